//! The most contended users, without a user label on any metric: a space-saving sketch
//! (Metwally et al.) of `CONTENDED_USERS_TRACKED` counters. Any user contended more than
//! 1/`CONTENDED_USERS_TRACKED` of the time is guaranteed to be in it; a count may be
//! overestimated by at most the `error` reported beside it. Read by the admin RPC
//! `ContendedUsers` and logged periodically by the server.

use std::sync::{LazyLock, Mutex};

/// Users tracked at once: memory and the cost of one update are bounded by it.
pub const CONTENDED_USERS_TRACKED: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contended {
    pub user: String,
    /// Times the user's lease was found busy (an upper bound).
    pub count: u64,
    /// How much of `count` may belong to users evicted before this one took their slot.
    pub error: u64,
}

/// A space-saving top-k of string keys.
#[derive(Debug, Default)]
pub struct SpaceSaving {
    capacity: usize,
    entries: Vec<Contended>,
}

impl SpaceSaving {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a sketch needs room for one key");
        Self {
            capacity,
            entries: Vec::with_capacity(capacity),
        }
    }

    pub fn record(&mut self, key: &str) {
        if let Some(entry) = self.entries.iter_mut().find(|entry| entry.user == key) {
            entry.count += 1;
            return;
        }
        if self.entries.len() < self.capacity {
            self.entries.push(Contended {
                user: key.to_owned(),
                count: 1,
                error: 0,
            });
            return;
        }
        // Replace the smallest counter; the newcomer inherits its count as possible error.
        let smallest = self
            .entries
            .iter_mut()
            .min_by_key(|entry| entry.count)
            .expect("a full sketch has entries");
        *smallest = Contended {
            user: key.to_owned(),
            count: smallest.count + 1,
            error: smallest.count,
        };
    }

    /// The `limit` largest counts, largest first.
    pub fn top(&self, limit: usize) -> Vec<Contended> {
        let mut entries = self.entries.clone();
        entries.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.user.cmp(&b.user)));
        entries.truncate(limit);
        entries
    }
}

static CONTENTION: LazyLock<Mutex<SpaceSaving>> =
    LazyLock::new(|| Mutex::new(SpaceSaving::new(CONTENDED_USERS_TRACKED)));

pub(super) fn record(user: &str) {
    CONTENTION.lock().expect("contention sketch poisoned").record(user);
}

/// The most contended users of this process so far, largest first.
pub fn top(limit: usize) -> Vec<Contended> {
    CONTENTION.lock().expect("contention sketch poisoned").top(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heavy hitter stays on top however many light users pass through the sketch.
    #[test]
    fn a_heavy_hitter_survives_many_light_users() {
        let mut sketch = SpaceSaving::new(4);
        for round in 0..1000 {
            sketch.record("hot");
            sketch.record(&format!("cold-{round}"));
        }
        let top = sketch.top(1);
        assert_eq!(top[0].user, "hot");
        assert!(top[0].count >= 1000 && top[0].count - top[0].error <= 1000);
        assert_eq!(sketch.top(10).len(), 4, "bounded");
    }
}
