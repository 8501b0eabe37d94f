//! What an operator sees when a function fails: a stable `errorType` per class of cause (the
//! Lambda console, X-Ray and the `/runtime/.../error` report all show it), a message that names
//! the class and the setting to check but never a secret, and one CloudWatch metric per class so
//! an alarm can tell a wrong secret from an outage. `docs/operations.md` maps each class to what
//! to do.

use std::fmt;

use serde::Serialize;

use crate::config::ConfigError;
use crate::ports::{ConnectFailure, StoreError};

/// The class of a function failure; its name is the invocation's `errorType` and the metric's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FailureClass {
    /// The database refused the credentials, also after re-reading the secret.
    DatabaseAuthenticationFailed,
    /// The database could not be reached, restarted, or stopped answering within the bound.
    DatabaseUnavailable,
    /// A statement failed (schema not migrated, a constraint, a serialization failure).
    DatabaseStatementFailed,
    /// A stored row holds a value the code does not understand.
    StoredDataInvalid,
    /// Every publish call of the invocation failed: the bus (or the route to it) is down.
    BusUnavailable,
    /// A setting is missing or invalid, or the secret could not be read at start-up.
    InvalidConfiguration,
}

impl FailureClass {
    /// Every class, for tables and tests.
    pub const ALL: [FailureClass; 6] = [
        FailureClass::DatabaseAuthenticationFailed,
        FailureClass::DatabaseUnavailable,
        FailureClass::DatabaseStatementFailed,
        FailureClass::StoredDataInvalid,
        FailureClass::BusUnavailable,
        FailureClass::InvalidConfiguration,
    ];

    /// The stable name: `errorType` and metric name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DatabaseAuthenticationFailed => "DatabaseAuthenticationFailed",
            Self::DatabaseUnavailable => "DatabaseUnavailable",
            Self::DatabaseStatementFailed => "DatabaseStatementFailed",
            Self::StoredDataInvalid => "StoredDataInvalid",
            Self::BusUnavailable => "BusUnavailable",
            Self::InvalidConfiguration => "InvalidConfiguration",
        }
    }

    /// What to check, first words of the message.
    pub fn hint(self) -> &'static str {
        match self {
            Self::DatabaseAuthenticationFailed => {
                "database authentication failed: check the secret named by DATABASE_SECRET_ARN \
                 (or DATABASE_URL) against the database user, and the secret's rotation"
            }
            Self::DatabaseUnavailable => {
                "database unavailable: check the database or proxy, the security groups and the \
                 host in the secret (or DATABASE_URL); bounded by DATABASE_OPERATION_TIMEOUT_MS"
            }
            Self::DatabaseStatementFailed => {
                "database statement failed: check that the schema is migrated (outboxctl migrate) \
                 and the function's logs"
            }
            Self::StoredDataInvalid => "stored data is invalid: see the function's logs",
            Self::BusUnavailable => {
                "every publish call failed: check the topic or bus (SNS_TOPIC_ARN, EVENT_BUS_NAME), \
                 the function's permissions and its route to the AWS APIs"
            }
            Self::InvalidConfiguration => "invalid configuration: fix the setting named here",
        }
    }

    /// The class of a store failure.
    pub fn of_store(error: &StoreError) -> Self {
        match error {
            StoreError::Connect { failure, .. } => match failure {
                ConnectFailure::Authentication => Self::DatabaseAuthenticationFailed,
                ConnectFailure::Configuration => Self::InvalidConfiguration,
                ConnectFailure::Unreachable => Self::DatabaseUnavailable,
            },
            StoreError::Unavailable(_) | StoreError::Timeout(_) | StoreError::Conflict(_) => {
                Self::DatabaseUnavailable
            }
            StoreError::Statement(_) => Self::DatabaseStatementFailed,
            StoreError::Corrupt(_) => Self::StoredDataInvalid,
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A function's failure as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionError {
    /// The class (`errorType`).
    pub class: FailureClass,
    /// The class's hint and the cause chain (never a secret: errors here carry none).
    pub message: String,
}

impl FunctionError {
    /// A failure of `class` caused by `cause`.
    pub fn new(class: FailureClass, cause: &dyn std::error::Error) -> Self {
        Self {
            class,
            message: format!("{}: {}", class.hint(), crate::telemetry::error_chain(cause)),
        }
    }

    /// A failure of `class` described by `detail`.
    pub fn with_detail(class: FailureClass, detail: impl fmt::Display) -> Self {
        Self {
            class,
            message: format!("{}: {detail}", class.hint()),
        }
    }

    /// A store failure, classified.
    pub fn from_store(error: &StoreError) -> Self {
        Self::new(FailureClass::of_store(error), error)
    }

    /// A configuration failure.
    pub fn from_config(error: &ConfigError) -> Self {
        Self::new(FailureClass::InvalidConfiguration, error)
    }

    /// Logs it with its class and writes the class's metric (EMF), once per failure.
    pub fn record(&self, service: &str) {
        tracing::error!(error_type = self.class.as_str(), error = %self.message, "function failed");
        let mut doc = crate::metrics::MetricsDocument::from_env(service);
        doc.count(self.class.as_str(), 1);
        doc.emit();
    }
}

impl fmt::Display for FunctionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FunctionError {}

impl From<FunctionError> for lambda_runtime::Diagnostic {
    fn from(error: FunctionError) -> Self {
        lambda_runtime::Diagnostic {
            error_type: error.class.as_str().to_owned(),
            error_message: error.message,
        }
    }
}

/// Fails a function's initialisation: records the failure (log and metric), reports it to the
/// runtime API's `/runtime/init/error` with its class as `errorType` (the Lambda console shows
/// it instead of `Runtime.ExitError`), and returns the error for `main` to exit with.
pub async fn init_failed(service: &str, error: FunctionError) -> lambda_runtime::Error {
    error.record(service);
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        report_init_error(&error).await;
    }
    error.message.into()
}

/// The value, or the init failure a configuration error makes (see [`init_failed`]).
pub async fn or_init_failed<T>(
    service: &str,
    result: Result<T, ConfigError>,
) -> Result<T, lambda_runtime::Error> {
    match result {
        Ok(value) => Ok(value),
        Err(e) => Err(init_failed(service, FunctionError::from_config(&e)).await),
    }
}

async fn report_init_error(error: &FunctionError) {
    let diagnostic = lambda_runtime::Diagnostic::from(error.clone());
    let Ok(body) = serde_json::to_vec(&diagnostic) else {
        return;
    };
    let request = lambda_runtime_api_client::build_request()
        .method("POST")
        .uri("/2018-06-01/runtime/init/error")
        .header("lambda-runtime-function-error-type", error.class.as_str())
        .body(lambda_runtime_api_client::body::Body::from(body));
    let (Ok(client), Ok(request)) = (
        lambda_runtime_api_client::Client::builder().build(),
        request,
    ) else {
        return;
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), client.call(request)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "init error not reported to the runtime API"),
        Err(_) => tracing::warn!("init error not reported to the runtime API: no answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_a_distinct_name_and_a_hint_naming_what_to_check() {
        let names: std::collections::BTreeSet<&str> =
            FailureClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), FailureClass::ALL.len());
        for class in FailureClass::ALL {
            assert!(class.hint().contains(':'), "{class}");
            assert_eq!(format!("{class}"), class.as_str());
        }
    }

    #[test]
    fn store_failures_map_to_the_class_an_operator_acts_on() {
        assert_eq!(
            FailureClass::of_store(&StoreError::Timeout(std::time::Duration::from_secs(5))),
            FailureClass::DatabaseUnavailable
        );
        assert_eq!(
            FailureClass::of_store(&StoreError::Corrupt("x".into())),
            FailureClass::StoredDataInvalid
        );
        let config = ConfigError::Missing {
            name: "OUTBOX_TARGET",
        };
        let error = FunctionError::from_config(&config);
        assert_eq!(error.class, FailureClass::InvalidConfiguration);
        assert!(error.message.contains("OUTBOX_TARGET"), "{}", error.message);
        let diagnostic = lambda_runtime::Diagnostic::from(error);
        assert_eq!(diagnostic.error_type, "InvalidConfiguration");
    }
}
