//! (Past 400 lines: the checker harness, its refusal cases and the channel, sample and append tests share one set of fixtures.)
//!
//! Event contracts: the committed schemas (`schemas/`) are the Rust types', and every event a
//! consumer gets, on every channel, keeps them and the CloudEvents rules. The envelopes are
//! checked by a standard validator and the CloudEvents SDK (`tests/contracts/check_events.py`:
//! PyPI `jsonschema` with formats, `cloudevents`), as received: SNS raw and wrapped (through
//! SQS), EventBridge (through SQS), NATS JetStream, the events feed, and the sink's samples.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outbox_tests::aws::{self, moto_endpoint, receive};
use outbox_tests::nats::PrivateNats;
use outbox_tests::{
    dispatcher, invoke, paid_body, paid_request, refund_request, sample_files,
    test_dispatcher_config, TestDb,
};
use pg_outbox::contract::{self, Contract, JsonSchema};
use pg_outbox::dispatcher::Target;
use pg_outbox::feed::{FeedCursor, FeedQuery};
use pg_outbox::ids::TenantId;
use pg_outbox::outbox::EventMetadata;
use pg_outbox::producer::{self, OutboxEvent};
use serde::Serialize;
use serde_json::{json, Value};

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

#[test]
fn the_committed_schemas_are_the_types() {
    // Regenerate with `make schemas` (UPDATE_SCHEMAS=1); a breaking change gets a new version.
    let written = contract::check_dir(&schemas_dir(), &payments::domain::events::contracts());
    match written {
        Ok(changed) if std::env::var("UPDATE_SCHEMAS").is_ok_and(|v| v == "1") => {
            eprintln!("schemas written: {changed:?}")
        }
        Ok(changed) => assert!(changed.is_empty()),
        Err(e) => panic!("{e}"),
    }
}

/// A service's own event, as a team writes it: its contract comes from the same derive.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("additionalProperties" = false))]
struct OrderPlaced {
    #[serde(skip)]
    tenant: String,
    /// The order.
    order_id: String,
    /// Its total, in minor units.
    #[schemars(range(min = 1))]
    total_minor: i64,
}

impl OutboxEvent for OrderPlaced {
    const EVENT_TYPE: &'static str = "order.placed";
    const SCHEMA_VERSION: i32 = 1;
    const AGGREGATE_TYPE: &'static str = "order";
    fn tenant_id(&self) -> &str {
        &self.tenant
    }
    fn aggregate_id(&self) -> &str {
        &self.order_id
    }
}

/// What the checker said of each envelope.
#[derive(Debug)]
struct Report {
    checked: u64,
    passed: u64,
    errors: BTreeMap<String, Vec<String>>,
}

/// Runs the checker on `bodies` (name, body as received) with the schemas of `dirs`.
fn check(bodies: &[(String, String)], dirs: &[&Path]) -> Report {
    let work = tempdir();
    let manifest = work.join("manifest.json");
    let list: Vec<Value> = bodies
        .iter()
        .map(|(name, body)| json!({"name": name, "body": body}))
        .collect();
    std::fs::write(&manifest, serde_json::to_vec(&list).unwrap()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("contracts/check_events.py");
    let mut command = std::process::Command::new("python3");
    command.arg(script);
    for dir in dirs {
        command.arg("--schemas").arg(dir);
    }
    let output = command
        .arg(&manifest)
        .output()
        .expect("python3 runs (scripts/dev-env installs jsonschema and cloudevents)");
    assert!(
        output.status.success(),
        "the checker failed to run: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("the checker's report");
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in report["envelopes"].as_array().unwrap() {
        let list: Vec<String> = serde_json::from_value(e["errors"].clone()).unwrap();
        errors
            .entry(e["name"].as_str().unwrap().to_owned())
            .or_default()
            .extend(list);
    }
    Report {
        checked: report["checked"].as_u64().unwrap(),
        passed: report["passed"].as_u64().unwrap(),
        errors,
    }
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("contracts-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The service's own contracts, written where the checker reads them.
fn own_contracts() -> PathBuf {
    let dir = tempdir();
    for (name, text) in contract::files(&[Contract::for_event::<OrderPlaced>()]).unwrap() {
        if name != contract::ENVELOPE_FILE {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }
    dir
}

/// A valid envelope of `payment.paid`, to spoil one attribute at a time.
fn good_envelope() -> Value {
    json!({
        "specversion": "1.0", "id": "0190d4c8-5f8e-7c6a-9b1e-3f2a1b0c4d5e", "source": "payments",
        "type": "payment.paid", "schemaversion": 1, "subject": "payment/pay_1",
        "time": "2026-12-01T09:00:00Z", "datacontenttype": "application/json",
        "tenantid": "acme", "aggregatetype": "payment", "aggregateid": "pay_1",
        "aggregateversion": 1, "correlationid": "c1",
        "data": {"paymentId": "pay_1", "amountMinor": 1000, "currency": "EUR",
                 "verificationMethod": "card_3ds", "verifiedBy": "acs", "paidAt": "2026-12-01T09:00:00Z"}
    })
}

#[test]
fn the_checker_refuses_what_breaks_the_contract_or_the_spec() {
    // Tried, one flaw each: a version beyond CloudEvents' Integer, a source that is no
    // URI-reference, an invalid traceparent, a tracestate alone, an extension name with an
    // underscore, an amount as a string, an unknown currency, an unknown member in data, a float
    // attribute, no schema for the type, specversion 0.3, not JSON at all.
    let mut cases: Vec<(&str, Value, &str)> = Vec::new();
    let spoil = |f: &dyn Fn(&mut Value)| {
        let mut e = good_envelope();
        f(&mut e);
        e
    };
    cases.push((
        "version",
        spoil(&|e| e["aggregateversion"] = 3_000_000_000i64.into()),
        "Integer range",
    ));
    cases.push((
        "source",
        spoil(&|e| e["source"] = "capture:Sales.Order Lines".into()),
        "URI-reference",
    ));
    cases.push((
        "traceparent",
        spoil(&|e| {
            e["traceparent"] = "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()
        }),
        "W3C",
    ));
    cases.push((
        "tracestate",
        spoil(&|e| e["tracestate"] = "k=v".into()),
        "without a traceparent",
    ));
    cases.push((
        "extension",
        spoil(&|e| e["aggregate_id"] = "x".into()),
        "lowercase letters and numbers",
    ));
    cases.push((
        "amount",
        spoil(&|e| e["data"]["amountMinor"] = "1000".into()),
        "data schema",
    ));
    cases.push((
        "currency",
        spoil(&|e| e["data"]["currency"] = "ZZZ".into()),
        "data schema",
    ));
    cases.push((
        "member",
        spoil(&|e| e["data"]["note"] = "x".into()),
        "data schema",
    ));
    cases.push((
        "float",
        spoil(&|e| e["schemaversion"] = 1.5.into()),
        "not a CloudEvents type",
    ));
    cases.push((
        "type",
        spoil(&|e| e["type"] = "payment.lost".into()),
        "no schema for payment.lost",
    ));
    cases.push((
        "specversion",
        spoil(&|e| e["specversion"] = "0.3".into()),
        "specversion",
    ));
    let mut bodies: Vec<(String, String)> = cases
        .iter()
        .map(|(name, e, _)| (name.to_string(), e.to_string()))
        .collect();
    bodies.push(("not json".into(), "{not json".into()));
    bodies.push(("good".into(), good_envelope().to_string()));
    let report = check(&bodies, &[&schemas_dir()]);
    assert_eq!(report.checked, bodies.len() as u64);
    assert_eq!(report.passed, 1, "{:#?}", report.errors);
    assert!(
        report.errors["good"].is_empty(),
        "{:?}",
        report.errors["good"]
    );
    assert!(report.errors["not json"][0].contains("not JSON"));
    for (name, _, rule) in &cases {
        let found = &report.errors[*name];
        assert!(
            found.iter().any(|e| e.contains(rule)),
            "{name}: expected an error about {rule:?}, got {found:?}"
        );
    }
}

/// Every envelope consumers get, on every channel, keeps the contract and the spec: events of
/// the payment commands (one with an invalid traceparent, one with a valid one, API Gateway
/// request ids ending in `=`), a service's own event appended through the API, and rows a SQL
/// producer wrote with a source no URI can hold and an invalid traceparent.
#[tokio::test]
async fn every_envelope_on_every_channel_keeps_the_contract_and_the_spec() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let invalid = "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request_ids = Vec::new();
    for (i, mut request) in [
        paid_request("acme", "pay_a", paid_body(1_000, "EUR")),
        paid_request("acme", "pay_b", paid_body(2_500, "JPY")),
        refund_request("acme", "pay_a", "refund-1", 400),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("Jx1aAbCdEFAEMp{i}=");
        request.request_context.request_id = Some(id.clone());
        let traceparent = if i == 0 { invalid } else { valid };
        request
            .headers
            .insert("traceparent", traceparent.parse().unwrap());
        request.headers.insert("tracestate", "k=v".parse().unwrap());
        let reply = invoke(&handler, request).await;
        assert!(reply.status < 300, "{reply:?}");
        request_ids.push(id);
    }
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    let metadata = EventMetadata {
        correlation_id: "order-flow".into(),
        causation_id: None,
        traceparent: Some(valid.into()),
        tracestate: None,
        xray_trace_header: None,
        source: "urn:shop:orders".into(),
    };
    let order = OrderPlaced {
        tenant: "acme".into(),
        order_id: "o-1".into(),
        total_minor: 990,
    };
    producer::append(&tx, &order, &metadata).await.unwrap();
    tx.commit().await.unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata)
             VALUES (gen_random_uuid(), 'acme', 'order', 'o-2', 'order.placed', 1,
                     '{{\"orderId\": \"o-2\", \"totalMinor\": 5}}',
                     '{{\"correlation_id\": \"sql\", \"source\": \"capture:Sales.Order Lines\",
                        \"traceparent\": \"{invalid}\", \"tracestate\": \"k=v\"}}')"
        ))
        .await
        .unwrap();
    let events = 5;

    // SNS, to a raw and a wrapped subscription; then EventBridge and NATS after a replay each.
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let (topic_arn, raw_queue) = aws::topic_with_queue(&config, false, true).await;
    let wrapped_queue = aws::create_queue(&config, false).await;
    aws_sdk_sns::Client::new(&config)
        .subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(&wrapped_queue.arn)
        .send()
        .await
        .unwrap();
    let (bus_name, bus_queue) = aws::bus_with_queue(&config).await;
    let nats = PrivateNats::start().await;
    nats.stream("CONTRACTS", "contracts", None).await;
    let mut bodies: Vec<(String, String)> = Vec::new();
    for (round, target) in [
        Target::Sns { topic_arn },
        Target::EventBridge { bus_name },
        Target::Nats(nats.settings("contracts")),
    ]
    .into_iter()
    .enumerate()
    {
        if round > 0 {
            client
                .execute(
                    "SELECT outbox_replay(ARRAY(SELECT id FROM outbox WHERE status = 'published'))",
                    &[],
                )
                .await
                .unwrap();
        }
        let d = dispatcher(&db, &moto_endpoint(), target, test_dispatcher_config()).await;
        let summary = d
            .drain(Instant::now() + Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            (summary.published, summary.dead),
            (events, 0),
            "{summary:?}"
        );
        // The SQL row's invalid traceparent went out left out, counted (the command's was
        // refused by the handler already, so never stored).
        assert_eq!(summary.trace_contexts_dropped, 1, "{summary:?}");
    }
    let wait = Duration::from_secs(20);
    let quiet = Duration::from_millis(300);
    for (channel, queue) in [
        ("sns-raw", &raw_queue),
        ("sns-wrapped", &wrapped_queue),
        ("eventbridge", &bus_queue),
    ] {
        for (i, m) in receive(&config, queue, events, wait, quiet)
            .await
            .into_iter()
            .enumerate()
        {
            bodies.push((format!("{channel} {i}"), m.body));
        }
    }
    for (i, m) in nats.messages("CONTRACTS").await.into_iter().enumerate() {
        bodies.push((
            format!("nats {i}"),
            String::from_utf8(m.payload.to_vec()).unwrap(),
        ));
    }
    let page = pg_outbox::postgres::feed::page(
        &client,
        &FeedQuery {
            tenant: TenantId::parse("acme").unwrap(),
            after: FeedCursor { position: 0 },
            limit: 100,
            event_type: None,
            aggregate_id: None,
            created_from: None,
            created_to: None,
            consumer: None,
            exclude_acknowledged: false,
        },
    )
    .await
    .unwrap();
    for (i, envelope) in page.events.iter().enumerate() {
        bodies.push((
            format!("feed {i}"),
            serde_json::to_string(envelope).unwrap(),
        ));
    }
    assert_eq!(
        bodies.len(),
        5 * events,
        "every channel carried every event"
    );

    let report = check(&bodies, &[&schemas_dir(), &own_contracts()]);
    assert_eq!(report.checked, bodies.len() as u64);
    let failed: BTreeMap<_, _> = report
        .errors
        .iter()
        .filter(|(_, e)| !e.is_empty())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(report.passed, bodies.len() as u64);

    // What the envelopes say: the SQL row's source made a URI-reference, the invalid trace
    // context left out, the valid one kept, the causation id the request id as API Gateway sent it.
    let envelopes: Vec<Value> = page
        .events
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    let of = |aggregate: &str, version: i64| {
        envelopes
            .iter()
            .find(|e| e["aggregateid"] == aggregate && e["aggregateversion"] == version)
            .unwrap()
            .clone()
    };
    assert_eq!(of("o-2", 1)["source"], "capture:Sales.Order%20Lines");
    // EventBridge's Source is the same text, so a rule on Source and one on detail.source agree.
    let on_the_bus: Value = bodies
        .iter()
        .filter(|(name, _)| name.starts_with("eventbridge"))
        .map(|(_, body)| serde_json::from_str::<Value>(body).unwrap())
        .find(|event| event["detail"]["aggregateid"] == "o-2")
        .unwrap();
    assert_eq!(on_the_bus["source"], "capture:Sales.Order%20Lines");
    assert!(of("o-2", 1).get("traceparent").is_none() && of("o-2", 1).get("tracestate").is_none());
    assert!(of("pay_a", 1).get("traceparent").is_none());
    assert_eq!(of("pay_b", 1)["traceparent"], valid);
    assert_eq!(of("pay_b", 1)["tracestate"], "k=v");
    assert_eq!(of("pay_a", 1)["causationid"], request_ids[0].as_str());
    assert_eq!(of("pay_a", 2)["causationid"], request_ids[2].as_str());
}

#[test]
fn every_sample_delivery_of_the_sink_keeps_the_contract_but_the_malformed_ones() {
    // malformed.json mixes one good delivery (its record 1) with text that is not JSON, an
    // object that is no envelope, schema version 7 and an event type no producer publishes.
    let mut bodies = Vec::new();
    for file in sample_files("projection-sink") {
        let event: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (i, record) in event["Records"].as_array().unwrap().iter().enumerate() {
            bodies.push((
                format!("{name} {i}"),
                record["body"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let report = check(&bodies, &[&schemas_dir()]);
    assert_eq!(report.checked, bodies.len() as u64);
    let failing: Vec<&String> = report
        .errors
        .iter()
        .filter(|(_, e)| !e.is_empty())
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        failing,
        [
            "malformed.json 0",
            "malformed.json 2",
            "malformed.json 3",
            "malformed.json 4"
        ],
        "{:#?}",
        report.errors
    );
    assert_eq!(report.passed, bodies.len() as u64 - 4, "{report:?}");
}

#[tokio::test]
async fn what_cannot_be_a_cloudevent_is_refused_at_append_and_a_stored_one_goes_dead_alone() {
    // Migration V12: a version beyond CloudEvents' Integer, an empty source; refused by a trigger
    // that fires in a replica-role session too. A row stored before V12 (here: with the trigger
    // disabled) goes dead with its reason when claimed, and the claim, the record and the other
    // aggregates' events go on.
    let db = TestDb::create().await;
    let client = db.client().await;
    let insert = |aggregate: &str, version: &str, source: &str| {
        format!(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata {})
             VALUES (gen_random_uuid(), 'acme', 'order', '{aggregate}', 'order.placed', 1, '{{}}',
                     '{{\"correlation_id\": \"c\", \"source\": \"{source}\"}}' {})",
            if version.is_empty() {
                ""
            } else {
                ", aggregate_version"
            },
            if version.is_empty() {
                String::new()
            } else {
                format!(", {version}")
            },
        )
    };
    let err = client
        .batch_execute(&insert("o-1", "", ""))
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("metadata source is empty"),
        "{err:?}"
    );
    // The append trigger refuses any version but the next; a session that skips ordinary
    // triggers (as a restore does) still meets this one.
    let err = client
        .batch_execute(&format!(
            "SET session_replication_role = replica; {}",
            insert("o-1", "2147483648", "orders")
        ))
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("beyond CloudEvents"), "{err:?}");
    client
        .batch_execute("RESET session_replication_role")
        .await
        .unwrap();
    assert_eq!(db.count(&client, "outbox").await, 0, "nothing was written");

    for sql in [
        "ALTER TABLE outbox DISABLE TRIGGER outbox_is_a_cloudevent".to_owned(),
        insert("o-legacy", "", ""),
        insert("o-legacy", "", "orders"),
        "ALTER TABLE outbox ENABLE ALWAYS TRIGGER outbox_is_a_cloudevent".to_owned(),
        insert("o-2", "", "orders"),
    ] {
        client.batch_execute(&sql).await.unwrap();
    }
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let topic_arn = aws::create_topic(&config, false).await;
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
    assert_eq!((summary.published, summary.dead), (1, 1), "{summary:?}");
    let dead: String = client
        .query_one("SELECT last_error FROM outbox WHERE status = 'dead'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(dead.contains("source is empty"), "{dead}");
    // Its successor waits behind it, as behind any dead event; it is still an update away from
    // being claimable (a discard), which the trigger does not refuse.
    let parked = db
        .count(
            &client,
            "outbox WHERE aggregate_id = 'o-legacy' AND status = 'pending'",
        )
        .await;
    assert_eq!(parked, 1);
    client
        .execute(
            "SELECT outbox_discard(ARRAY(SELECT id FROM outbox WHERE status = 'dead'), 'no source')",
            &[],
        )
        .await
        .unwrap();
    let summary = d
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!((summary.published, summary.dead), (1, 0), "{summary:?}");
}
