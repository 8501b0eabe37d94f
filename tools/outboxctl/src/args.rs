//! Options several subcommands share (which events, `--yes`/`--json`), and the parsers of the
//! values options take.

use std::time::Duration;

use clap::Args;
use uuid::Uuid;

use pg_outbox::postgres::admin::Selection;

/// Which events a redrive, discard or replay takes.
#[derive(Args)]
pub struct Select {
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

impl Select {
    /// The selection these options name.
    pub fn selection(&self) -> Selection {
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

/// Which dead events a redrive or discard takes: [`Select`], or `--all`.
#[derive(Args)]
pub struct SelectDead {
    #[command(flatten)]
    select: Select,
    /// Every dead event (still narrowed by the other options).
    #[arg(long)]
    all: bool,
}

impl SelectDead {
    /// The selection these options name.
    pub fn selection(&self) -> Selection {
        Selection {
            all: self.all,
            ..self.select.selection()
        }
    }
}

/// How a destructive command asks, and what it prints.
#[derive(Args)]
pub struct Confirm {
    /// Do it without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn parse_aggregate(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('/') {
        Some((t, id)) if !t.is_empty() && !id.is_empty() => Ok((t.to_owned(), id.to_owned())),
        _ => Err(format!("{raw:?} is not TYPE/ID, e.g. payment/pay_123")),
    }
}

/// An RFC 3339 time.
pub fn parse_time(raw: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{raw:?} is not an RFC 3339 time such as 2026-11-22T10:00:00Z: {e}"))
}

/// `7d`, `36h`, `90m`, `45s`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
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

/// A share of the time, 0.01 to 1.
pub fn parse_share(raw: &str) -> Result<f64, String> {
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
}
