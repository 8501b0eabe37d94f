//! (Past 400 lines: the two commands' SQL and transactions side by side, as each mirrors the other.)
//!
//! SQL of the `payments` and `refunds` tables, and the [`PaymentCommandStore`] adapter: each
//! command is one transaction that locks the payment row, asks the domain rules what to do, and
//! writes the new state together with its outbox event.

use chrono::{DateTime, Utc};
use pg_outbox::ports::{StoreError, WakeDecision};
use pg_outbox::postgres::Db;
use pg_outbox::producer::append_with_id;
use pg_outbox::tokio_postgres::types::Type;
use pg_outbox::tokio_postgres::{self, Client, Row, Transaction};
use uuid::Uuid;

use crate::domain::events::{PaymentPaidV1, PaymentRefundedV1};
use crate::domain::payment::{
    decide_mark_paid, decide_refund, first_version, MarkPaidDecision, PaymentState, PaymentStatus,
    RefundDecision,
};
use crate::domain::Currency;
use crate::ports::{
    MarkPaidCommand, MarkPaidOutcome, PaidReceipt, PaymentCommandStore, RefundCommand,
    RefundOutcome, RefundReceipt,
};

/// Creates the payment already paid, unless it exists. `ON CONFLICT DO NOTHING` waits for a
/// concurrent insert of the same payment to finish, so of two racing commands exactly one inserts.
const INSERT_PAID_IF_ABSENT: &str = "
    INSERT INTO payments (tenant_id, payment_id, status, amount_minor, currency,
                          verification_method, verified_by, paid_at, paid_event_id, version)
    VALUES ($1, $2, 'paid', $3, $4, $5, $6, now(), $7, $8)
    ON CONFLICT (tenant_id, payment_id) DO NOTHING
    RETURNING paid_at";

const SELECT_FOR_UPDATE: &str = "
    SELECT status, amount_minor, currency, refunded_minor, version, paid_at, paid_event_id
    FROM payments
    WHERE tenant_id = $1 AND payment_id = $2
    FOR UPDATE";

const UPDATE_PAID: &str = "
    UPDATE payments
    SET status = 'paid', amount_minor = $3, currency = $4, verification_method = $5,
        verified_by = $6, paid_at = now(), paid_event_id = $7, version = $8, updated_at = now()
    WHERE tenant_id = $1 AND payment_id = $2
    RETURNING paid_at";

const UPDATE_REFUNDED: &str = "
    UPDATE payments
    SET refunded_minor = $3, status = $4, version = $5, updated_at = now()
    WHERE tenant_id = $1 AND payment_id = $2";

const SELECT_REFUND_BY_KEY: &str = "
    SELECT refund_id, payment_id, amount_minor, refunded_total_minor, event_id, created_at
    FROM refunds
    WHERE tenant_id = $1 AND idempotency_key = $2";

const INSERT_REFUND: &str = "
    INSERT INTO refunds (tenant_id, refund_id, payment_id, idempotency_key, amount_minor,
                         refunded_total_minor, event_id, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, now())
    RETURNING created_at";

/// Unique constraint behind "one refund per `Idempotency-Key` per tenant".
const REFUND_KEY_CONSTRAINT: &str = "refunds_tenant_id_idempotency_key_key";

/// The [`PaymentCommandStore`] on PostgreSQL.
pub struct PgPaymentStore {
    db: Db,
}

impl PgPaymentStore {
    /// A store on the instance's connection.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The connection, for start-up warm-up.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

impl PaymentCommandStore for PgPaymentStore {
    #[tracing::instrument(skip_all, fields(tenant_id = %cmd.tenant_id, payment_id = %cmd.payment_id))]
    async fn mark_paid(&self, cmd: MarkPaidCommand) -> Result<MarkPaidOutcome, StoreError> {
        let cmd = &cmd;
        self.db
            .run(|mut client| async move { mark_paid_in(&mut client, cmd).await })
            .await
    }

    #[tracing::instrument(skip_all, fields(tenant_id = %cmd.tenant_id, payment_id = %cmd.payment_id))]
    async fn record_refund(&self, cmd: RefundCommand) -> Result<RefundOutcome, StoreError> {
        let cmd = &cmd;
        self.db
            .run(|mut client| async move { record_refund_in(&mut client, cmd).await })
            .await
    }

    async fn request_wake(
        &self,
        debounce: std::time::Duration,
    ) -> Result<WakeDecision, StoreError> {
        self.db
            .run(|client| async move {
                pg_outbox::postgres::wake::request_wake(&client, debounce).await
            })
            .await
    }
}

/// The paid command, one transaction on `client`.
async fn mark_paid_in(
    client: &mut Client,
    cmd: &MarkPaidCommand,
) -> Result<MarkPaidOutcome, StoreError> {
    let tx = client.transaction().await?;
    let event_id = Uuid::now_v7();
    let tenant = cmd.tenant_id.as_str();
    let payment = cmd.payment_id.as_str();
    let pay = &cmd.command;
    let currency = pay.currency.as_str();
    let method = pay.verification_method.as_str();

    let new_version = first_version();
    let inserted = tx
        .query_typed_opt(
            INSERT_PAID_IF_ABSENT,
            &[
                (&tenant, Type::TEXT),
                (&payment, Type::TEXT),
                (&pay.amount_minor, Type::INT8),
                (&currency, Type::TEXT),
                (&method, Type::TEXT),
                (&pay.verified_by, Type::TEXT),
                (&event_id, Type::UUID),
                (&new_version, Type::INT8),
            ],
        )
        .await?;
    let (version, paid_at) = match inserted {
        Some(row) => (new_version, row.try_get::<_, DateTime<Utc>>(0)?),
        None => match pay_existing(&tx, cmd, event_id).await? {
            Existing::Paid(version, paid_at) => (version, paid_at),
            Existing::Done(outcome) => return Ok(outcome),
        },
    };

    let receipt = PaidReceipt {
        payment_id: payment.to_owned(),
        status: PaymentStatus::Paid.as_str(),
        amount_minor: pay.amount_minor,
        currency: pay.currency,
        paid_at,
        event_id,
    };
    let event = PaymentPaidV1::event(&cmd.tenant_id, &cmd.payment_id, pay, paid_at);
    append_with_id(&tx, event_id, &event, &cmd.metadata).await?;
    tx.commit().await?;
    tracing::info!(%event_id, version, "payment marked paid");
    Ok(MarkPaidOutcome::Paid(receipt))
}

/// The refund command, one transaction on `client`.
async fn record_refund_in(
    client: &mut Client,
    cmd: &RefundCommand,
) -> Result<RefundOutcome, StoreError> {
    let tx = client.transaction().await?;
    let tenant = cmd.tenant_id.as_str();
    let payment = cmd.payment_id.as_str();
    let key = cmd.idempotency_key.as_str();

    // Lock first, then look the key up in a statement of its own: under READ COMMITTED that
    // statement sees a refund committed by whoever held the lock before us.
    let Some(row) = tx
        .query_typed_opt(
            SELECT_FOR_UPDATE,
            &[(&tenant, Type::TEXT), (&payment, Type::TEXT)],
        )
        .await?
    else {
        return Ok(RefundOutcome::PaymentNotFound);
    };
    let state = state_from_row(&row)?;
    if let Some(existing) = tx
        .query_typed_opt(
            SELECT_REFUND_BY_KEY,
            &[(&tenant, Type::TEXT), (&key, Type::TEXT)],
        )
        .await?
    {
        return replayed_refund(&existing, &state, cmd);
    }

    let (new_version, refunded_total, remaining, new_status, currency) =
        match decide_refund(&state, &cmd.command) {
            RefundDecision::NotPaid => {
                return Ok(RefundOutcome::NotRefundable {
                    status: state.status,
                })
            }
            RefundDecision::ExceedsRemaining { remaining_minor } => {
                return Ok(RefundOutcome::ExceedsRemaining { remaining_minor })
            }
            RefundDecision::Refund {
                new_version,
                refunded_total_minor,
                remaining_minor,
                new_status,
                currency,
            } => (
                new_version,
                refunded_total_minor,
                remaining_minor,
                new_status,
                currency,
            ),
        };

    let refund_id = Uuid::now_v7();
    let event_id = Uuid::now_v7();
    let amount = cmd.command.amount_minor;
    let status = new_status.as_str();
    tx.execute_typed(
        UPDATE_REFUNDED,
        &[
            (&tenant, Type::TEXT),
            (&payment, Type::TEXT),
            (&refunded_total, Type::INT8),
            (&status, Type::TEXT),
            (&new_version, Type::INT8),
        ],
    )
    .await?;
    let inserted = tx
        .query_typed_one(
            INSERT_REFUND,
            &[
                (&tenant, Type::TEXT),
                (&refund_id, Type::UUID),
                (&payment, Type::TEXT),
                (&key, Type::TEXT),
                (&amount, Type::INT8),
                (&refunded_total, Type::INT8),
                (&event_id, Type::UUID),
            ],
        )
        .await;
    let created_at: DateTime<Utc> = match inserted {
        Ok(row) => row.try_get(0)?,
        // The same key, used at the same moment for another payment of this tenant.
        Err(e) if is_violation_of(&e, REFUND_KEY_CONSTRAINT) => {
            return Ok(RefundOutcome::IdempotencyKeyReused)
        }
        Err(e) => return Err(e.into()),
    };

    let payload = PaymentRefundedV1 {
        payment_id: payment.to_owned(),
        refund_id,
        amount_minor: amount,
        currency,
        refunded_total_minor: refunded_total,
        remaining_minor: remaining,
        refunded_at: created_at,
    };
    let event = PaymentRefundedV1::event(&cmd.tenant_id, &cmd.idempotency_key, payload);
    append_with_id(&tx, event_id, &event, &cmd.metadata).await?;
    tx.commit().await?;
    tracing::info!(%event_id, %refund_id, version = new_version, "refund recorded");
    Ok(RefundOutcome::Refunded(RefundReceipt {
        refund_id,
        payment_id: payment.to_owned(),
        amount_minor: amount,
        currency,
        refunded_total_minor: refunded_total,
        remaining_minor: remaining,
        payment_status: status_after_refund(remaining),
        event_id,
        created_at,
    }))
}

/// What the paid command found when the payment already existed.
enum Existing {
    /// It was pending and is now paid at this version and time; the event still has to be written.
    Paid(i64, DateTime<Utc>),
    /// Nothing to write: a replay or a conflict.
    Done(MarkPaidOutcome),
}

async fn pay_existing(
    tx: &Transaction<'_>,
    cmd: &MarkPaidCommand,
    event_id: Uuid,
) -> Result<Existing, StoreError> {
    let tenant = cmd.tenant_id.as_str();
    let payment = cmd.payment_id.as_str();
    let row = tx
        .query_typed_one(
            SELECT_FOR_UPDATE,
            &[(&tenant, Type::TEXT), (&payment, Type::TEXT)],
        )
        .await?;
    let state = state_from_row(&row)?;
    let pay = &cmd.command;
    match decide_mark_paid(Some(&state), pay) {
        MarkPaidDecision::Conflict => Ok(Existing::Done(MarkPaidOutcome::Conflict)),
        MarkPaidDecision::AlreadyPaid => {
            let (Some(paid_at), Some(event_id)) = (
                row.try_get::<_, Option<DateTime<Utc>>>("paid_at")?,
                row.try_get::<_, Option<Uuid>>("paid_event_id")?,
            ) else {
                return Err(StoreError::Corrupt(
                    "paid payment without paid_at or event".into(),
                ));
            };
            Ok(Existing::Done(MarkPaidOutcome::Replayed(PaidReceipt {
                payment_id: payment.to_owned(),
                status: PaymentStatus::Paid.as_str(),
                amount_minor: pay.amount_minor,
                currency: pay.currency,
                paid_at,
                event_id,
            })))
        }
        MarkPaidDecision::Pay { new_version } => {
            let currency = pay.currency.as_str();
            let method = pay.verification_method.as_str();
            let row = tx
                .query_typed_one(
                    UPDATE_PAID,
                    &[
                        (&tenant, Type::TEXT),
                        (&payment, Type::TEXT),
                        (&pay.amount_minor, Type::INT8),
                        (&currency, Type::TEXT),
                        (&method, Type::TEXT),
                        (&pay.verified_by, Type::TEXT),
                        (&event_id, Type::UUID),
                        (&new_version, Type::INT8),
                    ],
                )
                .await?;
            Ok(Existing::Paid(new_version, row.try_get(0)?))
        }
    }
}

fn replayed_refund(
    existing: &Row,
    state: &PaymentState,
    cmd: &RefundCommand,
) -> Result<RefundOutcome, StoreError> {
    let payment_id: String = existing.try_get("payment_id")?;
    let amount: i64 = existing.try_get("amount_minor")?;
    if payment_id != cmd.payment_id.as_str() || amount != cmd.command.amount_minor {
        return Ok(RefundOutcome::IdempotencyKeyReused);
    }
    let (Some(paid_amount), Some(currency)) = (state.amount_minor, state.currency) else {
        return Err(StoreError::Corrupt(
            "refunded payment without amount".into(),
        ));
    };
    let refunded_total: i64 = existing.try_get("refunded_total_minor")?;
    let remaining = paid_amount - refunded_total;
    Ok(RefundOutcome::Replayed(RefundReceipt {
        refund_id: existing.try_get("refund_id")?,
        payment_id,
        amount_minor: amount,
        currency,
        refunded_total_minor: refunded_total,
        remaining_minor: remaining,
        payment_status: status_after_refund(remaining),
        event_id: existing.try_get("event_id")?,
        created_at: existing.try_get("created_at")?,
    }))
}

fn status_after_refund(remaining_minor: i64) -> &'static str {
    if remaining_minor == 0 {
        PaymentStatus::Refunded.as_str()
    } else {
        PaymentStatus::PartiallyRefunded.as_str()
    }
}

fn state_from_row(row: &Row) -> Result<PaymentState, StoreError> {
    let status: String = row.try_get("status")?;
    let currency: Option<String> = row.try_get("currency")?;
    Ok(PaymentState {
        status: status
            .parse()
            .map_err(|e: crate::domain::payment::UnknownStatus| {
                StoreError::Corrupt(e.to_string())
            })?,
        amount_minor: row.try_get("amount_minor")?,
        currency: currency
            .map(|c| Currency::parse(&c))
            .transpose()
            .map_err(|_| StoreError::Corrupt("unknown currency".into()))?,
        refunded_minor: row.try_get("refunded_minor")?,
        version: row.try_get("version")?,
    })
}

/// Whether `e` is a unique violation (SQLSTATE 23505) of the named constraint.
fn is_violation_of(e: &tokio_postgres::Error, constraint: &str) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db.constraint() == Some(constraint)
    })
}

/// The events feed, served by the payment API from the commands' connection.
impl pg_outbox::ports::EventFeedStore for PgPaymentStore {
    async fn feed_page(
        &self,
        query: &pg_outbox::feed::FeedQuery,
    ) -> Result<pg_outbox::feed::FeedPage, StoreError> {
        self.db.feed_page(query).await
    }

    async fn acknowledge(
        &self,
        tenant: &pg_outbox::ids::TenantId,
        event_id: Uuid,
        consumer: &pg_outbox::feed::ConsumerName,
    ) -> Result<pg_outbox::feed::AckOutcome, StoreError> {
        self.db.acknowledge(tenant, event_id, consumer).await
    }
}
