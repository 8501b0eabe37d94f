//! (Past 400 lines: the proxy's HTTP handling and every fault it injects are one state machine.)
//!
//! A fault-injecting HTTP proxy on loopback, in front of moto (or standing in for SNS on its own,
//! for benchmarks). Publish calls (`PublishBatch`, `PutEvents`) can be throttled, failed with a
//! 5xx, timed out, partially failed entry by entry, slowed down, or forwarded and then never
//! answered (to kill a dispatcher between publish and mark). Every other call passes through.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;

/// What to do to one publish call.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with a throttling error (HTTP 400, `Throttling` / `ThrottlingException`).
    Throttle,
    /// Answer with HTTP 500.
    ServerError,
    /// Never answer in time (the client's attempt timeout fires).
    Timeout,
    /// Forward only the other entries; the entries at these positions fail with `code`.
    FailEntries {
        /// 0-based positions in the call.
        positions: Vec<usize>,
        /// Error code reported for them.
        code: String,
        /// SNS `SenderFault` (the client's fault: not retryable unless the code says so).
        sender_fault: bool,
    },
    /// Forward the call, then hold the response forever (after notifying `forwarded`).
    ForwardThenHang,
}

/// Entries whose message contains `needle` always fail with `code` (a poison message).
#[derive(Debug, Clone)]
pub struct PoisonRule {
    /// Substring of the message body.
    pub needle: String,
    /// Error code.
    pub code: String,
    /// SNS `SenderFault`.
    pub sender_fault: bool,
}

#[derive(Default)]
struct Plan {
    queue: VecDeque<Fault>,
    poison: Vec<PoisonRule>,
    latency: Duration,
    /// Inject one of the random faults into this share of publish calls (0.0..=1.0).
    random_fault_rate: f64,
}

/// Counters of what went through.
#[derive(Default, Debug)]
pub struct ProxyStats {
    /// Publish calls received.
    pub publish_calls: AtomicUsize,
    /// Publish calls that got a fault.
    pub faulted_calls: AtomicUsize,
    /// Entries forwarded (or, standalone, accepted).
    pub entries_forwarded: AtomicUsize,
    /// The `event_id` attribute of every SNS entry forwarded (or accepted), in arrival order.
    pub event_ids: Mutex<Vec<String>>,
    /// The same ids with their arrival time (wall clock, comparable with the database's).
    pub arrivals: Mutex<Vec<(String, chrono::DateTime<chrono::Utc>)>>,
    /// Whether to keep message bodies (`keep_bodies`).
    pub keep_bodies: std::sync::atomic::AtomicBool,
    /// The `Message` of every SNS entry that reached the bus, in arrival order, when kept: what a
    /// raw-delivery subscriber receives.
    pub bodies: Mutex<Vec<String>>,
}

/// The proxy. Dropping it stops it.
pub struct FaultProxy {
    /// `http://127.0.0.1:port`: the endpoint URL to give the SDK.
    pub endpoint: String,
    plan: Arc<Mutex<Plan>>,
    /// Counters.
    pub stats: Arc<ProxyStats>,
    /// Notified each time a `ForwardThenHang` call has been forwarded.
    pub forwarded: Arc<Notify>,
    server: Server,
}

/// Where the proxy's server runs.
enum Server {
    /// A task on the caller's runtime.
    Task(tokio::task::JoinHandle<()>),
    /// A thread of its own (`standalone_sns_on_own_thread`), stopped by dropping the sender.
    Thread {
        _stop: tokio::sync::oneshot::Sender<()>,
        tid: String,
    },
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Server::Task(task) = &self.server {
            task.abort();
        }
    }
}

struct Shared {
    upstream: Option<String>,
    plan: Arc<Mutex<Plan>>,
    stats: Arc<ProxyStats>,
    forwarded: Arc<Notify>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl FaultProxy {
    /// A proxy in front of `upstream` (moto's URL).
    pub async fn start(upstream: &str) -> Self {
        Self::spawn(Some(upstream.trim_end_matches('/').to_owned())).await
    }

    /// No upstream: answers `PublishBatch` itself, every entry successful (a zero-latency SNS for
    /// benchmarks; `set_latency` adds latency).
    pub async fn standalone_sns() -> Self {
        Self::spawn(None).await
    }

    /// A standalone SNS, as `standalone_sns`, served by a thread of its own named
    /// `sns-stand-in` (its own single-threaded runtime, its allocations not counted by
    /// `alloc_count`), so a benchmark can tell the stand-in's CPU (`stand_in_cpu`) from the
    /// dispatcher's.
    pub async fn standalone_sns_on_own_thread() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr: SocketAddr = listener.local_addr().expect("proxy address");
        let (shared, plan, stats, forwarded) = Self::shared(None);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("sns-stand-in".into())
            .spawn(move || {
                crate::alloc_count::exclude_this_thread();
                let tid = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .expect("the stand-in thread's id");
                tid_tx.send(tid).expect("send the thread id");
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the stand-in's runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    tokio::select! {
                        () = serve(listener, shared) => {}
                        _ = stopped => {}
                    }
                });
            })
            .expect("start the stand-in thread");
        let tid = tid_rx.recv().expect("the stand-in thread started");
        Self {
            endpoint: format!("http://{addr}"),
            plan,
            stats,
            forwarded,
            server: Server::Thread { _stop: stop, tid },
        }
    }

    /// CPU time (user + system) of the stand-in's thread so far; `None` for a proxy served on the
    /// caller's runtime, whose CPU is the caller's.
    pub fn stand_in_cpu(&self) -> Option<Duration> {
        let Server::Thread { tid, .. } = &self.server else {
            return None;
        };
        crate::bench::thread_cpu(tid)
    }

    #[allow(clippy::type_complexity)]
    fn shared(
        upstream: Option<String>,
    ) -> (Arc<Shared>, Arc<Mutex<Plan>>, Arc<ProxyStats>, Arc<Notify>) {
        let plan = Arc::new(Mutex::new(Plan::default()));
        let stats = Arc::new(ProxyStats::default());
        let forwarded = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            upstream,
            plan: plan.clone(),
            stats: stats.clone(),
            forwarded: forwarded.clone(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        (shared, plan, stats, forwarded)
    }

    async fn spawn(upstream: Option<String>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr: SocketAddr = listener.local_addr().expect("proxy address");
        let (shared, plan, stats, forwarded) = Self::shared(upstream);
        let task = tokio::spawn(serve(listener, shared));
        Self {
            endpoint: format!("http://{addr}"),
            plan,
            stats,
            forwarded,
            server: Server::Task(task),
        }
    }

    /// Applies `faults` to the next publish calls, one each, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.plan.lock().unwrap().queue.extend(faults);
    }

    /// Makes entries containing `rule.needle` fail on every call.
    pub fn add_poison(&self, rule: PoisonRule) {
        self.plan.lock().unwrap().poison.push(rule);
    }

    /// Delays every publish call's answer.
    pub fn set_latency(&self, latency: Duration) {
        self.plan.lock().unwrap().latency = latency;
    }

    /// Injects a random fault (throttle, 5xx, timeout, partial failure) into this share of
    /// publish calls.
    pub fn set_random_fault_rate(&self, rate: f64) {
        self.plan.lock().unwrap().random_fault_rate = rate;
    }
}

/// Accepts connections and serves each on a task of its own, until dropped.
async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn random_fault(entries: usize) -> Fault {
    match fastrand::u8(0..4) {
        0 => Fault::Throttle,
        1 => Fault::ServerError,
        2 => Fault::Timeout,
        _ => Fault::FailEntries {
            positions: vec![fastrand::usize(0..entries.max(1))],
            code: "InternalError".into(),
            sender_fault: false,
        },
    }
}

enum Protocol {
    Sns,
    EventBridge,
}

fn respond(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

fn error_response(protocol: &Protocol, status: u16, code: &str) -> Response<Full<Bytes>> {
    match protocol {
        Protocol::Sns => respond(
            status,
            "text/xml",
            format!(
                "<ErrorResponse xmlns=\"http://sns.amazonaws.com/doc/2010-03-31/\"><Error><Type>{}</Type>\
                 <Code>{code}</Code><Message>injected fault</Message></Error><RequestId>fault</RequestId></ErrorResponse>",
                if status < 500 { "Sender" } else { "Receiver" }
            ),
        ),
        Protocol::EventBridge => respond(
            status,
            "application/x-amz-json-1.1",
            serde_json::json!({"__type": code, "message": "injected fault"}).to_string(),
        ),
    }
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Each body is parsed once: the benchmarks' zero-latency SNS is this proxy, and its own CPU
    // comes out of the same cores as the dispatcher's and the database's.
    let call = if target == "AWSEvents.PutEvents" {
        Some(Call::EventBridge(eventbridge_entries(&body)))
    } else {
        sns_publish_batch(&body).map(Call::Sns)
    };
    let Some(call) = call else {
        return forward(shared, &parts, body.clone()).await;
    };
    shared.stats.publish_calls.fetch_add(1, Ordering::Relaxed);
    let (protocol, entries) = match &call {
        Call::Sns(entries) => (Protocol::Sns, entries.len()),
        Call::EventBridge(entries) => (Protocol::EventBridge, entries.len()),
    };
    let (fault, poison, latency) = {
        let mut plan = shared.plan.lock().unwrap();
        let mut fault = plan.queue.pop_front();
        if fault.is_none()
            && plan.random_fault_rate > 0.0
            && fastrand::f64() < plan.random_fault_rate
        {
            fault = Some(random_fault(entries));
        }
        (fault, plan.poison.clone(), plan.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if fault.is_some() {
        shared.stats.faulted_calls.fetch_add(1, Ordering::Relaxed);
    }
    let mut failing: Vec<(usize, String, bool)> = Vec::new();
    match fault {
        Some(Fault::Throttle) => {
            let code = match protocol {
                Protocol::Sns => "Throttling",
                Protocol::EventBridge => "ThrottlingException",
            };
            return error_response(&protocol, 400, code);
        }
        Some(Fault::ServerError) => return error_response(&protocol, 500, "InternalError"),
        Some(Fault::Timeout) => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return error_response(&protocol, 500, "InternalError");
        }
        Some(Fault::FailEntries {
            positions,
            code,
            sender_fault,
        }) => failing.extend(
            positions
                .into_iter()
                .map(|p| (p, code.clone(), sender_fault)),
        ),
        Some(Fault::ForwardThenHang) => {
            let response = forward(shared, &parts, body.clone()).await;
            if let (200, Call::Sns(entries)) = (response.status().as_u16(), &call) {
                record_sns_entries(shared, entries.iter());
            }
            shared.forwarded.notify_one();
            std::future::pending::<()>().await;
        }
        None => {}
    }
    match call {
        Call::Sns(entries) => sns_partial(shared, &parts, &body, entries, failing, &poison).await,
        Call::EventBridge(entries) => {
            eventbridge_partial(shared, &parts, &body, entries, failing, &poison).await
        }
    }
}

/// A publish call, its entries parsed.
enum Call<'a> {
    Sns(Vec<(usize, SnsFields<'a>)>),
    EventBridge(Vec<serde_json::Value>),
}

async fn forward(
    shared: &Shared,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let Some(upstream) = &shared.upstream else {
        return respond(
            400,
            "text/plain",
            "standalone proxy only answers PublishBatch".into(),
        );
    };
    let uri = format!(
        "{upstream}{}",
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut builder = Request::builder().method(parts.method.clone()).uri(uri);
    for (name, value) in &parts.headers {
        if name != "content-length" && name != "host" {
            builder = builder.header(name, value);
        }
    }
    let request = builder.body(Full::new(body)).expect("forwarded request");
    match shared.client.request(request).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut out = Response::builder().status(parts.status);
            for (name, value) in &parts.headers {
                if name != "content-length" && name != "transfer-encoding" {
                    out = out.header(name, value);
                }
            }
            out.body(Full::new(body)).expect("response")
        }
        Err(e) => respond(502, "text/plain", format!("upstream unreachable: {e}")),
    }
}

/// A form body's pairs, split but not decoded (`PublishBatch` bodies carry ten messages; only the
/// fields a check reads are decoded).
fn raw_pairs(body: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    body.split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.iter().position(|b| *b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &pair[pair.len()..]),
        })
}

/// One form-encoded key or value, decoded (`+` is a space).
fn decode(raw: &[u8]) -> Cow<'_, str> {
    if !raw.iter().any(|b| *b == b'%' || *b == b'+') {
        return String::from_utf8_lossy(raw);
    }
    let plus_as_space: Vec<u8> = raw
        .iter()
        .map(|b| if *b == b'+' { b' ' } else { *b })
        .collect();
    Cow::Owned(
        percent_encoding::percent_decode(&plus_as_space)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    raw_pairs(body)
        .map(|(k, v)| (decode(k).into_owned(), decode(v).into_owned()))
        .collect()
}

const SNS_MEMBER: &str = "PublishBatchRequestEntries.member.";

/// One SNS entry's fields: (field suffix, raw value).
type SnsFields<'a> = Vec<(String, &'a [u8])>;

/// A `PublishBatch` call's entries in member order, (member number, fields); `None` for
/// another action.
fn sns_publish_batch(body: &[u8]) -> Option<Vec<(usize, SnsFields<'_>)>> {
    let mut publish_batch = false;
    let mut entries: Vec<(usize, SnsFields<'_>)> = Vec::new();
    for (key, value) in raw_pairs(body) {
        let key = decode(key);
        let Some(rest) = key.strip_prefix(SNS_MEMBER) else {
            publish_batch |= key == "Action" && decode(value) == "PublishBatch";
            continue;
        };
        let Some((number, suffix)) = rest.split_once('.') else {
            continue;
        };
        let Ok(number) = number.parse::<usize>() else {
            continue;
        };
        match entries.iter_mut().find(|(n, _)| *n == number) {
            Some((_, fields)) => fields.push((suffix.to_owned(), value)),
            None => entries.push((number, vec![(suffix.to_owned(), value)])),
        }
    }
    entries.sort_by_key(|(n, _)| *n);
    publish_batch.then_some(entries)
}

/// Counts SNS entries that reach the bus and records their `event_id` attributes.
fn record_sns_entries<'a, 'b: 'a>(
    shared: &Shared,
    entries: impl Iterator<Item = &'a (usize, SnsFields<'b>)>,
) {
    let mut ids = shared.stats.event_ids.lock().unwrap();
    let mut arrivals = shared.stats.arrivals.lock().unwrap();
    let now = chrono::Utc::now();
    for (_, fields) in entries {
        shared
            .stats
            .entries_forwarded
            .fetch_add(1, Ordering::Relaxed);
        // MessageAttributes.entry.N.Name = event_id; MessageAttributes.entry.N.Value.StringValue = the id
        let slot = fields.iter().find_map(|(k, v)| {
            (decode(v) == "event_id")
                .then(|| k.strip_suffix(".Name"))
                .flatten()
        });
        if let Some(slot) = slot {
            let id = field(fields, &format!("{slot}.Value.StringValue")).into_owned();
            arrivals.push((id.clone(), now));
            ids.push(id);
        }
        if shared.stats.keep_bodies.load(Ordering::Relaxed) {
            shared
                .stats
                .bodies
                .lock()
                .unwrap()
                .push(field(fields, "Message").into_owned());
        }
    }
}

/// A field of an SNS entry, decoded ("" when absent).
fn field<'a>(fields: &[(String, &'a [u8])], name: &str) -> Cow<'a, str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| decode(v))
        .unwrap_or(Cow::Borrowed(""))
}

async fn sns_partial(
    shared: &Shared,
    parts: &hyper::http::request::Parts,
    body: &[u8],
    entries: Vec<(usize, SnsFields<'_>)>,
    mut failing: Vec<(usize, String, bool)>,
    poison: &[PoisonRule],
) -> Response<Full<Bytes>> {
    for (position, (_, fields)) in entries.iter().enumerate() {
        if let Some(rule) = poison
            .iter()
            .find(|r| field(fields, "Message").contains(&r.needle))
        {
            failing.push((position, rule.code.clone(), rule.sender_fault));
        }
    }
    let failed_xml: String = entries
        .iter()
        .enumerate()
        .filter_map(|(position, (_, fields))| {
            failing.iter().find(|f| f.0 == position).map(|(_, code, sender)| {
                format!(
                    "<member><Id>{}</Id><Code>{code}</Code><Message>injected fault</Message><SenderFault>{sender}</SenderFault></member>",
                    field(fields, "Id")
                )
            })
        })
        .collect();
    let keep: Vec<&(usize, SnsFields<'_>)> = entries
        .iter()
        .enumerate()
        .filter(|(position, _)| !failing.iter().any(|f| f.0 == *position))
        .map(|(_, e)| e)
        .collect();
    record_sns_entries(shared, keep.iter().copied());

    let successful_xml = if keep.is_empty() {
        String::new()
    } else if shared.upstream.is_none() {
        keep.iter()
            .map(|(_, fields)| {
                format!(
                    "<member><Id>{}</Id><MessageId>{}</MessageId></member>",
                    field(fields, "Id"),
                    uuid::Uuid::new_v4()
                )
            })
            .collect()
    } else {
        // Forward the kept entries, renumbered 1..n as SNS requires.
        let renumbered = {
            let mut serializer = form_urlencoded::Serializer::new(String::new());
            for (k, v) in form_pairs(body) {
                if !k.starts_with(SNS_MEMBER) {
                    serializer.append_pair(&k, &v);
                }
            }
            for (i, (_, fields)) in keep.iter().enumerate() {
                for (suffix, value) in fields {
                    serializer
                        .append_pair(&format!("{SNS_MEMBER}{}.{suffix}", i + 1), &decode(value));
                }
            }
            serializer.finish()
        };
        let response = forward(shared, parts, Bytes::from(renumbered)).await;
        if failing.is_empty() || response.status() != 200 {
            return response;
        }
        let text = String::from_utf8_lossy(
            &response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default(),
        )
        .into_owned();
        match (text.find("<Successful>"), text.find("</Successful>")) {
            (Some(a), Some(b)) => text[a + "<Successful>".len()..b].to_owned(),
            _ => String::new(),
        }
    };
    respond(
        200,
        "text/xml",
        format!(
            "<PublishBatchResponse xmlns=\"http://sns.amazonaws.com/doc/2010-03-31/\"><PublishBatchResult>\
             <Successful>{successful_xml}</Successful><Failed>{failed_xml}</Failed></PublishBatchResult>\
             <ResponseMetadata><RequestId>proxy</RequestId></ResponseMetadata></PublishBatchResponse>"
        ),
    )
}

fn eventbridge_entries(body: &[u8]) -> Vec<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("Entries").and_then(|e| e.as_array()).cloned())
        .unwrap_or_default()
}

async fn eventbridge_partial(
    shared: &Shared,
    parts: &hyper::http::request::Parts,
    body: &[u8],
    entries: Vec<serde_json::Value>,
    mut failing: Vec<(usize, String, bool)>,
    poison: &[PoisonRule],
) -> Response<Full<Bytes>> {
    for (position, entry) in entries.iter().enumerate() {
        let detail = entry.get("Detail").and_then(|d| d.as_str()).unwrap_or("");
        if let Some(rule) = poison.iter().find(|r| detail.contains(&r.needle)) {
            failing.push((position, rule.code.clone(), rule.sender_fault));
        }
    }
    if failing.is_empty() {
        shared
            .stats
            .entries_forwarded
            .fetch_add(entries.len(), Ordering::Relaxed);
        return forward(shared, parts, Bytes::copy_from_slice(body)).await;
    }
    let keep: Vec<serde_json::Value> = entries
        .iter()
        .enumerate()
        .filter(|(p, _)| !failing.iter().any(|f| f.0 == *p))
        .map(|(_, e)| e.clone())
        .collect();
    shared
        .stats
        .entries_forwarded
        .fetch_add(keep.len(), Ordering::Relaxed);
    let mut forwarded_results: VecDeque<serde_json::Value> = if keep.is_empty() {
        VecDeque::new()
    } else {
        let response = forward(
            shared,
            parts,
            Bytes::from(serde_json::json!({"Entries": keep}).to_string()),
        )
        .await;
        if response.status() != 200 {
            return response;
        }
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("Entries").and_then(|e| e.as_array()).cloned())
            .unwrap_or_default()
            .into()
    };
    let results: Vec<serde_json::Value> = (0..entries.len())
        .map(|p| match failing.iter().find(|f| f.0 == p) {
            Some((_, code, _)) => {
                serde_json::json!({"ErrorCode": code, "ErrorMessage": "injected fault"})
            }
            None => forwarded_results
                .pop_front()
                .unwrap_or(serde_json::json!({"ErrorCode": "InternalFailure"})),
        })
        .collect();
    let failed = results
        .iter()
        .filter(|r| r.get("ErrorCode").is_some())
        .count();
    respond(
        200,
        "application/x-amz-json-1.1",
        serde_json::json!({"FailedEntryCount": failed, "Entries": results}).to_string(),
    )
}
