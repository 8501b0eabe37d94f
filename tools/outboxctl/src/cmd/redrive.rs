//! `outboxctl redrive`.

use clap::Args;

use pg_outbox::postgres::admin::Requeue;

use crate::args::{Confirm, SelectDead};

/// Put dead events back in line; each aggregate's events still go out in version order.
#[derive(Args)]
pub struct Redrive {
    #[command(flatten)]
    select: SelectDead,
    #[command(flatten)]
    confirm: Confirm,
}

impl Redrive {
    /// Redrives the selected dead events, once confirmed.
    pub async fn run(self) -> super::CliResult {
        let client = super::admin_connection().await?;
        let selection = self.select.selection();
        super::requeue::run(&client, Requeue::Dead, &selection, &self.confirm).await
    }
}
