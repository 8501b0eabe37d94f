//! The payment service's migrations (`migrations/payments/`: payments, refunds, their projections
//! and functions), in a history table of their own (`payments_schema_history`), always after the
//! toolkit's, whose tables they use.

use pg_outbox::postgres::migrate::{self, refinery, MigrationSet};
use pg_outbox::tokio_postgres::Client;

/// The history table of the payment service's migrations.
pub const PAYMENTS_HISTORY_TABLE: &str = "payments_schema_history";

mod embedded {
    refinery::embed_migrations!("../migrations/payments");
}

/// The payment service's set.
pub const PAYMENTS: MigrationSet = MigrationSet {
    folder: "payments",
    history_table: PAYMENTS_HISTORY_TABLE,
    runner: embedded::migrations::runner,
    // Before the split, one set held these: V1 holds the payments part of V1, V2 of V2, V3 of
    // V5 and V4 of V7.
    before_split: &[(1, 1), (2, 2), (3, 5), (4, 7)],
};

/// Applies the payment service's migrations not applied yet; returns the names of those it
/// applied. The toolkit's must be applied first ([`run_migrations`] does both).
pub async fn run_payments_migrations(client: &mut Client) -> Result<Vec<String>, refinery::Error> {
    migrate::run_set(client, &PAYMENTS).await
}

/// Applies the toolkit's migrations, then the payment service's; returns the names applied
/// (`outbox/V1__outbox`, `payments/V1__payments`, ...).
pub async fn run_migrations(client: &mut Client) -> Result<Vec<String>, refinery::Error> {
    let mut applied = migrate::run_outbox_migrations(client).await?;
    applied.extend(run_payments_migrations(client).await?);
    Ok(applied)
}
