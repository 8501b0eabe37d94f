//! Human-readable output: aligned tables and the status page.

use std::fmt::Write;

use pg_outbox::postgres::admin::{SelectedEvent, StatusReport};

/// Columns padded to their widest cell; numbers right-aligned.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..headers.len())
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| !r[i].is_empty() && r[i].parse::<f64>().is_ok())
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i > 0 {
                out.push_str("  ");
            }
            if numeric[i] {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if i + 1 < cells.len() {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `text` cut to `max` characters, on one line.
pub fn clip(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// A duration in seconds as `42s`, `12m 5s`, `3h 20m`, `2d 4h`.
pub fn age(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m {}s", s / 60, s % 60),
        3_600..=86_399 => format!("{}h {}m", s / 3_600, (s % 3_600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3_600),
    }
}

/// The status page.
pub fn status(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Outbox status at {} UTC\n", time(report.taken_at));
    let mut rows: Vec<Vec<String>> = report
        .tenants
        .iter()
        .map(|t| {
            vec![
                t.tenant_id.clone(),
                t.pending.to_string(),
                t.published.to_string(),
                t.dead.to_string(),
                t.discarded.to_string(),
            ]
        })
        .collect();
    let sum = |f: fn(&pg_outbox::postgres::admin::TenantCounts) -> i64| {
        report.tenants.iter().map(f).sum::<i64>().to_string()
    };
    rows.push(vec![
        "(all tenants)".into(),
        sum(|t| t.pending),
        sum(|t| t.published),
        sum(|t| t.dead),
        sum(|t| t.discarded),
    ]);
    out.push_str(&table(
        &["TENANT", "PENDING", "PUBLISHED", "DEAD", "DISCARDED"],
        &rows,
    ));
    out.push('\n');
    if report.backlog.delayed > 0 {
        let _ = writeln!(
            out,
            "Delayed: {} pending events wait for their deliver_at (their aggregates' later events behind them)",
            report.backlog.delayed
        );
    }
    match &report.oldest_pending {
        Some(o) => {
            let _ = writeln!(
                out,
                "Oldest pending: {} old — event {} ({}, {}, {} attempts)",
                age(report.backlog.oldest_pending_age_seconds),
                o.event_id,
                o.tenant_id,
                o.event_type,
                o.attempts
            );
        }
        None => out.push_str("Oldest pending: none, every event is published or dead\n"),
    }
    let _ = writeln!(
        out,
        "Oldest transaction holding an xid (whole cluster): {}{}",
        age(report.backlog.oldest_transaction_age_seconds),
        if report.backlog.oldest_transaction_age_seconds > 600.0 {
            " — vacuum cannot clean the outbox behind it (docs/operations.md#oldest-transaction-age)"
        } else {
            ""
        }
    );
    let d = &report.dispatcher;
    if d.active.is_empty() {
        let woken = d
            .kicked_at
            .map(|t| format!("last woken by a command at {} UTC", time(t)))
            .unwrap_or_else(|| "never woken by a command".into());
        let _ = writeln!(out, "Dispatcher: not draining ({woken})");
    } else {
        for a in &d.active {
            let _ = writeln!(
                out,
                "Dispatcher: draining, {} (heartbeat holds until {} UTC)",
                a.owner,
                time(a.active_until)
            );
        }
    }
    out.push('\n');
    if report.parked.is_empty() {
        out.push_str("Parked aggregates: none\n");
    } else {
        out.push_str("Parked aggregates (held back by a dead event; `outboxctl redrive` them):\n");
        let rows: Vec<Vec<String>> = report
            .parked
            .iter()
            .map(|p| {
                vec![
                    p.tenant_id.clone(),
                    format!("{}/{}", p.aggregate_type, p.aggregate_id),
                    p.dead_version.to_string(),
                    p.dead_events.to_string(),
                    p.waiting.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["TENANT", "AGGREGATE", "DEAD VERSION", "DEAD", "WAITING"],
            &rows,
        ));
    }
    out.push('\n');
    if report.last_errors.is_empty() {
        out.push_str("Last errors: none\n");
    } else {
        out.push_str("Last errors (newest first):\n");
        let rows: Vec<Vec<String>> = report
            .last_errors
            .iter()
            .map(|e| {
                vec![
                    e.failed_at.map(time).unwrap_or_default(),
                    e.status.clone(),
                    e.event_id.to_string(),
                    e.tenant_id.clone(),
                    format!(
                        "{}/{} v{}",
                        e.aggregate_type, e.aggregate_id, e.aggregate_version
                    ),
                    e.attempts.to_string(),
                    clip(&e.last_error, 70),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "FAILED AT",
                "STATUS",
                "EVENT",
                "TENANT",
                "AGGREGATE",
                "ATTEMPTS",
                "ERROR",
            ],
            &rows,
        ));
    }
    out
}

/// The events a redrive or replay takes, as a table.
pub fn events(events: &[SelectedEvent], with_error: bool) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let mut row = vec![
                e.event_id.to_string(),
                e.tenant_id.clone(),
                format!(
                    "{}/{} v{}",
                    e.aggregate_type, e.aggregate_id, e.aggregate_version
                ),
                e.event_type.clone(),
                time(e.created_at),
            ];
            if with_error {
                row.push(clip(e.last_error.as_deref().unwrap_or(""), 60));
            }
            row
        })
        .collect();
    let mut headers = vec!["EVENT", "TENANT", "AGGREGATE", "TYPE", "CREATED"];
    if with_error {
        headers.push("ERROR");
    }
    table(&headers, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let out = table(
            &["TENANT", "PENDING"],
            &[
                vec!["acme".into(), "3".into()],
                vec!["globex-long".into(), "120".into()],
            ],
        );
        assert_eq!(
            out,
            "TENANT       PENDING\nacme               3\nglobex-long      120\n"
        );
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(0.4), "0s");
        assert_eq!(age(59.0), "59s");
        assert_eq!(age(725.0), "12m 5s");
        assert_eq!(age(12_000.0), "3h 20m");
        assert_eq!(age(187_200.0), "2d 4h");
    }

    #[test]
    fn long_errors_are_clipped_to_one_line() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("a\nb", 10), "a b");
        assert_eq!(clip("abcdefghijkl", 5), "abcd…");
    }
}
