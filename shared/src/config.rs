//! Configuration read once at cold start: a missing or invalid variable fails initialisation with
//! a message naming it, instead of failing the first request.

use std::fmt;

/// A configuration problem found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required environment variable is not set (or is empty).
    #[error("environment variable {name} is required but not set")]
    Missing {
        /// The variable's name.
        name: &'static str,
    },
    /// An environment variable is set to a value that cannot be used.
    #[error("environment variable {name} is invalid: {reason}")]
    Invalid {
        /// The variable's name.
        name: &'static str,
        /// Why the value was refused (never the value itself: it may be a secret).
        reason: String,
    },
}

/// Turns a start-up configuration error into the function's init error: logged, and reported
/// with its message (not its debug form) so the Lambda console shows what to fix.
pub fn init_error(e: ConfigError) -> Box<dyn std::error::Error + Send + Sync> {
    tracing::error!(error = %e, "invalid configuration");
    e.to_string().into()
}

/// Reads a required variable; empty counts as missing.
pub fn required_env(name: &'static str) -> Result<String, ConfigError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ConfigError::Missing { name }),
    }
}

/// Reads an optional variable; empty counts as unset.
pub fn optional_env(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Reads an optional variable and parses it, naming the variable when it does not parse.
pub fn parsed_env<T>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    match optional_env(name) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|e: T::Err| ConfigError::Invalid {
                name,
                reason: e.to_string(),
            }),
    }
}

/// Reads an optional number, falling back to `default`, and refuses it outside `min..=max`.
pub fn ranged_env<T>(name: &'static str, default: T, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display,
    T::Err: fmt::Display,
{
    check_range(name, parsed_env(name, default)?, min, max)
}

fn check_range<T: PartialOrd + fmt::Display>(
    name: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::Invalid {
            name,
            reason: format!("{value} is outside {min}..={max}"),
        });
    }
    Ok(value)
}

/// A value that must never be printed: `Debug` and `Display` show a placeholder.
#[derive(Clone)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself: call only where it is used, never to log it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_outside_their_range_are_refused_naming_the_variable() {
        assert_eq!(check_range("N", 5, 1, 10).unwrap(), 5);
        let err = check_range("DISPATCH_BATCH_SIZE", 0, 1, 5_000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable DISPATCH_BATCH_SIZE is invalid: 0 is outside 1..=5000"
        );
        assert!(check_range("N", 11, 1, 10).is_err());
    }

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("postgres://app:hunter2@db/x".to_string());
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
