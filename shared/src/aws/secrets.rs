//! Database credentials from Secrets Manager when `DATABASE_SECRET_ARN` is set: read at cold
//! start, and read again when the database refuses them (a rotation). The secret is the JSON that
//! RDS and Secrets Manager rotation use (`host`, `port`, `username`, `password`, `dbname`); its
//! values are never logged.

use std::sync::Arc;

use aws_config::SdkConfig;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use tokio_postgres::Config;

use crate::config::{optional_env, ConfigError, Secret};
use crate::postgres::{ConnectionLimits, CredentialSource, DatabaseSettings, Db, TlsMode};

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

/// Fetches the secret's current value (`AWSCURRENT`).
pub async fn fetch_secret(sdk: &SdkConfig, arn: &str) -> Result<Secret<String>, ConfigError> {
    let client = aws_sdk_secretsmanager::Client::new(sdk);
    fetch_stage(&client, arn, "AWSCURRENT")
        .await?
        .ok_or_else(|| invalid("the secret has no string value"))
}

/// The value at a version stage; `None` when no version has that stage (no rotation under way
/// for `AWSPENDING`) or the version holds no string.
async fn fetch_stage(
    client: &aws_sdk_secretsmanager::Client,
    arn: &str,
    stage: &str,
) -> Result<Option<Secret<String>>, ConfigError> {
    let output = client
        .get_secret_value()
        .secret_id(arn)
        .version_stage(stage)
        .send()
        .await;
    match output {
        Ok(output) => Ok(output.secret_string().map(|s| Secret::new(s.to_owned()))),
        Err(e)
            if stage != "AWSCURRENT"
                && e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(invalid(format!(
            "cannot read the secret: {}",
            super::describe(&e)
        ))),
    }
}

/// The secret as a [`CredentialSource`]: after the database refused the credentials, the
/// current value, then the pending one. AWS's rotation sets the new password in the database
/// (`setSecret`) before it moves `AWSCURRENT` to it (`finishSecret`); between the two steps only
/// `AWSPENDING` works, so a client that tries it keeps connecting through the whole rotation.
pub struct SecretCredentials {
    client: aws_sdk_secretsmanager::Client,
    arn: String,
    tls: TlsMode,
    extra_root: Option<Secret<Vec<u8>>>,
}

impl SecretCredentials {
    /// Reads the secret `arn` with `sdk`; connections use `tls` and trust `extra_root` too.
    pub fn new(
        sdk: &SdkConfig,
        arn: impl Into<String>,
        tls: TlsMode,
        extra_root: Option<Secret<Vec<u8>>>,
    ) -> Self {
        Self {
            client: aws_sdk_secretsmanager::Client::new(sdk),
            arn: arn.into(),
            tls,
            extra_root,
        }
    }

    fn settings(&self, json: &Secret<String>) -> Result<DatabaseSettings, ConfigError> {
        let settings = settings_from_secret(json, self.tls)?;
        Ok(match &self.extra_root {
            Some(pem) => settings.with_extra_root(pem.clone()),
            None => settings,
        })
    }

    /// The settings of the current value.
    pub async fn current(&self) -> Result<DatabaseSettings, ConfigError> {
        let json = fetch_stage(&self.client, &self.arn, "AWSCURRENT")
            .await?
            .ok_or_else(|| invalid("the secret has no string value"))?;
        self.settings(&json)
    }
}

impl CredentialSource for SecretCredentials {
    fn candidates(&self) -> BoxFuture<'_, Result<Vec<DatabaseSettings>, ConfigError>> {
        Box::pin(async move {
            let current = fetch_stage(&self.client, &self.arn, "AWSCURRENT").await?;
            let pending = fetch_stage(&self.client, &self.arn, "AWSPENDING").await?;
            let mut candidates = Vec::with_capacity(2);
            for json in [current, pending].into_iter().flatten() {
                candidates.push(self.settings(&json)?);
            }
            tracing::info!(
                candidates = candidates.len(),
                "database credentials re-read from Secrets Manager"
            );
            Ok(candidates)
        })
    }
}

/// The database settings of a function: from the secret named by `DATABASE_SECRET_ARN` when set
/// (TLS as `DATABASE_TLS` says, `verify-full` by default), from `DATABASE_URL` otherwise.
pub async fn database_settings_from_env() -> Result<DatabaseSettings, ConfigError> {
    Ok(match secret_credentials_from_env().await? {
        Some(source) => source.current().await?,
        None => DatabaseSettings::from_env()?,
    })
}

/// The function's database handle, configured once at cold start: credentials from
/// `DATABASE_SECRET_ARN` (re-read when the database refuses them) or `DATABASE_URL`, and the
/// bounds of [`ConnectionLimits::from_env`].
pub async fn database_from_env() -> Result<Db, ConfigError> {
    let limits = ConnectionLimits::from_env()?;
    let db = match secret_credentials_from_env().await? {
        Some(source) => {
            let settings = source.current().await?;
            tracing::info!(settings = ?settings, "database settings read from Secrets Manager");
            Db::new(settings).with_credentials(Arc::new(source))
        }
        None => Db::new(DatabaseSettings::from_env()?),
    };
    Ok(db.with_limits(limits))
}

async fn secret_credentials_from_env() -> Result<Option<SecretCredentials>, ConfigError> {
    let Some(arn) = optional_env("DATABASE_SECRET_ARN") else {
        return Ok(None);
    };
    if optional_env("DATABASE_URL").is_some() {
        return Err(invalid("set DATABASE_SECRET_ARN or DATABASE_URL, not both"));
    }
    Ok(Some(SecretCredentials::new(
        &super::sdk_config().await,
        arn,
        DatabaseSettings::tls_from_env()?,
        DatabaseSettings::extra_root_from_env()?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rds_style_secret_becomes_settings_and_never_prints_the_password() {
        let json = Secret::new(
            r#"{"engine":"postgres","host":"db.internal","port":5433,"username":"app","password":"s3cr3t-pw","dbname":"orders"}"#
                .to_owned(),
        );
        let settings = settings_from_secret(&json, TlsMode::VerifyFull).unwrap();
        assert_eq!(settings.dbname(), Some("orders"));
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
