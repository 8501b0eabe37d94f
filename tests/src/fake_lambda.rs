//! A stand-in for the Lambda service's Invoke API on loopback (`POST
//! /2015-03-31/functions/{name}/invocations`), for the command handler's wake-up call. It records
//! every invocation and answers as Lambda does an asynchronous invoke (202, empty body), then
//! hands the invocation to an optional callback: the benchmark runs a real dispatcher drain there,
//! as Lambda would start the function.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One invocation as received.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The function name from the path.
    pub function: String,
    /// The `X-Amz-Invocation-Type` header (`Event` for asynchronous invokes).
    pub invocation_type: Option<String>,
    /// The payload.
    pub payload: Bytes,
    /// When it arrived.
    pub at: Instant,
}

type OnInvoke = Arc<dyn Fn(Invocation) + Send + Sync>;

/// The fake service; stops when dropped.
pub struct FakeLambda {
    /// Its URL (an SDK `endpoint_url`).
    pub endpoint: String,
    invocations: Arc<Mutex<Vec<Invocation>>>,
    status: Arc<Mutex<u16>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeLambda {
    /// Records invocations and answers 202.
    pub async fn start() -> Self {
        Self::start_with(Arc::new(|_| {})).await
    }

    /// Also calls `on_invoke` for each invocation after answering.
    pub async fn start_with(on_invoke: OnInvoke) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Lambda");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let invocations = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(202u16));
        let (recorded, answer) = (invocations.clone(), status.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (recorded, answer, on_invoke) =
                    (recorded.clone(), answer.clone(), on_invoke.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (recorded, answer, on_invoke) =
                            (recorded.clone(), answer.clone(), on_invoke.clone());
                        async move {
                            let invocation = read(req).await;
                            recorded.lock().unwrap().push(invocation.clone());
                            let status = *answer.lock().unwrap();
                            if status == 202 {
                                on_invoke(invocation);
                            }
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("x-amzn-requestid", uuid::Uuid::new_v4().to_string())
                                    .body(Full::new(Bytes::new()))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            endpoint,
            invocations,
            status,
            task,
        }
    }

    /// Answers every later invoke with `status` (e.g. 500, or 429 for throttling).
    pub fn answer_with(&self, status: u16) {
        *self.status.lock().unwrap() = status;
    }

    /// The invocations so far.
    pub fn invocations(&self) -> Vec<Invocation> {
        self.invocations.lock().unwrap().clone()
    }
}

async fn read(req: Request<Incoming>) -> Invocation {
    let at = Instant::now();
    let function = req
        .uri()
        .path()
        .trim_start_matches("/2015-03-31/functions/")
        .trim_end_matches("/invocations")
        .to_owned();
    let invocation_type = req
        .headers()
        .get("x-amz-invocation-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let payload = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Invocation {
        function,
        invocation_type,
        payload,
        at,
    }
}

impl Drop for FakeLambda {
    fn drop(&mut self) {
        self.task.abort();
    }
}
