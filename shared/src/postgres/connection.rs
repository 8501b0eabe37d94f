//! Connection settings and the lazily (re)connected client a Lambda instance keeps.
//!
//! A Lambda instance handles one invocation at a time, so it holds one connection, not a pool.
//! Every statement is sent with `query_typed` (unnamed statements, one round trip), so nothing
//! outlives a transaction on the server: the connection works behind RDS Proxy without pinning.

use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};

use crate::config::{optional_env, required_env, ConfigError, Secret};

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS required, the server's certificate chain and host name verified (`verify-full`).
    VerifyFull,
    /// No TLS. Only for a local database, and only when asked for explicitly.
    Disable,
}

/// Where the database is and how to reach it.
#[derive(Clone)]
pub struct DatabaseSettings {
    config: Config,
    tls: TlsMode,
    extra_root_pem: Option<Secret<Vec<u8>>>,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("hosts", &self.config.get_hosts().len())
            .field("dbname", &self.config.get_dbname())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Why talking to the database failed before any statement ran.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The TLS connector could not be built (bad CA file, TLS library error).
    #[error("cannot set up TLS for the database connection")]
    Tls(#[source] native_tls::Error),
    /// Connecting or authenticating failed.
    #[error("cannot connect to the database")]
    Connect(#[source] tokio_postgres::Error),
}

impl DatabaseSettings {
    /// Settings from a parsed connection string.
    pub fn new(config: Config, tls: TlsMode) -> Self {
        Self {
            config,
            tls,
            extra_root_pem: None,
        }
    }

    /// Reads `DATABASE_URL` (a `postgres://` URL or `key=value` string), `DATABASE_TLS`
    /// (`verify-full`, the default, or `disable`) and `DATABASE_CA_FILE` (an extra PEM root, such
    /// as the RDS CA bundle).
    pub fn from_env() -> Result<Self, ConfigError> {
        let url = Secret::new(required_env("DATABASE_URL")?);
        let config: Config = url.expose().parse().map_err(|_| ConfigError::Invalid {
            name: "DATABASE_URL",
            // The parse error may quote the string, which may hold a password.
            reason: "not a valid PostgreSQL connection string".into(),
        })?;
        Ok(Self {
            config,
            tls: Self::tls_from_env()?,
            extra_root_pem: Self::extra_root_from_env()?,
        })
    }

    /// `DATABASE_TLS`: `verify-full` (the default) or `disable`.
    pub fn tls_from_env() -> Result<TlsMode, ConfigError> {
        match optional_env("DATABASE_TLS").as_deref() {
            None | Some("verify-full") => Ok(TlsMode::VerifyFull),
            Some("disable") => Ok(TlsMode::Disable),
            Some(other) => Err(ConfigError::Invalid {
                name: "DATABASE_TLS",
                reason: format!("{other:?} is not one of verify-full, disable"),
            }),
        }
    }

    /// `DATABASE_CA_FILE`: an extra PEM root certificate to trust, if set.
    pub fn extra_root_from_env() -> Result<Option<Secret<Vec<u8>>>, ConfigError> {
        let Some(path) = optional_env("DATABASE_CA_FILE") else {
            return Ok(None);
        };
        std::fs::read(&path)
            .map(|pem| Some(Secret::new(pem)))
            .map_err(|e| ConfigError::Invalid {
                name: "DATABASE_CA_FILE",
                reason: format!("cannot read {path}: {e}"),
            })
    }

    /// The same settings trusting one more root certificate (PEM).
    pub fn with_extra_root(mut self, pem: Secret<Vec<u8>>) -> Self {
        self.extra_root_pem = Some(pem);
        self
    }

    /// The same server and credentials, another database (used to create test databases).
    pub fn with_dbname(&self, dbname: &str) -> Self {
        let mut copy = self.clone();
        copy.config.dbname(dbname);
        copy
    }

    /// The database name, if the connection string gives one.
    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }

    /// Opens a new connection and drives it on the current runtime.
    pub async fn connect(&self) -> Result<Client, DbError> {
        let mut config = self.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name(env!("CARGO_PKG_NAME"));
        }
        let client = match self.tls {
            TlsMode::Disable => {
                config.ssl_mode(SslMode::Disable);
                let (client, connection) = config.connect(NoTls).await.map_err(DbError::Connect)?;
                tokio::spawn(drive(connection));
                client
            }
            TlsMode::VerifyFull => {
                // Require: the connection fails rather than falling back to plain text. native-tls
                // verifies the chain and the host name by default, which makes this verify-full.
                config.ssl_mode(SslMode::Require);
                let mut builder = native_tls::TlsConnector::builder();
                if let Some(pem) = &self.extra_root_pem {
                    let cert =
                        native_tls::Certificate::from_pem(pem.expose()).map_err(DbError::Tls)?;
                    builder.add_root_certificate(cert);
                }
                let tls = postgres_native_tls::MakeTlsConnector::new(
                    builder.build().map_err(DbError::Tls)?,
                );
                let (client, connection) = config.connect(tls).await.map_err(DbError::Connect)?;
                tokio::spawn(drive(connection));
                client
            }
        };
        Ok(client)
    }
}

async fn drive<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(error) = connection.await {
        tracing::warn!(%error, "database connection closed");
    }
}

/// The single connection of a Lambda instance: opened on first use, reopened after it breaks.
pub struct Db {
    settings: DatabaseSettings,
    slot: Mutex<Option<Client>>,
}

impl Db {
    /// A handle that connects on first use.
    pub fn new(settings: DatabaseSettings) -> Self {
        Self {
            settings,
            slot: Mutex::new(None),
        }
    }

    /// The connection, (re)opened if needed. Held exclusively until the guard drops.
    pub async fn client(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, DbError> {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.settings.connect().await?);
        }
        Ok(MutexGuard::map(slot, |slot| match slot {
            Some(client) => client,
            None => unreachable!("the slot was filled above"),
        }))
    }

    /// Opens the connection now (at cold start) so the first request does not pay for it. A
    /// failure is logged and retried on first use.
    pub async fn warm_up(&self) {
        if let Err(error) = self.client().await {
            tracing::warn!(error = %error, "database not reachable at start-up; will retry on first use");
        }
    }
}
