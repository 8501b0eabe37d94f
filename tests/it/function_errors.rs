//! What an on-call engineer sees when a function fails: each function binary is started against a
//! stand-in for the Lambda runtime API with a wrong database password, an unreachable database and
//! a missing setting, and the `errorType` and message the runtime API receives are checked (plus
//! the per-class metric on stdout): a stable class name, a message naming the class and the
//! setting to check, never the password.

use std::process::Stdio;
use std::time::Duration;

use outbox_tests::aws::moto_endpoint;
use outbox_tests::cluster::PrivateCluster;
use outbox_tests::runtime_api::{Report, RuntimeApi};
use outbox_tests::{sample_json, workspace_binary, TestDb};
use tokio::io::AsyncReadExt;

const WRONG_PASSWORD: &str = "wrong-pw-4711";

/// How a function is misconfigured.
#[derive(Debug, Clone, Copy)]
enum Fault {
    WrongPassword,
    UnreachableHost,
    MissingSetting,
}

/// What the function under test reported, and what it printed on stdout.
struct Outcome {
    report: Report,
    stdout: String,
}

async fn run(function: &str, event: serde_json::Value, database_url: Option<&str>) -> Outcome {
    let api = RuntimeApi::start(event, Duration::from_secs(8)).await;
    let mut command = tokio::process::Command::new(workspace_binary(function));
    command
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_SECRET_ARN")
        .env("DATABASE_TLS", "disable")
        .env("DATABASE_CONNECT_TIMEOUT_MS", "1000")
        .env("DATABASE_OPERATION_TIMEOUT_MS", "2000")
        .env("AWS_ENDPOINT_URL", moto_endpoint())
        .env("OUTBOX_TARGET", "sns")
        .env("SNS_TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:errors")
        .env("DISPATCH_SAFETY_MARGIN_MS", "5000")
        .env("RUST_LOG", "warn")
        .env("AWS_LAMBDA_RUNTIME_API", &api.address)
        .env("AWS_LAMBDA_FUNCTION_NAME", function)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    let mut child = command.spawn().expect("start the function");
    let report = api.first_report(Duration::from_secs(30)).await;
    // Give the function a moment to flush its last lines, then stop it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = child.start_kill();
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout).await;
    }
    let _ = child.wait().await;
    let report = report.unwrap_or_else(|| panic!("{function} reported nothing: {stdout}"));
    Outcome { report, stdout }
}

fn event_for(function: &str) -> serde_json::Value {
    match function {
        "payment-command" => sample_json("payment-command", "01-paid.json"),
        "outbox-dispatcher" => sample_json("outbox-dispatcher", "scheduled.json"),
        _ => sample_json("projection-sink", "sns-raw.json"),
    }
}

/// An EMF document on stdout counting one failure of `class`.
fn metric_line(stdout: &str, class: &str) -> bool {
    stdout.lines().any(|line| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .is_some_and(|doc| doc[class] == 1.0 && doc["_aws"]["CloudWatchMetrics"].is_array())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_function_reports_the_class_of_its_failure() {
    let cluster = PrivateCluster::start();
    let db = TestDb::create_on(&cluster).await;
    cluster
        .create_app_role(&db.name, "app_errors", "pw-right-1")
        .await;
    let wrong = format!(
        "postgres://app_errors:{WRONG_PASSWORD}@127.0.0.1:{}/{}",
        cluster.port, db.name
    );
    // Nothing listens on port 1.
    let unreachable = format!("postgres://postgres@127.0.0.1:1/{}", db.name);

    for function in ["payment-command", "outbox-dispatcher", "projection-sink"] {
        for fault in [
            Fault::WrongPassword,
            Fault::UnreachableHost,
            Fault::MissingSetting,
        ] {
            let url = match fault {
                Fault::WrongPassword => Some(wrong.as_str()),
                Fault::UnreachableHost => Some(unreachable.as_str()),
                Fault::MissingSetting => None,
            };
            let Outcome { report, stdout } = run(function, event_for(function), url).await;
            let (class, needle) = match fault {
                Fault::WrongPassword => ("DatabaseAuthenticationFailed", "DATABASE_SECRET_ARN"),
                Fault::UnreachableHost => ("DatabaseUnavailable", "DATABASE_OPERATION_TIMEOUT_MS"),
                Fault::MissingSetting => ("InvalidConfiguration", "DATABASE_URL"),
            };
            let context = format!("{function} with {fault:?}: {report:?}");
            println!("{context}");
            match (&report, fault, function) {
                (
                    Report::InitError {
                        error_type,
                        error_message,
                    },
                    Fault::MissingSetting,
                    _,
                ) => {
                    assert_eq!(error_type, class, "{context}");
                    assert!(error_message.contains(needle), "{context}");
                }
                // The command answers its HTTP clients with a 503 they may retry; the class goes
                // to its log and metric.
                (
                    Report::Response(response),
                    Fault::WrongPassword | Fault::UnreachableHost,
                    "payment-command",
                ) => {
                    assert_eq!(response["statusCode"], 503, "{context}");
                    assert!(
                        metric_line(&stdout, class),
                        "{context}: no {class} metric in {stdout}"
                    );
                }
                (
                    Report::InvocationError {
                        error_type,
                        error_message,
                    },
                    Fault::WrongPassword | Fault::UnreachableHost,
                    _,
                ) => {
                    assert_eq!(error_type, class, "{context}");
                    assert!(error_message.contains(needle), "{context}");
                    assert!(
                        metric_line(&stdout, class),
                        "{context}: no {class} metric in {stdout}"
                    );
                }
                _ => panic!("unexpected report: {context}"),
            }
            let text = format!("{report:?}{stdout}");
            assert!(
                !text.contains(WRONG_PASSWORD),
                "{function} printed the password: {text}"
            );
        }
    }
}
