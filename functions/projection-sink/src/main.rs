//! Lambda entry point: the payment projections, applied by the library's SQS sink.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    pg_outbox::sqs::run(
        payments::projection::projections(),
        projection_sink::DEFAULT_CONSUMER,
    )
    .await
}
