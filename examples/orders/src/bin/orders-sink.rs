//! The orders service's sink: an SQS-triggered Lambda applying its read models through the inbox.

#[tokio::main]
async fn main() -> Result<(), pg_outbox::sqs::LambdaError> {
    pg_outbox::sqs::run(orders::projections(), orders::CONSUMER).await
}
