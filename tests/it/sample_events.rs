//! Every committed sample under `events/payment-command/` parses into the handler's input type,
//! and replaying them in order against a fresh database gives the status each is there to show.

use aws_lambda_events::apigw::ApiGatewayV2httpRequest;
use outbox_tests::{invoke, sample_files, typed, TestDb};

/// File name → the status the sample must produce when the samples run in name order.
const EXPECTED: &[(&str, i64)] = &[
    ("01-paid.json", 200),
    ("02-paid-replay.json", 200),
    ("03-paid-conflict.json", 409),
    ("04-refund.json", 201),
    ("05-refund-replay.json", 200),
    ("06-refund-exceeds.json", 422),
    ("07-refund-unknown-payment.json", 404),
    ("08-paid-invalid-amount.json", 400),
    ("09-paid-malformed-json.json", 400),
    ("10-refund-missing-idempotency-key.json", 400),
    ("11-paid-no-tenant.json", 401),
    ("12-paid-second-payment-usd.json", 200),
];

#[tokio::test]
async fn every_payment_command_sample_parses_and_gets_its_status() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    let files = sample_files("payment-command");
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let expected: Vec<&str> = EXPECTED.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names, expected,
        "every sample needs an expected status here, and vice versa"
    );

    for (path, (name, status)) in files.iter().zip(EXPECTED) {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let request: ApiGatewayV2httpRequest = typed(json);
        let reply = invoke(&handler, request).await;
        assert_eq!(reply.status, *status, "{name}: {}", reply.body);
        if *status >= 400 {
            assert!(
                reply.body["error"]["code"].is_string(),
                "{name}: {}",
                reply.body
            );
        }
    }

    let client = db.client().await;
    // 01 and 12 paid two payments, 04 refunded one: three events, nothing from the rest.
    assert_eq!(db.count(&client, "outbox").await, 3);
    assert_eq!(db.count(&client, "payments").await, 2);
    assert_eq!(db.count(&client, "refunds").await, 1);
}

#[tokio::test]
async fn every_dispatcher_sample_parses_and_drains_the_outbox() {
    use lambda_runtime::{Context, LambdaEvent};
    use outbox_dispatcher::ScheduledEvent;
    use pg_outbox::dispatcher::{StopReason, Target};

    let db = TestDb::create().await;
    let handler = db.payment_handler();
    let first = outbox_tests::sample_json("payment-command", "01-paid.json");
    assert_eq!(invoke(&handler, typed(first)).await.status, 200);

    let endpoint = outbox_tests::aws::moto_endpoint();
    let config = outbox_tests::aws::sdk_config_for(&endpoint).await;
    let topic_arn = outbox_tests::aws::create_topic(&config, false).await;
    let dispatcher = outbox_tests::dispatcher(
        &db,
        &endpoint,
        Target::Sns { topic_arn },
        outbox_tests::test_dispatcher_config(),
    )
    .await;
    let files = sample_files("outbox-dispatcher");
    assert!(!files.is_empty());
    for (i, path) in files.iter().enumerate() {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let event: ScheduledEvent = typed(json);
        let mut context = Context::default();
        let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(30);
        context.deadline = deadline
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let summary = outbox_dispatcher::handle(&dispatcher, LambdaEvent::new(event, context))
            .await
            .unwrap();
        assert_eq!(
            summary.stopped,
            Some(StopReason::Empty),
            "{}",
            path.display()
        );
        assert_eq!(summary.published, usize::from(i == 0), "{}", path.display());
    }
}
