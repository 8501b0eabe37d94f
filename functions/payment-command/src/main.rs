//! Lambda entry point: reads configuration and opens the database connection once per cold start,
//! then serves invocations.

use lambda_runtime::{run, service_fn, Error};
use outbox_shared::aws::secrets::database_settings_from_env;
use outbox_shared::config::init_error;
use outbox_shared::postgres::payments::PgPaymentStore;
use outbox_shared::postgres::Db;
use payment_command::{HandlerConfig, PaymentCommandHandler};

#[tokio::main]
async fn main() -> Result<(), Error> {
    outbox_shared::telemetry::init_tracing();
    let settings = database_settings_from_env().await.map_err(init_error)?;
    let config = HandlerConfig::from_env().map_err(init_error)?;
    let store = PgPaymentStore::new(Db::new(settings));
    store.db().warm_up().await;
    let handler = PaymentCommandHandler::new(store, config);
    run(service_fn(|event| handler.handle(event))).await
}
