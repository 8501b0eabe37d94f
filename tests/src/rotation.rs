//! A database role whose password rotates the way Secrets Manager's single-user rotation does,
//! with its secret in moto: the functions read it as on AWS, the tests change it underneath them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use pg_outbox::aws::secrets::SecretCredentials;
use pg_outbox::config::ConfigError;
use pg_outbox::postgres::{ConnectionLimits, CredentialSource, DatabaseSettings, Db, TlsMode};

use crate::aws::{moto_endpoint, sdk_config_for};
use crate::cluster::PrivateCluster;
use crate::TestDb;

/// The rotating role.
pub const ROLE: &str = "app_rotating";

/// The secret of [`ROLE`] on a private cluster, in moto.
pub struct RotatingSecret {
    client: aws_sdk_secretsmanager::Client,
    /// Its ARN.
    pub arn: String,
    port: u16,
    dbname: String,
}

impl RotatingSecret {
    /// Creates [`ROLE`] with `password` on `db` and its secret.
    pub async fn create(cluster: &PrivateCluster, db: &TestDb, password: &str) -> Self {
        cluster.create_app_role(&db.name, ROLE, password).await;
        let sdk = sdk_config_for(&moto_endpoint()).await;
        let client = aws_sdk_secretsmanager::Client::new(&sdk);
        let mut secret = Self {
            client,
            arn: String::new(),
            port: cluster.port,
            dbname: db.name.clone(),
        };
        secret.arn = secret
            .client
            .create_secret()
            .name(format!("rotating-{}", uuid::Uuid::new_v4().simple()))
            .secret_string(secret.value(password))
            .send()
            .await
            .expect("create the secret in moto")
            .arn
            .expect("secret arn");
        secret
    }

    fn value(&self, password: &str) -> String {
        serde_json::json!({
            "engine": "postgres", "host": "127.0.0.1", "port": self.port,
            "username": ROLE, "password": password, "dbname": self.dbname,
        })
        .to_string()
    }

    /// A new version of the secret at `stage` (`AWSCURRENT` finishes a rotation, `AWSPENDING`
    /// alone is a rotation between `setSecret` and `finishSecret`).
    pub async fn put(&self, password: &str, stage: &str) {
        self.client
            .put_secret_value()
            .secret_id(&self.arn)
            .secret_string(self.value(password))
            .version_stages(stage)
            .send()
            .await
            .expect("put a secret version");
    }

    /// The source the functions use, wrapped to count how often it is read.
    pub async fn source(&self) -> Counted<SecretCredentials> {
        let sdk = sdk_config_for(&moto_endpoint()).await;
        Counted {
            inner: SecretCredentials::new(&sdk, &self.arn, TlsMode::Disable, None),
            reads: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A function's connection as `database_from_env` builds it from this secret, with the
    /// given bound between two reads of the secret.
    pub async fn db(&self, refresh_interval: Duration) -> (Db, Arc<AtomicUsize>) {
        let source = self.source().await;
        let reads = source.reads.clone();
        let settings = source
            .inner
            .current()
            .await
            .expect("read the secret at cold start");
        let db = Db::new(settings)
            .with_credentials(Arc::new(source))
            .with_limits(ConnectionLimits {
                refresh_interval,
                ..ConnectionLimits::default()
            });
        (db, reads)
    }
}

/// A credential source that counts how often it is read.
pub struct Counted<S> {
    /// The source.
    pub inner: S,
    /// Reads so far.
    pub reads: Arc<AtomicUsize>,
}

impl<S: CredentialSource> CredentialSource for Counted<S> {
    fn candidates(&self) -> BoxFuture<'_, Result<Vec<DatabaseSettings>, ConfigError>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.candidates()
    }
}

/// Rotates `ROLE`'s password the way single-user rotation does, then ends its sessions.
pub async fn rotate(
    cluster: &PrivateCluster,
    secret: &RotatingSecret,
    password: &str,
    stage: &str,
) {
    cluster.set_password(ROLE, password).await;
    secret.put(password, stage).await;
    let ended = cluster.terminate_sessions(ROLE).await;
    assert!(ended >= 1, "the function held no session to end");
}
