//! Accounts as this coordinator last left them. After a commit that gave the lease back, the
//! coordinator knows the account item exactly: its state, its version, and no lease on it. The
//! next batch for that user then skips the acquire and commits at once, its account update
//! conditioned on the item still being at that version with no lease on it (one request
//! instead of two). Any other writer moves the version or holds a lease (a coordinator sharing
//! the table, the sweeper, an admin release), so the condition refuses, nothing applies, and
//! the batch falls back to the lease (`commit::recover_known`). A user where that happened is
//! marked contended for a while and takes the lease path meanwhile, so coordinators sharing a
//! hot user do not waste a transaction per batch.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::core::{Account, UserId};

/// Accounts remembered at most; past it one is forgotten for each new one (memory stays
/// bounded by the users active on this coordinator, a few hundred bytes each).
pub const KNOWN_ACCOUNTS_MAX: usize = 16_384;
/// How long a user whose known state turned out stale takes the lease path.
pub const CONTENDED_FOR: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
enum Entry {
    Known(Account),
    Contended { until: Instant },
}

#[derive(Debug)]
pub(super) struct KnownAccounts {
    enabled: bool,
    entries: Mutex<HashMap<UserId, Entry>>,
}

impl KnownAccounts {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The account as this coordinator last wrote it, unless forgotten or contended.
    pub fn get(&self, user: &UserId) -> Option<Account> {
        let entries = self.entries.lock().expect("known accounts poisoned");
        match entries.get(user)? {
            Entry::Known(account) => Some(account.clone()),
            Entry::Contended { .. } => None,
        }
    }

    /// Remembers `account` as stored right now, with no lease on it; a user still contended
    /// stays so until its time is up.
    pub fn remember(&self, user: &UserId, account: Account) {
        if !self.enabled || !account.exists() {
            return;
        }
        let mut entries = self.entries.lock().expect("known accounts poisoned");
        if let Some(Entry::Contended { until }) = entries.get(user)
            && *until > Instant::now()
        {
            return;
        }
        if entries.len() >= KNOWN_ACCOUNTS_MAX && !entries.contains_key(user) {
            let forget = entries.keys().next().cloned();
            if let Some(forget) = forget {
                entries.remove(&forget);
            }
        }
        entries.insert(user.clone(), Entry::Known(account));
    }

    /// Forgets what is known of `user` (its state may have changed by another way).
    pub fn forget(&self, user: &UserId) {
        let mut entries = self.entries.lock().expect("known accounts poisoned");
        if matches!(entries.get(user), Some(Entry::Known(_))) {
            entries.remove(user);
        }
    }

    /// Another writer got to `user` first: the lease path for `CONTENDED_FOR`.
    pub fn contended(&self, user: &UserId) {
        if !self.enabled {
            return;
        }
        let mut entries = self.entries.lock().expect("known accounts poisoned");
        entries.insert(
            user.clone(),
            Entry::Contended {
                until: Instant::now() + CONTENDED_FOR,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::AccountState;

    fn account(version: u64) -> Account {
        Account {
            state: AccountState::Open,
            version,
            ..Account::default()
        }
    }

    #[test]
    fn remembers_forgets_and_stays_bounded() {
        let known = KnownAccounts::new(true);
        let user = |index: usize| UserId::parse("user_id", &format!("u{index}")).unwrap();
        known.remember(&user(0), account(3));
        assert_eq!(known.get(&user(0)).unwrap().version, 3);
        known.forget(&user(0));
        assert!(known.get(&user(0)).is_none());
        for index in 0..KNOWN_ACCOUNTS_MAX + 10 {
            known.remember(&user(index), account(1));
        }
        assert_eq!(known.entries.lock().unwrap().len(), KNOWN_ACCOUNTS_MAX);
    }

    #[test]
    fn a_contended_user_is_not_remembered_until_its_time_is_up() {
        let known = KnownAccounts::new(true);
        let user = UserId::parse("user_id", "hot").unwrap();
        known.contended(&user);
        known.remember(&user, account(1));
        assert!(known.get(&user).is_none());
    }

    #[test]
    fn nothing_is_remembered_when_disabled_or_without_an_account() {
        let known = KnownAccounts::new(false);
        let user = UserId::parse("user_id", "a").unwrap();
        known.remember(&user, account(1));
        assert!(known.get(&user).is_none());
        let known = KnownAccounts::new(true);
        known.remember(&user, Account::default());
        assert!(known.get(&user).is_none());
    }
}
