//! The orders service end to end, through the toolkit's public API only: its migrations beside
//! the toolkit's, events appended in its own transactions (a second placement refused), the
//! dispatcher publishing them to SNS, the queue subscribed to the topic delivering them (each
//! twice, the second order's events in reverse), and the toolkit's SQS sink applying them to the
//! service's read model once in effect.
//!
//! Needs PostgreSQL (`OUTBOX_TEST_DATABASE_URL`, a database it may create databases from) and
//! SNS/SQS (`AWS_ENDPOINT_URL`, moto): `scripts/dev-env up` starts both, `. .local/env` names
//! them. Without them it fails, it does not skip.

use std::str::FromStr;
use std::time::{Duration, Instant};

use orders::{place_order, ship_order, OrderPlaced, OrderShipped, CONSUMER};
use pg_outbox::aws::{sdk_config, BusPublisher};
use pg_outbox::dispatcher::{DispatcherConfig, OutboxDispatcher, Target};
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::projections::PgProjectionStore;
use pg_outbox::postgres::{DatabaseSettings, Db, TlsMode};
use pg_outbox::sqs::{ProjectionSink, SqsEvent, SqsMessage};
use pg_outbox::tokio_postgres;

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start PostgreSQL and moto with `scripts/dev-env up`, then `. .local/env`")
    })
}

async fn connect(settings: &DatabaseSettings) -> tokio_postgres::Client {
    settings.connect().await.expect("connect to PostgreSQL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_flow_from_append_to_the_read_model_once_in_effect() {
    // A database of its own.
    let admin_url = required("OUTBOX_TEST_DATABASE_URL");
    let endpoint = required("AWS_ENDPOINT_URL");
    let admin = DatabaseSettings::new(
        tokio_postgres::Config::from_str(&admin_url).expect("OUTBOX_TEST_DATABASE_URL"),
        TlsMode::Disable,
    );
    let name = format!("t_orders_{}", uuid::Uuid::new_v4().simple());
    connect(&admin)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create the test database");
    let settings = admin.with_dbname(&name);
    let mut client = connect(&settings).await;

    // The toolkit's migrations, then the service's, each in its own history table.
    let applied = orders::migrate(&mut client).await.expect("migrations");
    assert!(
        applied.iter().any(|m| m == "orders/V1__order_book"),
        "{applied:?}"
    );
    assert!(orders::migrate(&mut client).await.unwrap().is_empty());

    // The command side: three orders placed, one shipped; placing one again is refused.
    let placed = |tenant: &str, order: &str, total| OrderPlaced {
        tenant: tenant.into(),
        order_id: order.into(),
        total_minor: total,
    };
    let tx = client.transaction().await.unwrap();
    place_order(&tx, &placed("acme", "o-1", 1_250), "req-1")
        .await
        .unwrap();
    place_order(&tx, &placed("acme", "o-2", 990), "req-2")
        .await
        .unwrap();
    place_order(&tx, &placed("globex", "o-1", 40_000), "req-3")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let shipped = OrderShipped {
        tenant: "acme".into(),
        order_id: "o-2".into(),
        carrier: "DHL".into(),
    };
    assert_eq!(
        ship_order(&tx, &shipped, "req-4")
            .await
            .unwrap()
            .aggregate_version,
        2
    );
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let again = place_order(&tx, &placed("acme", "o-1", 1_250), "req-5").await;
    assert!(
        again.is_err_and(|e| e.is_duplicate()),
        "a second placement is refused"
    );
    drop(tx);

    // The bus: a topic, and a queue subscribed to it with raw delivery.
    let aws = sdk_config().await;
    let sns = aws_sdk_sns::Client::new(&aws);
    let sqs = aws_sdk_sqs::Client::new(&aws);
    let topic_arn = sns
        .create_topic()
        .name(format!("orders-{}", uuid::Uuid::new_v4().simple()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("create a topic on {endpoint}: {e:?}"))
        .topic_arn
        .unwrap();
    let queue_url = sqs
        .create_queue()
        .queue_name(format!("orders-{}", uuid::Uuid::new_v4().simple()))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    sns.subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(&queue_arn)
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .unwrap();

    // The dispatcher, as the service's scheduled function runs it.
    let publisher = BusPublisher::new(&aws, &Target::Sns { topic_arn })
        .await
        .unwrap();
    let dispatcher = OutboxDispatcher::new(
        PgOutboxStore::new(Db::new(settings.clone())),
        publisher,
        DispatcherConfig::default(),
        "orders-e2e",
    );
    let summary = dispatcher
        .drain(Instant::now() + Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!((summary.published, summary.dead), (4, 0), "{summary:?}");

    // What the queue holds: each message twice, acme/o-2's shipment before its placement.
    let mut bodies = Vec::new();
    let started = Instant::now();
    while bodies.len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "only {} messages",
            bodies.len()
        );
        let received = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap();
        bodies.extend(
            received
                .messages()
                .iter()
                .filter_map(|m| m.body().map(str::to_owned)),
        );
    }
    bodies.sort_by_key(|b| b.contains("order.placed"));
    let mut queue: Vec<String> = bodies.iter().chain(bodies.iter()).cloned().collect();

    // The toolkit's sink with the service's projections, as its sink binary runs it: a message
    // reported failed (the placement not applied yet) is delivered again, as SQS would.
    let sink = ProjectionSink::new(
        PgProjectionStore::new(Db::new(settings.clone()), orders::projections()),
        CONSUMER,
    );
    let mut rounds = 0;
    let mut applied = 0;
    while !queue.is_empty() {
        rounds += 1;
        assert!(rounds <= 10, "the sink did not converge");
        let batch: Vec<(String, String)> = queue
            .drain(..)
            .map(|body| (uuid::Uuid::new_v4().to_string(), body))
            .collect();
        let mut event = SqsEvent::default();
        event.records = batch
            .iter()
            .map(|(id, body)| {
                let mut message = SqsMessage::default();
                message.message_id = Some(id.clone());
                message.body = Some(body.clone());
                message
            })
            .collect();
        let (response, report) = sink.apply_batch(event).await;
        applied += report.applied;
        for failure in response.batch_item_failures {
            let (_, body) = batch
                .iter()
                .find(|(id, _)| *id == failure.item_identifier)
                .unwrap();
            queue.push(body.clone());
        }
    }
    assert_eq!(applied, 4, "each event applied once");

    let rows: Vec<(String, String, i64, String, Option<String>, i64)> = client
        .query(
            "SELECT tenant_id, order_id, total_minor, status, carrier, version
             FROM order_book ORDER BY tenant_id, order_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(
        rows,
        [
            ("acme".into(), "o-1".into(), 1_250, "placed".into(), None, 1),
            (
                "acme".into(),
                "o-2".into(),
                990,
                "shipped".into(),
                Some("DHL".into()),
                2
            ),
            (
                "globex".into(),
                "o-1".into(),
                40_000,
                "placed".into(),
                None,
                1
            ),
        ]
    );

    drop(client);
    connect(&admin)
        .await
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}
