//! The outbox store and the bus in memory, for tests that exercise the dispatcher's rules
//! without PostgreSQL or a bus (as cqrs-es ships its `MemStore`). They keep the same rules as
//! the real ones where the dispatcher can tell (per-aggregate order, leases, fenced outcomes,
//! held rows, whole-call failures) and record what happened for assertions.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::{Duration, Instant};
//! use pg_outbox::dispatcher::{DispatcherConfig, OutboxDispatcher};
//! use pg_outbox::memory::{MemoryPublisher, MemoryStore};
//!
//! let store = MemoryStore::new();
//! store.append("acme", "order", "o-1", "order.placed", serde_json::json!({}));
//! let bus = MemoryPublisher::new();
//! let dispatcher = OutboxDispatcher::new(store.clone(), bus.clone(), DispatcherConfig::default(), "doc");
//! let summary = dispatcher.drain(Instant::now() + Duration::from_secs(5)).await.unwrap();
//! assert_eq!((summary.published, bus.delivered().len()), (1, 1));
//! # });
//! ```
//!
//! # Layout
//! - [`store`]: [`MemoryStore`], an [`OutboxStore`](crate::ports::OutboxStore).
//! - [`publisher`]: [`MemoryPublisher`], a [`Publisher`](crate::ports::Publisher).

pub mod publisher;
pub mod store;

pub use publisher::MemoryPublisher;
pub use store::{MemoryRow, MemoryStatus, MemoryStore, StoreCall};
