//! Settings: where events go and how a drain paces itself, read once at cold start.

use std::time::Duration;

use crate::config::{optional_env, ranged_env, required_env, ConfigError};

/// Where events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An SNS topic (standard or FIFO).
    Sns {
        /// Topic ARN.
        topic_arn: String,
    },
    /// An EventBridge bus.
    EventBridge {
        /// Bus name or ARN.
        bus_name: String,
    },
    /// NATS JetStream subjects (see [`crate::nats`]).
    Nats(crate::nats::NatsSettings),
}

/// Dispatcher settings, read once at cold start.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatcherConfig {
    /// Rows per claim (`DISPATCH_BATCH_SIZE`, 1..=5000, default 500).
    pub batch_size: i64,
    /// Publish calls in flight at once (`DISPATCH_MAX_IN_FLIGHT`, 1..=128, default 50): with 10
    /// entries per call, 50 calls cover a 500-row claim in one round trip to the bus.
    pub max_in_flight: usize,
    /// How long a claim is leased (`DISPATCH_LEASE_SECONDS`, 5..=900, default 60). Longer than
    /// the SDK's whole-operation timeout, so a live dispatcher never loses its lease mid-publish.
    pub lease: Duration,
    /// Attempts before a row is dead (`DISPATCH_MAX_ATTEMPTS`, 1..=100, default 10).
    pub max_attempts: i32,
    /// First retry delay cap (`DISPATCH_BACKOFF_BASE_MS`, default 1000).
    pub backoff_base: Duration,
    /// Largest retry delay (`DISPATCH_BACKOFF_CAP_MS`, default 300000).
    pub backoff_cap: Duration,
    /// Stop claiming when less than this is left before the deadline
    /// (`DISPATCH_SAFETY_MARGIN_MS`, default 10000), and never more than half the time a drain
    /// has: a drain given 4 s claims for 2 s.
    pub safety_margin: Duration,
    /// When a claim finds nothing due: `None` returns, `Some(pause)` polls again after `pause`
    /// until the deadline (`DISPATCH_IDLE_POLL_MS`, 0 = return, default 0; the template sets
    /// 100 so an invocation keeps publishing new rows within 100 ms for its whole run).
    pub idle_poll: Option<Duration>,
    /// While a batch is on the bus, claim the due events of the tenants not being drained in
    /// bulk this often, and publish them at once: the drain's lane, so one tenant's backlog
    /// does not hold back another's events (`DISPATCH_LANE_POLL_MS`, 0 = no lane,
    /// default 20; the lane module of the dispatcher says how).
    pub lane_poll: Option<Duration>,
    /// Published rows older than this are deleted between claims (`OUTBOX_RETENTION_HOURS`,
    /// 0 = keep them, default 168 = 7 days).
    pub retention: Option<Duration>,
    /// Rows deleted per cleanup statement (`OUTBOX_CLEANUP_BATCH`, 100..=50000, default 5000):
    /// one short transaction each, so cleanup never holds locks for long.
    pub cleanup_batch: i32,
}

/// Rows per claim of the drain's lane (at most the batch size): 5 publish calls of 10.
pub const LANE_BATCH: i64 = 50;
/// The lane polls for this long after a claim last held more than one tenant or the lane last
/// took rows: a drain of one tenant alone makes no lane claims.
pub const LANE_AWAKE: Duration = Duration::from_secs(1);
/// How long a heartbeat holds: commands do not wake the dispatcher while it does.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
/// How often a polling drain renews its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Pause between cleanup statements while expired rows remain: at most one 5000-row delete a
/// second beside the claims, so a large backlog of expired rows never crowds out publishing.
pub const CLEANUP_BUSY_PAUSE: Duration = Duration::from_secs(1);
/// Pause after a cleanup statement found less than a full batch (or failed).
pub const CLEANUP_IDLE_PAUSE: Duration = Duration::from_secs(60);

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_in_flight: 50,
            lease: Duration::from_secs(60),
            max_attempts: 10,
            backoff_base: Duration::from_millis(1_000),
            backoff_cap: Duration::from_millis(300_000),
            safety_margin: Duration::from_millis(10_000),
            idle_poll: None,
            lane_poll: Some(Duration::from_millis(20)),
            retention: Some(Duration::from_secs(168 * 3600)),
            cleanup_batch: 5_000,
        }
    }
}

impl DispatcherConfig {
    /// When a failed publish is tried again, and when it is given up.
    pub fn retry_policy(&self) -> super::outcome::RetryPolicy {
        super::outcome::RetryPolicy {
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_cap: self.backoff_cap,
        }
    }

    /// Reads and validates the settings, falling back to the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = Self::default();
        let ms = |d: Duration| d.as_millis() as u64;
        let config = Self {
            batch_size: ranged_env("DISPATCH_BATCH_SIZE", d.batch_size, 1, 5_000)?,
            max_in_flight: ranged_env("DISPATCH_MAX_IN_FLIGHT", d.max_in_flight, 1, 128)?,
            lease: Duration::from_secs(ranged_env(
                "DISPATCH_LEASE_SECONDS",
                d.lease.as_secs(),
                5,
                900,
            )?),
            max_attempts: ranged_env("DISPATCH_MAX_ATTEMPTS", d.max_attempts, 1, 100)?,
            backoff_base: Duration::from_millis(ranged_env(
                "DISPATCH_BACKOFF_BASE_MS",
                ms(d.backoff_base),
                1,
                3_600_000,
            )?),
            backoff_cap: Duration::from_millis(ranged_env(
                "DISPATCH_BACKOFF_CAP_MS",
                ms(d.backoff_cap),
                1,
                86_400_000,
            )?),
            safety_margin: Duration::from_millis(ranged_env(
                "DISPATCH_SAFETY_MARGIN_MS",
                ms(d.safety_margin),
                0,
                600_000,
            )?),
            idle_poll: match ranged_env("DISPATCH_IDLE_POLL_MS", 0u64, 0, 60_000)? {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            lane_poll: match ranged_env("DISPATCH_LANE_POLL_MS", 20u64, 0, 60_000)? {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            retention: match ranged_env("OUTBOX_RETENTION_HOURS", 168u64, 0, 100_000)? {
                0 => None,
                hours => Some(Duration::from_secs(hours * 3600)),
            },
            cleanup_batch: ranged_env("OUTBOX_CLEANUP_BATCH", d.cleanup_batch, 100, 50_000)?,
        };
        if config.backoff_cap < config.backoff_base {
            return Err(ConfigError::Invalid {
                name: "DISPATCH_BACKOFF_CAP_MS",
                reason: "must not be smaller than DISPATCH_BACKOFF_BASE_MS".into(),
            });
        }
        Ok(config)
    }
}

impl Target {
    /// Reads `OUTBOX_TARGET` (`sns`, `eventbridge` or `nats`) and `SNS_TOPIC_ARN`,
    /// `EVENT_BUS_NAME` or the `NATS_*` settings.
    pub fn from_env() -> Result<Self, ConfigError> {
        match required_env("OUTBOX_TARGET")?.as_str() {
            "sns" => Ok(Self::Sns {
                topic_arn: required_env("SNS_TOPIC_ARN")?,
            }),
            "eventbridge" => Ok(Self::EventBridge {
                bus_name: optional_env("EVENT_BUS_NAME").unwrap_or_else(|| "default".into()),
            }),
            "nats" => Ok(Self::Nats(crate::nats::NatsSettings::from_env()?)),
            other => Err(ConfigError::Invalid {
                name: "OUTBOX_TARGET",
                reason: format!("{other:?} is not one of sns, eventbridge, nats"),
            }),
        }
    }
}
