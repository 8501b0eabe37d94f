//! The migrations apply to an empty database and are a no-op the second time.

use outbox_tests::TestDb;
use pg_outbox::postgres::migrate::run_migrations;

#[tokio::test]
async fn migrations_are_idempotent_and_create_the_claim_index() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    assert!(run_migrations(&mut client).await.unwrap().is_empty());

    let indexdef: String = client
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'outbox' AND indexname = 'outbox_claim_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(indexdef.contains("(next_attempt_at, id)"), "{indexdef}");
    assert!(
        indexdef.contains("WHERE (status = 'pending'::text)"),
        "{indexdef}"
    );

    let options: Vec<String> = client
        .query_one(
            "SELECT reloptions FROM pg_class WHERE relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        options
            .iter()
            .any(|o| o == "autovacuum_vacuum_cost_delay=0"),
        "{options:?}"
    );
}
