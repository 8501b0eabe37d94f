//! Before a destructive command changes anything: what it would change, and the question (a
//! terminal's answer, or `--yes`).

use std::io::{BufRead, IsTerminal, Write};

use serde_json::json;
use tokio_postgres::Client;

use pg_outbox::postgres::admin::{self, Requeue, SelectedEvent, Selection};

use crate::args::Confirm;
use crate::render;

/// Asks on the terminal; without one, only `--yes` goes ahead.
pub fn confirmed(question: &str, confirm: &Confirm) -> Result<bool, Box<dyn std::error::Error>> {
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
pub async fn preview_and_confirm(
    client: &Client,
    which: Requeue,
    selection: &Selection,
    confirm: &Confirm,
    (verb, noun, with_error): (&str, &str, bool),
    note: &str,
) -> Result<Option<(u64, Vec<SelectedEvent>)>, Box<dyn std::error::Error>> {
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
