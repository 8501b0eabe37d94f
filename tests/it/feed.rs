//! (Past 400 lines: one test per feed rule through the HTTP handler, sharing this file's fixtures.)
//!
//! The events feed through the HTTP API handler against the real PostgreSQL: pages read while
//! events are published and deleted, per-consumer acknowledgments, tenant isolation, filters and
//! every refused input.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::apigw::ApiGatewayV2httpRequest;
use outbox_tests::{invoke, sample_json, seed_outbox, typed, Reply, TestDb};
use pg_outbox::outbox::Outcomes;
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;
use serde_json::{json, Value};
use uuid::Uuid;

/// `GET /events?<query>` from `tenant`, built from the committed feed sample.
fn page_request(tenant: &str, query: &str) -> ApiGatewayV2httpRequest {
    let mut json = sample_json("payment-command", "feed/01-page.json");
    json["rawQueryString"] = query.into();
    json["queryStringParameters"] = json!({});
    json["requestContext"]["authorizer"]["jwt"]["claims"]["tenant_id"] = tenant.into();
    typed(json)
}

/// `POST /events/{event_id}/ack` from `tenant` with `body`.
fn ack_request(tenant: &str, event_id: &str, body: Option<&str>) -> ApiGatewayV2httpRequest {
    let mut json = sample_json("payment-command", "feed/02-ack.json");
    let path = format!("/events/{event_id}/ack");
    json["rawPath"] = path.clone().into();
    json["requestContext"]["http"]["path"] = path.into();
    json["pathParameters"]["eventId"] = event_id.into();
    json["requestContext"]["authorizer"]["jwt"]["claims"]["tenant_id"] = tenant.into();
    json["body"] = body.map_or(Value::Null, Value::from);
    typed(json)
}

fn ack_body(consumer: &str) -> String {
    json!({ "consumer": consumer }).to_string()
}

/// Publishes everything claimable through the dispatcher's store (claim, then record every row
/// published), as a dispatcher whose bus accepted everything would. Returns how many.
async fn publish_all(store: &PgOutboxStore, owner: &str) -> usize {
    let mut total = 0;
    loop {
        let claimed = store
            .claim_batch(50, Duration::from_secs(30), owner)
            .await
            .expect("claim");
        if claimed.is_empty() {
            return total;
        }
        total += claimed.len();
        let outcomes = Outcomes {
            published: claimed.iter().map(|e| e.id).collect(),
            ..Outcomes::default()
        };
        // Rows another statement holds for a moment (the other dispatcher's claim locking a row
        // it then finds leased) are recorded on a later call, as the drain does.
        let mut later = outcomes;
        while !later.is_empty() {
            later = store.record_outcomes(owner, &later).await.expect("record");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn event_ids(reply: &Reply) -> Vec<String> {
    reply.body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("a page: {}", reply.body))
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn seed_and_publish(db: &TestDb, tenant: &str, aggregates: &[&str], versions: i64) {
    let client = db.client().await;
    let aggregates: Vec<String> = aggregates.iter().map(|a| a.to_string()).collect();
    seed_outbox(&client, tenant, &aggregates, versions, "{}").await;
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    publish_all(&store, "test").await;
}

/// A reader pages through the feed (7 events a page) while two dispatchers publish new events of
/// two tenants and a cleanup deletes published rows, some before the reader got to them. The
/// reader sees every event that was not deleted, none twice, none of the other tenant, each
/// aggregate's versions in order, and nothing in the feed that was never published.
#[tokio::test]
async fn pages_read_while_events_are_published_and_deleted_skip_and_repeat_nothing() {
    let db = TestDb::create().await;
    let done = Arc::new(AtomicBool::new(false));

    // Producer: 30 rounds of 12 events (4 aggregates × 3 versions) for each of two tenants,
    // published by two dispatchers racing each other.
    let producer = {
        let db_settings = db.settings.clone();
        let client = db.client().await;
        let done = done.clone();
        tokio::spawn(async move {
            let stores = [
                PgOutboxStore::new(Db::new(db_settings.clone())),
                PgOutboxStore::new(Db::new(db_settings)),
            ];
            for round in 0..30 {
                for tenant in ["acme", "globex"] {
                    let aggregates: Vec<String> =
                        (0..4).map(|a| format!("pay_{round}_{a}")).collect();
                    seed_outbox(&client, tenant, &aggregates, 3, "{}").await;
                }
                let (a, b) = tokio::join!(
                    publish_all(&stores[0], "dispatcher-a"),
                    publish_all(&stores[1], "dispatcher-b")
                );
                assert!(a + b > 0);
            }
            done.store(true, Ordering::SeqCst);
        })
    };

    // Cleanup: deletes published rows with an id divisible by 3, as retention would, and keeps
    // their event ids.
    let deleter = {
        let client = db.client().await;
        let done = done.clone();
        tokio::spawn(async move {
            let mut deleted = HashSet::new();
            while !done.load(Ordering::SeqCst) {
                for row in client
                    .query(
                        "DELETE FROM outbox WHERE id IN (
                             SELECT id FROM outbox WHERE status = 'published' AND id % 3 = 0
                             ORDER BY id LIMIT 10)
                         RETURNING event_id::text",
                        &[],
                    )
                    .await
                    .expect("delete")
                {
                    deleted.insert(row.get::<_, String>(0));
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            deleted
        })
    };

    let handler = db.payment_handler();
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let finished = done.load(Ordering::SeqCst);
        let query = match &cursor {
            Some(c) => format!("limit=7&after={c}"),
            None => "limit=7".to_owned(),
        };
        let reply = invoke(&handler, page_request("acme", &query)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        pages += 1;
        let events = reply.body["events"].as_array().unwrap().clone();
        let next = reply.body["nextCursor"].as_str().unwrap().to_owned();
        if events.is_empty() {
            assert_eq!(
                cursor.as_deref().unwrap_or(&next),
                next,
                "an empty page hands back the cursor it was given"
            );
            if finished {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen.extend(events);
        cursor = Some(next);
    }
    producer.await.unwrap();
    let deleted = deleter.await.unwrap();

    let client = db.client().await;
    let published: HashSet<String> = db
        .texts(
            &client,
            "SELECT event_id::text FROM outbox WHERE tenant_id = 'acme' AND feed_position IS NOT NULL",
        )
        .await
        .into_iter()
        .collect();
    let ids: Vec<String> = seen
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an event was served twice");
    assert!(seen.iter().all(|e| e["tenantid"] == "acme"));
    for id in &published {
        assert!(unique.contains(id), "event {id} was skipped");
    }
    for id in &ids {
        assert!(
            published.contains(id) || deleted.contains(id),
            "event {id} was served but never published"
        );
    }
    // 30 rounds × 12 acme events: every one was either read or deleted before the reader came.
    assert!(
        ids.len() >= 360 - deleted.len(),
        "read {} of 360, {} deleted",
        ids.len(),
        deleted.len()
    );
    let mut versions: BTreeMap<String, i64> = BTreeMap::new();
    for e in &seen {
        let aggregate = e["aggregateid"].as_str().unwrap().to_owned();
        let version = e["aggregateversion"].as_i64().unwrap();
        let last = versions.insert(aggregate.clone(), version).unwrap_or(0);
        assert!(
            version > last,
            "{aggregate}: version {version} after {last}"
        );
    }
    assert!(pages > 360 / 7, "{pages} pages");
    assert!(
        !deleted.is_empty(),
        "the cleanup deleted rows during the run"
    );
}

#[tokio::test]
async fn two_consumers_acknowledge_independently_and_a_repeat_keeps_the_first_time() {
    let db = TestDb::create().await;
    seed_and_publish(
        &db,
        "acme",
        &["pay_1", "pay_2", "pay_3", "pay_4", "pay_5"],
        1,
    )
    .await;
    let handler = db.payment_handler();
    let all = event_ids(&invoke(&handler, page_request("acme", "")).await);
    assert_eq!(all.len(), 5);

    let ack = |consumer: &'static str, i: usize| {
        let id = all[i].clone();
        let handler = &handler;
        async move { invoke(handler, ack_request("acme", &id, Some(&ack_body(consumer)))).await }
    };
    let first = ack("ledger", 0).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(!first.replayed);
    assert_eq!(first.body["eventId"], all[0].as_str());
    assert_eq!(first.body["consumer"], "ledger");
    assert_eq!(ack("ledger", 1).await.status, 200);
    assert_eq!(ack("crm", 1).await.status, 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = ack("ledger", 0).await;
    assert_eq!(again.status, 200);
    assert!(again.replayed);
    assert_eq!(again.body["acknowledgedAt"], first.body["acknowledgedAt"]);

    let unacked = |consumer: &str| {
        page_request(
            "acme",
            &format!("consumer={consumer}&excludeAcknowledged=true"),
        )
    };
    let ledger = event_ids(&invoke(&handler, unacked("ledger")).await);
    assert_eq!(ledger, all[2..].to_vec());
    let crm = event_ids(&invoke(&handler, unacked("crm")).await);
    assert_eq!(crm, [&all[..1], &all[2..]].concat());
    let nobody = event_ids(&invoke(&handler, unacked("billing")).await);
    assert_eq!(nobody, all);
    // Without excludeAcknowledged the consumer changes nothing.
    let listed = event_ids(&invoke(&handler, page_request("acme", "consumer=ledger")).await);
    assert_eq!(listed, all);

    let client = db.client().await;
    assert_eq!(db.count(&client, "outbox_feed_acks").await, 3);
    // Retention takes the acknowledgments with their events.
    client
        .execute(
            "DELETE FROM outbox WHERE event_id = $1::text::uuid",
            &[&all[0]],
        )
        .await
        .unwrap();
    assert_eq!(db.count(&client, "outbox_feed_acks").await, 2);
}

#[tokio::test]
async fn a_tenant_sees_and_acknowledges_only_its_own_events() {
    let db = TestDb::create().await;
    seed_and_publish(&db, "acme", &["pay_1", "pay_2"], 2).await;
    seed_and_publish(&db, "globex", &["pay_9"], 1).await;
    let handler = db.payment_handler();

    let acme = invoke(&handler, page_request("acme", "limit=100")).await;
    assert_eq!(event_ids(&acme).len(), 4);
    let globex = invoke(&handler, page_request("globex", "limit=100")).await;
    let globex_ids = event_ids(&globex);
    assert_eq!(globex_ids.len(), 1);
    assert!(globex.body["events"][0]["tenantid"] == "globex");

    // acme's event acknowledged by globex: answered as an unknown event, byte for byte.
    let foreign = invoke(
        &handler,
        ack_request("globex", &event_ids(&acme)[0], Some(&ack_body("x"))),
    )
    .await;
    let unknown = invoke(
        &handler,
        ack_request("globex", &Uuid::new_v4().to_string(), Some(&ack_body("x"))),
    )
    .await;
    assert_eq!(foreign.status, 404);
    assert_eq!(foreign.body, unknown.body);
    assert_eq!(foreign.body["error"]["code"], "event_not_found");

    // acme's cursor in globex's hands.
    let cursor = acme.body["nextCursor"].as_str().unwrap();
    let stolen = invoke(&handler, page_request("globex", &format!("after={cursor}"))).await;
    assert_eq!(stolen.status, 400);
    assert_eq!(stolen.body["error"]["field"], "after");

    // An event not published yet is not in the feed and cannot be acknowledged.
    let client = db.client().await;
    seed_outbox(&client, "acme", &["pay_new".to_owned()], 1, "{}").await;
    let pending: String = client
        .query_one(
            "SELECT event_id::text FROM outbox WHERE aggregate_id = 'pay_new'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let early = invoke(
        &handler,
        ack_request("acme", &pending, Some(&ack_body("x"))),
    )
    .await;
    assert_eq!(early.status, 404);
    let after = invoke(&handler, page_request("acme", &format!("after={cursor}"))).await;
    assert_eq!(event_ids(&after), Vec::<String>::new());
    assert_eq!(db.count(&client, "outbox_feed_acks").await, 0);
}

#[tokio::test]
async fn filters_select_by_type_aggregate_and_creation_time() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &["pay_1".into(), "pay_2".into()], 2, "{}").await;
    client
        .batch_execute(
            "UPDATE outbox SET event_type = 'payment.refunded' WHERE aggregate_version = 2;
             UPDATE outbox SET created_at = '2026-01-01T00:00:00Z' WHERE aggregate_id = 'pay_1';
             INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload)
             VALUES ('acme', 'customer', 'cus_1', 'customer.renamed', 1, '{}')",
        )
        .await
        .unwrap();
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    assert_eq!(publish_all(&store, "t").await, 5);
    let handler = db.payment_handler();
    let count = |query: &'static str| {
        let handler = &handler;
        async move {
            let reply = invoke(handler, page_request("acme", query)).await;
            assert_eq!(reply.status, 200, "{query}: {}", reply.body);
            event_ids(&reply).len()
        }
    };
    assert_eq!(count("").await, 5);
    assert_eq!(count("type=payment.paid").await, 2);
    assert_eq!(count("type=payment.refunded").await, 2);
    assert_eq!(count("type=payment.*").await, 4);
    assert_eq!(count("type=customer.*").await, 1);
    assert_eq!(count("type=pay.*").await, 0);
    assert_eq!(count("aggregateId=pay_2").await, 2);
    assert_eq!(count("aggregateId=pay_2&type=payment.paid").await, 1);
    assert_eq!(count("createdTo=2026-06-01T00:00:00Z").await, 2);
    assert_eq!(count("createdFrom=2026-06-01T00:00:00Z").await, 3);
    assert_eq!(
        count("createdFrom=2025-12-31T23:00:00-01:00&createdTo=2026-01-01T00:00:01Z").await,
        2
    );
    // Pages of one: hasMore until the last.
    let first = invoke(&handler, page_request("acme", "limit=4")).await;
    assert_eq!(first.body["hasMore"], true);
    let cursor = first.body["nextCursor"].as_str().unwrap();
    let last = invoke(
        &handler,
        page_request("acme", &format!("limit=4&after={cursor}")),
    )
    .await;
    assert_eq!(event_ids(&last).len(), 1);
    assert_eq!(last.body["hasMore"], false);
    // The envelope is the one the buses carry.
    let event = &first.body["events"][0];
    for field in [
        "specversion",
        "id",
        "source",
        "type",
        "subject",
        "time",
        "data",
        "tenantid",
    ] {
        assert!(!event[field].is_null(), "{field} in {event}");
    }
}

/// Each refused input, through the handler: the status, and the parameter the error names.
#[tokio::test]
async fn bad_input_is_a_400_naming_the_parameter_and_writes_nothing() {
    let db = TestDb::create().await;
    seed_and_publish(&db, "acme", &["pay_1"], 1).await;
    let handler = db.payment_handler();
    let event = event_ids(&invoke(&handler, page_request("acme", "")).await)[0].clone();

    let pages = [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("type=Payment%20Paid", "type"),
        ("type=payment..paid", "type"),
        ("type=*", "type"),
        ("after=not-a-cursor", "after"),
        ("after=ZjE6MTI", "after"),
        ("createdFrom=yesterday", "createdFrom"),
        ("createdTo=2026-02-30T00:00:00Z", "createdTo"),
        (
            "createdFrom=2026-11-23T10:00:00Z&createdTo=2026-11-23T10:00:00Z",
            "createdTo",
        ),
        ("excludeAcknowledged=true", "consumer"),
        ("excludeAcknowledged=1&consumer=a", "excludeAcknowledged"),
        ("consumer=bad%20name", "consumer"),
        ("limit=5&limit=6", "limit"),
        ("status=published", "query"),
    ];
    for (query, field) in pages {
        let reply = invoke(&handler, page_request("acme", query)).await;
        assert_eq!(reply.status, 400, "{query}: {}", reply.body);
        assert_eq!(
            reply.body["error"]["field"], field,
            "{query}: {}",
            reply.body
        );
        assert_eq!(reply.body["error"]["code"], "invalid_request");
    }

    let acks: [(&str, Option<&str>, &str); 7] = [
        ("not-a-uuid", Some(r#"{"consumer":"a"}"#), "eventId"),
        (&event, None, "body"),
        (&event, Some("{"), "body"),
        (&event, Some(r#"{"consumer":""}"#), "consumer"),
        (&event, Some(r#"{"consumer":7}"#), "consumer"),
        (&event, Some(r#"{"consumer":"a","extra":1}"#), "extra"),
        (&event, Some(r#"{}"#), "consumer"),
    ];
    for (id, body, field) in acks {
        let reply = invoke(&handler, ack_request("acme", id, body)).await;
        assert_eq!(reply.status, 400, "{id} {body:?}: {}", reply.body);
        assert_eq!(
            reply.body["error"]["field"], field,
            "{body:?}: {}",
            reply.body
        );
    }
    let client = db.client().await;
    assert_eq!(db.count(&client, "outbox_feed_acks").await, 0);

    // Wrong method on a feed path; no tenant in the token.
    let mut json = sample_json("payment-command", "feed/01-page.json");
    json["routeKey"] = Value::Null;
    json["requestContext"]["routeKey"] = Value::Null;
    json["requestContext"]["http"]["method"] = "DELETE".into();
    let reply = invoke(&handler, typed(json)).await;
    assert_eq!(reply.status, 405);
    let mut json = sample_json("payment-command", "feed/01-page.json");
    json["requestContext"]["authorizer"]["jwt"]["claims"]
        .as_object_mut()
        .unwrap()
        .remove("tenant_id");
    assert_eq!(invoke(&handler, typed(json)).await.status, 401);
}

/// The committed feed samples, in order, against one published event with the ack sample's id:
/// a page with it, its acknowledgment, then a page of what `ledger-sync` has not acknowledged.
#[tokio::test]
async fn the_feed_samples_get_their_statuses() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let ack = sample_json("payment-command", "feed/02-ack.json");
    let id = ack["pathParameters"]["eventId"]
        .as_str()
        .unwrap()
        .to_owned();
    client
        .execute(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload)
             VALUES ($1::text::uuid, 'acme', 'payment', 'pay_1001', 'payment.paid', 1, '{}')",
            &[&id],
        )
        .await
        .unwrap();
    publish_all(&PgOutboxStore::new(Db::new(db.settings.clone())), "t").await;
    let handler = db.payment_handler();
    let files = outbox_tests::feed_sample_files();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["01-page.json", "02-ack.json", "03-page-unacknowledged.json"]
    );
    let mut replies = Vec::new();
    for path in &files {
        let json: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let reply = invoke(&handler, typed(json)).await;
        assert_eq!(reply.status, 200, "{}: {}", path.display(), reply.body);
        replies.push(reply);
    }
    assert_eq!(event_ids(&replies[0]), vec![id.clone()]);
    assert_eq!(replies[1].body["eventId"], id.as_str());
    assert_eq!(event_ids(&replies[2]), Vec::<String>::new());
}

/// The page query reads the feed index, whatever else the outbox holds.
#[tokio::test]
async fn a_page_is_an_index_range_scan() {
    let db = TestDb::create().await;
    let client = db.client().await;
    for tenant in ["acme", "globex", "initech"] {
        let aggregates: Vec<String> = (0..1_000).map(|a| format!("pay_{a}")).collect();
        seed_outbox(&client, tenant, &aggregates, 2, "{}").await;
    }
    client
        .batch_execute(
            "UPDATE outbox SET status = 'published', published_at = now(),
                    feed_position = nextval('outbox_feed_position_seq')
             WHERE id % 4 <> 0;
             ANALYZE outbox",
        )
        .await
        .unwrap();
    let tenant = payments::domain::TenantId::parse("acme").unwrap();
    let query = pg_outbox::feed::FeedQuery::parse(tenant, [("limit", "50")]).unwrap();
    let plan = pg_outbox::postgres::feed::explain_page(&client, &query)
        .await
        .unwrap();
    assert!(plan.contains("outbox_feed_idx"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}

/// Two dispatchers mark events of one tenant; the first is slow between drawing its feed position
/// and committing (a trigger sleeps 1 s in its mark). A reader that pages meanwhile must not see
/// the second event before the first, or its cursor would pass the first for good: the second
/// mark waits for the tenant's feed lock, and the two pages together hold both events.
#[tokio::test]
async fn a_slow_mark_holds_back_later_positions_of_its_tenant_so_no_reader_passes_it() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &["slow".into(), "fast".into()], 1, "{}").await;
    client
        .batch_execute(
            "CREATE FUNCTION slow_mark() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.aggregate_id = 'slow' AND NEW.status = 'published' AND OLD.status = 'pending'
                 THEN PERFORM pg_sleep(1); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER slow_mark BEFORE UPDATE ON outbox
                 FOR EACH ROW EXECUTE FUNCTION slow_mark();",
        )
        .await
        .unwrap();
    let a = Arc::new(PgOutboxStore::new(Db::new(db.settings.clone())));
    let b = Arc::new(PgOutboxStore::new(Db::new(db.settings.clone())));
    let claimed = a
        .claim_batch(10, Duration::from_secs(30), "a")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let id_of = |aggregate: &str| {
        claimed
            .iter()
            .find(|e| e.aggregate_id == aggregate)
            .unwrap()
            .id
    };
    let record = |store: Arc<PgOutboxStore>, id: i64| {
        tokio::spawn(async move {
            let outcomes = Outcomes {
                published: vec![id],
                ..Outcomes::default()
            };
            assert!(store
                .record_outcomes("a", &outcomes)
                .await
                .unwrap()
                .is_empty());
        })
    };
    let slow = record(a.clone(), id_of("slow"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fast = record(b.clone(), id_of("fast"));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let handler = db.payment_handler();
    let first = invoke(&handler, page_request("acme", "")).await;
    let cursor = first.body["nextCursor"].as_str().unwrap().to_owned();
    slow.await.unwrap();
    fast.await.unwrap();
    let second = invoke(&handler, page_request("acme", &format!("after={cursor}"))).await;
    let aggregates: Vec<String> = [&first, &second]
        .iter()
        .flat_map(|r| r.body["events"].as_array().unwrap().clone())
        .map(|e| e["aggregateid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        aggregates,
        ["slow", "fast"],
        "first page {}, second page {}",
        first.body,
        second.body
    );
}
