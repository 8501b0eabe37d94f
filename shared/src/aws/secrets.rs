//! Database credentials from Secrets Manager: read once per cold start when
//! `DATABASE_SECRET_ARN` is set. The secret is the JSON that RDS and Secrets Manager rotation use
//! (`host`, `port`, `username`, `password`, `dbname`); its values are never logged.

use aws_config::SdkConfig;
use serde::Deserialize;
use tokio_postgres::Config;

use crate::config::{optional_env, ConfigError, Secret};
use crate::postgres::{DatabaseSettings, TlsMode};

#[derive(Deserialize)]
struct DatabaseSecret {
    host: String,
    #[serde(default)]
    port: Option<serde_json::Value>,
    username: String,
    password: String,
    #[serde(default)]
    dbname: Option<String>,
}

fn invalid(reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name: "DATABASE_SECRET_ARN",
        reason: reason.into(),
    }
}

/// Builds connection settings from the secret's JSON. Errors name the field, never its value.
pub fn settings_from_secret(
    json: &Secret<String>,
    tls: TlsMode,
) -> Result<DatabaseSettings, ConfigError> {
    let secret: DatabaseSecret = serde_json::from_str(json.expose()).map_err(|e| {
        // serde_json's messages quote no input for missing fields and types, only positions.
        invalid(format!(
            "secret is not the expected JSON object: {}",
            e.to_string().split(" at line").next().unwrap_or("")
        ))
    })?;
    let port = match &secret.port {
        None => 5432,
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| invalid("secret field port is not a port number"))?,
        Some(serde_json::Value::String(s)) => s
            .parse()
            .map_err(|_| invalid("secret field port is not a port number"))?,
        Some(_) => return Err(invalid("secret field port is not a port number")),
    };
    let mut config = Config::new();
    config
        .host(&secret.host)
        .port(port)
        .user(&secret.username)
        .password(secret.password.as_bytes())
        .dbname(secret.dbname.as_deref().unwrap_or("postgres"));
    Ok(DatabaseSettings::new(config, tls))
}

/// Fetches the secret's current value.
pub async fn fetch_secret(sdk: &SdkConfig, arn: &str) -> Result<Secret<String>, ConfigError> {
    let output = aws_sdk_secretsmanager::Client::new(sdk)
        .get_secret_value()
        .secret_id(arn)
        .send()
        .await
        .map_err(|e| invalid(format!("cannot read the secret: {}", super::describe(&e))))?;
    output
        .secret_string()
        .map(|s| Secret::new(s.to_owned()))
        .ok_or_else(|| invalid("the secret has no string value"))
}

/// The database settings of a function: from the secret named by `DATABASE_SECRET_ARN` when set
/// (TLS as `DATABASE_TLS` says, `verify-full` by default), from `DATABASE_URL` otherwise.
pub async fn database_settings_from_env() -> Result<DatabaseSettings, ConfigError> {
    let Some(arn) = optional_env("DATABASE_SECRET_ARN") else {
        return DatabaseSettings::from_env();
    };
    if optional_env("DATABASE_URL").is_some() {
        return Err(invalid("set DATABASE_SECRET_ARN or DATABASE_URL, not both"));
    }
    let secret = fetch_secret(&super::sdk_config().await, &arn).await?;
    let mut settings = settings_from_secret(&secret, DatabaseSettings::tls_from_env()?)?;
    if let Some(pem) = DatabaseSettings::extra_root_from_env()? {
        settings = settings.with_extra_root(pem);
    }
    tracing::info!(settings = ?settings, "database settings read from Secrets Manager");
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rds_style_secret_becomes_settings_and_never_prints_the_password() {
        let json = Secret::new(
            r#"{"engine":"postgres","host":"db.internal","port":5433,"username":"app","password":"s3cr3t-pw","dbname":"payments"}"#
                .to_owned(),
        );
        let settings = settings_from_secret(&json, TlsMode::VerifyFull).unwrap();
        assert_eq!(settings.dbname(), Some("payments"));
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("s3cr3t-pw") && !shown.contains("app"),
            "{shown}"
        );
    }

    #[test]
    fn a_bad_secret_names_the_problem_without_its_values() {
        for (json, needle) in [
            (r#"{"host":"h","username":"u"}"#, "password"),
            (
                r#"{"host":"h","username":"u","password":"hunter2","port":"x"}"#,
                "port",
            ),
            ("not json hunter2", "expected JSON"),
        ] {
            let err = settings_from_secret(&Secret::new(json.to_owned()), TlsMode::Disable)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
