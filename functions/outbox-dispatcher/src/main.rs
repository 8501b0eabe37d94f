//! Lambda entry point: configuration, the database connection and the bus client are set up once
//! per cold start; every invocation drains the outbox.

use lambda_runtime::{run, service_fn, Error};
use outbox_dispatcher::SERVICE;
use pg_outbox::aws::s3::S3PayloadStore;
use pg_outbox::aws::secrets::database_from_env;
use pg_outbox::aws::{sdk_config, BusPublisher};
use pg_outbox::claim_check::ClaimCheckSettings;
use pg_outbox::dispatcher::{ClaimCheck, DispatcherConfig, OutboxDispatcher, Target};
use pg_outbox::failure::or_init_failed;
use pg_outbox::postgres::outbox::PgOutboxStore;

#[tokio::main]
async fn main() -> Result<(), Error> {
    pg_outbox::telemetry::init_tracing();
    let db = or_init_failed(SERVICE, database_from_env().await).await?;
    let target = or_init_failed(SERVICE, Target::from_env()).await?;
    let config = or_init_failed(SERVICE, DispatcherConfig::from_env()).await?;
    let sdk = sdk_config().await;
    let publisher = or_init_failed(SERVICE, BusPublisher::new(&sdk, &target).await).await?;
    let claim_check = or_init_failed(SERVICE, ClaimCheckSettings::from_env()).await?;
    let store = PgOutboxStore::new(db);
    store.db().warm_up().await;
    // The log stream names this execution environment: it identifies the lease holder.
    let worker = std::env::var("AWS_LAMBDA_LOG_STREAM_NAME")
        .unwrap_or_else(|_| format!("outbox-dispatcher-{}", std::process::id()));
    let mut dispatcher = OutboxDispatcher::new(store, publisher, config, worker);
    if let Some(settings) = claim_check {
        dispatcher = dispatcher.with_claim_check(ClaimCheck {
            settings,
            store: std::sync::Arc::new(S3PayloadStore::new(&sdk)),
        });
    }
    run(service_fn(|event| {
        outbox_dispatcher::handle(&dispatcher, event)
    }))
    .await
}
