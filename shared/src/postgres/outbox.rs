//! SQL of the `outbox` table on the command side: appending an event inside the caller's
//! transaction, which is the whole point of the pattern (state and event commit together).

use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use crate::outbox::NewOutboxEvent;

const APPEND: &str = "
    INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                        event_type, schema_version, payload, metadata, idempotency_key)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// Appends one event to the outbox in `tx`. It becomes visible to the dispatcher only when `tx`
/// commits, and disappears with it if `tx` rolls back.
#[tracing::instrument(skip_all, fields(event_id = %event.event_id, event_type = event.event_type,
    tenant_id = %event.tenant_id, aggregate_id = %event.aggregate_id))]
pub async fn append(
    tx: &Transaction<'_>,
    event: &NewOutboxEvent,
) -> Result<(), tokio_postgres::Error> {
    let metadata = serde_json::to_value(&event.metadata).unwrap_or_default();
    tx.execute_typed(
        APPEND,
        &[
            (&event.event_id, Type::UUID),
            (&event.tenant_id, Type::TEXT),
            (&event.aggregate_type, Type::TEXT),
            (&event.aggregate_id, Type::TEXT),
            (&event.aggregate_version, Type::INT8),
            (&event.event_type, Type::TEXT),
            (&event.schema_version, Type::INT4),
            (&event.payload, Type::JSONB),
            (&metadata, Type::JSONB),
            (&event.idempotency_key, Type::TEXT),
        ],
    )
    .await?;
    Ok(())
}
