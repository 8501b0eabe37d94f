//! Tenants' weights, caps and pauses in the claim (migration V19, `outbox_tenant_limits`): what a
//! tenant's part of each claim is, how many of its events go to the bus a second at most, and
//! holding its events back while its consumers are down. A tenant without a row has weight 1,
//! no cap, and is not paused.

use serde::Serialize;
use tokio_postgres::Client;

/// The largest weight (the table's CHECK).
pub const MAX_WEIGHT: i32 = 1_000;

/// One tenant's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantLimits {
    pub tenant_id: String,
    /// Its part of each claim against the other tenants' (1 to [`MAX_WEIGHT`]).
    pub weight: i32,
    /// Its live events leased at most this many a second, over every dispatcher; `None`: no cap.
    pub max_per_second: Option<i32>,
    /// None of its live events is leased.
    pub paused: bool,
    /// When the row was last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A change to a tenant's row; `None` fields keep what the row has (a new row: the defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsChange {
    pub weight: Option<i32>,
    /// `Some(None)` removes the cap.
    pub max_per_second: Option<Option<i32>>,
    pub paused: Option<bool>,
}

/// A change refused before it reached the database.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    #[error("a tenant id is required (got an empty one)")]
    NoTenant,
    #[error("weight {0} is out of range: a weight is 1 to {MAX_WEIGHT}")]
    Weight(i32),
    #[error("max per second {0} is out of range: a cap is at least 1 event a second (pause the tenant to stop its events)")]
    Cap(i32),
    #[error("nothing to change: give a weight, a cap (or no cap), or pause or resume")]
    Nothing,
}

impl LimitsChange {
    /// Checks it as the table would, with an error that says what is allowed.
    pub fn validate(&self, tenant_id: &str) -> Result<(), LimitsError> {
        if tenant_id.is_empty() {
            return Err(LimitsError::NoTenant);
        }
        if let Some(w) = self.weight {
            if !(1..=MAX_WEIGHT).contains(&w) {
                return Err(LimitsError::Weight(w));
            }
        }
        if let Some(Some(cap)) = self.max_per_second {
            if cap < 1 {
                return Err(LimitsError::Cap(cap));
            }
        }
        if *self == Self::default() {
            return Err(LimitsError::Nothing);
        }
        Ok(())
    }
}

/// A failed change.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Invalid(#[from] LimitsError),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

const COLUMNS: &str = "l.tenant_id, l.weight, l.max_per_second, l.paused, l.updated_at";

fn from_row(row: &tokio_postgres::Row) -> Result<TenantLimits, tokio_postgres::Error> {
    Ok(TenantLimits {
        tenant_id: row.try_get("tenant_id")?,
        weight: row.try_get("weight")?,
        max_per_second: row.try_get("max_per_second")?,
        paused: row.try_get("paused")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Every tenant with a row, by tenant id.
pub async fn list(client: &Client) -> Result<Vec<TenantLimits>, tokio_postgres::Error> {
    client
        .query(
            &format!("SELECT {COLUMNS} FROM outbox_tenant_limits l ORDER BY l.tenant_id"),
            &[],
        )
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Changes a tenant's row (creating it with the defaults first) and returns it. A cap that is set
/// or changed starts with a full second's worth (setting the same cap again keeps the bucket as
/// it is); a claim holding the row right now finishes first (the claim's lock).
pub async fn set(
    client: &Client,
    tenant_id: &str,
    change: &LimitsChange,
) -> Result<TenantLimits, ChangeError> {
    change.validate(tenant_id)?;
    let set_cap = change.max_per_second.is_some();
    let cap = change.max_per_second.flatten();
    let row = client
        .query_one(
            &format!(
                "WITH changed AS (
                     INSERT INTO outbox_tenant_limits AS l (tenant_id, weight, max_per_second, paused)
                     VALUES ($1, coalesce($2, 1), $4, coalesce($5, false))
                     ON CONFLICT (tenant_id) DO UPDATE
                     SET weight = coalesce($2, l.weight),
                         max_per_second = CASE WHEN $3 THEN $4 ELSE l.max_per_second END,
                         tokens = CASE WHEN $3 AND l.max_per_second IS DISTINCT FROM $4 THEN NULL
                                       ELSE l.tokens END,
                         paused = coalesce($5, l.paused),
                         updated_at = now()
                     RETURNING l.*)
                 SELECT {COLUMNS} FROM changed l"
            ),
            &[&tenant_id, &change.weight, &set_cap, &cap, &change.paused],
        )
        .await?;
    Ok(from_row(&row)?)
}

/// Removes a tenant's row (weight 1, no cap, not paused again). Returns whether it had one.
pub async fn clear(client: &Client, tenant_id: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .execute(
            "DELETE FROM outbox_tenant_limits WHERE tenant_id = $1",
            &[&tenant_id],
        )
        .await?
        == 1)
}
