//! `outboxctl discard`.

use clap::Args;
use serde_json::json;

use pg_outbox::postgres::admin::{self, Requeue};

use crate::args::{Confirm, SelectDead};
use crate::confirm::preview_and_confirm;
use crate::render;

/// Give up dead events: kept with the reason for audit, never published; each aggregate's
/// next event goes. Prints what it unparks.
#[derive(Args)]
pub struct Discard {
    #[command(flatten)]
    select: SelectDead,
    /// Why (kept with each event).
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    confirm: Confirm,
}

impl Discard {
    /// Discards the selected dead events, once confirmed, and prints what that unparked.
    pub async fn run(self) -> super::CliResult {
        let client = super::admin_connection().await?;
        let selection = self.select.selection();
        let confirm = &self.confirm;
        selection.validate()?;
        if self.reason.trim().is_empty() {
            return Err("--reason must say why the events are given up".into());
        }
        let Some((count, _)) = preview_and_confirm(
            &client,
            Requeue::Dead,
            &selection,
            confirm,
            ("discard", "dead", true),
            " (never published)",
        )
        .await?
        else {
            return Ok(());
        };
        let report = admin::discard(&client, &selection, &self.reason).await?;
        if confirm.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "selected": count,
                    "discarded": report.discarded,
                    "held": report.held,
                    "unparked": report.unparked,
                }))?
            );
            return Ok(());
        }
        println!(
            "{} event{} discarded",
            report.discarded,
            if report.discarded == 1 { "" } else { "s" }
        );
        if report.held > 0 {
            println!(
                "{} held by a transaction right now: run the discard again",
                report.held
            );
        }
        if !report.unparked.is_empty() {
            println!("\nNow first in line for their aggregates (unparked):");
            print!("{}", render::events(&report.unparked, false));
        }
        Ok(())
    }
}
