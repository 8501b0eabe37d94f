//! (Past 400 lines: the large-event fixtures (a projection, its events, the extended-client reader) and the three end-to-end tests share them.)
//!
//! Claim check (`shared/src/claim_check.rs`): an event larger than the bus takes goes through S3
//! (moto) end to end, read by AWS's own extended client (PyPI `amazon-sqs-extended-client`), by
//! the projection sink and on NATS; S3 unavailable is a clear, retried error on both sides, and
//! nothing is lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use outbox_tests::aws::{self, moto_endpoint, receive};
use outbox_tests::nats::PrivateNats;
use outbox_tests::sink_fixtures::sqs_event;
use outbox_tests::{dispatcher, test_dispatcher_config, TestDb};
use pg_outbox::aws::s3::S3PayloadStore;
use pg_outbox::claim_check::{ClaimCheckSettings, SIZE_ATTRIBUTE};
use pg_outbox::consumer::{Projection, ProjectionError, Projections};
use pg_outbox::dispatcher::{ClaimCheck, DispatcherConfig, Target};
use pg_outbox::envelope::EventEnvelope;
use pg_outbox::outbox::EventMetadata;
use pg_outbox::postgres::projections::PgProjectionStore;
use pg_outbox::postgres::Db;
use pg_outbox::producer::{append, OutboxEvent};
use pg_outbox::sink::DeliveryError;
use projection_sink::ProjectionSink;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const MIB: usize = 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DocumentStored {
    #[serde(skip)]
    tenant: String,
    document_id: String,
    content: String,
}

impl OutboxEvent for DocumentStored {
    const EVENT_TYPE: &'static str = "document.stored";
    const SCHEMA_VERSION: i32 = 1;
    const AGGREGATE_TYPE: &'static str = "document";
    fn tenant_id(&self) -> &str {
        &self.tenant
    }
    fn aggregate_id(&self) -> &str {
        &self.document_id
    }
}

/// A read model of the documents: their sizes.
struct Documents;

impl Projection for Documents {
    fn name(&self) -> &str {
        "documents"
    }
    fn aggregate_type(&self) -> &str {
        "document"
    }
    fn handles(&self, event_type: &str) -> bool {
        event_type == "document.stored"
    }
    fn check(&self, event: &EventEnvelope) -> Result<(), DeliveryError> {
        event.decode::<DocumentStored>().map(|_| ())
    }
    fn apply<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'_>,
        events: &'a [&'a EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            for event in events {
                let e: DocumentStored = event.decode()?;
                tx.execute(
                    "INSERT INTO documents (tenant_id, document_id, bytes) VALUES ($1, $2, $3)",
                    &[&event.tenantid, &e.document_id, &(e.content.len() as i64)],
                )
                .await?;
            }
            Ok(())
        })
    }
}

async fn store_documents(db: &TestDb, sizes: &[(&str, usize)]) {
    let mut client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE documents (tenant_id text, document_id text, bytes bigint,
                                     PRIMARY KEY (tenant_id, document_id))",
        )
        .await
        .unwrap();
    for (id, size) in sizes {
        let tx = client.transaction().await.unwrap();
        let event = DocumentStored {
            tenant: "acme".into(),
            document_id: (*id).into(),
            content: "x".repeat(*size),
        };
        append(&tx, &event, &EventMetadata::new("docs", *id))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
}

fn claim_check(config: &aws_config::SdkConfig, bucket: &str) -> ClaimCheck {
    ClaimCheck {
        settings: ClaimCheckSettings {
            bucket: bucket.into(),
            threshold: None,
            prefix: "outbox/".into(),
        },
        store: Arc::new(S3PayloadStore::new(config)),
    }
}

fn sink(db: &TestDb) -> ProjectionSink<PgProjectionStore> {
    ProjectionSink::new(
        PgProjectionStore::new(
            Db::new(db.settings.clone()),
            Projections::new().with(Documents),
        ),
        "documents-sink",
    )
}

/// Reads `expected` messages of `queue` with AWS's extended client for Python (boto3, moto).
fn read_with_amazons_extended_client(
    queue_url: &str,
    bucket: &str,
    expected: usize,
) -> Vec<String> {
    let script = r#"
import json, sys, time
import sqs_extended_client  # replaces boto3's Session with the extended client's
import boto3
sqs = boto3.Session().client("sqs")
sqs.large_payload_support = sys.argv[2]
sqs.delete_payload_from_s3 = False
bodies, deadline = [], time.time() + 30
while len(bodies) < int(sys.argv[3]) and time.time() < deadline:
    for m in sqs.receive_message(QueueUrl=sys.argv[1], MaxNumberOfMessages=10,
                                 MessageAttributeNames=["All"], WaitTimeSeconds=1).get("Messages", []):
        bodies.append(m["Body"])
        sqs.delete_message(QueueUrl=sys.argv[1], ReceiptHandle=m["ReceiptHandle"])
json.dump(bodies, sys.stdout)
"#;
    let output = std::process::Command::new("python3")
        .args(["-c", script, queue_url, bucket, &expected.to_string()])
        .output()
        .expect("python3 runs (scripts/dev-env installs amazon-sqs-extended-client)");
    assert!(
        output.status.success(),
        "the extended client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn a_one_mib_event_goes_through_s3_to_amazons_extended_client_and_to_the_projection() {
    // Fault: an envelope over SNS's 256 KiB. Without the claim check it is dead on its first
    // claim and its aggregate parked; with it, it is stored in S3 and sent as a pointer.
    let db = TestDb::create().await;
    store_documents(&db, &[("big", MIB), ("small", 100)]).await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let bucket = aws::create_bucket(&config).await;
    let (topic_arn, sink_queue) = aws::topic_with_queue(&config, false, true).await;
    let library_queue = aws::create_queue(&config, false).await;
    aws_sdk_sns::Client::new(&config)
        .subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(&library_queue.arn)
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .unwrap();
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns { topic_arn },
        test_dispatcher_config(),
    )
    .await
    .with_claim_check(claim_check(&config, &bucket));
    let summary = d
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!((summary.published, summary.dead), (2, 0), "{summary:?}");

    // On the queue: the small event as it is, the large one as the extended clients' pointer.
    let messages = receive(
        &config,
        &sink_queue,
        2,
        Duration::from_secs(20),
        Duration::from_millis(300),
    )
    .await;
    let (pointers, inline): (Vec<_>, Vec<_>) = messages
        .iter()
        .partition(|m| m.attributes.contains_key(SIZE_ATTRIBUTE));
    assert_eq!((pointers.len(), inline.len()), (1, 1));
    let pointer: Value = serde_json::from_str(&pointers[0].body).unwrap();
    assert_eq!(
        pointer[0],
        "software.amazon.payloadoffloading.PayloadS3Pointer"
    );
    assert_eq!(pointer[1]["s3BucketName"], bucket.as_str());
    assert!(pointers[0].body.len() < 300);
    let size: usize = pointers[0].attributes[SIZE_ATTRIBUTE].parse().unwrap();
    assert!(size > MIB, "{size}");

    // AWS's own library reads the full envelope.
    let bodies = read_with_amazons_extended_client(&library_queue.url, &bucket, 2);
    assert_eq!(bodies.len(), 2);
    let big = bodies
        .iter()
        .map(|b| serde_json::from_str::<EventEnvelope>(b).unwrap())
        .find(|e| e.aggregateid == "big")
        .expect("the large event, resolved by the library");
    assert_eq!(big.data["content"].as_str().unwrap().len(), MIB);

    // The sink applies both to the projection, the large one read back from S3.
    let records: Vec<(String, String)> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("m{i}"), m.body.clone()))
        .collect();
    let (response, report) = sink(&db)
        .with_claim_check(Arc::new(S3PayloadStore::new(&config)))
        .apply_batch(sqs_event(&records))
        .await;
    assert!(response.batch_item_failures.is_empty(), "{report:?}");
    assert_eq!(report.applied, 2);
    let client = db.client().await;
    let sizes: Vec<(String, i64)> = client
        .query("SELECT document_id, bytes FROM documents ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        sizes,
        [("big".to_owned(), MIB as i64), ("small".to_owned(), 100)]
    );

    // The feed serves it from the database, in full.
    let page = pg_outbox::postgres::feed::page(
        &client,
        &pg_outbox::feed::FeedQuery {
            tenant: pg_outbox::ids::TenantId::parse("acme").unwrap(),
            after: pg_outbox::feed::FeedCursor { position: 0 },
            limit: 10,
            event_type: None,
            aggregate_id: Some("big".into()),
            created_from: None,
            created_to: None,
            consumer: None,
            exclude_acknowledged: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].data["content"].as_str().unwrap().len(), MIB);
}

#[tokio::test]
async fn s3_unavailable_is_a_clear_retried_error_on_both_sides_and_nothing_is_lost() {
    let db = TestDb::create().await;
    store_documents(&db, &[("big", 300 * 1024)]).await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let bucket = aws::create_bucket(&config).await;
    let (topic_arn, queue) = aws::topic_with_queue(&config, false, true).await;
    let nowhere = aws::sdk_config_for("http://127.0.0.1:9").await;

    // The dispatcher cannot store the envelope: a retry, not dead, nothing sent. (An outage
    // still counts attempts: with the test configuration's 3, how many a 5 s drain makes
    // depends on the SDK's own retries, so this drain may make many.)
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns {
            topic_arn: topic_arn.clone(),
        },
        DispatcherConfig {
            max_attempts: 1_000,
            ..test_dispatcher_config()
        },
    )
    .await
    .with_claim_check(claim_check(&nowhere, &bucket));
    let summary = d
        .drain(Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((summary.published, summary.dead), (0, 0), "{summary:?}");
    assert!(summary.retried >= 1, "{summary:?}");
    let client = db.client().await;
    let last_error: String = client
        .query_one("SELECT last_error FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        last_error.contains("claim check: storing s3://"),
        "{last_error}"
    );

    // S3 back: published, through S3.
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns { topic_arn },
        test_dispatcher_config(),
    )
    .await
    .with_claim_check(claim_check(&config, &bucket));
    let mut published = 0;
    let until = Instant::now() + Duration::from_secs(20);
    while published == 0 && Instant::now() < until {
        published += d
            .drain(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap()
            .published;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(published, 1);
    let message = receive(
        &config,
        &queue,
        1,
        Duration::from_secs(20),
        Duration::from_millis(300),
    )
    .await
    .remove(0);
    let records = [("m1".to_owned(), message.body.clone())];

    // A sink that cannot read S3, has no S3 access at all, or reads only another bucket (a
    // pointer anyone able to send to the queue could write) fails that message alone, so SQS
    // delivers it again; nothing is applied.
    let elsewhere = ClaimCheckSettings {
        bucket: "another-bucket".into(),
        threshold: None,
        prefix: "outbox/".into(),
    };
    for sink in [
        sink(&db).with_claim_check(Arc::new(S3PayloadStore::new(&nowhere))),
        sink(&db),
        sink(&db).with_claim_check(Arc::new(S3PayloadStore::new(&config).only(&elsewhere))),
    ] {
        let (response, report) = sink.apply_batch(sqs_event(&records)).await;
        assert_eq!(response.batch_item_failures.len(), 1, "{report:?}");
        assert_eq!(
            (report.applied, report.claim_check_failures),
            (0, 1),
            "{report:?}"
        );
    }
    assert_eq!(db.count(&client, "documents").await, 0);
    // The redelivery, with S3 back, applies it (reading only its own bucket).
    let own = ClaimCheckSettings {
        bucket: bucket.clone(),
        threshold: None,
        prefix: "outbox/".into(),
    };
    let (response, report) = sink(&db)
        .with_claim_check(Arc::new(S3PayloadStore::new(&config).only(&own)))
        .apply_batch(sqs_event(&records))
        .await;
    assert!(response.batch_item_failures.is_empty(), "{report:?}");
    assert_eq!(db.count(&client, "documents WHERE bytes = 307200").await, 1);
}

#[tokio::test]
async fn eventbridge_and_nats_carry_a_pointer_the_consumers_resolve() {
    // EventBridge's Detail must be an object: the envelope without data, with `dataref`. NATS
    // (max_payload 1 MiB by default) gets the extended clients' pointer with its header.
    let db = TestDb::create().await;
    store_documents(&db, &[("big", 300 * 1024)]).await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let bucket = aws::create_bucket(&config).await;
    let (bus_name, queue) = aws::bus_with_queue(&config).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::EventBridge { bus_name },
        test_dispatcher_config(),
    )
    .await
    .with_claim_check(claim_check(&config, &bucket));
    let summary = d
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!((summary.published, summary.dead), (1, 0), "{summary:?}");
    let message = receive(
        &config,
        &queue,
        1,
        Duration::from_secs(20),
        Duration::from_millis(300),
    )
    .await
    .remove(0);
    let event: Value = serde_json::from_str(&message.body).unwrap();
    assert!(event["detail"].get("data").is_none());
    let dataref = event["detail"]["dataref"].as_str().unwrap();
    assert!(
        dataref.starts_with(&format!("s3://{bucket}/outbox/acme/")),
        "{dataref}"
    );
    let (response, report) = sink(&db)
        .with_claim_check(Arc::new(S3PayloadStore::new(&config)))
        .apply_batch(sqs_event(&[("m1".into(), message.body)]))
        .await;
    assert!(response.batch_item_failures.is_empty(), "{report:?}");
    assert_eq!(report.applied, 1);

    // NATS, with a threshold of 100 KiB: the pointer and its header; `nats consume` applies it
    // with the envelope read back (a second database, the same event).
    let db = TestDb::create().await;
    store_documents(&db, &[("big", 300 * 1024)]).await;
    let nats = PrivateNats::start().await;
    nats.stream("CLAIMS", "claims", None).await;
    let mut offload = claim_check(&config, &bucket);
    offload.settings.threshold = Some(100 * 1024);
    let d = dispatcher(
        &db,
        "http://127.0.0.1:9",
        Target::Nats(nats.settings("claims")),
        test_dispatcher_config(),
    )
    .await
    .with_claim_check(offload);
    let summary = d
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!((summary.published, summary.dead), (1, 0), "{summary:?}");
    let on_stream = nats.messages("CLAIMS").await;
    assert_eq!(on_stream.len(), 1);
    let headers = on_stream[0].headers.as_ref().unwrap();
    assert!(headers.get(SIZE_ATTRIBUTE).is_some(), "{headers:?}");
    assert!(on_stream[0].payload.len() < 300);
    let js = nats.jetstream().await;
    let consumer = pg_outbox::nats::sink_consumer(&js, "CLAIMS", "docs", None, 5)
        .await
        .unwrap();
    let store = PgProjectionStore::new(
        Db::new(db.settings.clone()),
        Projections::new().with(Documents),
    );
    let payloads = S3PayloadStore::new(&config);
    let report = pg_outbox::nats::consume(
        &consumer,
        &store,
        Some(&payloads as &dyn pg_outbox::claim_check::PayloadStore),
        "docs",
        10,
        Duration::from_secs(1),
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    assert_eq!((report.received, report.acknowledged), (1, 1), "{report:?}");
    let client = db.client().await;
    assert_eq!(db.count(&client, "documents WHERE bytes = 307200").await, 1);
}
