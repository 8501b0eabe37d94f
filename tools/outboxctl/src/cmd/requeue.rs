//! What `redrive` and `replay` share: the preview and the question, the requeue, and its report.

use serde_json::json;
use tokio_postgres::Client;

use pg_outbox::postgres::admin::{self, Requeue, Selection};

use crate::args::Confirm;
use crate::confirm::preview_and_confirm;
use crate::render;

/// Shows what `which` selects, asks, requeues it, and prints what changed (for a redrive, with
/// the dead events that still hold back the redriven ones).
pub async fn run(
    client: &Client,
    which: Requeue,
    selection: &Selection,
    confirm: &Confirm,
) -> super::CliResult {
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
