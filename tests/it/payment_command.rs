//! (Past 400 lines: one test per command rule (atomicity, idempotency, races), sharing this file's fixtures.)
//!
//! The payment command handler against a real PostgreSQL: atomicity, idempotency, races,
//! conflicts, bad input and tenant isolation.

use serde_json::{json, Value};
use tokio_postgres::Client;

use outbox_tests::{invoke, paid_body, paid_request, refund_request, sample_json, typed, TestDb};

async fn outbox_rows(client: &Client, tenant: &str) -> Vec<tokio_postgres::Row> {
    client
        .query(
            "SELECT event_id, event_type, schema_version, tenant_id, aggregate_type, aggregate_id,
                    aggregate_version, payload, metadata, idempotency_key, status, attempts
             FROM outbox WHERE tenant_id = $1 ORDER BY id",
            &[&tenant],
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn paid_writes_the_payment_and_one_outbox_row_with_the_envelope_fields() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    let request = paid_request("acme", "pay_1", paid_body(12_500, "EUR"));
    let request_id = request.request_context.request_id.clone().unwrap();
    let reply = invoke(&handler, request).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(!reply.replayed);
    assert_eq!(reply.body["status"], "paid");
    assert_eq!(reply.body["amountMinor"], 12_500);
    assert_eq!(reply.body["currency"], "EUR");

    let client = db.client().await;
    let payment = client
        .query_one(
            "SELECT status, amount_minor, currency, verification_method, verified_by, version, paid_event_id
             FROM payments WHERE tenant_id = 'acme' AND payment_id = 'pay_1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(payment.get::<_, String>("status"), "paid");
    assert_eq!(payment.get::<_, i64>("amount_minor"), 12_500);
    assert_eq!(payment.get::<_, String>("currency"), "EUR");
    assert_eq!(payment.get::<_, String>("verification_method"), "card_3ds");
    assert_eq!(
        payment.get::<_, String>("verified_by"),
        "acs.examplebank.com"
    );
    assert_eq!(payment.get::<_, i64>("version"), 1);

    let rows = outbox_rows(&client, "acme").await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    let event_id: uuid::Uuid = row.get("event_id");
    assert_eq!(reply.body["eventId"], event_id.to_string());
    assert_eq!(payment.get::<_, uuid::Uuid>("paid_event_id"), event_id);
    assert_eq!(row.get::<_, String>("event_type"), "payment.paid");
    assert_eq!(row.get::<_, i32>("schema_version"), 1);
    assert_eq!(row.get::<_, String>("aggregate_type"), "payment");
    assert_eq!(row.get::<_, String>("aggregate_id"), "pay_1");
    assert_eq!(row.get::<_, i64>("aggregate_version"), 1);
    assert_eq!(
        row.get::<_, String>("idempotency_key"),
        "payment-paid-pay_1"
    );
    assert_eq!(row.get::<_, String>("status"), "pending");
    assert_eq!(row.get::<_, i32>("attempts"), 0);

    let payload: Value = row.get("payload");
    assert_eq!(payload["paymentId"], "pay_1");
    assert_eq!(payload["amountMinor"], 12_500);
    assert_eq!(payload["currency"], "EUR");
    assert_eq!(payload["verificationMethod"], "card_3ds");
    assert_eq!(payload["verifiedBy"], "acs.examplebank.com");
    assert_eq!(payload["paidAt"], reply.body["paidAt"]);

    // The sample carries X-Correlation-Id and a W3C traceparent: both travel with the event.
    let metadata: Value = row.get("metadata");
    assert_eq!(metadata["correlation_id"], "demo-flow-1");
    assert_eq!(metadata["causation_id"], request_id.as_str());
    assert_eq!(
        metadata["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(metadata["source"], "payments");
}

#[tokio::test]
async fn replaying_the_paid_command_returns_the_original_result_and_writes_nothing() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    let first = invoke(
        &handler,
        paid_request("acme", "pay_1", paid_body(500, "GBP")),
    )
    .await;
    assert_eq!(first.status, 200);
    for _ in 0..3 {
        let again = invoke(
            &handler,
            paid_request("acme", "pay_1", paid_body(500, "GBP")),
        )
        .await;
        assert_eq!(again.status, 200);
        assert!(again.replayed);
        assert_eq!(
            again.body, first.body,
            "a replay returns the original result"
        );
    }
    let client = db.client().await;
    assert_eq!(db.count(&client, "outbox").await, 1);
    let version: i64 = client
        .query_one("SELECT version FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 1);
}

#[tokio::test]
async fn paying_again_with_another_amount_or_currency_is_a_conflict() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    assert_eq!(
        invoke(
            &handler,
            paid_request("acme", "pay_1", paid_body(500, "EUR"))
        )
        .await
        .status,
        200
    );
    for body in [paid_body(501, "EUR"), paid_body(500, "USD")] {
        let reply = invoke(&handler, paid_request("acme", "pay_1", body)).await;
        assert_eq!(reply.status, 409, "{}", reply.body);
        assert_eq!(reply.body["error"]["code"], "payment_conflict");
    }
    let client = db.client().await;
    assert_eq!(db.count(&client, "outbox").await, 1);
    let amount: i64 = client
        .query_one("SELECT amount_minor FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(amount, 500);
}

#[tokio::test]
async fn a_pending_payment_created_elsewhere_is_paid_at_its_next_version() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO payments (tenant_id, payment_id, version) VALUES ('acme', 'pay_p', 4);
             INSERT INTO payments (tenant_id, payment_id, amount_minor, currency, version)
                 VALUES ('acme', 'pay_preset', 700, 'EUR', 1);",
        )
        .await
        .unwrap();
    let handler = db.payment_handler();
    assert_eq!(
        invoke(
            &handler,
            paid_request("acme", "pay_p", paid_body(900, "EUR"))
        )
        .await
        .status,
        200
    );
    let version: i64 = client
        .query_one(
            "SELECT aggregate_version FROM outbox WHERE aggregate_id = 'pay_p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Outbox versions count the aggregate's events, gap-free (the payment's own row was at
    // version 4 without any event: a v5 would leave consumers waiting for v1..v4).
    assert_eq!(version, 1);
    // A pending payment with a preset amount only accepts that amount.
    let reply = invoke(
        &handler,
        paid_request("acme", "pay_preset", paid_body(900, "EUR")),
    )
    .await;
    assert_eq!(reply.status, 409);
    assert_eq!(
        invoke(
            &handler,
            paid_request("acme", "pay_preset", paid_body(700, "EUR"))
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn concurrent_identical_paid_commands_write_exactly_one_event() {
    let db = TestDb::create().await;
    // Two Lambda instances: two handlers, two connections.
    let (a, b) = (db.payment_handler(), db.payment_handler());
    for i in 0..25 {
        let payment = format!("pay_race_{i}");
        let (ra, rb) = tokio::join!(
            invoke(&a, paid_request("acme", &payment, paid_body(1_000, "EUR"))),
            invoke(&b, paid_request("acme", &payment, paid_body(1_000, "EUR"))),
        );
        assert_eq!(
            (ra.status, rb.status),
            (200, 200),
            "{} / {}",
            ra.body,
            rb.body
        );
        assert_eq!(
            ra.body["eventId"], rb.body["eventId"],
            "both see the one event"
        );
        assert!(
            ra.replayed != rb.replayed,
            "exactly one of the two is the original"
        );
    }
    let client = db.client().await;
    assert_eq!(db.count(&client, "outbox").await, 25);
    assert_eq!(
        db.count(
            &client,
            "(SELECT aggregate_id FROM outbox GROUP BY 1 HAVING count(*) > 1) d"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn refunds_are_idempotent_per_key_and_never_exceed_the_paid_amount() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    assert_eq!(
        invoke(
            &handler,
            paid_request("acme", "pay_1", paid_body(10_000, "EUR"))
        )
        .await
        .status,
        200
    );

    let first = invoke(&handler, refund_request("acme", "pay_1", "r-1", 2_500)).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.body["refundedTotalMinor"], 2_500);
    assert_eq!(first.body["remainingMinor"], 7_500);
    assert_eq!(first.body["paymentStatus"], "partially_refunded");

    let replay = invoke(&handler, refund_request("acme", "pay_1", "r-1", 2_500)).await;
    assert_eq!(replay.status, 200);
    assert!(replay.replayed);
    assert_eq!(replay.body, first.body);

    let reused = invoke(&handler, refund_request("acme", "pay_1", "r-1", 100)).await;
    assert_eq!(reused.status, 409);
    assert_eq!(reused.body["error"]["code"], "idempotency_key_reused");

    let over = invoke(&handler, refund_request("acme", "pay_1", "r-2", 7_501)).await;
    assert_eq!(over.status, 422);
    assert_eq!(over.body["error"]["remainingMinor"], 7_500);
    assert_eq!(over.body["error"]["field"], "amountMinor");

    let rest = invoke(&handler, refund_request("acme", "pay_1", "r-3", 7_500)).await;
    assert_eq!(rest.status, 201);
    assert_eq!(rest.body["paymentStatus"], "refunded");
    let nothing_left = invoke(&handler, refund_request("acme", "pay_1", "r-4", 1)).await;
    assert_eq!(nothing_left.status, 422);

    // The first refund's replay still answers with the result it had then.
    let late_replay = invoke(&handler, refund_request("acme", "pay_1", "r-1", 2_500)).await;
    assert_eq!(late_replay.body, first.body);

    let client = db.client().await;
    let versions: Vec<i64> = outbox_rows(&client, "acme")
        .await
        .iter()
        .map(|r| r.get("aggregate_version"))
        .collect();
    assert_eq!(versions, vec![1, 2, 3], "paid, refund r-1, refund r-3");
    let events = outbox_rows(&client, "acme").await;
    assert_eq!(events[1].get::<_, String>("event_type"), "payment.refunded");
    let payload: Value = events[2].get("payload");
    assert_eq!(payload["refundedTotalMinor"], 10_000);
    assert_eq!(payload["remainingMinor"], 0);
}

#[tokio::test]
async fn refunding_an_unpaid_or_unknown_payment_is_refused() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO payments (tenant_id, payment_id) VALUES ('acme', 'pay_pending')",
        )
        .await
        .unwrap();
    let handler = db.payment_handler();
    let pending = invoke(&handler, refund_request("acme", "pay_pending", "k1", 1)).await;
    assert_eq!(pending.status, 409);
    assert_eq!(pending.body["error"]["code"], "payment_not_paid");
    let unknown = invoke(&handler, refund_request("acme", "pay_nope", "k2", 1)).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(db.count(&client, "outbox").await, 0);
    assert_eq!(db.count(&client, "refunds").await, 0);
}

#[tokio::test]
async fn concurrent_refunds_never_refund_more_than_was_paid() {
    let db = TestDb::create().await;
    let handlers: Vec<_> = (0..5).map(|_| db.payment_handler()).collect();
    assert_eq!(
        invoke(
            &handlers[0],
            paid_request("acme", "pay_1", paid_body(100, "EUR"))
        )
        .await
        .status,
        200
    );

    // Five different refunds of 30 at once: only three fit in 100.
    let replies = futures_util::future::join_all(
        handlers
            .iter()
            .enumerate()
            .map(|(i, h)| invoke(h, refund_request("acme", "pay_1", &format!("k{i}"), 30))),
    )
    .await;
    let mut statuses: Vec<i64> = replies.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(statuses, vec![201, 201, 201, 422, 422]);

    // The same refund five times at once: one refund, one event.
    let replies = futures_util::future::join_all(
        handlers
            .iter()
            .map(|h| invoke(h, refund_request("acme", "pay_1", "same", 10))),
    )
    .await;
    assert_eq!(replies.iter().filter(|r| r.status == 201).count(), 1);
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.status == 200 && r.replayed)
            .count(),
        4
    );

    let client = db.client().await;
    let refunded: i64 = client
        .query_one("SELECT refunded_minor FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(refunded, 100);
    assert_eq!(
        db.count(&client, "outbox WHERE event_type = 'payment.refunded'")
            .await,
        4
    );
}

/// Makes every outbox insert fail: the failure lands after the payment write, inside the
/// command's transaction.
async fn break_outbox_inserts(client: &Client) {
    client
        .batch_execute(
            "CREATE FUNCTION fail_outbox() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'injected outbox failure'; END $$;
             CREATE TRIGGER fail_outbox BEFORE INSERT ON outbox
                 FOR EACH ROW EXECUTE FUNCTION fail_outbox();",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failure_between_the_payment_write_and_the_outbox_write_leaves_neither() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let handler = db.payment_handler();
    assert_eq!(
        invoke(
            &handler,
            paid_request("acme", "pay_ok", paid_body(1_000, "EUR"))
        )
        .await
        .status,
        200
    );
    client
        .batch_execute(
            "INSERT INTO payments (tenant_id, payment_id) VALUES ('acme', 'pay_pending')",
        )
        .await
        .unwrap();
    break_outbox_inserts(&client).await;

    // New payment, pending payment, refund: each fails as a whole.
    let new = invoke(
        &handler,
        paid_request("acme", "pay_new", paid_body(1_000, "EUR")),
    )
    .await;
    let pending = invoke(
        &handler,
        paid_request("acme", "pay_pending", paid_body(1_000, "EUR")),
    )
    .await;
    let refund = invoke(&handler, refund_request("acme", "pay_ok", "k1", 10)).await;
    for reply in [&new, &pending, &refund] {
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.body["error"]["code"], "service_unavailable");
        let text = reply.body.to_string();
        assert!(
            !text.contains("injected"),
            "internal error text leaked: {text}"
        );
    }
    assert_eq!(
        db.count(&client, "payments WHERE payment_id = 'pay_new'")
            .await,
        0
    );
    assert_eq!(
        db.count(
            &client,
            "payments WHERE payment_id = 'pay_pending' AND status = 'pending' AND version = 0"
        )
        .await,
        1
    );
    assert_eq!(
        db.count(
            &client,
            "payments WHERE payment_id = 'pay_ok' AND refunded_minor = 0 AND version = 1"
        )
        .await,
        1
    );
    assert_eq!(db.count(&client, "refunds").await, 0);
    assert_eq!(db.count(&client, "outbox").await, 1);

    // The same commands succeed once the fault is gone: nothing was half-written.
    client
        .batch_execute("DROP TRIGGER fail_outbox ON outbox")
        .await
        .unwrap();
    assert_eq!(
        invoke(
            &handler,
            paid_request("acme", "pay_new", paid_body(1_000, "EUR"))
        )
        .await
        .status,
        200
    );
    assert_eq!(
        invoke(&handler, refund_request("acme", "pay_ok", "k1", 10))
            .await
            .status,
        201
    );
    assert_eq!(db.count(&client, "outbox").await, 3);
}

#[tokio::test]
async fn the_database_going_away_is_a_503_and_the_next_request_reconnects() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    assert_eq!(
        invoke(&handler, paid_request("acme", "pay_1", paid_body(1, "EUR")))
            .await
            .status,
        200
    );
    let admin = db.client().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    // Let the client notice the closed socket.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let reply = invoke(&handler, paid_request("acme", "pay_2", paid_body(1, "EUR"))).await;
    assert!(reply.status == 200 || reply.status == 503, "{}", reply.body);
    let again = invoke(&handler, paid_request("acme", "pay_2", paid_body(1, "EUR"))).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(db.count(&admin, "outbox").await, 2);
}

/// Each input tried, the status it must get and the field the error must name. None of them may
/// write anything.
#[tokio::test]
async fn bad_input_gets_a_clear_error_naming_the_field_and_writes_nothing() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    let paid = |body: &str| {
        let mut json = sample_json("payment-command", "01-paid.json");
        json["body"] = body.into();
        json
    };
    let valid = paid_body(100, "EUR");
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        paid(&body.to_string())
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(field);
        paid(&body.to_string())
    };
    let mut cases: Vec<(&str, Value, i64, &str)> = vec![
        ("empty body", paid(""), 400, "body"),
        ("malformed JSON", paid("{\"amountMinor\": 1,"), 400, "body"),
        ("JSON array", paid("[]"), 400, "body"),
        ("JSON string", paid("\"pay\""), 400, "body"),
        (
            "deeply nested JSON",
            paid(&format!("{}{}", "[".repeat(5000), "]".repeat(5000))),
            400,
            "body",
        ),
        (
            "missing amountMinor",
            without("amountMinor"),
            400,
            "amountMinor",
        ),
        ("missing currency", without("currency"), 400, "currency"),
        (
            "missing verificationMethod",
            without("verificationMethod"),
            400,
            "verificationMethod",
        ),
        (
            "missing verifiedBy",
            without("verifiedBy"),
            400,
            "verifiedBy",
        ),
        (
            "amount as string",
            with("amountMinor", json!("100")),
            400,
            "amountMinor",
        ),
        (
            "amount fractional",
            with("amountMinor", json!(1.5)),
            400,
            "amountMinor",
        ),
        (
            "amount zero",
            with("amountMinor", json!(0)),
            400,
            "amountMinor",
        ),
        (
            "amount negative",
            with("amountMinor", json!(-100)),
            400,
            "amountMinor",
        ),
        (
            "amount beyond i64",
            paid(
                r#"{"amountMinor":18446744073709551616,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
            ),
            400,
            "amountMinor",
        ),
        (
            "amount above the cap",
            with("amountMinor", json!(1_000_000_000_000_001_i64)),
            400,
            "amountMinor",
        ),
        (
            "currency lower case",
            with("currency", json!("eur")),
            400,
            "currency",
        ),
        (
            "currency unknown",
            with("currency", json!("ABC")),
            400,
            "currency",
        ),
        (
            "currency numeric",
            with("currency", json!(978)),
            400,
            "currency",
        ),
        (
            "verification unknown",
            with("verificationMethod", json!("vibes")),
            400,
            "verificationMethod",
        ),
        (
            "verifier blank",
            with("verifiedBy", json!("   ")),
            400,
            "verifiedBy",
        ),
        (
            "verifier too long",
            with("verifiedBy", json!("v".repeat(129))),
            400,
            "verifiedBy",
        ),
        (
            "verifier with NUL",
            with("verifiedBy", json!("a\u{0}b")),
            400,
            "verifiedBy",
        ),
        (
            "tenant in body",
            with("tenantId", json!("globex")),
            400,
            "tenantId",
        ),
        ("unknown field", with("amount", json!(5)), 400, "amount"),
        (
            "duplicate key",
            paid(
                r#"{"amountMinor":100,"amountMinor":1,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
            ),
            400,
            "amountMinor",
        ),
        (
            "oversized body",
            with("verifiedBy", json!("x".repeat(9_000))),
            400,
            "body",
        ),
    ];

    let mut bad_path = paid(&valid.to_string());
    bad_path["pathParameters"]["paymentId"] = "pay 1'; DROP TABLE payments;--".into();
    cases.push(("SQL in the payment id", bad_path, 400, "paymentId"));
    let mut long_id = paid(&valid.to_string());
    long_id["pathParameters"]["paymentId"] = "p".repeat(65).into();
    cases.push(("payment id too long", long_id, 400, "paymentId"));
    let mut b64 = paid("%%% not base64 %%%");
    b64["isBase64Encoded"] = true.into();
    cases.push(("invalid base64 body", b64, 400, "body"));
    let mut no_key = sample_json("payment-command", "04-refund.json");
    no_key["headers"]
        .as_object_mut()
        .unwrap()
        .remove("idempotency-key");
    cases.push((
        "refund without Idempotency-Key",
        no_key,
        400,
        "Idempotency-Key",
    ));
    let mut bad_key = sample_json("payment-command", "04-refund.json");
    bad_key["headers"]["idempotency-key"] = "has spaces in it".into();
    cases.push((
        "refund with an invalid Idempotency-Key",
        bad_key,
        400,
        "Idempotency-Key",
    ));
    let mut refund_zero = sample_json("payment-command", "04-refund.json");
    refund_zero["body"] = r#"{"amountMinor":0}"#.into();
    cases.push(("refund of zero", refund_zero, 400, "amountMinor"));

    let mut no_tenant = paid(&valid.to_string());
    no_tenant["requestContext"]
        .as_object_mut()
        .unwrap()
        .remove("authorizer");
    cases.push(("no authorizer", no_tenant, 401, ""));
    let mut empty_claim = paid(&valid.to_string());
    empty_claim["requestContext"]["authorizer"]["jwt"]["claims"]["tenant_id"] = "".into();
    cases.push(("empty tenant claim", empty_claim, 401, ""));
    let mut crafted_claim = paid(&valid.to_string());
    crafted_claim["requestContext"]["authorizer"]["jwt"]["claims"]["tenant_id"] =
        "acme' OR '1'='1".into();
    cases.push(("crafted tenant claim", crafted_claim, 401, ""));
    let mut get = paid(&valid.to_string());
    get["routeKey"] = "$default".into();
    get["requestContext"]["http"]["method"] = "GET".into();
    cases.push(("GET on a command route", get, 405, ""));
    let mut unknown_route = paid(&valid.to_string());
    unknown_route["routeKey"] = "$default".into();
    unknown_route["rawPath"] = "/admin/payments".into();
    cases.push(("unknown route", unknown_route, 404, ""));

    for (what, json, status, field) in cases {
        let reply = invoke(&handler, typed(json)).await;
        assert_eq!(reply.status, status, "{what}: {}", reply.body);
        let error = &reply.body["error"];
        assert!(
            error["code"].is_string() && error["message"].is_string(),
            "{what}: {}",
            reply.body
        );
        if !field.is_empty() {
            assert_eq!(error["field"], field, "{what}: {}", reply.body);
        }
    }
    let client = db.client().await;
    assert_eq!(db.count(&client, "payments").await, 0);
    assert_eq!(db.count(&client, "outbox").await, 0);
}

#[tokio::test]
async fn a_tenant_can_neither_see_nor_change_another_tenants_payments() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    assert_eq!(
        invoke(
            &handler,
            paid_request("acme", "pay_1", paid_body(1_000, "EUR"))
        )
        .await
        .status,
        200
    );

    // Globex refunding acme's payment id finds nothing.
    let refund = invoke(&handler, refund_request("globex", "pay_1", "k1", 10)).await;
    assert_eq!(refund.status, 404);
    // Globex paying the same id with other figures creates its own payment: no 409 that would leak
    // the existence of acme's.
    let own = invoke(
        &handler,
        paid_request("globex", "pay_1", paid_body(5, "USD")),
    )
    .await;
    assert_eq!(own.status, 200, "{}", own.body);
    assert!(!own.replayed);
    // The same Idempotency-Key in two tenants are two refunds.
    assert_eq!(
        invoke(&handler, refund_request("acme", "pay_1", "shared-key", 10))
            .await
            .status,
        201
    );
    assert_eq!(
        invoke(&handler, refund_request("globex", "pay_1", "shared-key", 5))
            .await
            .status,
        201
    );

    // A header naming another tenant is ignored: the claim decides.
    let mut json = sample_json("payment-command", "01-paid.json");
    json["headers"]["x-tenant-id"] = "acme".into();
    json["requestContext"]["authorizer"]["jwt"]["claims"]["tenant_id"] = "initech".into();
    assert_eq!(invoke(&handler, typed(json)).await.status, 200);

    let client = db.client().await;
    let acme: (i64, i64) = {
        let row = client
            .query_one(
                "SELECT amount_minor, refunded_minor FROM payments WHERE tenant_id = 'acme' AND payment_id = 'pay_1'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(acme, (1_000, 10), "acme's payment only saw acme's commands");
    assert_eq!(
        db.count(&client, "outbox WHERE tenant_id = 'acme'").await,
        2
    );
    assert_eq!(
        db.count(&client, "outbox WHERE tenant_id = 'globex'").await,
        2
    );
    assert_eq!(
        db.count(&client, "outbox WHERE tenant_id = 'initech'")
            .await,
        1
    );
    assert_eq!(
        db.count(
            &client,
            "payments WHERE tenant_id = 'acme' AND payment_id = 'pay_1001'"
        )
        .await,
        0
    );
}
