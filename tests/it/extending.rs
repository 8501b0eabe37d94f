//! A second, made-up domain running next to the payment projections in one sink: a `customer`
//! aggregate with two event types appended by the service's own code in its own transaction,
//! published by the same dispatcher to SNS (moto), delivered through SQS, and applied by one sink
//! whose registry holds the customer projection beside `PaymentProjections`. The database, the
//! dispatcher and the queue come from this test crate's helpers (`outbox_tests`); the crate that
//! uses the toolkit's public API alone, outside this workspace, is `examples/orders`
//! (docs/extending.md). Nothing in `shared/` knows about customers.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use outbox_tests::aws::{self, moto_endpoint, receive};
use outbox_tests::sink_fixtures::sqs_event;
use outbox_tests::{dispatcher, test_dispatcher_config, TestDb};
use payments::projection::PaymentProjections;
use pg_outbox::consumer::{Projection, ProjectionError, Projections};
use pg_outbox::dispatcher::Target;
use pg_outbox::envelope::EventEnvelope;
use pg_outbox::outbox::EventMetadata;
use pg_outbox::postgres::projections::PgProjectionStore;
use pg_outbox::postgres::Db;
use pg_outbox::producer::{append, AppendError, OutboxEvent};
use pg_outbox::sink::DeliveryError;
use projection_sink::ProjectionSink;

// ---- the service's own events (what a team writes) ----------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CustomerRegistered {
    #[serde(skip)]
    tenant: String,
    customer_id: String,
    name: String,
    email: String,
}

impl OutboxEvent for CustomerRegistered {
    const EVENT_TYPE: &'static str = "customer.registered";
    const SCHEMA_VERSION: i32 = 1;
    const AGGREGATE_TYPE: &'static str = "customer";
    fn tenant_id(&self) -> &str {
        &self.tenant
    }
    fn aggregate_id(&self) -> &str {
        &self.customer_id
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CustomerRenamed {
    #[serde(skip)]
    tenant: String,
    customer_id: String,
    name: String,
}

impl OutboxEvent for CustomerRenamed {
    const EVENT_TYPE: &'static str = "customer.renamed";
    const SCHEMA_VERSION: i32 = 1;
    const AGGREGATE_TYPE: &'static str = "customer";
    fn tenant_id(&self) -> &str {
        &self.tenant
    }
    fn aggregate_id(&self) -> &str {
        &self.customer_id
    }
}

// ---- the service's own projection (what a team writes) ------------------------------------------

const DIRECTORY_TABLE: &str = "
    CREATE TABLE customer_directory (
        tenant_id    text   NOT NULL,
        customer_id  text   NOT NULL,
        name         text   NOT NULL,
        email        text   NOT NULL,
        renames      int    NOT NULL DEFAULT 0,
        version      bigint NOT NULL,
        PRIMARY KEY (tenant_id, customer_id))";

struct CustomerDirectory;

impl Projection for CustomerDirectory {
    fn name(&self) -> &str {
        "customer_directory"
    }
    fn aggregate_type(&self) -> &str {
        "customer"
    }
    fn handles(&self, event_type: &str) -> bool {
        matches!(event_type, "customer.registered" | "customer.renamed")
    }
    fn check(&self, event: &EventEnvelope) -> Result<(), DeliveryError> {
        match event.event_type.as_str() {
            "customer.registered" => event.decode::<CustomerRegistered>().map(|_| ()),
            _ => event.decode::<CustomerRenamed>().map(|_| ()),
        }
    }
    fn apply<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'_>,
        events: &'a [&'a EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            for event in events {
                if event.event_type == "customer.registered" {
                    let e: CustomerRegistered = event.decode()?;
                    tx.execute(
                        "INSERT INTO customer_directory (tenant_id, customer_id, name, email, version)
                         VALUES ($1, $2, $3, $4, $5)",
                        &[&event.tenantid, &e.customer_id, &e.name, &e.email, &event.aggregateversion],
                    )
                    .await?;
                } else {
                    let e: CustomerRenamed = event.decode()?;
                    tx.execute(
                        "UPDATE customer_directory SET name = $3, renames = renames + 1, version = $4
                         WHERE tenant_id = $1 AND customer_id = $2",
                        &[&event.tenantid, &e.customer_id, &e.name, &event.aggregateversion],
                    )
                    .await?;
                }
            }
            Ok(())
        })
    }
}

// ---- the test -------------------------------------------------------------------------------------

/// The service's own write: a `customers` row and its event, one transaction.
async fn register(client: &mut tokio_postgres::Client, tenant: &str, id: &str, commit: bool) {
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO customers (tenant_id, customer_id) VALUES ($1, $2)",
        &[&tenant, &id],
    )
    .await
    .unwrap();
    let event = CustomerRegistered {
        tenant: tenant.into(),
        customer_id: id.into(),
        name: format!("{id} Lovelace"),
        email: format!("{id}@example.com"),
    };
    let appended = append(
        &tx,
        &event,
        &EventMetadata::new("crm", format!("signup-{id}")),
    )
    .await
    .unwrap();
    assert_eq!(appended.aggregate_version, 1);
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
}

#[tokio::test]
async fn a_second_domain_goes_end_to_end_beside_the_payment_projections_in_one_sink() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE customers (tenant_id text, customer_id text, PRIMARY KEY (tenant_id, customer_id));
             {DIRECTORY_TABLE}"
        ))
        .await
        .unwrap();

    // 6 customers over two tenants, each renamed 0–2 times; one registration rolled back.
    let mut expected = Vec::new();
    for c in 0..6 {
        let tenant = ["acme", "globex"][c % 2];
        let id = format!("cus_{c}");
        register(&mut client, tenant, &id, true).await;
        let mut name = format!("{id} Lovelace");
        for r in 0..c % 3 {
            name = format!("{id} Byron {r}");
            let tx = client.transaction().await.unwrap();
            let event = CustomerRenamed {
                tenant: tenant.into(),
                customer_id: id.clone(),
                name: name.clone(),
            };
            let appended = append(&tx, &event, &EventMetadata::default())
                .await
                .unwrap();
            assert_eq!(
                appended.aggregate_version,
                r as i64 + 2,
                "versions assigned in order"
            );
            tx.commit().await.unwrap();
        }
        expected.push(format!(
            "{tenant}/{id}: {name} ({} renames, v{})",
            c % 3,
            c % 3 + 1
        ));
    }
    register(&mut client, "acme", "cus_rolled_back", false).await;

    // An idempotency key refuses a second append of the same fact, with a typed error.
    struct Keyed(CustomerRenamed);
    impl Serialize for Keyed {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.0.serialize(s)
        }
    }
    impl OutboxEvent for Keyed {
        const EVENT_TYPE: &'static str = "customer.renamed";
        const SCHEMA_VERSION: i32 = 1;
        const AGGREGATE_TYPE: &'static str = "customer";
        fn tenant_id(&self) -> &str {
            &self.0.tenant
        }
        fn aggregate_id(&self) -> &str {
            &self.0.customer_id
        }
        fn idempotency_key(&self) -> Option<&str> {
            Some("rename-request-1")
        }
    }
    let keyed = Keyed(CustomerRenamed {
        tenant: "acme".into(),
        customer_id: "cus_0".into(),
        name: "cus_0 Final".into(),
    });
    let tx = client.transaction().await.unwrap();
    append(&tx, &keyed, &EventMetadata::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let second = append(&tx, &keyed, &EventMetadata::default()).await;
    assert!(matches!(&second, Err(e) if e.is_duplicate()), "{second:?}");
    drop(tx);
    expected[0] = "acme/cus_0: cus_0 Final (1 renames, v2)".into();
    // Empty ids are refused before the database sees them.
    let tx = client.transaction().await.unwrap();
    let empty = CustomerRenamed {
        tenant: "acme".into(),
        customer_id: " ".into(),
        name: "x".into(),
    };
    assert!(matches!(
        append(&tx, &empty, &EventMetadata::default()).await,
        Err(AppendError::Empty {
            field: "aggregate id",
            ..
        })
    ));
    drop(tx);

    // Published by the same dispatcher, to SNS with an SQS subscription (raw delivery).
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let (topic_arn, queue) = aws::topic_with_queue(&config, false, true).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns { topic_arn },
        test_dispatcher_config(),
    )
    .await;
    let mut published = 0;
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let summary = d
            .drain(Instant::now() + Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            summary.dead, 0,
            "the producer's rows make envelopes: {summary:?}"
        );
        published += summary.published;
        if summary.claimed == 0 {
            break;
        }
    }
    let events = db.count(&client, "outbox").await as usize;
    assert_eq!(
        events,
        6 + 6 + 1,
        "6 registrations, 6 renames, 1 keyed rename"
    );
    assert_eq!(published, events);
    let metadata: serde_json::Value = client
        .query_one(
            "SELECT metadata FROM outbox WHERE event_type = 'customer.renamed' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        metadata["source"], "database",
        "defaults filled in: {metadata}"
    );

    // Applied by the same sink with the service's projection registered next to the payments'.
    let messages = receive(
        &config,
        &queue,
        events,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    let projections = Projections::new()
        .with(PaymentProjections)
        .with(CustomerDirectory);
    let sink = ProjectionSink::new(
        PgProjectionStore::new(Db::new(db.settings.clone()), projections),
        "crm-directory",
    );
    // Delivered in reverse, twice over: gaps are redelivered, duplicates change nothing.
    let mut pending: Vec<(String, String)> = messages
        .iter()
        .rev()
        .chain(messages.iter())
        .map(|m| (uuid::Uuid::new_v4().to_string(), m.body.clone()))
        .collect();
    let (mut applied, mut duplicates, mut gaps, mut rounds) = (0, 0, 0, 0);
    while !pending.is_empty() {
        rounds += 1;
        assert!(rounds < 100, "sink did not converge");
        let batch: Vec<(String, String)> = pending.drain(..pending.len().min(10)).collect();
        let (response, report) = sink.apply_batch(sqs_event(&batch)).await;
        assert!(report.store_failure.is_none());
        let failed: HashSet<String> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect();
        applied += report.applied;
        duplicates += report.duplicates + report.stale;
        gaps += failed.len();
        pending.extend(batch.into_iter().filter(|(id, _)| failed.contains(id)));
    }
    assert_eq!(applied, events, "each event applied once");
    assert_eq!(
        duplicates, events,
        "each second copy acknowledged, changing nothing"
    );
    assert!(gaps > 0, "reverse order must have produced gaps: {gaps}");

    let rows = db
        .texts(
            &client,
            "SELECT tenant_id || '/' || customer_id || ': ' || name || ' (' || renames || ' renames, v'
                    || version || ')'
             FROM customer_directory ORDER BY customer_id",
        )
        .await;
    assert_eq!(rows, expected);
}
