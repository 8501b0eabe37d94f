//! `outboxctl`: the outbox's admin command line. Connects with the same settings as the functions
//! (`DATABASE_URL` or `DATABASE_SECRET_ARN`, `DATABASE_TLS`, `DATABASE_CA_FILE`).

mod render;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

use outbox_shared::aws::secrets::database_from_env;
use outbox_shared::aws::{sdk_config, BusPublisher};
use outbox_shared::dispatcher::{DispatcherConfig, OutboxDispatcher, Target};
use outbox_shared::postgres::admin::{self, Requeue, Selection};
use outbox_shared::postgres::migrate::run_migrations;
use outbox_shared::postgres::outbox::PgOutboxStore;
use outbox_shared::postgres::ConnectionLimits;

#[derive(Parser)]
#[command(
    name = "outboxctl",
    version,
    about = "Administer the transactional outbox",
    after_help = "Destructive commands (redrive, replay, cleanup) show what they would change and \
                  ask for confirmation; --yes skips the question (required when not on a terminal)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the schema migrations that have not been applied yet (safe to run again).
    Migrate,
    /// Drain the outbox now, as the dispatcher function does, with the same settings
    /// (`OUTBOX_TARGET`, `SNS_TOPIC_ARN` / `EVENT_BUS_NAME`, `DISPATCH_*`).
    Dispatch {
        /// Stop claiming after this many seconds even if rows are still due.
        #[arg(long, default_value_t = 60)]
        for_seconds: u64,
    },
    /// Counts by status and tenant, the oldest pending event, parked aggregates, last errors.
    Status {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Rows in the parked and last-error lists.
        #[arg(long, default_value_t = 10)]
        limit: i64,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Put dead events back in line; each aggregate's events still go out in version order.
    Redrive {
        #[command(flatten)]
        select: Select,
        /// Every dead event (still narrowed by the other options).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Publish already published events again (to rebuild a consumer), in aggregate order.
    /// Consumers that deduplicate by event id skip events they have applied.
    Replay {
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
    },
    /// Delete published events older than the retention, in short batches.
    Cleanup {
        /// Retention: published longer ago than this (e.g. 7d, 36h, 90m, 45s). Default:
        /// `OUTBOX_RETENTION_HOURS` hours, else 7 days.
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
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
    },
}

/// Which events a redrive or replay takes.
#[derive(Args)]
struct Select {
    /// This event (repeat for more).
    #[arg(long = "event-id")]
    event_ids: Vec<Uuid>,
    /// Events of this aggregate, as TYPE/ID (e.g. payment/pay_123); needs --tenant.
    #[arg(long, value_parser = parse_aggregate, requires = "tenant")]
    aggregate: Option<(String, String)>,
    /// Events of this type (e.g. payment.paid).
    #[arg(long)]
    event_type: Option<String>,
    /// Events of this tenant.
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Args)]
struct Confirm {
    /// Do it without asking.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

fn parse_aggregate(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('/') {
        Some((t, id)) if !t.is_empty() && !id.is_empty() => Ok((t.to_owned(), id.to_owned())),
        _ => Err(format!("{raw:?} is not TYPE/ID, e.g. payment/pay_123")),
    }
}

fn parse_time(raw: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{raw:?} is not an RFC 3339 time such as 2026-11-22T10:00:00Z: {e}"))
}

/// `7d`, `36h`, `90m`, `45s`.
fn parse_duration(raw: &str) -> Result<Duration, String> {
    let bad = || format!("{raw:?} is not a duration such as 7d, 36h, 90m or 45s");
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = raw.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3_600).ok_or_else(bad)?,
        "d" => n.checked_mul(86_400).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs))
}

impl Select {
    fn selection(&self) -> Selection {
        let (aggregate_type, aggregate_id) = match &self.aggregate {
            Some((t, id)) => (Some(t.clone()), Some(id.clone())),
            None => (None, None),
        };
        Selection {
            event_ids: self.event_ids.clone(),
            tenant_id: self.tenant.clone(),
            aggregate_type,
            aggregate_id,
            event_type: self.event_type.clone(),
            ..Selection::default()
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "outboxctl: {}",
                outbox_shared::telemetry::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> CliResult {
    // Credentials re-read when the database refuses them, as in the functions.
    let db = database_from_env().await?;
    if let Command::Dispatch { for_seconds } = cli.command {
        let target = Target::from_env()?;
        let mut config = DispatcherConfig::from_env()?;
        config.safety_margin = Duration::ZERO;
        let publisher = BusPublisher::new(&sdk_config().await, &target);
        let store = PgOutboxStore::new(db);
        let worker = format!("outboxctl-{}", std::process::id());
        let dispatcher = OutboxDispatcher::new(store, publisher, config, worker);
        let summary = dispatcher
            .drain(Instant::now() + Duration::from_secs(for_seconds))
            .await?;
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    // Administrative statements (a migration, a long cleanup) may run for long: no server-side
    // statement timeout for them.
    let limits = ConnectionLimits {
        statement_timeout: None,
        ..db.limits()
    };
    let db = db.with_limits(limits);
    let mut client = db.client().await?;
    match cli.command {
        Command::Migrate => {
            let applied = run_migrations(&mut client).await?;
            if applied.is_empty() {
                println!("schema is up to date");
            } else {
                for name in applied {
                    println!("applied {name}");
                }
            }
        }
        Command::Dispatch { .. } => unreachable!("handled above"),
        Command::Status {
            tenant,
            limit,
            json,
        } => {
            let report = admin::status(&client, tenant.as_deref(), limit.clamp(1, 1_000)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render::status(&report));
            }
        }
        Command::Redrive {
            select,
            all,
            confirm,
        } => {
            let mut selection = select.selection();
            selection.all = all;
            requeue(&client, Requeue::Dead, &selection, &confirm).await?;
        }
        Command::Replay {
            select,
            from,
            to,
            confirm,
        } => {
            let mut selection = select.selection();
            selection.from = from;
            selection.to = to;
            if selection.event_ids.is_empty()
                && selection.aggregate_id.is_none()
                && from.is_none()
                && to.is_none()
            {
                return Err(
                    "replay needs --event-id, --aggregate or a time range (--from/--to)".into(),
                );
            }
            requeue(&client, Requeue::Published, &selection, &confirm).await?;
        }
        Command::Cleanup {
            older_than,
            batch_size,
            duty_cycle,
            max_batches,
            confirm,
        } => {
            let retention = match older_than {
                Some(d) => d,
                None => DispatcherConfig::from_env()?
                    .retention
                    .ok_or("OUTBOX_RETENTION_HOURS is 0 (keep everything): pass --older-than")?,
            };
            let pace = admin::Pace::Duty(duty_cycle);
            cleanup(&client, retention, batch_size, pace, max_batches, &confirm).await?;
        }
    }
    Ok(())
}

/// Asks on the terminal; without one, only `--yes` goes ahead.
fn confirmed(question: &str, confirm: &Confirm) -> Result<bool, Box<dyn std::error::Error>> {
    if confirm.yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(
            format!("{question}: not confirmed (stdin is not a terminal): pass --yes").into(),
        );
    }
    eprint!("{question}? Type yes to go ahead: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "yes" | "y"))
}

async fn requeue(
    client: &Client,
    which: Requeue,
    selection: &Selection,
    confirm: &Confirm,
) -> CliResult {
    selection.validate()?;
    let (verb, noun, with_error) = match which {
        Requeue::Dead => ("redrive", "dead", true),
        Requeue::Published => ("replay", "published", false),
    };
    let (count, sample) = admin::preview(client, which, selection, 20).await?;
    if count == 0 {
        if confirm.json {
            println!("{}", json!({"selected": 0, "changed": 0}));
        } else {
            println!("no {noun} events match");
        }
        return Ok(());
    }
    if !confirm.json {
        print!("{}", render::events(&sample, with_error));
        if count > sample.len() as u64 {
            println!("… and {} more", count - sample.len() as u64);
        }
    }
    let question = format!(
        "{verb} {count} {noun} event{}",
        if count == 1 { "" } else { "s" }
    );
    if !confirmed(&question, confirm)? {
        println!("nothing changed");
        return Ok(());
    }
    let changed = admin::requeue(client, which, selection).await?;
    let blocking = match which {
        Requeue::Dead => admin::blocking_dead(client, selection).await?,
        Requeue::Published => Vec::new(),
    };
    if confirm.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "selected": count,
                "changed": changed,
                "events": sample,
                "stillBlockedBy": blocking,
            }))?
        );
        return Ok(());
    }
    println!(
        "{changed} event{} back in line: the next dispatcher run publishes them, each aggregate in version order",
        if changed == 1 { "" } else { "s" }
    );
    if !blocking.is_empty() {
        println!(
            "\nStill held back by earlier dead events of the same aggregates (redrive these too):"
        );
        print!("{}", render::events(&blocking, true));
    }
    Ok(())
}

async fn cleanup(
    client: &Client,
    retention: Duration,
    batch_size: i32,
    pace: admin::Pace,
    max_batches: Option<u64>,
    confirm: &Confirm,
) -> CliResult {
    let expired = admin::count_expired(client, retention).await?;
    let age = render::age(retention.as_secs_f64());
    if expired == 0 {
        if confirm.json {
            println!("{}", json!({"expired": 0, "deleted": 0}));
        } else {
            println!("no events published more than {age} ago");
        }
        return Ok(());
    }
    let question = format!("delete {expired} events published more than {age} ago");
    if !confirmed(&question, confirm)? {
        println!("nothing changed");
        return Ok(());
    }
    let never = std::sync::atomic::AtomicBool::new(false);
    let quiet = confirm.json;
    let run = admin::run_cleanup(
        client,
        retention,
        batch_size,
        pace,
        max_batches,
        &never,
        |run| {
            if !quiet && run.statements % 20 == 0 {
                eprintln!("… {} deleted", run.deleted);
            }
        },
    )
    .await?;
    if confirm.json {
        println!(
            "{}",
            json!({"expired": expired, "deleted": run.deleted, "statements": run.statements, "seconds": run.seconds})
        );
    } else {
        println!(
            "deleted {} events in {} statements, {:.1} s ({:.0} rows/s)",
            run.deleted,
            run.statements,
            run.seconds,
            run.deleted as f64 / run.seconds.max(1e-9)
        );
    }
    Ok(())
}

fn parse_share(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(share) if (0.01..=1.0).contains(&share) => Ok(share),
        _ => Err(format!("{raw:?} is not a share between 0.01 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("36h"), Ok(Duration::from_secs(36 * 3_600)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        for bad in ["", "7", "d", "7w", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn aggregates_are_type_slash_id() {
        assert_eq!(
            parse_aggregate("payment/pay_1"),
            Ok(("payment".into(), "pay_1".into()))
        );
        assert_eq!(
            parse_aggregate("payment/a/b"),
            Ok(("payment".into(), "a/b".into()))
        );
        for bad in ["payment", "/pay_1", "payment/", ""] {
            assert!(parse_aggregate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
