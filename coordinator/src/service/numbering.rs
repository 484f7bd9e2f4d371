//! Numbering the ledger entries written before sequences: the upgrade that needs no stop.
//!
//! Every entry Lockstep writes now carries its account's next sequence (1, 2, 3 …, no gaps) and
//! is keyed by it. Entries written by a version before sequences (or by such a coordinator
//! during a rolling upgrade) are keyed by their id and carry the account's version as their
//! `sequence`: ordered, but with gaps. An account item says which it may hold: a coordinator
//! that numbers stamps `entries_at` with the version it writes, so an item whose version is
//! not its `entries_at` was last written by one that does not number.
//!
//! Such an account is numbered under its lease before anything else commits on it: its
//! unsequenced entries not yet numbered are read in the order they were written and given the
//! places after the account's `entries`, `NUMBERED_PER_TRANSACTION` per transaction, each
//! fenced on the lease and the version and moving `entries` with the places it gives. A
//! numbering cut short (the lease lost, storage gone) leaves every step whole, and the next
//! holder goes on where it stopped. Readers that need the places (ListLedger after a sequence,
//! WatchLedger) number an account the same way, taking and releasing its lease.

use std::sync::Arc;

use crate::core::UserId;
use crate::core::ops::LeaseKind;
use crate::storage::model::{self, NUMBERED_PER_TRANSACTION, UnsequencedEntry};
use crate::storage::{Key, StorageError};

use super::{HeldLease, ServiceError, TransactionCoordinator};

/// The operation name a reader's numbering takes the lease under (seen by `inspect`).
pub const NUMBERING: &str = "NUMBER_LEDGER";

impl TransactionCoordinator {
    /// Numbers `held`'s unsequenced entries if the account says some may lack their place;
    /// afterwards `held.account.entries` is the account's last sequence. Nothing is written
    /// when every entry already has its place.
    pub(super) async fn number_entries(&self, held: &mut HeldLease) -> Result<(), ServiceError> {
        if !held.account.needs_numbering {
            return Ok(());
        }
        let Some(lock_id) = held.lock_id.clone() else {
            return Err(ServiceError::Internal(
                "an account to number was held without a lease".to_owned(),
            ));
        };
        let mut unnumbered = Vec::new();
        for item in self.unsequenced_items(&held.user).await? {
            let entry = model::unsequenced_entry_from_item(&item)?;
            if !entry.numbered {
                unnumbered.push(entry);
            }
        }
        // The order they were written in: the account's version then (0 for the oldest, which
        // carry none), then the id (UUID v7, by creation time).
        unnumbered
            .sort_by(|a: &UnsequencedEntry, b| (a.written_sequence, &a.key.sk).cmp(&(b.written_sequence, &b.key.sk)));
        let mut entries = held.account.entries;
        for chunk in unnumbered.chunks(NUMBERED_PER_TRANSACTION) {
            let places: Vec<(Key, u64, u64)> = chunk
                .iter()
                .enumerate()
                .map(|(index, entry)| (entry.key.clone(), entry.written_sequence, entries + 1 + index as u64))
                .collect();
            let next = entries + chunk.len() as u64;
            let now = self.clock.now();
            // Each step keeps the lease for a whole lease more: a long history is numbered in
            // as many steps as it needs, none of them refused by an expiry the scan used up.
            let until = held
                .expires_at
                .max(now + self.config.lease(LeaseKind::Deposit).as_millis() as u64);
            let items = model::number_entries(&held.user, &lock_id, held.account.version, &places, next, until, now);
            match self.storage.transact(&items, None).await {
                Ok(()) => {
                    entries = next;
                    held.expires_at = until;
                }
                Err(StorageError::TransactionCanceled { .. }) => {
                    return Err(ServiceError::Unavailable(format!(
                        "numbering {}'s ledger entries: the lease was lost or another coordinator numbered them; try again",
                        held.user
                    )));
                }
                Err(error) => return Err(error.into()),
            }
        }
        if !unnumbered.is_empty() {
            tracing::info!(user = %held.user, numbered = unnumbered.len(), entries, "numbered the ledger entries written before sequences");
            crate::telemetry::metrics::entries_numbered(unnumbered.len());
            held.account.legacy_through = entries;
        }
        held.account.entries = entries;
        held.account.needs_numbering = false;
        Ok(())
    }

    /// `user`'s account with every entry numbered: as stored when it is, else numbered under
    /// its lease first (taken and given back here). For readers that need the places.
    pub(super) async fn numbered_account(
        self: &Arc<Self>,
        user: &UserId,
    ) -> Result<crate::core::Account, ServiceError> {
        let mut account = self.account(user).await?;
        if !account.needs_numbering {
            return Ok(account);
        }
        // Last written by a release that did not stamp `entries_at` (the sweeper's, say), on an
        // account that never had an entry keyed by id: `entries` counts them all already.
        if !self.may_hold_unsequenced(user).await? {
            account.needs_numbering = false;
            return Ok(account);
        }
        let lease = self.config.lease(LeaseKind::Deposit);
        // In a task of its own: a reader that goes away (its deadline, a cancel) must not leave
        // the lease it took behind, blocking the account's writers until it expires.
        let (this, user) = (Arc::clone(self), user.clone());
        let numbered = self.mutations.spawn(async move {
            // `acquire` numbers the account before it returns.
            let held = this.acquire(&user, NUMBERING, lease, true, None).await?;
            let account = held.account.clone();
            this.release(&held).await;
            Ok::<_, ServiceError>(account)
        });
        numbered
            .await
            .map_err(|error| ServiceError::Internal(format!("numbering stopped: {error}")))?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::Clock;
    use crate::core::Principal;
    use crate::core::time::ManualClock;
    use crate::service::testing::{coordinator, usd, user};
    use crate::storage::{Delete, Item, Put, Value};

    /// Every ledger item of `who`, as stored.
    async fn ledger_items(coordinator: &TransactionCoordinator, who: &str) -> Vec<Item> {
        let query = model::user_page_query(&user(who), model::UserCollection::Ledger, 1000, None).unwrap();
        coordinator.storage().query(query).await.unwrap().items
    }

    /// Moves one sequenced entry back to its id key, written with `written` as its sequence
    /// (None: no sequence at all), as a coordinator before sequences would have left it.
    async fn move_to_id_key(coordinator: &TransactionCoordinator, who: &str, item: &Item, written: Option<u64>) {
        let storage = coordinator.storage();
        let entry = model::ledger_from_item(item).unwrap();
        let mut old = item.clone();
        let key = model::ledger_key(&user(who), entry.entry_id.as_str());
        old.insert("sk".to_owned(), Value::S(key.sk));
        match written {
            Some(written) => old.insert("sequence".to_owned(), Value::N(written.to_string())),
            None => old.remove("sequence"),
        };
        let put = Put {
            item: old,
            condition: None,
            bindings: Default::default(),
        };
        storage.put(put).await.unwrap();
        let delete = Delete {
            key: model::entry_key(&user(who), entry.sequence),
            condition: None,
            bindings: Default::default(),
        };
        storage.delete(delete).await.unwrap();
    }

    /// Rewrites `who`'s account as a coordinator before sequences last left it: `entries` set
    /// to `entries` (None: absent), no `entries_at`, the version moved.
    async fn account_written_before_sequences(coordinator: &TransactionCoordinator, who: &str, entries: Option<u64>) {
        let storage = coordinator.storage();
        let mut account = storage.get(model::account_key(&user(who))).await.unwrap().unwrap();
        match entries {
            Some(entries) => account.insert("entries".to_owned(), Value::N(entries.to_string())),
            None => account.remove("entries"),
        };
        account.remove("entries_at");
        bump_version(&mut account);
        let put = Put {
            item: account,
            condition: None,
            bindings: Default::default(),
        };
        storage.put(put).await.unwrap();
    }

    /// Turns `who`'s data into what a coordinator before sequences left: each entry keyed by
    /// its id and carrying a version-like sequence (with gaps; the oldest none at all), the
    /// account without `entries`.
    async fn as_written_before_sequences(coordinator: &TransactionCoordinator, who: &str) {
        for item in ledger_items(coordinator, who).await {
            let sequence = model::ledger_from_item(&item).unwrap().sequence;
            let written = (sequence > 1).then_some(sequence * 3);
            move_to_id_key(coordinator, who, &item, written).await;
        }
        account_written_before_sequences(coordinator, who, None).await;
    }

    /// Every writer moves the version; so did the old coordinator.
    fn bump_version(account: &mut Item) {
        let Some(Value::N(version)) = account.get("version") else {
            panic!("no version")
        };
        let next = version.parse::<u64>().unwrap() + 1;
        account.insert("version".to_owned(), Value::N(next.to_string()));
    }

    async fn deposit(coordinator: &Arc<TransactionCoordinator>, who: &str, amount: &str) -> u64 {
        let receipt = coordinator
            .deposit(&Principal::local(), &user(who), usd(amount), None, None)
            .await
            .unwrap();
        receipt.entry.sequence
    }

    fn sequences(entries: &[crate::core::records::LedgerEntry]) -> Vec<u64> {
        entries.iter().map(|entry| entry.sequence).collect()
    }

    /// Entries written before sequences get places 1..n in the order they were written, at
    /// the account's next write; the new entry follows; reads after a cursor merge both kinds
    /// of key without a gap, and the audit finds the books whole.
    #[tokio::test]
    async fn entries_written_before_sequences_are_numbered_at_the_next_write() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        for amount in ["1", "2", "3"] {
            deposit(&coordinator, "old", amount).await;
        }
        as_written_before_sequences(&coordinator, "old").await;
        let account = coordinator.account(&user("old")).await.unwrap();
        assert!(account.needs_numbering);

        assert_eq!(deposit(&coordinator, "old", "4").await, 4);
        let account = coordinator.account(&user("old")).await.unwrap();
        assert_eq!((account.entries, account.needs_numbering), (4, false));
        let all = coordinator.ledger_after(&user("old"), 0, 100).await.unwrap();
        assert_eq!(sequences(&all), vec![1, 2, 3, 4]);
        let cash: Vec<String> = all.iter().map(|entry| entry.cash_after.to_string()).collect();
        assert_eq!(cash, ["1.00", "3.00", "6.00", "10.00"], "in the order written");
        assert_eq!(
            sequences(&coordinator.ledger_after(&user("old"), 2, 100).await.unwrap()),
            vec![3, 4]
        );
        assert_eq!(
            sequences(&coordinator.ledger_after(&user("old"), 1, 2).await.unwrap()),
            vec![2, 3]
        );
        let report = crate::audit::audit(coordinator.storage(), clock.now(), crate::audit::LEASE_MARGIN_DEFAULT)
            .await
            .unwrap();
        assert!(report.is_clean(), "{report}");

        // A coordinator before sequences writes once more (a rolling upgrade): its entry gets
        // the next place at the next write, between the sequenced ones.
        deposit(&coordinator, "old", "5").await;
        let fifth = ledger_items(&coordinator, "old")
            .await
            .into_iter()
            .find(|item| model::ledger_from_item(item).unwrap().sequence == 5)
            .unwrap();
        as_written_before_sequences_one(&coordinator, "old", fifth).await;
        assert_eq!(deposit(&coordinator, "old", "6").await, 6);
        let all = coordinator.ledger_after(&user("old"), 0, 100).await.unwrap();
        assert_eq!(sequences(&all), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(
            sequences(&coordinator.ledger_after(&user("old"), 4, 1).await.unwrap()),
            vec![5]
        );
        let report = crate::audit::audit(coordinator.storage(), clock.now(), crate::audit::LEASE_MARGIN_DEFAULT)
            .await
            .unwrap();
        assert!(report.is_clean(), "{report}");
    }

    /// One entry moved back to its id key with a version-like sequence, the account's
    /// `entries_at` stale: what one write by an old coordinator leaves.
    async fn as_written_before_sequences_one(coordinator: &TransactionCoordinator, who: &str, item: Item) {
        let sequence = model::ledger_from_item(&item).unwrap().sequence;
        move_to_id_key(coordinator, who, &item, Some(1000)).await;
        account_written_before_sequences(coordinator, who, Some(sequence - 1)).await;
    }

    /// More entries than one transaction numbers: several steps, the places still in order.
    #[tokio::test]
    async fn a_long_history_is_numbered_in_several_transactions() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        let count = NUMBERED_PER_TRANSACTION as u64 + 21;
        for _ in 0..count {
            deposit(&coordinator, "long", "1").await;
        }
        as_written_before_sequences(&coordinator, "long").await;
        // A reader numbers it (taking and giving back the lease).
        let page = coordinator.ledger_after(&user("long"), count - 2, 100).await.unwrap();
        assert_eq!(sequences(&page), vec![count - 1, count]);
        let account = coordinator.account(&user("long")).await.unwrap();
        assert_eq!((account.entries, account.needs_numbering), (count, false));
        let all = coordinator.ledger_after(&user("long"), 0, 100).await.unwrap();
        assert_eq!(sequences(&all), (1..=100).collect::<Vec<_>>());
        assert_eq!(deposit(&coordinator, "long", "1").await, count + 1);
    }

    /// A cursor past the account's last entry is refused, naming the field.
    #[tokio::test]
    async fn a_cursor_past_the_last_entry_is_refused() {
        let clock = ManualClock::starting_at(1_000_000);
        let coordinator = coordinator(&clock).await;
        deposit(&coordinator, "short", "1").await;
        let error = coordinator.ledger_after(&user("short"), 2, 10).await.unwrap_err();
        assert!(
            matches!(&error, ServiceError::InvalidArgument(field) if field.field == "after_sequence"),
            "{error:?}"
        );
        assert!(
            coordinator
                .ledger_after(&user("short"), 1, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
