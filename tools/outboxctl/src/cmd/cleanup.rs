//! `outboxctl cleanup`.

use std::time::Duration;

use clap::Args;
use serde_json::json;

use pg_outbox::consumer::InboxRetention;
use pg_outbox::dispatcher::DispatcherConfig;
use pg_outbox::postgres::admin::{self, Batches, Expiring, Pace};

use crate::args::{parse_duration, parse_share, Confirm};
use crate::confirm::confirmed;
use crate::render;

/// Delete published events older than the retention, in short batches (with --inbox: the
/// consumers' inbox entries instead).
#[derive(Args)]
pub struct Cleanup {
    /// Retention: published (or, with --inbox, applied) longer ago than this (e.g. 7d, 36h,
    /// 90m, 45s). Default: `OUTBOX_RETENTION_HOURS` hours, else 7 days; with --inbox,
    /// `INBOX_RETENTION_DAYS` days, else 14.
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Delete inbox entries (`processed_events`) instead of published events. Aggregate
    /// positions stay: a redelivery older than the retention is still recognised as applied.
    #[arg(long)]
    inbox: bool,
    /// Rows per delete statement (one short transaction each).
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(i32).range(1..=50_000))]
    batch_size: i32,
    /// Share of the time spent deleting (0.01–1): after a statement that took t, wait
    /// t·(1−share)/share, leaving the database to the dispatchers. 1 runs back to back.
    #[arg(long, default_value_t = 0.25, value_parser = parse_share)]
    duty_cycle: f64,
    /// Stop after this many statements.
    #[arg(long)]
    max_batches: Option<u64>,
    #[command(flatten)]
    confirm: Confirm,
}

impl Cleanup {
    /// Counts what the retention expires, asks, and deletes it in paced batches.
    pub async fn run(self) -> super::CliResult {
        let client = super::admin_connection().await?;
        let what = if self.inbox {
            Expiring::Inbox
        } else {
            Expiring::Outbox
        };
        let retention = match (self.older_than, what) {
            (Some(d), _) => d,
            (None, Expiring::Outbox) => DispatcherConfig::from_env()?
                .retention
                .ok_or("OUTBOX_RETENTION_HOURS is 0 (keep everything): pass --older-than")?,
            (None, Expiring::Inbox) => InboxRetention::from_env()?
                .keep
                .ok_or("INBOX_RETENTION_DAYS is 0 (keep everything): pass --older-than")?,
        };
        let batches = Batches {
            size: self.batch_size,
            pace: Pace::Duty(self.duty_cycle),
            max_statements: self.max_batches,
        };
        let confirm = &self.confirm;
        let expired = admin::count_expired(&client, what, retention).await?;
        let age = render::age(retention.as_secs_f64());
        let rows = match what {
            Expiring::Outbox => format!("events published more than {age} ago"),
            Expiring::Inbox => format!("inbox entries applied more than {age} ago"),
        };
        if expired == 0 {
            if confirm.json {
                println!("{}", json!({"expired": 0, "deleted": 0}));
            } else {
                println!("no {rows}");
            }
            return Ok(());
        }
        let question = format!("delete {expired} {rows}");
        if !confirmed(&question, confirm)? {
            println!("nothing changed");
            return Ok(());
        }
        let never = std::sync::atomic::AtomicBool::new(false);
        let quiet = confirm.json;
        let run = admin::run_cleanup(&client, what, retention, batches, &never, |run| {
            if !quiet && run.statements % 20 == 0 {
                eprintln!("… {} deleted", run.deleted);
            }
        })
        .await?;
        if confirm.json {
            println!(
                "{}",
                json!({"expired": expired, "deleted": run.deleted, "statements": run.statements, "seconds": run.seconds})
            );
        } else {
            println!(
                "deleted {} rows in {} statements, {:.1} s ({:.0} rows/s)",
                run.deleted,
                run.statements,
                run.seconds,
                run.deleted as f64 / run.seconds.max(1e-9)
            );
        }
        Ok(())
    }
}
