//! `outboxctl replay`.

use clap::Args;

use pg_outbox::postgres::admin::Requeue;

use crate::args::{parse_time, Confirm, Select};

/// Deliver already published events again (to rebuild a consumer): same event ids and
/// versions, in version order among one aggregate's replays, outside the aggregate's live
/// order (its new events do not wait for them). Consumers that deduplicate by event id or
/// aggregate version skip events they have applied.
#[derive(Args)]
pub struct Replay {
    #[command(flatten)]
    select: Select,
    /// Events created at or after this time (RFC 3339, e.g. 2026-11-22T10:00:00Z).
    #[arg(long, value_parser = parse_time)]
    from: Option<chrono::DateTime<chrono::Utc>>,
    /// Events created before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    to: Option<chrono::DateTime<chrono::Utc>>,
    #[command(flatten)]
    confirm: Confirm,
}

impl Replay {
    /// Marks the selected published events for delivery again, once confirmed.
    pub async fn run(self) -> super::CliResult {
        let client = super::admin_connection().await?;
        let mut selection = self.select.selection();
        selection.from = self.from;
        selection.to = self.to;
        if selection.event_ids.is_empty()
            && selection.aggregate_id.is_none()
            && self.from.is_none()
            && self.to.is_none()
        {
            return Err(
                "replay needs --event-id, --aggregate or a time range (--from/--to)".into(),
            );
        }
        super::requeue::run(&client, Requeue::Published, &selection, &self.confirm).await
    }
}
