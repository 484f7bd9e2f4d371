//! Fixtures for the step files' unit tests: a coordinator on an in-memory embedded engine with
//! a controlled clock and the default catalog.

use std::sync::Arc;
use std::time::Duration;

use super::{CoordinatorConfig, TransactionCoordinator};
use crate::core::time::ManualClock;
use crate::core::{Quantity, Usd, UserId};
use crate::storage::Storage;
use crate::storage::embedded::EmbeddedEngine;

/// A lease long enough for any step under test.
pub const LEASE: Duration = Duration::from_secs(10);

/// A coordinator whose clock starts at `clock`, waiting at most 30 ms for a busy lease.
pub async fn coordinator(clock: &ManualClock) -> TransactionCoordinator {
    let storage = Storage::new(Arc::new(EmbeddedEngine::in_memory().unwrap()), "lockstep");
    storage.ensure_table().await.unwrap();
    let config = CoordinatorConfig {
        lease_wait_max: Duration::from_millis(30),
        ..CoordinatorConfig::default()
    };
    let coordinator = TransactionCoordinator::new(storage, Arc::new(clock.clone()), config);
    let catalog = crate::server::parse_catalog(crate::server::DEFAULT_CATALOG).unwrap();
    coordinator.seed_catalog(&catalog).await.unwrap();
    coordinator
}

pub fn user(raw: &str) -> UserId {
    UserId::parse("user_id", raw).unwrap()
}

pub fn usd(raw: &str) -> Usd {
    Usd::parse_amount("amount", raw).unwrap()
}

pub fn quantity(raw: &str) -> Quantity {
    Quantity::parse_trade("quantity", raw).unwrap()
}
