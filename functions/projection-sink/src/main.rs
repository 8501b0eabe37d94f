//! Lambda entry point: configuration and the database connection once per cold start.

use lambda_runtime::{run, service_fn, Error};
use outbox_shared::aws::secrets::database_from_env;
use outbox_shared::config::optional_env;
use outbox_shared::consumer::{InboxRetention, Projections};
use outbox_shared::failure::or_init_failed;
use outbox_shared::postgres::payment_projection::PaymentProjections;
use outbox_shared::postgres::projections::PgProjectionStore;
use projection_sink::{ProjectionSink, DEFAULT_CONSUMER, SERVICE};

#[tokio::main]
async fn main() -> Result<(), Error> {
    outbox_shared::telemetry::init_tracing();
    let db = or_init_failed(SERVICE, database_from_env().await).await?;
    let consumer = optional_env("SINK_CONSUMER").unwrap_or_else(|| DEFAULT_CONSUMER.into());
    let retention = or_init_failed(SERVICE, InboxRetention::from_env()).await?;
    // The read models this sink keeps: register yours here (docs/extending.md).
    let projections = Projections::new().with(PaymentProjections);
    let store = PgProjectionStore::new(db, projections);
    store.db().warm_up().await;
    let sink = ProjectionSink::new(store, consumer).with_retention(retention);
    run(service_fn(|event| projection_sink::handle(&sink, event))).await
}
