//! (Past 400 lines: the routes, their responses and their unit tests, read together.)
//!
//! The HTTP API (payload v2) handler: routes the request, takes the tenant from the verified JWT
//! claims, parses the command, runs it against the store and maps the outcome to a response. It
//! also serves the events feed (`GET /events`, `POST /events/{eventId}/ack`) to the same clients.

use aws_lambda_events::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use aws_lambda_events::encodings::Body;
use aws_lambda_events::http::{HeaderMap, HeaderName, HeaderValue};
use lambda_runtime::{Context, LambdaEvent};
use serde::Serialize;
use serde_json::json;
use tracing::Instrument;

use std::time::{Duration, Instant};

use payments::domain::{IdempotencyKey, PaymentId, TenantId};
use payments::ports::{
    MarkPaidCommand, MarkPaidOutcome, PaymentCommandStore, RefundCommand, RefundOutcome,
};
use pg_outbox::config::{optional_env, parsed_env, ranged_env, ConfigError};
use pg_outbox::feed::{AckOutcome, ConsumerName, FeedQuery, ParameterError};
use pg_outbox::outbox::EventMetadata;
use pg_outbox::ports::{EventFeedStore, WakeDispatcher};

use crate::request::{
    body_bytes, parse_ack, parse_mark_paid, parse_refund, FieldError, DEFAULT_MAX_BODY_BYTES,
};

/// Route key of the paid command in the HTTP API.
pub const PAID_ROUTE: &str = "POST /payments/{paymentId}/paid";
/// Route key of the refund command in the HTTP API.
pub const REFUND_ROUTE: &str = "POST /payments/{paymentId}/refunds";
/// Route key of the events feed.
pub const FEED_ROUTE: &str = "GET /events";
/// Route key of a consumer's acknowledgment of one event.
pub const ACK_ROUTE: &str = "POST /events/{eventId}/ack";

/// Handler settings, read once at cold start.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// JWT claim that holds the tenant id (`TENANT_CLAIM`, default `tenant_id`).
    pub tenant_claim: String,
    /// Service name written as the events' source (`EVENT_SOURCE`, default `payments`).
    pub source: String,
    /// Largest accepted body in bytes (`MAX_BODY_BYTES`, default 8192).
    pub max_body_bytes: usize,
    /// At most one dispatcher wake-up per this window across all instances
    /// (`WAKE_DEBOUNCE_MS`, 100..=60000, default 2000).
    pub wake_debounce: Duration,
}

/// How long an instance trusts "no need to wake the dispatcher" before asking again. Short: a
/// dispatcher that stops draining right after the answer must not leave this instance's events
/// waiting for long.
pub const WAKE_QUIET_CAP: Duration = Duration::from_millis(100);

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            tenant_claim: "tenant_id".into(),
            source: "payments".into(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            wake_debounce: Duration::from_secs(2),
        }
    }
}

impl HandlerConfig {
    /// Reads the settings from the environment, falling back to the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            tenant_claim: optional_env("TENANT_CLAIM").unwrap_or(defaults.tenant_claim),
            source: optional_env("EVENT_SOURCE").unwrap_or(defaults.source),
            max_body_bytes: parsed_env("MAX_BODY_BYTES", defaults.max_body_bytes)?,
            wake_debounce: Duration::from_millis(ranged_env(
                "WAKE_DEBOUNCE_MS",
                defaults.wake_debounce.as_millis() as u64,
                100,
                60_000,
            )?),
        })
    }
}

/// The payment command function: one per Lambda instance, built in `main`.
pub struct PaymentCommandHandler<S, W = NoWake> {
    store: S,
    config: HandlerConfig,
    wake: Option<W>,
    /// Until when this instance need not ask whether to wake the dispatcher.
    quiet_until: std::sync::Mutex<Option<Instant>>,
}

/// No dispatcher to wake: events wait for the schedule.
pub struct NoWake;

impl WakeDispatcher for NoWake {
    async fn wake(&self) -> Result<(), String> {
        Ok(())
    }
}

enum Route {
    Paid(String),
    Refund(String),
    Feed,
    Ack(String),
}

impl<S: PaymentCommandStore + EventFeedStore> PaymentCommandHandler<S> {
    /// A handler over `store`; events wait for the dispatcher's schedule.
    pub fn new(store: S, config: HandlerConfig) -> Self {
        Self {
            store,
            config,
            wake: None,
            quiet_until: std::sync::Mutex::new(None),
        }
    }

    /// The same handler, waking the dispatcher through `wake` after each new event.
    pub fn with_wake<W: WakeDispatcher>(self, wake: W) -> PaymentCommandHandler<S, W> {
        PaymentCommandHandler {
            store: self.store,
            config: self.config,
            wake: Some(wake),
            quiet_until: self.quiet_until,
        }
    }
}

impl<S: PaymentCommandStore + EventFeedStore, W: WakeDispatcher> PaymentCommandHandler<S, W> {
    /// The store, for wiring and tests.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Handles one invocation. Every outcome, including a database outage, is an HTTP response:
    /// the function itself never fails, so API Gateway never turns an error into an opaque 500.
    pub async fn handle(
        &self,
        event: LambdaEvent<ApiGatewayV2httpRequest>,
    ) -> Result<ApiGatewayV2httpResponse, lambda_runtime::Error> {
        let (request, context) = event.into_parts();
        // The command's span continues the caller's trace; the events it appends carry this
        // span as their producer (EventMetadata.traceparent), so the sink's spans are its children.
        let span = tracing::info_span!(
            "command",
            otel.name = request.route_key.as_deref().unwrap_or("command"),
            otel.kind = "server",
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        pg_outbox::telemetry::continue_trace(
            &span,
            header(&request.headers, "traceparent"),
            header(&request.headers, "tracestate"),
        );
        let response = self
            .respond(&request, &context)
            .instrument(span.clone())
            .await;
        span.in_scope(|| {
            tracing::info!(
                status = response.status_code,
                request_id = request.request_context.request_id.as_deref().unwrap_or(""),
                "request handled"
            )
        });
        drop(span);
        pg_outbox::telemetry::flush_traces().await;
        Ok(response)
    }

    async fn respond(
        &self,
        req: &ApiGatewayV2httpRequest,
        ctx: &Context,
    ) -> ApiGatewayV2httpResponse {
        let route = match route(req) {
            Ok(route) => route,
            Err(response) => return *response,
        };
        let Some(tenant) = tenant(req, &self.config.tenant_claim) else {
            return error(401, "unauthorized", "no valid tenant in the token", None);
        };
        let metadata = metadata(req, ctx, &self.config.source);
        let result = match route {
            Route::Paid(id) => self.mark_paid(req, tenant, &id, metadata).await,
            Route::Refund(id) => self.refund(req, tenant, &id, metadata).await,
            Route::Feed => self.feed(req, tenant).await,
            Route::Ack(id) => self.acknowledge(req, tenant, &id).await,
        };
        result.unwrap_or_else(|e| {
            error(
                400,
                "invalid_request",
                &format!("{} {}", e.field, e.message),
                Some(&e.field),
            )
        })
    }

    async fn mark_paid(
        &self,
        req: &ApiGatewayV2httpRequest,
        tenant_id: TenantId,
        payment_id: &str,
        metadata: EventMetadata,
    ) -> Result<ApiGatewayV2httpResponse, FieldError> {
        let payment_id = parse_payment_id(payment_id)?;
        let body = body_bytes(
            req.body.as_deref(),
            req.is_base64_encoded,
            self.config.max_body_bytes,
        )?;
        let command = parse_mark_paid(&body)?;
        let cmd = MarkPaidCommand {
            tenant_id,
            payment_id,
            command,
            metadata,
        };
        Ok(match self.store.mark_paid(cmd).await {
            Ok(MarkPaidOutcome::Paid(receipt)) => {
                self.wake_dispatcher().await;
                ok(200, &receipt, false)
            }
            Ok(MarkPaidOutcome::Replayed(receipt)) => ok(200, &receipt, true),
            Ok(MarkPaidOutcome::Conflict) => error(
                409,
                "payment_conflict",
                "the payment is already paid with a different amount or currency",
                None,
            ),
            Err(e) => unavailable(&e),
        })
    }

    async fn refund(
        &self,
        req: &ApiGatewayV2httpRequest,
        tenant_id: TenantId,
        payment_id: &str,
        metadata: EventMetadata,
    ) -> Result<ApiGatewayV2httpResponse, FieldError> {
        let payment_id = parse_payment_id(payment_id)?;
        let key = header(&req.headers, "idempotency-key")
            .ok_or_else(|| FieldError::new("Idempotency-Key", "header is required"))?;
        let idempotency_key = IdempotencyKey::parse(key)
            .map_err(|e| FieldError::new("Idempotency-Key", format!("header {e}")))?;
        let body = body_bytes(
            req.body.as_deref(),
            req.is_base64_encoded,
            self.config.max_body_bytes,
        )?;
        let command = parse_refund(&body)?;
        let cmd = RefundCommand {
            tenant_id,
            payment_id,
            idempotency_key,
            command,
            metadata,
        };
        Ok(match self.store.record_refund(cmd).await {
            Ok(RefundOutcome::Refunded(receipt)) => {
                self.wake_dispatcher().await;
                ok(201, &receipt, false)
            }
            Ok(RefundOutcome::Replayed(receipt)) => ok(200, &receipt, true),
            Ok(RefundOutcome::PaymentNotFound) => {
                error(404, "payment_not_found", "no such payment", None)
            }
            Ok(RefundOutcome::NotRefundable { status }) => error(
                409,
                "payment_not_paid",
                &format!("a payment in status {status} cannot be refunded"),
                None,
            ),
            Ok(RefundOutcome::ExceedsRemaining { remaining_minor }) => response(
                422,
                json!({"error": {
                    "code": "refund_exceeds_remaining",
                    "message": format!("at most {remaining_minor} (minor units) can still be refunded"),
                    "field": "amountMinor",
                    "remainingMinor": remaining_minor,
                }})
                .to_string(),
            ),
            Ok(RefundOutcome::IdempotencyKeyReused) => error(
                409,
                "idempotency_key_reused",
                "this Idempotency-Key was already used for a different refund",
                Some("Idempotency-Key"),
            ),
            Err(e) => unavailable(&e),
        })
    }
}

impl<S: PaymentCommandStore + EventFeedStore, W: WakeDispatcher> PaymentCommandHandler<S, W> {
    async fn feed(
        &self,
        req: &ApiGatewayV2httpRequest,
        tenant: TenantId,
    ) -> Result<ApiGatewayV2httpResponse, FieldError> {
        let parameters = query_parameters(req)?;
        let query = FeedQuery::parse(
            tenant,
            parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .map_err(parameter_error)?;
        Ok(match self.store.feed_page(&query).await {
            Ok(page) => ok(200, &page, false),
            Err(e) => unavailable(&e),
        })
    }

    async fn acknowledge(
        &self,
        req: &ApiGatewayV2httpRequest,
        tenant: TenantId,
        event_id: &str,
    ) -> Result<ApiGatewayV2httpResponse, FieldError> {
        let event_id = uuid::Uuid::parse_str(event_id)
            .map_err(|_| FieldError::new("eventId", "must be an event id (a UUID)"))?;
        let body = body_bytes(
            req.body.as_deref(),
            req.is_base64_encoded,
            self.config.max_body_bytes,
        )?;
        let consumer =
            ConsumerName::parse("consumer", &parse_ack(&body)?).map_err(parameter_error)?;
        Ok(
            match self.store.acknowledge(&tenant, event_id, &consumer).await {
                Ok(AckOutcome::Recorded(ack)) => ok(200, &ack, false),
                Ok(AckOutcome::AlreadyAcknowledged(ack)) => ok(200, &ack, true),
                // Another tenant's event is answered exactly as an unknown one.
                Ok(AckOutcome::NotFound) => error(404, "event_not_found", "no such event", None),
                Err(e) => unavailable(&e),
            },
        )
    }
}

fn parameter_error(e: ParameterError) -> FieldError {
    FieldError::new(e.parameter, e.message)
}

/// The query string as `name → value` pairs, repeats kept (so they can be refused): from the raw
/// query string when API Gateway passes it, else from the parsed parameters.
fn query_parameters(req: &ApiGatewayV2httpRequest) -> Result<Vec<(String, String)>, FieldError> {
    match req.raw_query_string.as_deref().filter(|q| !q.is_empty()) {
        Some(raw) => Ok(form_urlencoded::parse(raw.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()),
        None => Ok(req
            .query_string_parameters
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()),
    }
}

impl<S: PaymentCommandStore, W: WakeDispatcher> PaymentCommandHandler<S, W> {
    /// After a commit that wrote an event: wakes the dispatcher unless one is draining or was
    /// woken within the debounce window. Runs before the response is returned, because Lambda
    /// freezes the instance after that. Never fails the command: the event is committed, and
    /// the schedule publishes it if this does not.
    async fn wake_dispatcher(&self) {
        let Some(wake) = &self.wake else {
            return;
        };
        let now = Instant::now();
        if let Ok(quiet) = self.quiet_until.lock() {
            if quiet.is_some_and(|until| now < until) {
                return;
            }
        }
        let decision = match self.store.request_wake(self.config.wake_debounce).await {
            Ok(decision) => decision,
            Err(e) => {
                tracing::warn!(error = %pg_outbox::telemetry::error_chain(&e), "could not check whether to wake the dispatcher");
                return;
            }
        };
        if let Ok(mut quiet) = self.quiet_until.lock() {
            *quiet = Some(now + decision.quiet_for.min(WAKE_QUIET_CAP));
        }
        if decision.wake {
            match tokio::time::timeout(WAKE_TIMEOUT, wake.wake()).await {
                Ok(Ok(())) => tracing::info!("dispatcher woken"),
                Ok(Err(reason)) => {
                    tracing::warn!(%reason, "could not wake the dispatcher; the schedule will run it")
                }
                Err(_) => {
                    tracing::warn!("waking the dispatcher timed out; the schedule will run it")
                }
            }
        }
    }
}

/// Longest a command waits for the wake-up call (an asynchronous invoke answers in tens of ms).
pub const WAKE_TIMEOUT: Duration = Duration::from_millis(1_000);

fn parse_payment_id(raw: &str) -> Result<PaymentId, FieldError> {
    PaymentId::parse(raw).map_err(|e| FieldError::new("paymentId", e.to_string()))
}

/// Finds the route: by route key when API Gateway matched one, by path otherwise (a `$default`
/// route, or a request replayed without route key).
/// The error is the response to send (boxed: a response is large, a route small).
fn route(req: &ApiGatewayV2httpRequest) -> Result<Route, Box<ApiGatewayV2httpResponse>> {
    let path_param = |name: &str| req.path_parameters.get(name).cloned().unwrap_or_default();
    match req
        .route_key
        .as_deref()
        .or(req.request_context.route_key.as_deref())
    {
        Some(PAID_ROUTE) => return Ok(Route::Paid(path_param("paymentId"))),
        Some(REFUND_ROUTE) => return Ok(Route::Refund(path_param("paymentId"))),
        Some(FEED_ROUTE) => return Ok(Route::Feed),
        Some(ACK_ROUTE) => return Ok(Route::Ack(path_param("eventId"))),
        _ => {}
    }
    let path = req
        .raw_path
        .as_deref()
        .or(req.request_context.http.path.as_deref())
        .unwrap_or("");
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // The last three segments, so a stage prefix such as `/prod` does not matter.
    use aws_lambda_events::http::Method;
    let (route, method) = match segments.as_slice() {
        [.., "payments", id, "paid"] => (Route::Paid((*id).to_owned()), Method::POST),
        [.., "payments", id, "refunds"] => (Route::Refund((*id).to_owned()), Method::POST),
        [.., "events", id, "ack"] => (Route::Ack((*id).to_owned()), Method::POST),
        [.., "events"] => (Route::Feed, Method::GET),
        _ => return Err(Box::new(error(404, "not_found", "no such route", None))),
    };
    if req.request_context.http.method != method {
        let mut response = error(
            405,
            "method_not_allowed",
            &format!("only {method} is allowed here"),
            None,
        );
        response.headers.insert(
            "allow",
            HeaderValue::from_str(method.as_str()).expect("a method is a valid header value"),
        );
        return Err(Box::new(response));
    }
    Ok(route)
}

/// The tenant, from the JWT authorizer's verified claims only. A tenant in a header or the body
/// is never looked at.
fn tenant(req: &ApiGatewayV2httpRequest, claim: &str) -> Option<TenantId> {
    let claims = &req
        .request_context
        .authorizer
        .as_ref()?
        .jwt
        .as_ref()?
        .claims;
    TenantId::parse(claims.get(claim)?).ok()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)?
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn is_token(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// An API Gateway request id, whatever its characters (HTTP API ids end in `=`): printable ASCII,
/// no spaces, at most 128 bytes.
fn is_request_id(value: &str) -> bool {
    !value.is_empty() && value.len() <= 128 && value.bytes().all(|b| b.is_ascii_graphic())
}

fn metadata(req: &ApiGatewayV2httpRequest, ctx: &Context, source: &str) -> EventMetadata {
    let request_id = req
        .request_context
        .request_id
        .clone()
        .filter(|id| is_request_id(id))
        .or_else(|| Some(ctx.request_id.clone()).filter(|id| is_request_id(id)))
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let correlation_id = header(&req.headers, "x-correlation-id")
        .filter(|id| is_token(id, 128))
        .map_or_else(|| request_id.clone(), str::to_owned);
    // The command's own span when spans are exported, else the caller's context as it came.
    let traceparent = pg_outbox::telemetry::current_traceparent().or_else(|| {
        header(&req.headers, "traceparent")
            .filter(|tp| pg_outbox::envelope::is_valid_traceparent(tp))
            .map(str::to_owned)
    });
    let tracestate = traceparent
        .as_ref()
        .and(header(&req.headers, "tracestate"))
        .filter(|ts| ts.len() <= 512)
        .map(str::to_owned);
    EventMetadata {
        correlation_id,
        causation_id: Some(request_id),
        traceparent,
        tracestate,
        // An empty header (an emulator) is no trace, not an empty one.
        xray_trace_header: ctx.xray_trace_id.clone().filter(|t| !t.is_empty()),
        source: source.to_owned(),
    }
}

fn response(status: u16, body: String) -> ApiGatewayV2httpResponse {
    let mut response = ApiGatewayV2httpResponse::default();
    response.status_code = i64::from(status);
    response
        .headers
        .insert("content-type", HeaderValue::from_static("application/json"));
    response.body = Some(Body::Text(body));
    response
}

fn ok<T: Serialize>(status: u16, receipt: &T, replayed: bool) -> ApiGatewayV2httpResponse {
    let body = serde_json::to_string(receipt).unwrap_or_else(|_| "{}".into());
    let mut response = response(status, body);
    if replayed {
        response.headers.insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
    }
    response
}

fn error(status: u16, code: &str, message: &str, field: Option<&str>) -> ApiGatewayV2httpResponse {
    let mut error = json!({"code": code, "message": message});
    if let Some(field) = field {
        error["field"] = json!(field);
    }
    response(status, json!({ "error": error }).to_string())
}

/// A store failure: logged with its cause chain, answered with a generic 503 the client may retry
/// (every command is idempotent, so a retry is safe).
/// Its class goes to the log (`error_type`) and to the class's metric, as a function error's
/// would: the HTTP answer stays a 503, which API clients know to retry.
fn unavailable(e: &pg_outbox::ports::StoreError) -> ApiGatewayV2httpResponse {
    pg_outbox::failure::FunctionError::from_store(e).record(crate::SERVICE);
    let mut response = error(
        503,
        "service_unavailable",
        "the command could not be completed; retry it with the same request",
        None,
    );
    response
        .headers
        .insert("retry-after", HeaderValue::from_static("1"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_id_is_kept_whatever_its_characters() {
        // API Gateway HTTP API ids end in `=`; REST API ids are UUIDs.
        for id in [
            "Jx1aAbCdEFAEMpQ=",
            "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "a+b/c==",
        ] {
            assert!(is_request_id(id), "{id}");
        }
        for id in ["", "a b", "tab\there", "é", &"x".repeat(129)] {
            assert!(!is_request_id(id), "{id}");
        }
    }

    #[test]
    fn correlation_ids_are_plain_tokens() {
        assert!(is_token("req-1:abc.def_2", 128));
        assert!(!is_token("a b", 128));
        assert!(!is_token("<script>", 128));
        assert!(!is_token(&"x".repeat(129), 128));
    }
}
