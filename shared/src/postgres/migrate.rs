//! Schema migrations: the SQL files under `migrations/`, embedded at build time and applied in
//! order by refinery, which records what ran in its own history table.

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Applies every migration not applied yet; returns the names of those it applied.
pub async fn run_migrations(client: &mut Client) -> Result<Vec<String>, refinery::Error> {
    let report = embedded::migrations::runner().run_async(client).await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}
