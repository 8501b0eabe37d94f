//! Database credentials from Secrets Manager (moto over HTTP), read the way the functions read
//! them at cold start.

use outbox_tests::aws::{moto_endpoint, sdk_config_for};
use outbox_tests::{workspace_binary, TestDb};
use pg_outbox::aws::secrets::{fetch_secret, settings_from_secret};
use pg_outbox::postgres::TlsMode;

const PASSWORD: &str = "pw-never-logged-4711";

async fn secret_for(db: &TestDb) -> String {
    let config = sdk_config_for(&moto_endpoint()).await;
    let (server, _) = db.url.rsplit_once('/').unwrap();
    let port = server.rsplit_once(':').unwrap().1;
    let value = serde_json::json!({
        "engine": "postgres", "host": "127.0.0.1", "port": port.parse::<u16>().unwrap(),
        "username": "postgres", "password": PASSWORD, "dbname": db.name,
    });
    aws_sdk_secretsmanager::Client::new(&config)
        .create_secret()
        .name(format!("db-{}", uuid::Uuid::new_v4().simple()))
        .secret_string(value.to_string())
        .send()
        .await
        .expect("create secret")
        .arn
        .expect("secret arn")
}

#[tokio::test]
async fn a_secret_in_secrets_manager_connects_to_the_database() {
    let db = TestDb::create().await;
    let arn = secret_for(&db).await;
    let config = sdk_config_for(&moto_endpoint()).await;
    let secret = fetch_secret(&config, &arn).await.unwrap();
    let settings = settings_from_secret(&secret, TlsMode::Disable).unwrap();
    assert_eq!(settings.dbname(), Some(db.name.as_str()));
    let client = settings
        .connect()
        .await
        .expect("connect with the secret's credentials");
    let n: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert!(!format!("{settings:?} {secret:?}").contains(PASSWORD));
}

#[tokio::test]
async fn a_process_configured_with_a_secret_arn_uses_it_and_never_prints_it() {
    let db = TestDb::create().await;
    let arn = secret_for(&db).await;
    let run = |with_url: bool| {
        let mut command = std::process::Command::new(workspace_binary("outboxctl"));
        command
            .arg("migrate")
            .env_remove("DATABASE_URL")
            .env("DATABASE_SECRET_ARN", &arn)
            .env("DATABASE_TLS", "disable")
            .env("AWS_ENDPOINT_URL", moto_endpoint())
            .env("RUST_LOG", "debug");
        if with_url {
            command.env("DATABASE_URL", &db.url);
        }
        command.output().expect("run outboxctl")
    };
    let output = run(false);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("schema is up to date"), "{text}");
    assert!(!text.contains(PASSWORD), "the password was printed: {text}");

    // Both ways at once is a configuration error that says so.
    let output = run(true);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        text.contains("set DATABASE_SECRET_ARN or DATABASE_URL, not both"),
        "{text}"
    );
}

#[tokio::test]
async fn a_missing_secret_fails_start_up_with_a_clear_message() {
    let config = sdk_config_for(&moto_endpoint()).await;
    let err = fetch_secret(
        &config,
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf",
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(
            "environment variable DATABASE_SECRET_ARN is invalid: cannot read the secret"
        ),
        "{err}"
    );
}

/// The functions' own start-up (configuration, Secrets Manager, the database warm-up) logged at
/// debug level, captured and searched: neither the password nor the connection string appears.
#[tokio::test]
async fn function_start_up_logs_never_contain_the_secret_or_the_connection_string() {
    let db = TestDb::create().await;
    let arn = secret_for(&db).await;
    let url_with_password = db
        .url
        .replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    for function in ["payment-command", "outbox-dispatcher", "projection-sink"] {
        for (name, value) in [
            ("DATABASE_SECRET_ARN", arn.as_str()),
            ("DATABASE_URL", url_with_password.as_str()),
        ] {
            let output = std::process::Command::new(workspace_binary(function))
                .env_remove("DATABASE_URL")
                .env(name, value)
                .env("DATABASE_TLS", "disable")
                .env("AWS_ENDPOINT_URL", moto_endpoint())
                .env("OUTBOX_TARGET", "sns")
                .env("SNS_TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:logs")
                .env("RUST_LOG", "trace")
                .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
                // No runtime API listens here: the function starts, logs, and stops.
                .env("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9")
                .env("AWS_LAMBDA_FUNCTION_NAME", function)
                .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
                .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
                .output()
                .expect("run the function");
            let logs = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            // Start-up went all the way to asking the runtime API for work.
            assert!(
                logs.contains("127.0.0.1:9"),
                "{function} with {name} stopped early: {logs}"
            );
            if name == "DATABASE_SECRET_ARN" {
                assert!(
                    logs.contains("read from Secrets Manager"),
                    "{function}: {logs}"
                );
            }
            assert!(
                !logs.contains(PASSWORD),
                "{function} with {name} logged the password: {logs}"
            );
            assert!(
                !logs.contains(&db.url),
                "{function} with {name} logged the connection string: {logs}"
            );
        }
    }
}
