//! One trace from command to projection: a command sent with a W3C `traceparent` is appended,
//! published to SNS, delivered through SQS and applied by the sink, whose span for each event is
//! a child of the producer's, exported by OTLP/HTTP to a real receiver
//! (`tests/otlp/receiver.py`, decoding with the OpenTelemetry project's protobuf messages).

use std::io::BufRead;
use std::time::{Duration, Instant};

use outbox_tests::aws::{self, moto_endpoint, receive};
use outbox_tests::sink_fixtures::{self, sqs_event};
use outbox_tests::{dispatcher, invoke, paid_body, paid_request, test_dispatcher_config, TestDb};
use pg_outbox::dispatcher::Target;
use serde_json::Value;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_commands_trace_continues_in_the_sinks_spans_exported_by_otlp() {
    // The receiver, on a port of its own; its spans go to a file.
    let spans_file = std::env::temp_dir().join(format!("spans-{}.jsonl", uuid::Uuid::new_v4()));
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("otlp/receiver.py");
    let mut receiver = std::process::Command::new("python3")
        .arg(script)
        .arg(&spans_file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/dev-env installs opentelemetry-proto)");
    let mut port = String::new();
    std::io::BufReader::new(receiver.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let port: u16 = port.trim().parse().expect("the receiver's port");
    // This process's telemetry, as a function's with OTLP configured (nextest runs each test in
    // a process of its own).
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{port}"),
    );
    std::env::set_var("OTEL_SERVICE_NAME", "payments");
    pg_outbox::telemetry::init_tracing();

    let db = TestDb::create().await;
    let handler = db.payment_handler();
    let mut request = paid_request("acme", "pay_t", paid_body(1_000, "EUR"));
    request.headers.insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT}-01").parse().unwrap(),
    );
    let reply = invoke(&handler, request).await;
    assert_eq!(reply.status, 200, "{reply:?}");

    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let (topic_arn, queue) = aws::topic_with_queue(&config, false, true).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns { topic_arn },
        test_dispatcher_config(),
    )
    .await;
    let summary = d
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(summary.published, 1);
    let message = receive(
        &config,
        &queue,
        1,
        Duration::from_secs(20),
        Duration::from_millis(300),
    )
    .await
    .remove(0);
    let (response, report) = sink_fixtures::sink(&db)
        .apply_batch(sqs_event(&[("m1".into(), message.body)]))
        .await;
    assert!(response.batch_item_failures.is_empty(), "{report:?}");
    assert_eq!(report.applied, 1);
    pg_outbox::telemetry::flush_traces().await;

    // The receiver got the command's span and the sink's, one trace.
    let until = Instant::now() + Duration::from_secs(10);
    let spans: Vec<Value> = loop {
        let spans: Vec<Value> = std::fs::read_to_string(&spans_file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let both = ["apply event", "POST /payments/{paymentId}/paid"]
            .iter()
            .all(|name| spans.iter().any(|s| s["name"] == *name));
        if both || Instant::now() > until {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = receiver.kill();
    let _ = receiver.wait();
    let named =
        |name: &str| -> Vec<&Value> { spans.iter().filter(|s| s["name"] == name).collect() };
    // The command's span: in the caller's trace, the caller's span its parent, a server span.
    let commands = named("POST /payments/{paymentId}/paid");
    assert_eq!(commands.len(), 1, "spans received: {spans:#?}");
    let command = commands[0];
    assert_eq!(command["trace_id"], TRACE_ID, "{command:#}");
    assert_eq!(command["parent_span_id"], PARENT, "{command:#}");
    assert_eq!(command["kind"], 2, "a server span: {command:#}");
    // The sink's span for the event: in the same trace, the command's span its parent.
    let applied = named("apply event");
    assert_eq!(applied.len(), 1, "spans received: {spans:#?}");
    let span = applied[0];
    assert_eq!(span["trace_id"], TRACE_ID, "{span:#}");
    assert_eq!(span["parent_span_id"], command["span_id"], "{span:#}");
    assert_eq!(span["service"], "payments");
    assert_eq!(span["kind"], 5, "a consumer span: {span:#}");
    assert_eq!(span["attributes"]["event_type"], "payment.paid");
    assert_eq!(span["attributes"]["outcome"], "applied");
    assert_eq!(span["attributes"]["trace_id"], TRACE_ID);
}
