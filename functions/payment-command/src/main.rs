//! Lambda entry point: reads configuration and opens the database connection once per cold start,
//! then serves invocations. With `DISPATCHER_FUNCTION_NAME` set, each new event wakes the
//! dispatcher right after its commit.

use lambda_runtime::{run, service_fn, Error};
use payment_command::{HandlerConfig, PaymentCommandHandler, SERVICE};
use payments::store::PgPaymentStore;
use pg_outbox::aws::sdk_config;
use pg_outbox::aws::secrets::database_from_env;
use pg_outbox::aws::wake::LambdaWake;
use pg_outbox::config::optional_env;
use pg_outbox::failure::or_init_failed;

#[tokio::main]
async fn main() -> Result<(), Error> {
    pg_outbox::telemetry::init_tracing();
    let db = or_init_failed(SERVICE, database_from_env().await).await?;
    let config = or_init_failed(SERVICE, HandlerConfig::from_env()).await?;
    let store = PgPaymentStore::new(db);
    store.db().warm_up().await;
    let source = config.source.clone();
    let handler = PaymentCommandHandler::new(store, config);
    match optional_env("DISPATCHER_FUNCTION_NAME") {
        Some(function) => {
            let client = aws_sdk_lambda::Client::new(&sdk_config().await);
            let handler = handler.with_wake(LambdaWake::new(client, function, source));
            run(service_fn(|event| handler.handle(event))).await
        }
        None => run(service_fn(|event| handler.handle(event))).await,
    }
}
