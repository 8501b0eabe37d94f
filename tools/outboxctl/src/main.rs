//! `outboxctl`: the outbox's admin command line. Connects with the same settings as the functions
//! (`DATABASE_URL` or `DATABASE_SECRET_ARN`, `DATABASE_TLS`, `DATABASE_CA_FILE`).
//!
//! Past 400 lines: every subcommand still lives here; one file per subcommand is the next step
//! of the layout work.

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
use outbox_shared::consumer::InboxRetention;
use outbox_shared::consumer::Projections;
use outbox_shared::dispatcher::{DispatcherConfig, OutboxDispatcher, Target};
use outbox_shared::nats::{ensure_stream, ConsumeReport, NatsSettings, StreamSpec};
use outbox_shared::postgres::admin::{self, Requeue, Selection};
use outbox_shared::postgres::migrate::run_migrations;
use outbox_shared::postgres::outbox::PgOutboxStore;
use outbox_shared::postgres::payment_projection::PaymentProjections;
use outbox_shared::postgres::projections::PgProjectionStore;
use outbox_shared::postgres::ConnectionLimits;

#[derive(Parser)]
#[command(
    name = "outboxctl",
    version,
    about = "Administer the transactional outbox",
    after_help = "Destructive commands (redrive, discard, replay, cleanup) show what they would change and \
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
    /// (`OUTBOX_TARGET`, `SNS_TOPIC_ARN` / `EVENT_BUS_NAME` / `NATS_*`, `DISPATCH_*`). With
    /// `DISPATCH_IDLE_POLL_MS` set it keeps polling until the time is up: a long-running relay
    /// next to NATS.
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
    /// Give up dead events: kept with the reason for audit, never published; each aggregate's
    /// next event goes. Prints what it unparks.
    Discard {
        #[command(flatten)]
        select: Select,
        /// Every dead event (still narrowed by the other options).
        #[arg(long)]
        all: bool,
        /// Why (kept with each event).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Deliver already published events again (to rebuild a consumer): same event ids and
    /// versions, in version order among one aggregate's replays, outside the aggregate's live
    /// order (its new events do not wait for them). Consumers that deduplicate by event id or
    /// aggregate version skip events they have applied.
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
    /// Delete published events older than the retention, in short batches (with --inbox: the
    /// consumers' inbox entries instead).
    Cleanup {
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
    },
    /// Capture a table's row changes into the outbox with a trigger, for code that cannot
    /// append events itself: `<table>.created|updated|deleted`, in the writer's transaction.
    Capture {
        #[command(subcommand)]
        action: CaptureAction,
    },
    /// NATS JetStream (`NATS_URL`, `NATS_CREDS_FILE`): create the outbox's stream, or apply the
    /// payment projections from a durable consumer through the inbox.
    Nats {
        #[command(subcommand)]
        action: NatsAction,
    },
}

#[derive(Subcommand)]
enum NatsAction {
    /// Create the stream, or update it to these settings (prints its state as JSON).
    Stream {
        /// Stream name.
        #[arg(long, default_value = "OUTBOX")]
        name: String,
        /// Subjects it stores (repeatable). Default: `<NATS_SUBJECT_PREFIX or outbox>.>`.
        #[arg(long = "subject")]
        subjects: Vec<String>,
        /// JetStream drops a message whose `Nats-Msg-Id` (the event id) it stored within this
        /// window: a re-publish after a dispatcher died between publish and mark.
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        duplicate_window: Duration,
        /// Keep at most this many messages, refusing new ones when full (the dispatcher retries
        /// them). Default: unlimited.
        #[arg(long)]
        max_messages: Option<i64>,
        /// Drop messages older than this (e.g. 7d). Default: kept.
        #[arg(long, value_parser = parse_duration)]
        max_age: Option<Duration>,
    },
    /// Apply the stream's events to the payment projections through the inbox, from a durable
    /// pull consumer; each message is acknowledged once its effect committed.
    Consume {
        /// The stream.
        #[arg(long, default_value = "OUTBOX")]
        stream: String,
        /// Durable consumer name on the stream (created if missing).
        #[arg(long, default_value = "projection-sink")]
        durable: String,
        /// The inbox consumer the events are applied as. Keep the SQS sink's name
        /// (`SINK_CONSUMER`, default `payment-projections`) when both feed the same projection
        /// tables: the inbox then applies each event once whichever path brings it.
        #[arg(long, default_value = "payment-projections")]
        inbox_consumer: String,
        /// Only these subjects (e.g. `outbox.payment.>`).
        #[arg(long)]
        filter_subject: Option<String>,
        /// Messages per fetch and per database transaction.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
        batch: u16,
        /// Deliveries of a message before JetStream gives up on it.
        #[arg(long, default_value_t = 10)]
        max_deliver: i64,
        /// Stop after this many seconds (default: run until stopped).
        #[arg(long)]
        for_seconds: Option<u64>,
        /// Stop at the first fetch that finds nothing (to catch up and exit).
        #[arg(long)]
        until_idle: bool,
    },
}

#[derive(Subcommand)]
enum CaptureAction {
    /// Install (or re-install) the capture trigger on a table.
    Enable {
        /// The table, optionally schema-qualified (e.g. crm.customers).
        #[arg(long)]
        table: String,
        /// Aggregate type of its events (e.g. customer); the row's primary key is the
        /// aggregate id.
        #[arg(long)]
        aggregate_type: String,
        /// The column holding each row's tenant.
        #[arg(long)]
        tenant_column: String,
    },
    /// Remove the capture trigger from a table.
    Disable {
        /// The table, optionally schema-qualified.
        #[arg(long)]
        table: String,
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
    if let Command::Nats {
        action:
            NatsAction::Stream {
                name,
                subjects,
                duplicate_window,
                max_messages,
                max_age,
            },
    } = &cli.command
    {
        let settings = NatsSettings::from_env()?;
        let client = settings.connect("outboxctl").await?;
        let jetstream = async_nats::jetstream::new(client);
        let subjects = if subjects.is_empty() {
            vec![format!("{}.>", settings.subject_prefix)]
        } else {
            subjects.clone()
        };
        let spec = StreamSpec {
            name: name.clone(),
            subjects,
            duplicate_window: *duplicate_window,
            max_messages: *max_messages,
            max_age: *max_age,
        };
        let info = tokio::time::timeout(Duration::from_secs(10), ensure_stream(&jetstream, &spec))
            .await
            .map_err(|_| "NATS did not answer within 10 s")?
            .map_err(|e| format!("creating the stream failed: {e}"))?;
        println!(
            "{}",
            json!({"stream": info.config.name, "subjects": info.config.subjects,
                   "messages": info.state.messages,
                   "duplicateWindowSeconds": info.config.duplicate_window.as_secs()})
        );
        return Ok(());
    }
    // Credentials re-read when the database refuses them, as in the functions.
    let db = database_from_env().await?;
    if let Command::Nats {
        action:
            NatsAction::Consume {
                stream,
                durable,
                inbox_consumer,
                filter_subject,
                batch,
                max_deliver,
                for_seconds,
                until_idle,
            },
    } = &cli.command
    {
        let settings = NatsSettings::from_env()?;
        let jetstream = async_nats::jetstream::new(settings.connect("outboxctl").await?);
        let consumer = outbox_shared::nats::sink_consumer(
            &jetstream,
            stream,
            durable,
            filter_subject.as_deref(),
            *max_deliver,
        )
        .await
        .map_err(|e| format!("the durable consumer could not be set up: {e}"))?;
        let store = PgProjectionStore::new(db, Projections::new().with(PaymentProjections));
        let deadline = for_seconds.map(|s| Instant::now() + Duration::from_secs(s));
        let mut sums = ConsumeReport::default();
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let report = match outbox_shared::nats::consume(
                &consumer,
                &store,
                inbox_consumer,
                usize::from(*batch),
                Duration::from_secs(1),
                Duration::from_secs(1),
            )
            .await
            {
                Ok(report) => report,
                // NATS restarting or unreachable: the client reconnects; try again shortly.
                Err(e) => {
                    eprintln!("outboxctl: consuming failed, retrying in 1 s: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            sums += report;
            if *until_idle && report.received == 0 {
                break;
            }
        }
        println!("{}", serde_json::to_string(&sums)?);
        return Ok(());
    }
    if let Command::Dispatch { for_seconds } = cli.command {
        let target = Target::from_env()?;
        let mut config = DispatcherConfig::from_env()?;
        config.safety_margin = Duration::ZERO;
        let publisher = BusPublisher::new(&sdk_config().await, &target).await?;
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
        Command::Dispatch { .. } | Command::Nats { .. } => unreachable!("handled above"),
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
        Command::Discard {
            select,
            all,
            reason,
            confirm,
        } => {
            let mut selection = select.selection();
            selection.all = all;
            discard(&client, &selection, &reason, &confirm).await?;
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
            inbox,
            batch_size,
            duty_cycle,
            max_batches,
            confirm,
        } => {
            let what = if inbox {
                admin::Expiring::Inbox
            } else {
                admin::Expiring::Outbox
            };
            let retention = match (older_than, what) {
                (Some(d), _) => d,
                (None, admin::Expiring::Outbox) => DispatcherConfig::from_env()?
                    .retention
                    .ok_or("OUTBOX_RETENTION_HOURS is 0 (keep everything): pass --older-than")?,
                (None, admin::Expiring::Inbox) => InboxRetention::from_env()?
                    .keep
                    .ok_or("INBOX_RETENTION_DAYS is 0 (keep everything): pass --older-than")?,
            };
            let pace = admin::Pace::Duty(duty_cycle);
            let batch = admin::Batches {
                size: batch_size,
                pace,
                max_statements: max_batches,
            };
            cleanup(&client, what, retention, batch, &confirm).await?;
        }
        Command::Capture { action } => {
            let message: String = match action {
                CaptureAction::Enable {
                    table,
                    aggregate_type,
                    tenant_column,
                } => client
                    .query_one(
                        "SELECT outbox_capture_enable($1::text::regclass, $2, $3)",
                        &[&table, &aggregate_type, &tenant_column],
                    )
                    .await?
                    .get(0),
                CaptureAction::Disable { table } => client
                    .query_one(
                        "SELECT outbox_capture_disable($1::text::regclass)",
                        &[&table],
                    )
                    .await?
                    .get(0),
            };
            println!("{message}");
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

/// Shows what `which` selects (a sample, and the count) and asks before changing it (`--yes`
/// skips the question, `--json` prints only the result). `None`: nothing to do, or declined.
async fn preview_and_confirm(
    client: &Client,
    which: Requeue,
    selection: &Selection,
    confirm: &Confirm,
    (verb, noun, with_error): (&str, &str, bool),
    note: &str,
) -> Result<Option<(u64, Vec<admin::SelectedEvent>)>, Box<dyn std::error::Error>> {
    let (count, sample) = admin::preview(client, which, selection, 20).await?;
    if count == 0 {
        if confirm.json {
            println!("{}", json!({"selected": 0, "changed": 0}));
        } else {
            println!("no {noun} events match");
        }
        return Ok(None);
    }
    if !confirm.json {
        print!("{}", render::events(&sample, with_error));
        if count > sample.len() as u64 {
            println!("… and {} more", count - sample.len() as u64);
        }
    }
    let question = format!(
        "{verb} {count} {noun} event{}{note}",
        if count == 1 { "" } else { "s" }
    );
    if !confirmed(&question, confirm)? {
        println!("nothing changed");
        return Ok(None);
    }
    Ok(Some((count, sample)))
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
    let Some((count, sample)) = preview_and_confirm(
        client,
        which,
        selection,
        confirm,
        (verb, noun, with_error),
        "",
    )
    .await?
    else {
        return Ok(());
    };
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
    let plural = if changed == 1 { "" } else { "s" };
    match which {
        Requeue::Dead => println!(
            "{changed} event{plural} back in line: the next dispatcher run publishes them, each aggregate in version order"
        ),
        Requeue::Published => println!(
            "{changed} event{plural} to deliver again: the next dispatcher run re-publishes them (same event ids and versions), each aggregate's replays in version order"
        ),
    }
    if !blocking.is_empty() {
        println!(
            "\nStill held back by earlier dead events of the same aggregates (redrive these too):"
        );
        print!("{}", render::events(&blocking, true));
    }
    Ok(())
}

async fn discard(
    client: &Client,
    selection: &Selection,
    reason: &str,
    confirm: &Confirm,
) -> CliResult {
    selection.validate()?;
    if reason.trim().is_empty() {
        return Err("--reason must say why the events are given up".into());
    }
    let Some((count, _)) = preview_and_confirm(
        client,
        Requeue::Dead,
        selection,
        confirm,
        ("discard", "dead", true),
        " (never published)",
    )
    .await?
    else {
        return Ok(());
    };
    let report = admin::discard(client, selection, reason).await?;
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

async fn cleanup(
    client: &Client,
    what: admin::Expiring,
    retention: Duration,
    batch: admin::Batches,
    confirm: &Confirm,
) -> CliResult {
    let expired = admin::count_expired(client, what, retention).await?;
    let age = render::age(retention.as_secs_f64());
    let rows = match what {
        admin::Expiring::Outbox => format!("events published more than {age} ago"),
        admin::Expiring::Inbox => format!("inbox entries applied more than {age} ago"),
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
    let run = admin::run_cleanup(client, what, retention, batch, &never, |run| {
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
