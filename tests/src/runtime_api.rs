//! A stand-in for the Lambda runtime API (the endpoints a function's runtime talks to), on
//! loopback: hands one event to the function, then records what the function reports back
//! (`/invocation/{id}/response`, `/invocation/{id}/error`, `/init/error`), as Lambda would show it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

/// What the function reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// `/runtime/init/error`: the function could not start.
    InitError {
        /// The `errorType` in the body.
        error_type: String,
        /// The `errorMessage` in the body.
        error_message: String,
    },
    /// `/runtime/invocation/{id}/error`: the invocation failed.
    InvocationError {
        /// The `errorType` in the body.
        error_type: String,
        /// The `errorMessage` in the body.
        error_message: String,
    },
    /// `/runtime/invocation/{id}/response`: the invocation's result.
    Response(serde_json::Value),
}

struct State {
    event: Mutex<Option<serde_json::Value>>,
    deadline: Duration,
    reports: Mutex<Vec<Report>>,
    reported: Notify,
}

/// A running stand-in; stops when dropped.
pub struct RuntimeApi {
    /// `host:port`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub address: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl RuntimeApi {
    /// Serves `event` to the first `/invocation/next`, with a deadline `deadline` from then; later
    /// calls wait forever (the function idles, as between invocations).
    pub async fn start(event: serde_json::Value, deadline: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the runtime API stand-in");
        let addr: SocketAddr = listener.local_addr().expect("address");
        let state = Arc::new(State {
            event: Mutex::new(Some(event)),
            deadline,
            reports: Mutex::new(Vec::new()),
            reported: Notify::new(),
        });
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(&state, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Self {
            address: addr.to_string(),
            state,
            task,
        }
    }

    /// The first report, waiting at most `limit`.
    pub async fn first_report(&self, limit: Duration) -> Option<Report> {
        let wait = async {
            loop {
                let notified = self.state.reported.notified();
                if let Some(first) = self.state.reports.lock().unwrap().first() {
                    return first.clone();
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.ok()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if path.ends_with("/runtime/invocation/next") {
        let event = state.event.lock().unwrap().take();
        let Some(event) = event else {
            // One invocation per test: the function waits here, as between invocations.
            std::future::pending::<()>().await;
            unreachable!();
        };
        let deadline = std::time::SystemTime::now() + state.deadline;
        let deadline_ms = deadline
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        return Response::builder()
            .header("lambda-runtime-aws-request-id", "req-1")
            .header("lambda-runtime-deadline-ms", deadline_ms.to_string())
            .header(
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:us-east-1:123456789012:function:under-test",
            )
            .header(
                "lambda-runtime-trace-id",
                "Root=1-00000000-000000000000000000000000",
            )
            .body(Full::new(Bytes::from(event.to_string())))
            .expect("next response");
    }
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = |key: &str| json[key].as_str().unwrap_or_default().to_owned();
    let report = if path.ends_with("/runtime/init/error") {
        Report::InitError {
            error_type: text("errorType"),
            error_message: text("errorMessage"),
        }
    } else if path.ends_with("/error") {
        Report::InvocationError {
            error_type: text("errorType"),
            error_message: text("errorMessage"),
        }
    } else {
        Report::Response(json)
    };
    state.reports.lock().unwrap().push(report);
    state.reported.notify_waiters();
    Response::builder()
        .status(202)
        .body(Full::new(Bytes::new()))
        .expect("accepted")
}
