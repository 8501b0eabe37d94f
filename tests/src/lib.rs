//! (Past 400 lines: the harness every integration test and benchmark imports; its parts are re-exported modules too.)
//!
//! Harness shared by the integration tests and the benchmarks: a fresh, migrated database per test
//! on the local PostgreSQL, and loaders for the committed sample events under `events/`.
//!
//! The tests need a running PostgreSQL: `scripts/dev-env up` starts one and writes
//! `OUTBOX_TEST_DATABASE_URL` to `.local/env`. Without it they fail with a message, never skip.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use aws_lambda_events::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use aws_lambda_events::encodings::Body;
use lambda_runtime::{Context, LambdaEvent};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_postgres::Client;

use payment_command::{HandlerConfig, PaymentCommandHandler};
use payments::migrate::run_migrations;
use payments::store::PgPaymentStore;
use pg_outbox::postgres::{DatabaseSettings, Db, TlsMode};

fn test_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "OUTBOX_TEST_DATABASE_URL is not set: these tests need a real PostgreSQL. \
             Run them with `make test` (or `scripts/dev-env up && . .local/env` first)."
        )
    })
}

/// The server the tests create their databases on, from `OUTBOX_TEST_DATABASE_URL`.
pub fn admin_settings() -> DatabaseSettings {
    let config = test_url()
        .parse()
        .unwrap_or_else(|e| panic!("OUTBOX_TEST_DATABASE_URL is not a connection string: {e}"));
    DatabaseSettings::new(config, TlsMode::Disable)
}

/// A database of its own for one test, created empty and migrated.
pub struct TestDb {
    /// Settings that connect to it.
    pub settings: DatabaseSettings,
    /// Its connection URL (for child processes).
    pub url: String,
    /// Its name (`t_` and a random hex id).
    pub name: String,
    /// The server's administrative connection, to drop it.
    admin: DatabaseSettings,
}

impl TestDb {
    /// Creates and migrates a new database. Panics, naming the cause, when PostgreSQL is not there.
    pub async fn create() -> Self {
        Self::create_with(&admin_settings(), &test_url()).await
    }

    /// Creates and migrates a new database on a private cluster (superuser connection).
    pub async fn create_on(cluster: &cluster::PrivateCluster) -> Self {
        Self::create_with(
            &cluster.admin_settings("postgres"),
            &cluster.admin_url("postgres"),
        )
        .await
    }

    async fn create_with(admin: &DatabaseSettings, admin_url: &str) -> Self {
        let client = admin.connect().await.unwrap_or_else(|e| {
            panic!(
                "cannot reach the test PostgreSQL ({e:?}); run `scripts/dev-env up` or `make test`"
            )
        });
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        // An identifier cannot be a bind parameter; the name is built from hex digits only.
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let settings = admin.with_dbname(&name);
        let mut client = settings
            .connect()
            .await
            .expect("connect to the test database");
        run_migrations(&mut client)
            .await
            .expect("migrate the test database");
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) if server.contains("://") => format!("{server}/{name}"),
            _ => panic!(
                "OUTBOX_TEST_DATABASE_URL must be a postgres:// URL ending in a database name"
            ),
        };
        Self {
            settings,
            name,
            url,
            admin: admin.clone(),
        }
    }

    /// Drops the database now (benchmarks' databases are gigabytes; tests leave theirs, and
    /// `scripts/dev-env prune` drops what earlier runs left).
    pub async fn drop_database(self) {
        let client = self.admin.connect().await.expect("admin connection");
        // The name is built from hex digits only (see create_with).
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop the test database");
    }

    /// A new connection to the test database.
    pub async fn client(&self) -> Client {
        self.settings
            .connect()
            .await
            .expect("connect to the test database")
    }

    /// A payment command handler on its own connection, as one Lambda instance would have.
    pub fn payment_handler(&self) -> PaymentCommandHandler<PgPaymentStore> {
        PaymentCommandHandler::new(
            PgPaymentStore::new(Db::new(self.settings.clone())),
            HandlerConfig::default(),
        )
    }

    /// The first column of every row of `sql`, as text (for listings in assertions).
    pub async fn texts(&self, client: &Client, sql: &str) -> Vec<String> {
        client
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Every outbox row's (aggregate id, aggregate version) by event id, to check what reached
    /// a bus against.
    pub async fn event_versions(&self, client: &Client) -> HashMap<String, (String, i64)> {
        client
            .query(
                "SELECT event_id::text, aggregate_id, aggregate_version FROM outbox",
                &[],
            )
            .await
            .expect("event versions")
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    }

    /// `SELECT count(*)` of a query's rows.
    pub async fn count(&self, client: &Client, from_where: &str) -> i64 {
        client
            .query_one(&format!("SELECT count(*) FROM {from_where}"), &[])
            .await
            .expect("count query")
            .get(0)
    }
}

/// The folder of a function's sample events.
pub fn events_dir(function: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../events")
        .join(function)
}

/// The sample events of a function, sorted by file name.
pub fn sample_files(function: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(events_dir(function))
        .expect("events folder")
        .map(|e| e.expect("events folder entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// The events feed's samples (`events/payment-command/feed/`), sorted by file name.
pub fn feed_sample_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(events_dir("payment-command").join("feed"))
        .expect("feed samples folder")
        .map(|e| e.expect("feed samples entry").path())
        .collect();
    files.sort();
    files
}

/// A committed sample event, as raw JSON (read once per process, so benchmarks do not measure the
/// disk).
pub fn sample_json(function: &str, file: &str) -> Value {
    static CACHE: Mutex<BTreeMap<PathBuf, Value>> = Mutex::new(BTreeMap::new());
    let path = events_dir(function).join(file);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(path.clone())
        .or_insert_with(|| {
            let bytes =
                std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
        })
        .clone()
}

/// Turns JSON into a typed event, panicking with the reason.
pub fn typed<T: DeserializeOwned>(json: Value) -> T {
    serde_json::from_value(json).expect("event has the handler's input shape")
}

/// A paid-command request for `tenant` and `payment`, built from the committed `01-paid.json`
/// sample with its body replaced.
pub fn paid_request(tenant: &str, payment: &str, body: Value) -> ApiGatewayV2httpRequest {
    command_request(
        "01-paid.json",
        tenant,
        payment,
        "paid",
        &body.to_string(),
        None,
    )
}

/// A refund request, built from the committed `04-refund.json` sample.
pub fn refund_request(
    tenant: &str,
    payment: &str,
    key: &str,
    amount: i64,
) -> ApiGatewayV2httpRequest {
    let body = serde_json::json!({ "amountMinor": amount }).to_string();
    command_request(
        "04-refund.json",
        tenant,
        payment,
        "refunds",
        &body,
        Some(key),
    )
}

/// A standard paid body.
pub fn paid_body(amount: i64, currency: &str) -> Value {
    serde_json::json!({
        "amountMinor": amount,
        "currency": currency,
        "verificationMethod": "card_3ds",
        "verifiedBy": "acs.examplebank.com",
    })
}

fn command_request(
    sample: &str,
    tenant: &str,
    payment: &str,
    action: &str,
    body: &str,
    key: Option<&str>,
) -> ApiGatewayV2httpRequest {
    let mut json = sample_json("payment-command", sample);
    let path = format!("/payments/{payment}/{action}");
    json["rawPath"] = path.clone().into();
    json["requestContext"]["http"]["path"] = path.into();
    json["pathParameters"]["paymentId"] = payment.into();
    json["requestContext"]["authorizer"]["jwt"]["claims"]["tenant_id"] = tenant.into();
    json["requestContext"]["requestId"] = uuid::Uuid::new_v4().simple().to_string().into();
    json["body"] = body.into();
    if let Some(key) = key {
        json["headers"]["idempotency-key"] = key.into();
    }
    typed(json)
}

/// What a test needs of a response.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: i64,
    /// Parsed JSON body.
    pub body: Value,
    /// Whether the `Idempotent-Replayed: true` header was set.
    pub replayed: bool,
}

/// Invokes a handler the way the Lambda runtime does and unpacks the response.
pub async fn invoke<W: pg_outbox::ports::WakeDispatcher>(
    handler: &PaymentCommandHandler<PgPaymentStore, W>,
    request: ApiGatewayV2httpRequest,
) -> Reply {
    let response = handler
        .handle(LambdaEvent::new(request, Context::default()))
        .await
        .expect("the handler answers every request with a response");
    reply(response)
}

/// Unpacks an API Gateway response.
pub fn reply(response: ApiGatewayV2httpResponse) -> Reply {
    let text = match &response.body {
        Some(Body::Text(text)) => text.clone(),
        other => panic!("expected a text body, got {other:?}"),
    };
    assert_eq!(
        response
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    Reply {
        status: response.status_code,
        body: serde_json::from_str(&text).expect("JSON body"),
        replayed: response.headers.get("idempotent-replayed").is_some(),
    }
}

pub mod alloc_count;
pub mod aws;
pub mod bench;
pub mod cluster;
pub mod fake_lambda;
pub mod fault_proxy;
pub mod nats;
pub mod rotation;
pub mod runtime_api;
pub mod tcp_proxy;

use std::time::Duration;

use pg_outbox::aws::BusPublisher;
use pg_outbox::dispatcher::{DispatcherConfig, OutboxDispatcher, Target};
use pg_outbox::postgres::outbox::PgOutboxStore;

/// Dispatcher settings for tests: small batches, a short lease and fast backoff.
pub fn test_dispatcher_config() -> DispatcherConfig {
    DispatcherConfig {
        batch_size: 50,
        max_in_flight: 4,
        lease: Duration::from_secs(5),
        max_attempts: 3,
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(100),
        safety_margin: Duration::ZERO,
        ..DispatcherConfig::default()
    }
}

/// A dispatcher on its own connection to `db`, publishing to `target` through `endpoint`.
pub async fn dispatcher(
    db: &TestDb,
    endpoint: &str,
    target: Target,
    config: DispatcherConfig,
) -> OutboxDispatcher<PgOutboxStore, BusPublisher> {
    let sdk = aws::sdk_config_for(endpoint).await;
    OutboxDispatcher::new(
        PgOutboxStore::new(Db::new(db.settings.clone())),
        BusPublisher::new(&sdk, &target).await.expect("publisher"),
        config,
        format!("test-{}", uuid::Uuid::new_v4().simple()),
    )
}

/// Drains until a drain claims nothing and no aggregate's head is pending (rows parked behind a
/// dead event of their aggregate stay pending), waiting out backoff delays, for at most `limit`.
pub async fn drain_until_settled(
    dispatcher: &OutboxDispatcher<PgOutboxStore, BusPublisher>,
    db: &TestDb,
    limit: Duration,
) {
    let client = db.client().await;
    let started = std::time::Instant::now();
    loop {
        let summary = dispatcher
            .drain(std::time::Instant::now() + Duration::from_secs(30))
            .await
            .expect("drain");
        // Every pending head still has to go: backing off, due (it may have become due just
        // after the drain's last claim), or leased. Rows parked behind a dead event are not heads.
        let heads_left = db
            .count(&client, "outbox WHERE status = 'pending' AND is_head")
            .await;
        if summary.claimed == 0 && heads_left == 0 {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "outbox not settled within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Inserts `versions` events for each aggregate directly (the command side's columns, as the
/// payment store writes them). `payload_extra` is merged into every payload.
pub async fn seed_outbox(
    client: &impl tokio_postgres::GenericClient,
    tenant: &str,
    aggregates: &[String],
    versions: i64,
    payload_extra: &str,
) {
    client
        .execute(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, schema_version, payload, metadata)
             SELECT gen_random_uuid(), $1, 'payment', a, v, 'payment.paid', 1,
                    jsonb_build_object('paymentId', a, 'version', v) || $4::text::jsonb,
                    '{\"correlation_id\":\"seed\",\"source\":\"payments\"}'
             FROM unnest($2::text[]) AS a, generate_series(1, $3::bigint) AS v
             ORDER BY v, a",
            &[&tenant, &aggregates, &versions, &payload_extra],
        )
        .await
        .expect("seed outbox");
}

/// Runs `outboxctl` on `db` with stdin closed (not a terminal, as in CI or a pipe).
pub fn outboxctl(db: &TestDb, args: &[&str]) -> std::process::Output {
    std::process::Command::new(workspace_binary("outboxctl"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("DATABASE_TLS", "disable")
        .env_remove("DATABASE_SECRET_ARN")
        .env_remove("OUTBOX_RETENTION_HOURS")
        .env_remove("INBOX_RETENTION_DAYS")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run outboxctl")
}

/// A process's standard output, as text.
pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A process's standard error, as text.
pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A binary of this workspace (built by `cargo build`, which `scripts/test` runs first), next to
/// the test executable's own folder.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p {name}` (scripts/test does)",
        path.display()
    );
    path
}

pub mod sink_fixtures {
    //! Building SQS batches for the sink from the committed samples, and reading projections.

    use aws_lambda_events::sqs::SqsEvent;
    use chrono::{DateTime, TimeZone, Utc};
    use payments::domain::events::{PaymentPaidV1, PaymentRefundedV1};
    use payments::domain::Currency;

    use pg_outbox::consumer::Projections;
    use pg_outbox::envelope::EventEnvelope;
    use pg_outbox::postgres::projections::PgProjectionStore;
    use pg_outbox::postgres::Db;
    use projection_sink::ProjectionSink;
    use serde_json::Value;

    use super::{sample_json, typed, TestDb};

    /// The projections the sink function registers.
    pub fn payment_projections() -> Projections {
        payments::projection::projections()
    }

    /// A sink on its own connection, as one Lambda instance would have.
    pub fn sink(db: &TestDb) -> ProjectionSink<PgProjectionStore> {
        ProjectionSink::new(
            PgProjectionStore::new(Db::new(db.settings.clone()), payment_projections()),
            projection_sink::DEFAULT_CONSUMER,
        )
    }

    /// An SQS event with these (message id, body) records, built from the committed
    /// `sns-raw.json` sample's first record.
    pub fn sqs_event(records: &[(String, String)]) -> SqsEvent {
        let sample = sample_json("projection-sink", "sns-raw.json");
        let template = sample["Records"][0].clone();
        let records: Vec<Value> = records
            .iter()
            .map(|(id, body)| {
                let mut r = template.clone();
                r["messageId"] = id.clone().into();
                r["receiptHandle"] = format!("AQEB{id}").into();
                r["body"] = body.clone().into();
                r
            })
            .collect();
        typed(serde_json::json!({ "Records": records }))
    }

    /// One published event as the dispatcher would have sent it (raw delivery body).
    #[derive(Debug, Clone)]
    pub struct StreamEvent {
        /// Event id.
        pub event_id: uuid::Uuid,
        /// Raw-delivery body (the envelope).
        pub body: String,
    }

    fn envelope(
        tenant: &str,
        payment: &str,
        version: i64,
        event_type: &str,
        data: Value,
        at: DateTime<Utc>,
    ) -> StreamEvent {
        let event_id = uuid::Uuid::new_v4();
        let envelope = EventEnvelope {
            specversion: "1.0".into(),
            id: event_id,
            source: "payments".into(),
            event_type: event_type.into(),
            schemaversion: 1,
            subject: format!("payment/{payment}"),
            time: at,
            datacontenttype: "application/json".into(),
            tenantid: tenant.into(),
            aggregatetype: "payment".into(),
            aggregateid: payment.into(),
            aggregateversion: version,
            correlationid: "stream".into(),
            causationid: None,
            traceparent: None,
            tracestate: None,
            data,
        };
        StreamEvent {
            event_id,
            body: serde_json::to_string(&envelope).expect("envelope"),
        }
    }

    /// A stream of `payments` payments over two tenants, two currencies and three days, each with
    /// 0–3 refunds, in commit order. Deterministic for a seed.
    pub fn payment_stream(seed: u64, payments: usize) -> Vec<StreamEvent> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut events = Vec::new();
        for p in 0..payments {
            let tenant = if p % 2 == 0 { "acme" } else { "globex" };
            let payment = format!("pay_{seed}_{p}");
            let currency =
                Currency::parse(if rng.bool() { "EUR" } else { "USD" }).expect("currency");
            let amount = rng.i64(100..100_000);
            let day = Utc
                .with_ymd_and_hms(2026, 11, 20 + rng.u32(0..3), rng.u32(0..24), 0, 0)
                .unwrap();
            let paid = PaymentPaidV1 {
                payment_id: payment.clone(),
                amount_minor: amount,
                currency,
                verification_method: "card_3ds".into(),
                verified_by: "acs".into(),
                paid_at: day,
            };
            events.push(envelope(
                tenant,
                &payment,
                1,
                "payment.paid",
                serde_json::to_value(paid).unwrap(),
                day,
            ));
            let mut refunded = 0;
            for r in 0..rng.usize(0..4) {
                let left = amount - refunded;
                if left == 0 {
                    break;
                }
                let part = rng.i64(1..=left);
                refunded += part;
                let at = day + chrono::Duration::hours(rng.i64(1..48));
                let refund = PaymentRefundedV1 {
                    payment_id: payment.clone(),
                    refund_id: uuid::Uuid::new_v4(),
                    amount_minor: part,
                    currency,
                    refunded_total_minor: refunded,
                    remaining_minor: amount - refunded,
                    refunded_at: at,
                };
                events.push(envelope(
                    tenant,
                    &payment,
                    2 + r as i64,
                    "payment.refunded",
                    serde_json::to_value(refund).unwrap(),
                    at,
                ));
            }
        }
        events
    }

    /// Both projections, as comparable text rows.
    pub async fn snapshot(db: &TestDb) -> (Vec<String>, Vec<String>) {
        let client = db.client().await;
        let payments = client
            .query(
                "SELECT concat_ws('|', tenant_id, payment_id, status, currency, paid_minor, refunded_minor, last_version)
                 FROM payment_projection ORDER BY tenant_id, payment_id",
                &[],
            )
            .await
            .expect("payment projection")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let revenue = client
            .query(
                "SELECT concat_ws('|', tenant_id, day, currency, paid_minor, refunded_minor, net_minor)
                 FROM tenant_daily_revenue ORDER BY tenant_id, day, currency",
                &[],
            )
            .await
            .expect("revenue")
            .iter()
            .map(|r| r.get(0))
            .collect();
        (payments, revenue)
    }
}
