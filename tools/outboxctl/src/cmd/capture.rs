//! `outboxctl capture`.

use clap::{Args, Subcommand};

/// Capture a table's row changes into the outbox with a trigger, for code that cannot
/// append events itself: `<table>.created|updated|deleted`, in the writer's transaction.
#[derive(Args)]
pub struct Capture {
    #[command(subcommand)]
    action: CaptureAction,
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

impl Capture {
    /// Installs or removes the trigger (migration functions `outbox_capture_enable` and
    /// `outbox_capture_disable`), and prints what they say.
    pub async fn run(self) -> super::CliResult {
        let client = super::admin_connection().await?;
        let message: String = match self.action {
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
        Ok(())
    }
}
