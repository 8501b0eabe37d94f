//! Tracing set-up, done once per process: JSON lines when Lambda asks for JSON logs
//! (`AWS_LAMBDA_LOG_FORMAT=JSON`), human-readable text otherwise; and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported by OTLP over HTTP (protobuf, the
//! standard `OTEL_EXPORTER_OTLP_*` variables; `OTEL_SERVICE_NAME`, else the function's name).
//!
//! One trace from command to projection: the envelope carries the producer's W3C `traceparent`,
//! and the sink's span for each event it applies has it as parent ([`continue_trace`]); its logs
//! carry `trace_id` and `span_id`. Lambda freezes the process between invocations, so each
//! handler calls [`flush_traces`] before it answers.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber. Safe to call more than once (later calls do nothing), so tests
/// and binaries can share it.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| EnvFilter::try_from_env("AWS_LAMBDA_LOG_LEVEL"))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("AWS_LAMBDA_LOG_FORMAT")
        .map(|v| v.eq_ignore_ascii_case("json"))
        .unwrap_or(false);
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .boxed()
    } else {
        fmt.with_ansi(false).boxed()
    };
    let otel = otlp_provider().map(|provider| {
        let tracer = provider.tracer("pg-outbox");
        let _ = PROVIDER.set(provider);
        tracing_opentelemetry::layer().with_tracer(tracer)
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .try_init();
}

fn otlp_provider() -> Option<SdkTracerProvider> {
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("OTLP exporter not started: {e}");
            return None;
        }
    };
    let service = std::env::var("OTEL_SERVICE_NAME")
        .or_else(|_| std::env::var("AWS_LAMBDA_FUNCTION_NAME"))
        .unwrap_or_else(|_| "pg-outbox".into());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}

/// Exports the spans buffered so far (a no-op without OTLP). Blocks a thread of the blocking
/// pool, not the runtime.
pub async fn flush_traces() {
    if let Some(provider) = PROVIDER.get() {
        let provider = provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }
}

/// Makes `span` a child of the W3C trace context `traceparent` (with `tracestate`) and records
/// its `trace_id` and `span_id` fields (declared empty by the caller), so its logs name the
/// trace. An absent or invalid `traceparent` leaves the span where it was.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if let Some(traceparent) = traceparent.filter(|t| crate::envelope::is_valid_traceparent(t)) {
        let mut carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        if let Some(state) = tracestate {
            carrier.insert("tracestate".into(), state.to_owned());
        }
        let parent = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let ids = context.span().span_context().clone();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
        span.record("span_id", tracing::field::display(ids.span_id()));
    } else if let Some(traceparent) =
        traceparent.filter(|t| crate::envelope::is_valid_traceparent(t))
    {
        // No exporter: the logs still name the producer's trace.
        span.record("trace_id", &traceparent[3..35]);
    }
}

/// The current span's W3C `traceparent` when spans are exported (`None` without OTLP): what an
/// event appended here carries, so its consumers' spans are children of this one.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let ids = span.span_context();
    ids.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            ids.trace_id(),
            ids.span_id(),
            ids.trace_flags().to_u8()
        )
    })
}

/// An error and its whole cause chain on one line (`outer: inner: root`), for logs and messages.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
