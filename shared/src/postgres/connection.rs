//! (Past 400 lines: settings, TLS, credential re-reads and the reconnecting client are one life cycle.)
//!
//! Connection settings and the lazily (re)connected client a Lambda instance keeps.
//!
//! A Lambda instance handles one invocation at a time, so it holds a connection or two, not a
//! pool: a second one is opened only when two operations overlap (the dispatcher records one
//! batch's outcomes while it leases the next), up to `DATABASE_MAX_CONNECTIONS`.
//! Every statement is sent with `query_typed` (unnamed statements, one round trip), so nothing
//! outlives a transaction on the server: the connection works behind RDS Proxy without pinning.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};

use futures_util::future::BoxFuture;

use crate::config::{optional_env, ranged_env, required_env, ConfigError, Secret};
use crate::ports::{ConnectFailure, StoreError};

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
    /// The server could not be reached, refused the connection, or is starting up or shutting
    /// down. Transient: the next attempt may succeed.
    #[error("cannot connect to the database")]
    Connect(#[source] tokio_postgres::Error),
    /// The server refused the credentials (SQLSTATE 28P01 or 28000), also after re-reading them:
    /// the secret (`DATABASE_SECRET_ARN`) or `DATABASE_URL` holds a user or password the
    /// database does not accept.
    #[error(
        "the database refused the credentials (check the secret named by DATABASE_SECRET_ARN, \
         or DATABASE_URL)"
    )]
    Authentication(#[source] tokio_postgres::Error),
    /// Re-reading the credentials after an authentication failure failed.
    #[error("cannot re-read the database credentials")]
    Credentials(#[source] ConfigError),
}

impl DbError {
    fn from_connect(e: tokio_postgres::Error) -> Self {
        if is_authentication_failure(&e) {
            DbError::Authentication(e)
        } else {
            DbError::Connect(e)
        }
    }

    /// Whether the server refused the credentials.
    pub fn is_authentication(&self) -> bool {
        matches!(self, DbError::Authentication(_) | DbError::Credentials(_))
    }
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        let failure = match e {
            DbError::Tls(_) => ConnectFailure::Configuration,
            DbError::Connect(_) => ConnectFailure::Unreachable,
            DbError::Authentication(_) | DbError::Credentials(_) => ConnectFailure::Authentication,
        };
        StoreError::Connect {
            failure,
            source: Box::new(e),
        }
    }
}

/// The driver's errors as the ports see them: a session the server ended or a socket that
/// closed is the connection lost; a lost lock conflict is a conflict; any other is a statement
/// that failed.
impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        // A session ended by the server (restart, failover, pg_terminate_backend) arrives as an
        // error of class 57P (operator intervention) before the socket closes.
        let ended_by_server = e.code().is_some_and(|c| {
            *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
        });
        let lost_a_conflict = e.code().is_some_and(|c| {
            *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::LOCK_NOT_AVAILABLE
                || *c == SqlState::QUERY_CANCELED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
        });
        if e.is_closed() || e.as_db_error().is_none() || ended_by_server {
            StoreError::Unavailable(Box::new(e))
        } else if lost_a_conflict {
            StoreError::Conflict(Box::new(e))
        } else {
            StoreError::Statement(Box::new(e))
        }
    }
}

/// An append that failed, as the ports see it: the database's refusal as any of its errors, a
/// payload that does not serialize as stored data that is invalid.
impl From<crate::producer::AppendError> for StoreError {
    fn from(e: crate::producer::AppendError) -> Self {
        match e {
            crate::producer::AppendError::Database { source, .. } => source.into(),
            other => Self::Corrupt(other.to_string()),
        }
    }
}

/// SQLSTATE 28P01 (invalid password) or 28000 (invalid authorization, e.g. no `pg_hba.conf`
/// entry for the user, or an unknown user).
fn is_authentication_failure(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(
        e.code(),
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    )
}

/// Where fresh credentials come from after the server refused the current ones (a rotated
/// secret). Implemented by [`crate::aws::secrets::SecretCredentials`].
pub trait CredentialSource: Send + Sync {
    /// The settings to try, best first (the secret's current value, then its pending one).
    fn candidates(&self) -> BoxFuture<'_, Result<Vec<DatabaseSettings>, ConfigError>>;
}

/// Bounds on every wait of a function's connection, so a database that fails over, restarts or
/// silently stops answering costs a bounded error, never the Lambda timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// One connection attempt, TCP and TLS and authentication (`DATABASE_CONNECT_TIMEOUT_MS`,
    /// 100..=60000, default 3000).
    pub connect: Duration,
    /// One store operation from start to end, connecting included (`DATABASE_OPERATION_TIMEOUT_MS`,
    /// 100..=300000, default 5000).
    pub operation: Duration,
    /// The session's `statement_timeout`, sent at connect so the server gives up on a statement
    /// the client gave up on (`DATABASE_STATEMENT_TIMEOUT_MS`, 0 = do not send one, default: the
    /// operation timeout). `None` for administrative commands whose statements may run long.
    pub statement_timeout: Option<Duration>,
    /// Least time between two reads of the credentials (`DATABASE_CREDENTIALS_REFRESH_MS`,
    /// 0..=600000, default 5000): a wrong secret cannot make an instance hammer Secrets Manager.
    pub refresh_interval: Duration,
    /// Connections an instance holds at most (`DATABASE_MAX_CONNECTIONS`, 1..=4, default 2). An
    /// operation takes a free one, opening it if needed, or waits for one: with 1, the
    /// dispatcher's record and next claim run one after the other.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            connect: Duration::from_millis(3_000),
            operation: Duration::from_millis(5_000),
            statement_timeout: Some(Duration::from_millis(5_000)),
            refresh_interval: Duration::from_millis(5_000),
            max_connections: 2,
        }
    }
}

impl ConnectionLimits {
    /// Reads the settings, falling back to the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = Self::default();
        let ms = |name, default: Duration, min, max| {
            ranged_env(name, default.as_millis() as u64, min, max).map(Duration::from_millis)
        };
        let operation = ms("DATABASE_OPERATION_TIMEOUT_MS", d.operation, 100, 300_000)?;
        let statement_timeout = ms("DATABASE_STATEMENT_TIMEOUT_MS", operation, 0, 3_600_000)?;
        Ok(Self {
            connect: ms("DATABASE_CONNECT_TIMEOUT_MS", d.connect, 100, 60_000)?,
            operation,
            statement_timeout: (!statement_timeout.is_zero()).then_some(statement_timeout),
            refresh_interval: ms(
                "DATABASE_CREDENTIALS_REFRESH_MS",
                d.refresh_interval,
                0,
                600_000,
            )?,
            max_connections: ranged_env("DATABASE_MAX_CONNECTIONS", d.max_connections, 1, 4)?,
        })
    }
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

    /// Opens a new connection and drives it on the current runtime (for tools and tests: a
    /// 5 s connect timeout unless the connection string sets one, no statement timeout).
    pub async fn connect(&self) -> Result<Client, DbError> {
        let mut config = self.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        self.connect_config(config).await
    }

    /// Opens a connection for a function: every wait bounded by `limits`. TCP keepalives and
    /// `TCP_USER_TIMEOUT` find a peer that vanished (a failover, a NAT that dropped its state)
    /// while the connection idles between invocations; the session's `statement_timeout` makes
    /// the server stop a statement the client has given up on.
    pub async fn connect_bounded(&self, limits: &ConnectionLimits) -> Result<Client, DbError> {
        let mut config = self.config.clone();
        config
            .connect_timeout(limits.connect)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(limits.operation);
        if let Some(timeout) = limits.statement_timeout {
            let timeout = format!("-c statement_timeout={}", timeout.as_millis());
            let options = match config.get_options() {
                Some(given) if !given.trim().is_empty() => format!("{given} {timeout}"),
                _ => timeout,
            };
            config.options(options);
        }
        self.connect_config(config).await
    }

    async fn connect_config(&self, mut config: Config) -> Result<Client, DbError> {
        if config.get_application_name().is_none() {
            config.application_name(env!("CARGO_PKG_NAME"));
        }
        let client = match self.tls {
            TlsMode::Disable => {
                config.ssl_mode(SslMode::Disable);
                let (client, connection) =
                    config.connect(NoTls).await.map_err(DbError::from_connect)?;
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
                let (client, connection) =
                    config.connect(tls).await.map_err(DbError::from_connect)?;
                tokio::spawn(drive(connection));
                client
            }
        };
        Ok(client)
    }

    /// Whether both settings reach the same server as the same user with the same password.
    pub fn same_credentials(&self, other: &DatabaseSettings) -> bool {
        self.config == other.config
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

/// The single connection of a Lambda instance: opened on first use, reopened after it breaks,
/// with the credentials re-read when the server refuses them.
pub struct Db {
    settings: std::sync::Mutex<DatabaseSettings>,
    credentials: Option<Arc<dyn CredentialSource>>,
    last_refresh: std::sync::Mutex<Option<Instant>>,
    limits: ConnectionLimits,
    /// `limits.max_connections` of them, each empty until an operation needs it.
    slots: Vec<Arc<Mutex<Option<Client>>>>,
}

/// The instance's connection, held exclusively by one operation (see [`Db::run`]).
pub type Connection = OwnedMappedMutexGuard<Option<Client>, Client>;

fn slots(n: usize) -> Vec<Arc<Mutex<Option<Client>>>> {
    (0..n.max(1)).map(|_| Arc::new(Mutex::new(None))).collect()
}

impl Db {
    /// A handle that connects on first use, with the default [`ConnectionLimits`] and no way to
    /// re-read its credentials.
    pub fn new(settings: DatabaseSettings) -> Self {
        Self {
            settings: std::sync::Mutex::new(settings),
            credentials: None,
            last_refresh: std::sync::Mutex::new(None),
            limits: ConnectionLimits::default(),
            slots: slots(ConnectionLimits::default().max_connections),
        }
    }

    /// Re-reads the credentials from `source` when the server refuses them.
    pub fn with_credentials(mut self, source: Arc<dyn CredentialSource>) -> Self {
        self.credentials = Some(source);
        self
    }

    /// Other bounds on connecting and on each operation.
    pub fn with_limits(mut self, limits: ConnectionLimits) -> Self {
        if limits.max_connections != self.slots.len() {
            self.slots = slots(limits.max_connections);
        }
        self.limits = limits;
        self
    }

    /// The bounds in force.
    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    fn current_settings(&self) -> DatabaseSettings {
        self.settings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Opens a connection. When the server refuses the credentials and a [`CredentialSource`]
    /// is set, re-reads them (at most once per `refresh_interval`) and tries each candidate once,
    /// keeping the first that works: a rotated password costs one extra connection attempt, not
    /// a failed request.
    async fn open(&self) -> Result<Client, DbError> {
        let current = self.current_settings();
        let refused = match current.connect_bounded(&self.limits).await {
            Ok(client) => return Ok(client),
            Err(DbError::Authentication(e)) => e,
            Err(other) => return Err(other),
        };
        let Some(source) = &self.credentials else {
            return Err(DbError::Authentication(refused));
        };
        {
            let mut last = self
                .last_refresh
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if last.is_some_and(|at| at.elapsed() < self.limits.refresh_interval) {
                tracing::warn!(
                    "database refused the credentials; re-read them less than {} ms ago, not again",
                    self.limits.refresh_interval.as_millis()
                );
                return Err(DbError::Authentication(refused));
            }
            *last = Some(Instant::now());
        }
        tracing::warn!("database refused the credentials; re-reading them");
        let candidates = source.candidates().await.map_err(DbError::Credentials)?;
        let mut last_refusal = refused;
        for candidate in candidates {
            if candidate.same_credentials(&current) {
                continue;
            }
            match candidate.connect_bounded(&self.limits).await {
                Ok(client) => {
                    tracing::info!("connected with the re-read credentials");
                    *self
                        .settings
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = candidate;
                    return Ok(client);
                }
                Err(DbError::Authentication(e)) => last_refusal = e,
                Err(other) => return Err(other),
            }
        }
        Err(DbError::Authentication(last_refusal))
    }

    /// The connection, (re)opened if needed, held exclusively until the guard drops. Not bounded
    /// by the operation timeout (administrative commands may run long): stores use [`Db::run`].
    pub async fn client(&self) -> Result<Connection, DbError> {
        Ok(self.client_in_slot().await?.1)
    }

    /// A free connection (an open one first), or the first to be given back; with its slot.
    async fn client_in_slot(&self) -> Result<(usize, Connection), DbError> {
        let free = |open: bool| {
            self.slots.iter().enumerate().find_map(|(i, slot)| {
                let guard = slot.clone().try_lock_owned().ok()?;
                (guard.is_some() == open).then_some((i, guard))
            })
        };
        let (i, mut slot) = match free(true).or_else(|| free(false)) {
            Some(found) => found,
            None => {
                let waits = self
                    .slots
                    .iter()
                    .map(|slot| Box::pin(slot.clone().lock_owned()));
                let (guard, i, _) = futures_util::future::select_all(waits).await;
                (i, guard)
            }
        };
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.open().await?);
        }
        let connection = OwnedMutexGuard::map(slot, |slot| match slot {
            Some(client) => client,
            None => unreachable!("the slot was filled above"),
        });
        Ok((i, connection))
    }

    /// Closes the connection in slot `i` (broken, or not answering): the next operation that
    /// takes the slot opens a new one. No slot (`usize::MAX`): the operation never got one.
    async fn drop_connection(&self, i: usize) {
        if let Some(slot) = self.slots.get(i) {
            slot.lock().await.take();
        }
    }

    /// Runs one store operation on the connection, bounded by the operation timeout (connecting
    /// included). When the connection turns out to be broken (the server restarted, failed over,
    /// or ended the session) the operation runs once more on a new connection, within the same
    /// bound: every operation of this crate's stores is safe to repeat (idempotent writes,
    /// leases, the inbox). When the bound passes, the connection is dropped (it may be one that
    /// silently stopped answering) and the next operation opens a new one.
    ///
    /// `operation` gets the connection as an owned guard, so the future it returns borrows
    /// nothing from `run`: `db.run(|mut client| async move { f(&mut client, args).await })`.
    pub async fn run<T, F, Fut>(&self, operation: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        // The slot of the attempt under way, for dropping its connection on a timeout.
        let in_use = std::sync::atomic::AtomicUsize::new(usize::MAX);
        let attempts = async {
            let mut retried = false;
            loop {
                let (slot, connection) = self.client_in_slot().await?;
                in_use.store(slot, std::sync::atomic::Ordering::Relaxed);
                match operation(connection).await {
                    Err(e) if e.is_connection_lost() => {
                        // The guard went with the operation's future; take the broken client out.
                        self.drop_connection(slot).await;
                        if retried {
                            return Err(e);
                        }
                        tracing::warn!(error = %crate::telemetry::error_chain(&e),
                            "database connection broken; running the operation again on a new one");
                        retried = true;
                    }
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(self.limits.operation, attempts).await {
            Ok(result) => result,
            Err(_) => {
                self.drop_connection(in_use.load(std::sync::atomic::Ordering::Relaxed))
                    .await;
                tracing::warn!(
                    timeout_ms = self.limits.operation.as_millis() as u64,
                    "database did not answer in time; connection dropped"
                );
                Err(StoreError::Timeout(self.limits.operation))
            }
        }
    }

    /// Opens the connection now (at cold start) so the first request does not pay for it. A
    /// failure is logged and retried on first use.
    pub async fn warm_up(&self) {
        let opened = tokio::time::timeout(self.limits.operation, self.client()).await;
        match opened {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(error = %crate::telemetry::error_chain(&error),
                "database not reachable at start-up; will retry on first use"),
            Err(_) => {
                tracing::warn!("database did not answer at start-up; will retry on first use")
            }
        }
    }
}
