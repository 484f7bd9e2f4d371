//! The data model: every key, item shape, condition and update expression Lockstep sends to
//! DynamoDB, built here and nowhere else. See `docs/storage.md` for the table design.
//!
//! One table, keys `pk` (S) and `sk` (S):
//!
//! | item          | pk               | sk                 |
//! |---------------|------------------|--------------------|
//! | account+lease | `USER#{user}`    | `ACCOUNT`          |
//! | ledger entry  | `USER#{user}`    | `LEDGER@{sequence, 20 digits}` |
//! | ledger entry written before sequences | `USER#{user}` | `LEDGER#{uuid v7}` |
//! | order (user)  | `USER#{user}`    | `ORDER#{uuid v7}`  |
//! | order (by id) | `ORDER#{uuid v7}`| `ORDER`            |
//! | request record| `USER#{user}`    | `REQUEST#{key}`    |
//! | asset         | `ASSET`          | `{symbol}`         |
//! | asset change  | `ASSET_CHANGE#{symbol}` | `{uuid v7}` |
//! | feed record   | `FEED#{shard, 2 digits}` | `{ms, 15 digits}#{user}#{first sequence, 20 digits}` |
//!
//! The lease lives on the account item, so taking it (one conditional UpdateItem with
//! ReturnValues = ALL_NEW) also reads the account consistently: a successful mutation costs
//! two requests, acquire and commit-and-release, or one on an account the coordinator last wrote
//! (the commit alone, conditioned on that version and on no lease).

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::{Bindings, ConditionCheck, Delete, Item, Key, Put, Query, TransactItem, Update, Value};
use crate::core::account::{Hold, Holds, PendingWithdrawal, PendingWithdrawals};
use crate::core::asset_change::AssetChange;
use crate::core::records::{
    Asset, EntryKind, Lease, LedgerEntry, LedgerHold, LedgerTrade, LedgerTransfer, Order, OrderStatus, RecordedOutcome,
    RefusalCode, RequestRecord, Withdrawal, WithdrawalStatus,
};
use crate::core::{
    Account, AccountState, AssetSymbol, Decision, EntryId, LeaseId, Memo, Millis, OrderId, Price, Principal, Quantity,
    RequestId, TradeSide, TransferId, Usd, UsdDelta, UserId, UtcDay, WithdrawalId,
};

const USER_PREFIX: &str = "USER#";
const ACCOUNT_SK: &str = "ACCOUNT";
/// Both kinds of ledger key: one Query of this prefix, newest first, reads the sequenced
/// entries (`LEDGER@`, highest sequence first) and then those written before sequences
/// (`LEDGER#`, newest first), because `@` sorts after `#`.
const LEDGER_PREFIX: &str = "LEDGER";
/// Entries keyed by their sequence, zero-padded so the key order is the sequence order.
const SEQUENCED_PREFIX: &str = "LEDGER@";
/// Entries written before sequences, keyed by their id (UUID v7).
const UNSEQUENCED_PREFIX: &str = "LEDGER#";
const ORDER_PREFIX: &str = "ORDER#";
const ORDER_SK: &str = "ORDER";
const ASSET_PK: &str = "ASSET";
const REQUEST_PREFIX: &str = "REQUEST#";
/// A pending withdrawal's record, under its user (so only its user's calls find it).
const WITHDRAWAL_PREFIX: &str = "WITHDRAWAL#";
/// The feed's journal (`WatchFeed`): one record per account per commit, in one of
/// `FEED_SHARDS` partitions, ordered by the commit's time (`docs/feed.md`).
const FEED_PREFIX: &str = "FEED#";
/// Partitions of the feed's journal: an account's records are all in one (`feed_shard`), so
/// they keep its order; more than one, so no single partition takes every commit's write
/// (DynamoDB gives a partition about 1,000 writes a second). Fixed: a change moves accounts.
pub const FEED_SHARDS: usize = 8;
/// The TTL attribute of request records and feed records. Only they carry it: a TTL on anything
/// else would delete money (a feed record is a copy of entries kept in the ledger). Every
/// stored time names its unit: this one is in seconds since the epoch, because DynamoDB's TTL
/// reads nothing else; all the others (`lock_expires_at_ms`,
/// `created_at_ms`) are in milliseconds, like the coordinator's clock.
pub const TTL_ATTRIBUTE: &str = "record_expires_at_s";

/// The lease's attributes on the account item, removed together on release.
const LEASE_ATTRIBUTES: &str = "lock_id, lock_owner, lock_incarnation, lock_operation, lock_expires_at_ms";

fn s(text: impl Into<String>) -> Value {
    Value::S(text.into())
}

fn n(number: impl ToString) -> Value {
    Value::N(number.to_string())
}

fn bindings<const N: usize, const V: usize>(names: [(&str, &str); N], values: [(&str, Value); V]) -> Bindings {
    Bindings {
        names: names.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
        values: values.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

fn user_pk(user: &UserId) -> String {
    format!("{USER_PREFIX}{user}")
}

pub fn account_key(user: &UserId) -> Key {
    Key {
        pk: user_pk(user),
        sk: ACCOUNT_SK.to_owned(),
    }
}

/// The key of an entry written before sequences (by its id).
pub fn ledger_key(user: &UserId, entry_id: &str) -> Key {
    Key {
        pk: user_pk(user),
        sk: format!("{UNSEQUENCED_PREFIX}{entry_id}"),
    }
}

/// The key of `user`'s entry number `sequence`.
pub fn entry_key(user: &UserId, sequence: u64) -> Key {
    Key {
        pk: user_pk(user),
        sk: format!("{SEQUENCED_PREFIX}{sequence:020}"),
    }
}

pub fn order_key(order_id: &str) -> Key {
    Key {
        pk: format!("{ORDER_PREFIX}{order_id}"),
        sk: ORDER_SK.to_owned(),
    }
}

pub fn withdrawal_key(user: &UserId, withdrawal_id: &WithdrawalId) -> Key {
    Key {
        pk: user_pk(user),
        sk: format!("{WITHDRAWAL_PREFIX}{withdrawal_id}"),
    }
}

fn withdrawal_item(withdrawal: &Withdrawal) -> Item {
    let mut item = key_attributes(&withdrawal_key(&withdrawal.user_id, &withdrawal.withdrawal_id));
    item.insert("withdrawal_id".to_owned(), s(withdrawal.withdrawal_id.as_str()));
    item.insert("user_id".to_owned(), s(withdrawal.user_id.as_str()));
    item.insert("amount".to_owned(), n(withdrawal.amount));
    item.insert("status".to_owned(), s(withdrawal.status.as_str()));
    item.insert("day".to_owned(), s(withdrawal.day.to_string()));
    item.insert("created_at_ms".to_owned(), n(withdrawal.created_at_ms));
    item.insert("principal".to_owned(), s(withdrawal.principal.as_str()));
    if let Some(reason) = &withdrawal.reason {
        item.insert("reason".to_owned(), s(reason));
    }
    item
}

pub fn withdrawal_from_item(item: &Item) -> Result<Withdrawal, MalformedItem> {
    const KIND: &str = "withdrawal";
    Ok(Withdrawal {
        withdrawal_id: WithdrawalId::from_stored(required(KIND, "withdrawal_id", string(item, "withdrawal_id"))?),
        user_id: required(
            KIND,
            "user_id",
            string(item, "user_id").and_then(|raw| UserId::parse("user_id", raw).ok()),
        )?,
        amount: required(KIND, "amount", number(item, "amount").and_then(Usd::from_stored))?,
        status: required(KIND, "status", string(item, "status").and_then(WithdrawalStatus::parse))?,
        reason: string(item, "reason").map(str::to_owned),
        day: required(KIND, "day", string(item, "day").and_then(UtcDay::from_stored))?,
        created_at_ms: required(
            KIND,
            "created_at_ms",
            number(item, "created_at_ms").and_then(|raw| raw.parse().ok()),
        )?,
        principal: principal_of(item, KIND)?,
    })
}

pub fn request_key(user: &UserId, request_id: &RequestId) -> Key {
    Key {
        pk: user_pk(user),
        sk: format!("{REQUEST_PREFIX}{request_id}"),
    }
}

pub fn asset_key(symbol: &AssetSymbol) -> Key {
    Key {
        pk: ASSET_PK.to_owned(),
        sk: symbol.as_str().to_owned(),
    }
}

const PRICE_COPY_PREFIX: &str = "PRICE#";
const PRICE_COPY_SK: &str = "PRICE";
/// Copies of each asset's price and active flag, each under its own partition key, written
/// together with the catalog item by UpsertAsset (one transaction) and checked by trade commits,
/// each user always the same copy. No item is then checked by every trade: one asset's trades
/// spread over this many partitions (docs/deploy.md, "How many coordinators per table").
pub const PRICE_COPIES: u32 = 16;

/// The copy of `symbol`'s price that `user`'s trades check.
pub fn price_copy_key(symbol: &AssetSymbol, user: &UserId) -> Key {
    price_copy_key_at(symbol, price_copy_of(user))
}

fn price_copy_key_at(symbol: &AssetSymbol, copy: u32) -> Key {
    Key {
        pk: format!("{PRICE_COPY_PREFIX}{symbol}#{copy}"),
        sk: PRICE_COPY_SK.to_owned(),
    }
}

/// Which copy `user` checks: FNV-1a of the user id, stable across builds and coordinators.
fn price_copy_of(user: &UserId) -> u32 {
    let hash = user.as_str().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % u64::from(PRICE_COPIES)) as u32
}

fn key_attributes(key: &Key) -> Item {
    BTreeMap::from([("pk".to_owned(), s(&key.pk)), ("sk".to_owned(), s(&key.sk))])
}

/// Puts a new item, refusing to overwrite one: ids are fresh, so an existing item means a bug
/// or a replayed request, never something to clobber.
fn put_new(item: Item) -> Put {
    Put {
        item,
        condition: Some("attribute_not_exists(pk)".to_owned()),
        bindings: Bindings::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Lease

/// Takes the user's lease if it is absent or expired, in one conditional write, and returns the
/// whole account item as written. Operations other than deposit also require the account to
/// exist. On failure the item is returned as it was (ALL_OLD), so the caller can tell a busy
/// lease from a missing account, or find that the lease is already its own (a retried request).
pub fn acquire_lease(user: &UserId, lease: &Lease, now: Millis, require_account: bool) -> Update {
    take_lease(user, lease, now, require_account, None)
}

/// Takes over the lease `orphan` held by a previous run of this same coordinator instance (it
/// died holding it): conditioned on that exact lock id, so it cannot steal from anyone else.
pub fn reclaim_lease(user: &UserId, lease: &Lease, now: Millis, require_account: bool, orphan: &LeaseId) -> Update {
    take_lease(user, lease, now, require_account, Some(orphan))
}

fn take_lease(user: &UserId, lease: &Lease, now: Millis, require_account: bool, orphan: Option<&LeaseId>) -> Update {
    // A lease expiring later than any clock within the tolerated skew could have set is free
    // too: a coordinator whose clock ran far ahead must not block a user for that long.
    let free = if orphan.is_some() {
        "(lock_id = :orphan OR attribute_not_exists(lock_id) OR lock_expires_at_ms <= :now OR lock_expires_at_ms > :implausible)"
    } else {
        "(attribute_not_exists(lock_id) OR lock_expires_at_ms <= :now OR lock_expires_at_ms > :implausible)"
    };
    let condition = if require_account {
        format!("attribute_exists(cash) AND {free}")
    } else {
        free.to_owned()
    };
    let mut update = Update {
        key: account_key(user),
        update: "SET user_id = :user, lock_id = :lock, lock_owner = :owner, lock_incarnation = :incarnation, \
                 lock_operation = :operation, lock_expires_at_ms = :expires, version = if_not_exists(version, :zero), \
                 holdings = if_not_exists(holdings, :empty)"
            .to_owned(),
        condition: Some(condition),
        bindings: bindings(
            [],
            [
                (":user", s(user.as_str())),
                (":lock", s(lease.lock_id.as_str())),
                (":owner", s(&lease.owner)),
                (":incarnation", s(&lease.incarnation)),
                (":operation", s(&lease.operation)),
                (":expires", n(lease.expires_at_ms)),
                (":now", n(now)),
                (":implausible", n(crate::core::records::implausible_after(now))),
                (":zero", n(0)),
                (":empty", Value::M(BTreeMap::new())),
            ],
        ),
        return_new: true,
        return_old_on_condition_failure: true,
    };
    if let Some(orphan) = orphan {
        update.bindings.values.insert(":orphan".to_owned(), s(orphan.as_str()));
    }
    update
}

/// Gives the lease back without changing the account, if it is still ours, and bumps the
/// version: any copy of a commit decided under this lease that is still in flight (its reply
/// lost, a retry delayed in the network) can then never apply, even if a delayed copy of the
/// acquire re-took the lease with the same lock id. This is also the fence of an unclear
/// ending, so it never deletes: an item that holds only a lease stays as a lease-free item then
/// (deleting it would reset the version). A plain release of an item the acquire created, with
/// nothing decided under it, is `release_created_item`.
///
/// `numbered_at`: the version the holder knows the account is at with every entry numbered
/// (it read it so, or numbered it, and only it wrote since); the release then stamps
/// `entries_at` with the next one. Should the holder's knowledge be stale, the stamp misses the
/// version and the next holder merely looks for unnumbered entries again.
pub fn release_lease(user: &UserId, lock_id: &LeaseId, numbered_at: Option<u64>) -> TransactItem {
    let mut values = bindings([], [(":lock", s(lock_id.as_str())), (":one", n(1))]);
    let entries_at = match numbered_at {
        Some(version) => {
            values.values.insert(":entries_at".to_owned(), n(version + 1));
            ", entries_at = :entries_at"
        }
        None => "",
    };
    TransactItem::Update(Update {
        key: account_key(user),
        update: format!("SET version = version + :one{entries_at} REMOVE {LEASE_ATTRIBUTES}"),
        condition: Some("lock_id = :lock".to_owned()),
        bindings: values,
        return_new: false,
        return_old_on_condition_failure: false,
    })
}

/// Whether the account item read with a lease was created by that very acquire: no account yet,
/// and no earlier release (each bumps the version).
pub fn created_by_this_lease(read: &Account) -> bool {
    !read.exists() && read.version == 0
}

/// Gives back a lease whose acquire created the item (a first deposit refused, say) by deleting
/// the item, so a refused call leaves nothing behind: only while it is still this lease's and
/// still no account. Used only when no commit was decided under the lease, so no late copy of
/// one can meet the recreated item.
pub fn release_created_item(user: &UserId, lock_id: &LeaseId) -> TransactItem {
    TransactItem::Delete(Delete {
        key: account_key(user),
        condition: Some("lock_id = :lock AND attribute_not_exists(cash)".to_owned()),
        bindings: bindings([], [(":lock", s(lock_id.as_str()))]),
    })
}

/// The sweeper's release of a lease whose holder never came back: only if it is still that
/// lease and still expired. Like every release it bumps the version, so nothing decided under
/// that lease can commit afterwards.
pub fn release_expired_lease(account: &Key, lock_id: &LeaseId, now: Millis) -> TransactItem {
    TransactItem::Update(Update {
        key: account.clone(),
        update: format!("SET version = version + :one REMOVE {LEASE_ATTRIBUTES}"),
        condition: Some(
            "lock_id = :lock AND (lock_expires_at_ms <= :now OR lock_expires_at_ms > :implausible)".to_owned(),
        ),
        bindings: bindings(
            [],
            [
                (":lock", s(lock_id.as_str())),
                (":now", n(now)),
                (":implausible", n(crate::core::records::implausible_after(now))),
                (":one", n(1)),
            ],
        ),
        return_new: false,
        return_old_on_condition_failure: false,
    })
}

/// Deletes a request record past its retention, unless it was rewritten meanwhile.
pub fn delete_expired_record(record: &Key, now: Millis) -> TransactItem {
    TransactItem::Delete(Delete {
        key: record.clone(),
        condition: Some(format!(
            "{TTL_ATTRIBUTE} < :now_seconds OR {TTL_ATTRIBUTE} > :implausible_seconds"
        )),
        bindings: bindings(
            [],
            [
                (":now_seconds", n(epoch_seconds(now))),
                (":implausible_seconds", n(implausible_record_expiry(now))),
            ],
        ),
    })
}

/// Whether a request record is past its retention at `now`: the sweeper's test, and the same
/// comparison as the conditions that treat such a record as absent.
pub fn request_record_expired(record: &RequestRecord, now: Millis) -> bool {
    record.expires_at_seconds < epoch_seconds(now) || record.expires_at_seconds > implausible_record_expiry(now)
}

/// Request records expiring after this (epoch seconds) were stamped by a clock far ahead: no
/// retention (at most `REQUEST_RETENTION_MAX`, plus for a fill its order's life, at most
/// `EXPIRES_IN_MAX`) from a clock within `CLOCK_SKEW_MAX` reaches it. Such a record is treated
/// as expired rather than pinning its key (and its item) for that long.
fn implausible_record_expiry(now: Millis) -> u64 {
    epoch_seconds(now)
        + (REQUEST_RETENTION_MAX + crate::core::ops::orders::EXPIRES_IN_MAX + crate::core::records::CLOCK_SKEW_MAX)
            .as_secs()
}

/// The longest retention a request record can be given (`--request-retention-hours` bound).
pub const REQUEST_RETENTION_MAX: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// `now` in whole seconds since the epoch, the unit of the TTL attribute.
pub fn epoch_seconds(now: Millis) -> u64 {
    now / 1000
}

pub fn lease_from_item(item: &Item) -> Option<Lease> {
    Some(Lease {
        lock_id: LeaseId::from_stored(string(item, "lock_id")?.to_owned()),
        owner: string(item, "lock_owner").unwrap_or_default().to_owned(),
        incarnation: string(item, "lock_incarnation").unwrap_or_default().to_owned(),
        operation: string(item, "lock_operation").unwrap_or_default().to_owned(),
        expires_at_ms: number(item, "lock_expires_at_ms")?.parse().ok()?,
    })
}

// ---------------------------------------------------------------------------------------------
// Commit

/// The writes of one operation in a batch commit: its ledger entry if it was accepted, its
/// order (CONFIRMED, or FAILED for a refused trade), and its request record.
#[derive(Debug, Clone, Copy, Default)]
pub struct OperationWrites<'a> {
    pub entry: Option<&'a LedgerEntry>,
    pub order: Option<&'a Order>,
    /// The order exists already (a fill or cancel rewrites it); otherwise it is written fresh.
    pub order_rewritten: bool,
    /// A pending withdrawal's record: fresh when it starts, rewritten when it ends.
    pub withdrawal: Option<&'a Withdrawal>,
    pub record: Option<(&'a RequestId, &'a RequestRecord)>,
}

/// Everything a batch of operations decided under one lease writes, as one transaction: the
/// account's state after the batch, each operation's writes, a check that the catalog still
/// has the price every accepted trade executed at, and the lease released or extended.
///
/// The account update is fenced: it applies only if the lease is still this holder's, unexpired
/// at `now`, and the account is at the version the batch read. Without a lease (`lock_id` None:
/// the account as this coordinator last wrote it) it applies only if the account is still at
/// that version with no lease on it: every other writer moves the version or holds a lease. The floors of the batch (the
/// deepest any prefix of it goes below the read cash and holdings) are restated as conditions,
/// so no commit can ever make either negative.
#[derive(Debug, Clone)]
pub struct BatchCommit<'a> {
    pub user: &'a UserId,
    /// The lease the batch was decided under; None when it was decided on the account as this
    /// coordinator last wrote it, with no lease.
    pub lock_id: Option<&'a LeaseId>,
    /// The account as read with the lease (or left by the previous batch under it).
    pub read: &'a Account,
    /// The account after every accepted operation, at its next version: the read version plus
    /// one per accepted operation (each ledger entry's sequence), or plus one if none was.
    pub after: &'a Account,
    pub cash_floor: Usd,
    pub holding_floors: &'a BTreeMap<AssetSymbol, Quantity>,
    /// The catalog price of each asset an accepted trade executed at.
    pub prices: &'a BTreeMap<AssetSymbol, Price>,
    pub operations: &'a [OperationWrites<'a>],
    /// Keep the lease until then (more calls wait), instead of releasing it.
    pub extend_until: Option<Millis>,
    /// Check the user's own copy of each price (DynamoDB: one asset's trades spread over
    /// `PRICE_COPIES` partitions), or copy 0 for every user (group commit on a single-node
    /// server, which has no partitions to spread over and shares one identical check between
    /// the members of a group).
    pub spread_price_checks: bool,
    pub now: Millis,
    /// The committing process (its incarnation), kept on the account with the commit's feed
    /// record's time and first sequence (`FeedMark`).
    pub writer: &'a str,
}

/// What the account keeps of its last commit's feed record: its time, its first sequence and
/// the process that wrote it. A coordinator that takes the account from another writer records
/// that commit in the feed again if it may have landed past the horizon (`service::feed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedMark {
    pub at: Millis,
    pub first: u64,
    pub writer: String,
}

pub fn feed_mark_from_item(item: &Item) -> Option<FeedMark> {
    Some(FeedMark {
        at: number(item, "feed_at_ms")?.parse().ok()?,
        first: number(item, "feed_first")?.parse().ok()?,
        writer: string(item, "feed_writer")?.to_owned(),
    })
}

/// The parts of a transaction whose cancellation reasons the service reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionPart {
    /// The request record of the batch's `operation`-th operation: its key was used before.
    RequestRecord { operation: usize },
    /// The account update or lease release: fenced, or the version moved.
    Account,
    /// A transfer's second account (the first is `Account`): fenced, or the version moved.
    Counterparty,
    /// A catalog check of a trade: the price or active flag changed.
    CatalogCheck,
}

/// A transaction's items, with the position of each part that has a name.
#[derive(Debug, Clone, Default)]
pub struct NamedItems {
    pub items: Vec<TransactItem>,
    parts: Vec<(usize, TransactionPart)>,
    /// An item written only by this transaction (a fresh ledger entry or order): found in
    /// storage, it proves the transaction applied.
    marker: Option<Marker>,
    /// The feed records it writes (one per account with entries), to be written again at a
    /// later time if the transaction is acknowledged past the feed's horizon.
    pub feed: Vec<Item>,
}

/// The proof that a transaction applied: an item it alone wrote, named by its key and by its
/// own id. The id matters: an entry's key is its account's next sequence, which a competing
/// commit that won the account writes too, so a key found in storage proves nothing alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub key: Key,
    /// The attribute that holds the item's id (`entry_id`, `order_id`) and its value.
    id_attribute: &'static str,
    id: String,
}

impl Marker {
    /// Whether `item` (read at `key`) is the very item the transaction wrote.
    pub fn proves(&self, item: &Item) -> bool {
        string(item, self.id_attribute) == Some(self.id.as_str())
    }
}

/// DynamoDB's limit on the items of one TransactWriteItems (and of dynoxide's).
pub const TRANSACTION_ITEMS_MAX: usize = 100;

impl NamedItems {
    fn push(&mut self, item: TransactItem) -> usize {
        // Always on: the batch size is bounded by the items its calls count (`service::BATCH_ITEMS_MAX`);
        // a transaction past the limit would be refused whole by storage, after deciding.
        assert!(
            self.items.len() < TRANSACTION_ITEMS_MAX,
            "a transaction holds at most {TRANSACTION_ITEMS_MAX} items"
        );
        self.items.push(item);
        self.items.len() - 1
    }

    fn push_part(&mut self, part: TransactionPart, item: TransactItem) {
        let position = self.push(item);
        self.parts.push((position, part));
    }

    fn push_fresh(&mut self, item: Item) {
        if self.marker.is_none() {
            self.marker = item_key(&item).and_then(|key| {
                ["entry_id", "order_id"].into_iter().find_map(|id_attribute| {
                    string(&item, id_attribute).map(|id| Marker {
                        key: key.clone(),
                        id_attribute,
                        id: id.to_owned(),
                    })
                })
            });
        }
        self.push(TransactItem::Put(put_new(item)));
    }

    /// The part whose condition failed in a cancelled transaction, in order of precedence: a
    /// request record (its outcome answers), then the account, then a catalog check.
    pub fn refused_part(&self, reasons: &[super::CancellationReason]) -> Option<TransactionPart> {
        let failed = |position: usize| {
            reasons
                .get(position)
                .is_some_and(super::CancellationReason::condition_failed)
        };
        let rank = |part: &TransactionPart| match part {
            TransactionPart::RequestRecord { .. } => 0,
            TransactionPart::Account | TransactionPart::Counterparty => 1,
            TransactionPart::CatalogCheck => 2,
        };
        self.parts
            .iter()
            .filter(|(position, _)| failed(*position))
            .map(|(_, part)| *part)
            .min_by_key(rank)
    }

    /// The positions in the batch (`TransactionPart::RequestRecord { operation }`) of every call
    /// whose request record's condition failed in a cancelled transaction: request ids used
    /// before, each to be answered from its record. DynamoDB reports every item's reason; an
    /// engine that reports only the first gives one.
    pub fn refused_records(&self, reasons: &[super::CancellationReason]) -> Vec<usize> {
        self.parts
            .iter()
            .filter(|(position, _)| {
                reasons
                    .get(*position)
                    .is_some_and(super::CancellationReason::condition_failed)
            })
            .filter_map(|(_, part)| match part {
                TransactionPart::RequestRecord { operation } => Some(*operation),
                _ => None,
            })
            .collect()
    }

    /// The key whose presence proves this transaction applied, if it writes a fresh item.
    pub fn marker(&self) -> Option<&Marker> {
        self.marker.as_ref()
    }

    /// Appends `other`'s items, its parts renamed by `rename`, into one transaction.
    fn append(&mut self, other: NamedItems, rename: impl Fn(TransactionPart) -> TransactionPart) {
        let offset = self.items.len();
        self.items.extend(other.items);
        self.parts.extend(
            other
                .parts
                .into_iter()
                .map(|(position, part)| (position + offset, rename(part))),
        );
        if self.marker.is_none() {
            self.marker = other.marker;
        }
        self.feed.extend(other.feed);
    }

    fn push_feed(&mut self, item: Item) {
        self.push(TransactItem::Put(Put {
            item: item.clone(),
            condition: None,
            bindings: Bindings::default(),
        }));
        self.feed.push(item);
    }
}

fn item_key(item: &Item) -> Option<Key> {
    Some(Key {
        pk: string(item, "pk")?.to_owned(),
        sk: string(item, "sk")?.to_owned(),
    })
}

/// Builds the batch's one transaction.
pub fn commit_batch(commit: &BatchCommit<'_>) -> NamedItems {
    assert_books_balance(commit);
    let mut items = NamedItems::default();
    for (asset, price) in commit.prices {
        let key = if commit.spread_price_checks {
            price_copy_key(asset, commit.user)
        } else {
            price_copy_key_at(asset, 0)
        };
        let check = TransactItem::ConditionCheck(ConditionCheck {
            key,
            condition: "price = :price AND active = :active".to_owned(),
            bindings: bindings([], [(":price", n(price)), (":active", Value::Bool(true))]),
        });
        items.push_part(TransactionPart::CatalogCheck, check);
    }
    let account = match commit.lock_id {
        Some(lock_id)
            if created_by_this_lease(commit.read) && !commit.after.exists() && commit.extend_until.is_none() =>
        {
            release_created_item(commit.user, lock_id)
        }
        _ => TransactItem::Update(account_update(commit)),
    };
    items.push_part(TransactionPart::Account, account);
    // Several fills or a fill and a cancel of one order in one batch: only the order as the
    // last of them leaves it is written (a transaction names each item once), fresh if any of
    // them made it.
    let last_write = |order: &Order| {
        commit
            .operations
            .iter()
            .rposition(|operation| operation.order.is_some_and(|other| other.order_id == order.order_id))
    };
    for (index, operation) in commit.operations.iter().enumerate() {
        if let Some(entry) = operation.entry {
            items.push_fresh(ledger_item(entry));
        }
        if let Some(order) = operation.order.filter(|order| last_write(order) == Some(index)) {
            let made_here = commit.operations.iter().any(|other| {
                other.order.is_some_and(|other| other.order_id == order.order_id) && !other.order_rewritten
            });
            for item in order_items(order) {
                if !made_here {
                    // A fill or cancel of an order the account holds: the account's version
                    // condition already orders every write of it.
                    items.push(TransactItem::Put(Put {
                        item,
                        condition: None,
                        bindings: Bindings::default(),
                    }));
                } else {
                    items.push_fresh(item);
                }
            }
        }
        if let Some(withdrawal) = operation.withdrawal {
            let item = withdrawal_item(withdrawal);
            if withdrawal.status == WithdrawalStatus::Pending {
                items.push_fresh(item);
            } else {
                // Its account's version condition orders every write of it.
                items.push(TransactItem::Put(Put {
                    item,
                    condition: None,
                    bindings: Bindings::default(),
                }));
            }
        }
        if let Some((request_id, record)) = operation.record {
            let put = TransactItem::Put(put_request_record(commit.user, request_id, record, commit.now));
            items.push_part(TransactionPart::RequestRecord { operation: index }, put);
        }
    }
    let entries: Vec<LedgerEntry> = commit
        .operations
        .iter()
        .filter_map(|operation| operation.entry.cloned())
        .collect();
    if !entries.is_empty() {
        let expires = epoch_seconds(commit.now) + crate::core::records::FEED_RETENTION.as_secs();
        items.push_feed(feed_item(&entries, commit.now, expires));
    }
    items
}

/// Paired with the decision's own assertions, where the account is encoded for storage and
/// always on: the cash written equals the cash read plus every ledger entry's delta written
/// with it, and each traded holding the same with its quantity deltas. A mismatch is a
/// programmer error that would put the books out of balance; it never reaches storage.
fn assert_books_balance(commit: &BatchCommit<'_>) {
    let sequences = commit
        .operations
        .iter()
        .filter_map(|operation| operation.entry)
        .map(|entry| entry.sequence);
    assert!(
        sequences.eq(commit.read.entries + 1..=commit.after.entries),
        "a commit numbers its entries on from the account's last one, in order, with no gap"
    );
    if !commit.after.exists() {
        return;
    }
    let entries = || commit.operations.iter().filter_map(|operation| operation.entry);
    let cash_moved: Decimal = entries().map(|entry| entry.cash_delta.decimal()).sum();
    assert_eq!(
        commit.after.cash.decimal(),
        commit.read.cash.decimal() + cash_moved,
        "cash written = cash read + the deltas of the entries written with it"
    );
    for asset in commit.prices.keys().chain(commit.holding_floors.keys()) {
        let moved: Decimal = entries()
            .filter_map(|entry| entry.trade.as_ref())
            .filter(|trade| trade.asset == *asset)
            .map(|trade| trade.quantity_delta)
            .sum();
        assert_eq!(
            commit.after.holding(asset).decimal(),
            commit.read.holding(asset).decimal() + moved,
            "holding written = holding read + the quantity deltas of the entries written with it"
        );
    }
    if let Some(last) = entries().next_back() {
        assert_eq!(
            last.cash_after, commit.after.cash,
            "the last entry's balance is the account's"
        );
    }
}

/// The fenced update of the account item: its state after the batch (when the batch made it an
/// account), the version bumped, and the lease released or extended.
fn account_update(commit: &BatchCommit<'_>) -> Update {
    let (read, after) = (commit.read, commit.after);
    assert!(after.version > read.version, "every commit moves the version forward");
    assert!(
        !read.needs_numbering && !after.needs_numbering,
        "a commit writes only on an account whose entries are numbered"
    );
    let mut set = [
        "version = :next_version",
        "entries = :entries",
        "entries_at = :next_version",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut update_bindings = bindings(
        [],
        [
            (":next_version", n(after.version)),
            (":version", n(read.version)),
            (":entries", n(after.entries)),
        ],
    );
    let values = &mut update_bindings.values;
    if let Some(first) = commit.operations.iter().find_map(|operation| operation.entry) {
        set.extend(
            [
                "feed_at_ms = :feed_at",
                "feed_first = :feed_first",
                "feed_writer = :feed_writer",
            ]
            .map(str::to_owned),
        );
        values.insert(":feed_at".to_owned(), n(commit.now));
        values.insert(":feed_first".to_owned(), n(first.sequence));
        values.insert(":feed_writer".to_owned(), s(commit.writer));
    }
    let mut condition: Vec<String> = match commit.lock_id {
        Some(lock_id) => {
            values.insert(":lock".to_owned(), s(lock_id.as_str()));
            values.insert(":now".to_owned(), n(commit.now));
            ["lock_id = :lock", "lock_expires_at_ms > :now", "version = :version"]
                .map(str::to_owned)
                .to_vec()
        }
        None => ["attribute_not_exists(lock_id)", "version = :version"]
            .map(str::to_owned)
            .to_vec(),
    };
    if after.exists() {
        set.extend(
            [
                "cash = :cash",
                "limit_day = :day",
                "deposited_today = :deposited",
                "withdrawn_today = :withdrawn",
                "transferred_today = :transferred",
                "created_at_ms = if_not_exists(created_at_ms, :created_at_ms)",
            ]
            .map(str::to_owned),
        );
        values.insert(":cash".to_owned(), n(after.cash));
        values.insert(
            ":day".to_owned(),
            s(after.limit_day.map(|day| day.to_string()).unwrap_or_default()),
        );
        values.insert(":deposited".to_owned(), n(after.deposited_today));
        values.insert(":withdrawn".to_owned(), n(after.withdrawn_today));
        values.insert(":transferred".to_owned(), n(after.transferred_today));
        values.insert(":created_at_ms".to_owned(), n(commit.now));
    }
    if commit.cash_floor > Usd::ZERO {
        condition.push("cash >= :cash_floor".to_owned());
        values.insert(":cash_floor".to_owned(), n(commit.cash_floor));
    }
    set_holdings(commit, &mut set, &mut condition, &mut update_bindings);
    let mut remove: Vec<&str> = Vec::new();
    if after.exists() && after.withdrawals != read.withdrawals {
        if after.withdrawals.is_empty() {
            remove.push("withdrawals");
        } else {
            set.push("withdrawals = :withdrawals".to_owned());
            update_bindings
                .values
                .insert(":withdrawals".to_owned(), withdrawals_value(&after.withdrawals));
        }
    }
    if after.exists() && after.holds != read.holds {
        // Paired with the decisions' own check: nothing written is on hold beyond its total.
        Account::assert_holds_kept_within_totals(read, after, commit.now);
        if after.holds.is_empty() {
            remove.push("holds");
        } else {
            set.push("holds = :holds".to_owned());
            update_bindings
                .values
                .insert(":holds".to_owned(), holds_value(&after.holds));
        }
    }
    match (commit.lock_id, commit.extend_until) {
        (None, _) => {}
        (Some(_), Some(until)) => {
            set.push("lock_expires_at_ms = :extend_until".to_owned());
            update_bindings.values.insert(":extend_until".to_owned(), n(until));
        }
        (Some(_), None) => remove.push(LEASE_ATTRIBUTES),
    }
    let remove = if remove.is_empty() {
        String::new()
    } else {
        format!(" REMOVE {}", remove.join(", "))
    };
    Update {
        key: account_key(commit.user),
        update: format!("SET {}{remove}", set.join(", ")),
        condition: Some(condition.join(" AND ")),
        bindings: update_bindings,
        return_new: false,
        return_old_on_condition_failure: false,
    }
}

/// The holding of every asset the batch traded, and its floor as a condition.
fn set_holdings(commit: &BatchCommit<'_>, set: &mut Vec<String>, condition: &mut Vec<String>, bindings: &mut Bindings) {
    let traded = commit.prices.keys().chain(commit.holding_floors.keys());
    for (index, asset) in traded
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .enumerate()
    {
        let name = format!("#asset{index}");
        set.push(format!("holdings.{name} = :holding{index}"));
        bindings.names.insert(name.clone(), asset.as_str().to_owned());
        bindings
            .values
            .insert(format!(":holding{index}"), n(commit.after.holding(asset)));
        if let Some(floor) = commit.holding_floors.get(asset).filter(|floor| !floor.is_zero()) {
            condition.push(format!("holdings.{name} >= :floor{index}"));
            bindings.values.insert(format!(":floor{index}"), n(floor));
        }
    }
}

/// One account of a transfer: its fenced update to `after` (lease released), and its ledger
/// entry when the transfer was accepted.
#[derive(Debug, Clone, Copy)]
pub struct TransferParty<'a> {
    pub user: &'a UserId,
    /// The lease held on it; None for the account as this coordinator last wrote it.
    pub lock_id: Option<&'a LeaseId>,
    pub read: &'a Account,
    /// The account after the transfer (or, for a refusal, as read), at its next version.
    pub after: &'a Account,
    /// What the transfer takes from its cash (the sender's amount; zero for the receiver),
    /// restated as a condition.
    pub cash_floor: Usd,
    pub entry: Option<&'a LedgerEntry>,
}

/// Everything a transfer writes, as one transaction: both accounts (`first` in the global
/// order, whose part is `Account`, then `second`, whose part is `Counterparty`), each fenced as
/// a batch commit is and its lease released; both ledger entries; the sender's request record.
#[derive(Debug, Clone, Copy)]
pub struct TransferCommit<'a> {
    pub first: TransferParty<'a>,
    pub second: TransferParty<'a>,
    /// The request record, keyed on the sender (`first` when `sender_is_first`).
    pub record: Option<(&'a RequestId, &'a RequestRecord)>,
    pub sender_is_first: bool,
    pub now: Millis,
    pub writer: &'a str,
}

/// Builds a transfer's one transaction (at most 7 items: two accounts, two entries, two feed records, a request record).
pub fn commit_transfer(commit: &TransferCommit<'_>) -> NamedItems {
    let part = |party: &TransferParty<'_>, record| {
        let operations = [OperationWrites {
            entry: party.entry,
            order: None,
            order_rewritten: false,
            withdrawal: None,
            record,
        }];
        commit_batch(&BatchCommit {
            user: party.user,
            lock_id: party.lock_id,
            read: party.read,
            after: party.after,
            cash_floor: party.cash_floor,
            holding_floors: &BTreeMap::new(),
            prices: &BTreeMap::new(),
            operations: &operations,
            extend_until: None,
            spread_price_checks: true,
            now: commit.now,
            writer: commit.writer,
        })
    };
    let (first_record, second_record) = if commit.sender_is_first {
        (commit.record, None)
    } else {
        (None, commit.record)
    };
    let mut items = part(&commit.first, first_record);
    items.append(part(&commit.second, second_record), |part| match part {
        TransactionPart::Account => TransactionPart::Counterparty,
        other => other,
    });
    items
}

/// Everything one mutation writes, as decided under the lease, and released with it: a batch
/// of one. (The fencing tests build stale commits with it.)
#[derive(Debug, Clone, Copy)]
pub struct Commit<'a> {
    pub user: &'a UserId,
    pub lock_id: &'a LeaseId,
    /// The account as read with the lease: the commit is conditioned on its version.
    pub read: &'a Account,
    pub decision: &'a Decision,
    pub entry: &'a LedgerEntry,
    pub order: Option<&'a Order>,
    pub record: Option<(&'a RequestId, &'a RequestRecord)>,
    pub now: Millis,
}

pub fn commit(commit: &Commit<'_>) -> NamedItems {
    let mut after = commit.read.clone();
    after.apply(commit.decision);
    after.version = commit.read.version + 1;
    after.entries = commit.read.entries + 1;
    let debit = commit.decision.cash_delta.debited();
    let mut prices = BTreeMap::new();
    let mut holding_floors = BTreeMap::new();
    if let Some(trade) = &commit.decision.trade {
        prices.insert(trade.asset.clone(), trade.price);
        let sold = (-trade.quantity_delta).max(Decimal::ZERO);
        holding_floors.insert(trade.asset.clone(), Quantity::from_decimal(sold));
    }
    let operations = [OperationWrites {
        entry: Some(commit.entry),
        order: commit.order,
        order_rewritten: false,
        withdrawal: None,
        record: commit.record,
    }];
    commit_batch(&BatchCommit {
        user: commit.user,
        lock_id: Some(commit.lock_id),
        read: commit.read,
        after: &after,
        cash_floor: debit,
        holding_floors: &holding_floors,
        prices: &prices,
        operations: &operations,
        extend_until: None,
        spread_price_checks: true,
        now: commit.now,
        writer: "",
    })
}

/// Writes a request record unless a live one exists for the key: a retry's write fails there,
/// which is how a duplicate is detected inside the very transaction that would apply it.
fn put_request_record(user: &UserId, request_id: &RequestId, record: &RequestRecord, now: Millis) -> Put {
    let mut item = key_attributes(&request_key(user, request_id));
    item.insert("request_id".to_owned(), s(request_id.as_str()));
    item.insert("fingerprint".to_owned(), s(&record.fingerprint));
    item.insert(TTL_ATTRIBUTE.to_owned(), n(record.expires_at_seconds));
    match &record.outcome {
        RecordedOutcome::Committed {
            entry_id,
            entry_sequence,
            order_id,
            holding,
        } => {
            item.insert("outcome".to_owned(), s("COMMITTED"));
            item.insert("entry_id".to_owned(), s(entry_id.as_str()));
            if let Some(sequence) = entry_sequence {
                item.insert("entry_sequence".to_owned(), n(sequence));
            }
            if let Some(order_id) = order_id {
                item.insert("order_id".to_owned(), s(order_id.as_str()));
            }
            if let Some(holding) = holding {
                item.insert("holding".to_owned(), n(holding));
            }
        }
        RecordedOutcome::Refused { message, code } => {
            item.insert("outcome".to_owned(), s("REFUSED"));
            item.insert("message".to_owned(), s(message));
            if *code == RefusalCode::NotFound {
                item.insert("refusal_code".to_owned(), s("NOT_FOUND"));
            }
        }
    }
    Put {
        item,
        condition: Some(format!(
            "attribute_not_exists(pk) OR {TTL_ATTRIBUTE} < :now_seconds OR {TTL_ATTRIBUTE} > :implausible_seconds"
        )),
        bindings: bindings(
            [],
            [
                (":now_seconds", n(epoch_seconds(now))),
                (":implausible_seconds", n(implausible_record_expiry(now))),
            ],
        ),
    }
}

pub fn request_record_from_item(item: &Item) -> Result<RequestRecord, MalformedItem> {
    const KIND: &str = "request record";
    let outcome = match string(item, "outcome") {
        Some("COMMITTED") => RecordedOutcome::Committed {
            entry_id: EntryId::from_stored(required(KIND, "entry_id", string(item, "entry_id"))?),
            entry_sequence: number(item, "entry_sequence").and_then(|raw| raw.parse().ok()),
            order_id: string(item, "order_id").map(OrderId::from_stored),
            holding: number(item, "holding").and_then(Quantity::from_stored),
        },
        Some("REFUSED") => RecordedOutcome::Refused {
            message: string(item, "message").unwrap_or_default().to_owned(),
            // Records written before codes were kept were all FAILED_PRECONDITION refusals.
            code: match string(item, "refusal_code") {
                Some("NOT_FOUND") => RefusalCode::NotFound,
                _ => RefusalCode::FailedPrecondition,
            },
        },
        _ => {
            return Err(MalformedItem {
                kind: KIND,
                attribute: "outcome",
            });
        }
    };
    Ok(RequestRecord {
        fingerprint: required(KIND, "fingerprint", string(item, "fingerprint"))?.to_owned(),
        outcome,
        expires_at_seconds: number(item, TTL_ATTRIBUTE)
            .and_then(|raw| raw.parse().ok())
            .unwrap_or(0),
    })
}

/// The two fresh Puts of an order (under its user and under its id), written on their own.
pub fn order_puts(order: &Order) -> Vec<TransactItem> {
    order_items(order)
        .into_iter()
        .map(|item| TransactItem::Put(put_new(item)))
        .collect()
}

/// Both copies of an order: under its user (for ListOrders) and under its id (for GetOrder).
pub fn order_items(order: &Order) -> [Item; 2] {
    let by_user = order_item(
        order,
        Key {
            pk: user_pk(&order.user_id),
            sk: format!("{ORDER_PREFIX}{}", order.order_id),
        },
    );
    [by_user, order_item(order, order_key(order.order_id.as_str()))]
}

// ---------------------------------------------------------------------------------------------
// Items <-> records

fn string<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(Value::S(text)) => Some(text),
        _ => None,
    }
}

fn number<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(Value::N(text)) => Some(text),
        _ => None,
    }
}

/// A stored item that does not have the shape Lockstep writes: a bug or foreign data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind} item: attribute {attribute}")]
pub struct MalformedItem {
    pub kind: &'static str,
    pub attribute: &'static str,
}

fn required<T>(kind: &'static str, attribute: &'static str, value: Option<T>) -> Result<T, MalformedItem> {
    value.ok_or(MalformedItem { kind, attribute })
}

pub fn account_from_item(item: &Item) -> Result<Account, MalformedItem> {
    const KIND: &str = "account";
    let Some(cash) = number(item, "cash") else {
        // Only a lease so far: the first deposit has not committed.
        let version = number(item, "version").and_then(|raw| raw.parse().ok()).unwrap_or(0);
        return Ok(Account {
            version,
            ..Account::default()
        });
    };
    let usd = |attribute: &'static str| -> Result<Usd, MalformedItem> {
        required(KIND, attribute, number(item, attribute).and_then(Usd::from_stored))
    };
    let version = required(
        KIND,
        "version",
        number(item, "version").and_then(|raw| raw.parse().ok()),
    )?;
    let mut holdings = BTreeMap::new();
    if let Some(Value::M(stored)) = item.get("holdings") {
        for (symbol, quantity) in stored {
            let Value::N(quantity) = quantity else {
                return Err(MalformedItem {
                    kind: KIND,
                    attribute: "holdings",
                });
            };
            let symbol = required(KIND, "holdings", AssetSymbol::parse("holdings", symbol).ok())?;
            let quantity = required(KIND, "holdings", Quantity::from_stored(quantity))?;
            holdings.insert(symbol, quantity);
        }
    }
    let holds = match item.get("holds") {
        None => Holds::new(),
        Some(value) => required(KIND, "holds", holds_from_value(value))?,
    };
    let withdrawals = match item.get("withdrawals") {
        None => PendingWithdrawals::new(),
        Some(value) => required(KIND, "withdrawals", withdrawals_from_value(value))?,
    };
    Ok(Account {
        holds,
        withdrawals,
        state: AccountState::Open,
        cash: required(KIND, "cash", Usd::from_stored(cash))?,
        holdings,
        limit_day: match string(item, "limit_day") {
            None | Some("") => None,
            Some(raw) => Some(required(KIND, "limit_day", UtcDay::from_stored(raw))?),
        },
        deposited_today: usd("deposited_today")?,
        withdrawn_today: usd("withdrawn_today")?,
        // Accounts written before transfers existed have none: nothing was sent.
        transferred_today: match number(item, "transferred_today") {
            None => Usd::ZERO,
            Some(_) => usd("transferred_today")?,
        },
        version,
        entries: number(item, "entries").and_then(|raw| raw.parse().ok()).unwrap_or(0),
        legacy_through: number(item, "legacy_through")
            .and_then(|raw| raw.parse().ok())
            .unwrap_or(0),
        // `entries_at` is the version whose write last counted the entries: any other write
        // since (by a coordinator that predates sequences) may have added an entry it did not
        // number.
        needs_numbering: number(item, "entries_at").and_then(|raw| raw.parse::<u64>().ok()) != Some(version),
    })
}

/// The account's holds as stored: a map by order id of each hold's figures.
fn holds_value(holds: &Holds) -> Value {
    Value::M(
        holds
            .iter()
            .map(|(order_id, hold)| {
                let stored: Item = [
                    ("side", s(hold.side.as_str())),
                    ("asset", s(hold.asset.as_str())),
                    ("quantity", n(hold.quantity)),
                    ("limit", n(hold.limit)),
                    ("filled", n(hold.filled)),
                    ("filled_value", n(hold.filled_value)),
                    ("moved", n(hold.moved)),
                    ("expires_at_ms", n(hold.expires_at_ms)),
                    ("created_at_ms", n(hold.created_at_ms)),
                    ("principal", s(hold.principal.as_str())),
                ]
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect();
                (order_id.as_str().to_owned(), Value::M(stored))
            })
            .collect(),
    )
}

/// The account's pending withdrawals as stored: a map by withdrawal id.
fn withdrawals_value(withdrawals: &PendingWithdrawals) -> Value {
    Value::M(
        withdrawals
            .iter()
            .map(|(id, pending)| {
                let stored: Item = [
                    ("amount", n(pending.amount)),
                    ("day", s(pending.day.to_string())),
                    ("created_at_ms", n(pending.created_at_ms)),
                    ("principal", s(pending.principal.as_str())),
                ]
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value))
                .collect();
                (id.as_str().to_owned(), Value::M(stored))
            })
            .collect(),
    )
}

fn withdrawals_from_value(value: &Value) -> Option<PendingWithdrawals> {
    let Value::M(stored) = value else { return None };
    stored
        .iter()
        .map(|(id, pending)| {
            let Value::M(pending) = pending else { return None };
            Some((
                WithdrawalId::from_stored(id.as_str()),
                PendingWithdrawal {
                    amount: Usd::from_stored(number(pending, "amount")?)?,
                    day: UtcDay::from_stored(string(pending, "day")?)?,
                    created_at_ms: number(pending, "created_at_ms")?.parse().ok()?,
                    principal: Principal::parse("principal", string(pending, "principal")?).ok()?,
                },
            ))
        })
        .collect()
}

fn holds_from_value(value: &Value) -> Option<Holds> {
    let Value::M(stored) = value else { return None };
    stored
        .iter()
        .map(|(order_id, hold)| {
            let Value::M(hold) = hold else { return None };
            let hold = Hold {
                side: match string(hold, "side")? {
                    "BUY" => TradeSide::Buy,
                    "SELL" => TradeSide::Sell,
                    _ => return None,
                },
                asset: AssetSymbol::parse("asset", string(hold, "asset")?).ok()?,
                quantity: Quantity::from_stored(number(hold, "quantity")?)?,
                limit: Price::from_stored(number(hold, "limit")?)?,
                filled: Quantity::from_stored(number(hold, "filled")?)?,
                filled_value: number(hold, "filled_value")?.parse().ok()?,
                moved: Usd::from_stored(number(hold, "moved")?)?,
                expires_at_ms: number(hold, "expires_at_ms")?.parse().ok()?,
                created_at_ms: number(hold, "created_at_ms")?.parse().ok()?,
                principal: Principal::parse("principal", string(hold, "principal")?).ok()?,
            };
            (hold.filled <= hold.quantity).then(|| (OrderId::from_stored(order_id.as_str()), hold))
        })
        .collect()
}

fn ledger_item(entry: &LedgerEntry) -> Item {
    assert!(entry.sequence > 0, "every entry written has its sequence");
    let mut item = key_attributes(&entry_key(&entry.user_id, entry.sequence));
    item.insert("entry_id".to_owned(), s(entry.entry_id.as_str()));
    item.insert("user_id".to_owned(), s(entry.user_id.as_str()));
    item.insert("kind".to_owned(), s(entry.kind.as_str()));
    item.insert("cash_delta".to_owned(), n(entry.cash_delta));
    item.insert("cash_after".to_owned(), n(entry.cash_after));
    item.insert("created_at_ms".to_owned(), n(entry.created_at_ms));
    item.insert("sequence".to_owned(), n(entry.sequence));
    item.insert("principal".to_owned(), s(entry.principal.as_str()));
    if let Some(request_id) = &entry.request_id {
        item.insert("request_id".to_owned(), s(request_id));
    }
    if let Some(trade) = &entry.trade {
        item.insert("asset".to_owned(), s(trade.asset.as_str()));
        item.insert("quantity_delta".to_owned(), n(trade.quantity_delta));
        item.insert("order_id".to_owned(), s(trade.order_id.as_str()));
        if let Some(holding) = trade.holding_after {
            item.insert("holding_after".to_owned(), n(holding));
        }
    }
    if let Some(hold) = &entry.hold {
        if let Some(order_id) = &hold.order_id {
            item.insert("hold_order_id".to_owned(), s(order_id.as_str()));
        }
        if let Some(withdrawal_id) = &hold.withdrawal_id {
            item.insert("hold_withdrawal_id".to_owned(), s(withdrawal_id.as_str()));
        }
        item.insert("held_delta".to_owned(), n(hold.held_delta));
        if let Some(asset) = &hold.asset {
            item.insert("held_asset".to_owned(), s(asset.as_str()));
        }
        if let Some(fill_id) = &hold.fill_id {
            item.insert("fill_id".to_owned(), s(fill_id));
        }
    }
    if let Some(transfer) = &entry.transfer {
        item.insert("transfer_id".to_owned(), s(transfer.transfer_id.as_str()));
        item.insert("counterparty".to_owned(), s(transfer.counterparty.as_str()));
        if !transfer.memo.is_empty() {
            item.insert("memo".to_owned(), s(transfer.memo.as_str()));
        }
    }
    item
}

pub fn ledger_from_item(item: &Item) -> Result<LedgerEntry, MalformedItem> {
    const KIND: &str = "ledger";
    let decimal = |attribute: &'static str| -> Result<Decimal, MalformedItem> {
        required(
            KIND,
            attribute,
            number(item, attribute).and_then(|raw| raw.parse().ok()),
        )
    };
    let trade = match string(item, "asset") {
        Some(asset) => Some(LedgerTrade {
            asset: required(KIND, "asset", AssetSymbol::parse("asset", asset).ok())?,
            quantity_delta: decimal("quantity_delta")?,
            order_id: OrderId::from_stored(string(item, "order_id").unwrap_or_default()),
            holding_after: number(item, "holding_after").and_then(Quantity::from_stored),
        }),
        None => None,
    };
    let transfer = match string(item, "transfer_id") {
        Some(transfer_id) => Some(LedgerTransfer {
            transfer_id: TransferId::from_stored(transfer_id),
            counterparty: required(
                KIND,
                "counterparty",
                string(item, "counterparty").and_then(|raw| UserId::parse("counterparty", raw).ok()),
            )?,
            memo: Memo::from_stored(string(item, "memo").unwrap_or_default()),
        }),
        None => None,
    };
    let hold_order = string(item, "hold_order_id");
    let hold_withdrawal = string(item, "hold_withdrawal_id");
    let hold = match hold_order.or(hold_withdrawal) {
        Some(_) => Some(LedgerHold {
            order_id: hold_order.map(OrderId::from_stored),
            withdrawal_id: hold_withdrawal.map(WithdrawalId::from_stored),
            fill_id: string(item, "fill_id").map(str::to_owned),
            asset: match string(item, "held_asset") {
                Some(asset) => Some(required(KIND, "held_asset", AssetSymbol::parse("asset", asset).ok())?),
                None => None,
            },
            // Cash amounts read with their cents, as they were written.
            held_delta: match string(item, "held_asset") {
                Some(_) => decimal("held_delta")?,
                None => {
                    let mut cents = decimal("held_delta")?;
                    cents.rescale(crate::core::money::USD_SCALE);
                    cents
                }
            },
        }),
        None => None,
    };
    Ok(LedgerEntry {
        hold,
        entry_id: EntryId::from_stored(required(KIND, "entry_id", string(item, "entry_id"))?),
        user_id: required(
            KIND,
            "user_id",
            string(item, "user_id").and_then(|raw| UserId::parse("user_id", raw).ok()),
        )?,
        kind: required(KIND, "kind", string(item, "kind").and_then(EntryKind::parse))?,
        cash_delta: required(
            KIND,
            "cash_delta",
            number(item, "cash_delta").and_then(UsdDelta::from_stored),
        )?,
        cash_after: Usd::from_decimal(decimal("cash_after")?),
        trade,
        transfer,
        created_at_ms: required(
            KIND,
            "created_at_ms",
            number(item, "created_at_ms").and_then(|raw| raw.parse().ok()),
        )?,
        request_id: string(item, "request_id").map(str::to_owned),
        sequence: number(item, "sequence").and_then(|raw| raw.parse().ok()).unwrap_or(0),
        principal: principal_of(item, KIND)?,
    })
}

fn order_item(order: &Order, key: Key) -> Item {
    let mut item = key_attributes(&key);
    item.insert("order_id".to_owned(), s(order.order_id.as_str()));
    item.insert("user_id".to_owned(), s(order.user_id.as_str()));
    item.insert("side".to_owned(), s(order.side.as_str()));
    item.insert("asset".to_owned(), s(order.asset.as_str()));
    item.insert("quantity".to_owned(), n(order.quantity));
    item.insert("status".to_owned(), s(order.status.as_str()));
    item.insert("price".to_owned(), n(order.price));
    item.insert("total".to_owned(), n(order.total));
    item.insert("created_at_ms".to_owned(), n(order.created_at_ms));
    item.insert("principal".to_owned(), s(order.principal.as_str()));
    if let Some(limit) = order.limit_price {
        item.insert("limit_price".to_owned(), n(limit));
    }
    if let Some(reason) = &order.failure_reason {
        item.insert("failure_reason".to_owned(), s(reason));
    }
    if let Some(expires_at) = order.expires_at_ms {
        item.insert("filled_quantity".to_owned(), n(order.filled_quantity));
        item.insert("expires_at_ms".to_owned(), n(expires_at));
    }
    item
}

pub fn order_from_item(item: &Item) -> Result<Order, MalformedItem> {
    const KIND: &str = "order";
    let status = required(KIND, "status", string(item, "status").and_then(OrderStatus::parse))?;
    let quantity = required(
        KIND,
        "quantity",
        number(item, "quantity").and_then(Quantity::from_stored),
    )?;
    Ok(Order {
        // Orders executed at once (PlaceBuy, PlaceSell) keep no fill count: all or nothing.
        filled_quantity: match number(item, "filled_quantity") {
            Some(raw) => required(KIND, "filled_quantity", Quantity::from_stored(raw))?,
            None if status == OrderStatus::Confirmed => quantity,
            None => Quantity::ZERO,
        },
        expires_at_ms: number(item, "expires_at_ms").and_then(|raw| raw.parse().ok()),
        order_id: OrderId::from_stored(required(KIND, "order_id", string(item, "order_id"))?),
        user_id: required(
            KIND,
            "user_id",
            string(item, "user_id").and_then(|raw| UserId::parse("user_id", raw).ok()),
        )?,
        side: match string(item, "side") {
            Some("BUY") => TradeSide::Buy,
            Some("SELL") => TradeSide::Sell,
            _ => {
                return Err(MalformedItem {
                    kind: KIND,
                    attribute: "side",
                });
            }
        },
        asset: required(
            KIND,
            "asset",
            string(item, "asset").and_then(|raw| AssetSymbol::parse("asset", raw).ok()),
        )?,
        quantity,
        limit_price: number(item, "limit_price").and_then(Price::from_stored),
        status,
        price: required(KIND, "price", number(item, "price").and_then(Price::from_stored))?,
        total: required(KIND, "total", number(item, "total").and_then(Usd::from_stored))?,
        failure_reason: string(item, "failure_reason").map(str::to_owned),
        created_at_ms: required(
            KIND,
            "created_at_ms",
            number(item, "created_at_ms").and_then(|raw| raw.parse().ok()),
        )?,
        principal: principal_of(item, KIND)?,
    })
}

/// The `principal` attribute of a ledger entry or order. Items written before principals were
/// recorded have none; they were written without authentication, so they read as `local`.
fn principal_of(item: &Item, kind: &'static str) -> Result<Principal, MalformedItem> {
    match string(item, "principal") {
        None => Ok(Principal::local()),
        Some(raw) => required(kind, "principal", Principal::parse("principal", raw).ok()),
    }
}

// ---------------------------------------------------------------------------------------------
// Asset catalog

/// Writes an asset. With `only_if_new`, an existing asset is left as it is: seeding the
/// catalog at start never overwrites what an admin changed.
pub fn put_asset(asset: &Asset, only_if_new: bool) -> Put {
    let mut item = key_attributes(&asset_key(&asset.symbol));
    item.insert("symbol".to_owned(), s(asset.symbol.as_str()));
    item.insert("price".to_owned(), n(asset.price));
    item.insert("active".to_owned(), Value::Bool(asset.active));
    if only_if_new {
        put_new(item)
    } else {
        Put {
            item,
            condition: None,
            bindings: Bindings::default(),
        }
    }
}

/// Puts of every copy of `asset`'s price (`PRICE_COPIES` of them).
pub fn put_price_copies(asset: &Asset) -> Vec<Put> {
    (0..PRICE_COPIES)
        .map(|copy| {
            let mut item = key_attributes(&price_copy_key_at(&asset.symbol, copy));
            item.insert("symbol".to_owned(), s(asset.symbol.as_str()));
            item.insert("price".to_owned(), n(asset.price));
            item.insert("active".to_owned(), Value::Bool(asset.active));
            Put {
                item,
                condition: None,
                bindings: Bindings::default(),
            }
        })
        .collect()
}

/// The catalog item of `asset` and every copy of its price, for one transaction: what a trade
/// checks changes everywhere at once or nowhere.
pub fn put_asset_everywhere(asset: &Asset, old: Option<&Asset>) -> Vec<TransactItem> {
    let mut catalog_item = put_asset_if_unchanged(asset, old);
    catalog_item
        .item
        .insert(PRICE_COPIES_ATTRIBUTE.to_owned(), n(PRICE_COPIES));
    std::iter::once(catalog_item)
        .chain(put_price_copies(asset))
        .map(TransactItem::Put)
        .collect()
}

/// On a catalog item: how many price copies were written with it. A catalog written before the
/// copies existed (or written by an older version) lacks it, and a coordinator writes them
/// ([`repair_price_copies`]).
const PRICE_COPIES_ATTRIBUTE: &str = "price_copies";

/// Whether the catalog item's price copies are known to exist.
pub fn has_price_copies(item: &Item) -> bool {
    number(item, PRICE_COPIES_ATTRIBUTE).and_then(|raw| raw.parse::<u32>().ok()) == Some(PRICE_COPIES)
}

/// Writes every copy of `asset`'s price from its catalog item, and marks the item, in one
/// transaction conditioned on the item still holding that price and flag (an UpsertAsset in
/// between wrote its own copies and the mark; this then does nothing).
pub fn repair_price_copies(asset: &Asset) -> Vec<TransactItem> {
    let mark = Update {
        key: asset_key(&asset.symbol),
        update: "SET #copies = :copies".to_owned(),
        condition: Some("#price = :price AND #active = :active".to_owned()),
        bindings: bindings(
            [
                ("#copies", PRICE_COPIES_ATTRIBUTE),
                ("#price", "price"),
                ("#active", "active"),
            ],
            [
                (":copies", n(PRICE_COPIES)),
                (":price", n(asset.price)),
                (":active", Value::Bool(asset.active)),
            ],
        ),
        return_new: false,
        return_old_on_condition_failure: false,
    };
    std::iter::once(TransactItem::Update(mark))
        .chain(put_price_copies(asset).into_iter().map(TransactItem::Put))
        .collect()
}

pub fn asset_from_item(item: &Item) -> Result<Asset, MalformedItem> {
    const KIND: &str = "asset";
    Ok(Asset {
        symbol: required(
            KIND,
            "symbol",
            string(item, "symbol").and_then(|raw| AssetSymbol::parse("symbol", raw).ok()),
        )?,
        price: required(KIND, "price", number(item, "price").and_then(Price::from_stored))?,
        active: matches!(item.get("active"), Some(Value::Bool(true))),
    })
}

/// Writes an asset on behalf of UpsertAsset, only if it is still as `old` was read (or still
/// absent): a concurrent change makes the transaction fail, and the caller checks the bound
/// again against what is stored then.
pub fn put_asset_if_unchanged(asset: &Asset, old: Option<&Asset>) -> Put {
    let Some(old) = old else {
        return put_asset(asset, true);
    };
    let mut put = put_asset(asset, false);
    put.condition = Some("#price = :old_price AND #active = :old_active".to_owned());
    put.bindings = bindings(
        [("#price", "price"), ("#active", "active")],
        [(":old_price", n(old.price)), (":old_active", Value::Bool(old.active))],
    );
    put
}

const ASSET_CHANGE_PREFIX: &str = "ASSET_CHANGE#";

pub fn asset_change_key(symbol: &AssetSymbol, change_id: &str) -> Key {
    Key {
        pk: format!("{ASSET_CHANGE_PREFIX}{symbol}"),
        sk: change_id.to_owned(),
    }
}

/// One kept change of the catalog; never overwritten.
pub fn put_asset_change(change: &AssetChange) -> Put {
    let mut item = key_attributes(&asset_change_key(&change.symbol, &change.change_id));
    item.insert("change_id".to_owned(), s(&change.change_id));
    item.insert("symbol".to_owned(), s(change.symbol.as_str()));
    item.insert("principal".to_owned(), s(change.principal.as_str()));
    item.insert("changed_at_ms".to_owned(), n(change.changed_at_ms));
    item.insert("new_price".to_owned(), n(change.new.price));
    item.insert("new_active".to_owned(), Value::Bool(change.new.active));
    item.insert("forced".to_owned(), Value::Bool(change.forced));
    if let Some(old) = &change.old {
        item.insert("old_price".to_owned(), n(old.price));
        item.insert("old_active".to_owned(), Value::Bool(old.active));
    }
    put_new(item)
}

pub fn asset_change_from_item(item: &Item) -> Result<AssetChange, MalformedItem> {
    const KIND: &str = "asset change";
    let symbol = required(
        KIND,
        "symbol",
        string(item, "symbol").and_then(|raw| AssetSymbol::parse("symbol", raw).ok()),
    )?;
    let old = match number(item, "old_price") {
        Some(raw) => Some(Asset {
            symbol: symbol.clone(),
            price: required(KIND, "old_price", Price::from_stored(raw))?,
            active: matches!(item.get("old_active"), Some(Value::Bool(true))),
        }),
        None => None,
    };
    Ok(AssetChange {
        change_id: required(KIND, "change_id", string(item, "change_id"))?.to_owned(),
        principal: required(
            KIND,
            "principal",
            string(item, "principal").and_then(|raw| Principal::parse("principal", raw).ok()),
        )?,
        changed_at_ms: required(
            KIND,
            "changed_at_ms",
            number(item, "changed_at_ms").and_then(|raw| raw.parse().ok()),
        )?,
        new: Asset {
            symbol: symbol.clone(),
            price: required(
                KIND,
                "new_price",
                number(item, "new_price").and_then(Price::from_stored),
            )?,
            active: matches!(item.get("new_active"), Some(Value::Bool(true))),
        },
        symbol,
        old,
        forced: matches!(item.get("forced"), Some(Value::Bool(true))),
    })
}

/// Newest first; `after_change_id` is the last change id of the previous page.
pub fn asset_changes_query(symbol: &AssetSymbol, limit: u32, after_change_id: Option<String>) -> Query {
    let pk = format!("{ASSET_CHANGE_PREFIX}{symbol}");
    Query {
        start_after: after_change_id.map(|sk| Key { pk: pk.clone(), sk }),
        pk,
        sk_prefix: String::new(),
        newest_first: true,
        limit,
    }
}

/// Largest page of the asset catalog read at once; the catalog is a handful of assets.
pub const ASSET_PAGE_SIZE: u32 = 100;

pub fn assets_query(start_after: Option<Key>) -> Query {
    Query {
        pk: ASSET_PK.to_owned(),
        sk_prefix: String::new(),
        newest_first: false,
        limit: ASSET_PAGE_SIZE,
        start_after,
    }
}

// ---------------------------------------------------------------------------------------------
// What a stored item is

/// An item's record, or why the item does not have the shape Lockstep writes.
pub type Parsed<T> = Result<T, MalformedItem>;

/// One stored item, named by its key: the single place that decides what an item is, for
/// everything that reads the whole table (the audit, the sweeper, the tests). `key` is the key
/// as stored; `user` is the user id as it stands in the partition key.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredItem {
    /// The account, with the lease it carries (read even when the account itself is malformed:
    /// a lease is released by its id alone).
    Account {
        key: Key,
        user: String,
        account: Parsed<Account>,
        lease: Option<Lease>,
    },
    LedgerEntry {
        key: Key,
        user: String,
        entry: Parsed<LedgerEntry>,
    },
    /// An order under its user, for ListOrders.
    OrderByUser {
        key: Key,
        user: String,
        order: Parsed<Order>,
    },
    /// The same order under its id, for GetOrder.
    OrderById {
        key: Key,
        order: Parsed<Order>,
    },
    RequestRecord {
        key: Key,
        user: String,
        record: Parsed<RequestRecord>,
    },
    /// A withdrawal made with settlement PENDING, under its user.
    Withdrawal {
        key: Key,
        user: String,
        withdrawal: Parsed<Withdrawal>,
    },
    Asset {
        key: Key,
        asset: Parsed<Asset>,
    },
    /// A copy of an asset's price, checked by trade commits.
    PriceCopy {
        key: Key,
        asset: Parsed<Asset>,
    },
    /// A kept change of an asset (UpsertAsset's history).
    AssetChange {
        key: Key,
        change: Parsed<AssetChange>,
    },
    /// A named coordinator instance's heartbeat (None if malformed).
    InstanceHeartbeat {
        key: Key,
        heartbeat: Option<Heartbeat>,
    },
    /// A coordinator's announcement as a member of the table (None if malformed).
    Member {
        key: Key,
        member: Option<Member>,
    },
    /// A record of the feed's journal (a copy of entries kept in the ledger) and when it expires.
    FeedRecord {
        key: Key,
        record: Parsed<FeedRecord>,
        expires_at_seconds: Option<u64>,
    },
    /// The sweeper lease: which coordinator sweeps, until when.
    SweeperLease {
        key: Key,
    },
    /// A key outside the model, or no string key at all: not an item Lockstep writes.
    Foreign {
        key: Option<Key>,
    },
}

/// Names a stored item by its key and parses it into its record.
pub fn classify(item: &Item) -> StoredItem {
    let (Some(pk), Some(sk)) = (string(item, "pk"), string(item, "sk")) else {
        return StoredItem::Foreign { key: None };
    };
    let key = Key {
        pk: pk.to_owned(),
        sk: sk.to_owned(),
    };
    if let Some(user) = pk.strip_prefix(USER_PREFIX) {
        let user = user.to_owned();
        if sk == ACCOUNT_SK {
            return StoredItem::Account {
                key,
                user,
                account: account_from_item(item),
                lease: lease_from_item(item),
            };
        }
        if sk.starts_with(LEDGER_PREFIX) {
            return StoredItem::LedgerEntry {
                key,
                user,
                entry: ledger_from_item(item),
            };
        }
        if sk.starts_with(ORDER_PREFIX) {
            return StoredItem::OrderByUser {
                key,
                user,
                order: order_from_item(item),
            };
        }
        if sk.starts_with(WITHDRAWAL_PREFIX) {
            return StoredItem::Withdrawal {
                key,
                user,
                withdrawal: withdrawal_from_item(item),
            };
        }
        if sk.starts_with(REQUEST_PREFIX) {
            return StoredItem::RequestRecord {
                key,
                user,
                record: request_record_from_item(item),
            };
        }
    } else if pk.starts_with(ORDER_PREFIX) && sk == ORDER_SK {
        return StoredItem::OrderById {
            key,
            order: order_from_item(item),
        };
    } else if pk.starts_with(ASSET_CHANGE_PREFIX) {
        return StoredItem::AssetChange {
            key,
            change: asset_change_from_item(item),
        };
    } else if pk == ASSET_PK {
        return StoredItem::Asset {
            key,
            asset: asset_from_item(item),
        };
    } else if pk.starts_with(PRICE_COPY_PREFIX) && sk == PRICE_COPY_SK {
        return StoredItem::PriceCopy {
            key,
            asset: asset_from_item(item),
        };
    } else if pk == MEMBERS_PK {
        return StoredItem::Member {
            key,
            member: member_from_item(item),
        };
    } else if pk == SWEEPER_PK && sk == SWEEPER_SK {
        return StoredItem::SweeperLease { key };
    } else if pk.starts_with(FEED_PREFIX) {
        return StoredItem::FeedRecord {
            key,
            record: feed_record_from_item(item),
            expires_at_seconds: number(item, TTL_ATTRIBUTE).and_then(|raw| raw.parse().ok()),
        };
    } else if pk.starts_with(INSTANCE_PREFIX) && sk == HEARTBEAT_SK {
        return StoredItem::InstanceHeartbeat {
            key,
            heartbeat: heartbeat_from_item(item),
        };
    }
    StoredItem::Foreign { key: Some(key) }
}

// ---------------------------------------------------------------------------------------------
// Numbering the entries written before sequences

/// Entries one numbering transaction renumbers at most: DynamoDB's 100 items, less the
/// account's fenced update.
pub const NUMBERED_PER_TRANSACTION: usize = 99;

/// A page (ascending) of `user`'s entries written before sequences.
pub fn unsequenced_entries(user: &UserId, start_after: Option<Key>) -> Query {
    Query {
        pk: user_pk(user),
        sk_prefix: UNSEQUENCED_PREFIX.to_owned(),
        newest_first: false,
        limit: super::SCAN_PAGE_SIZE,
        start_after,
    }
}

/// An entry written before sequences as numbering reads it: its key, the sequence it was
/// written with (the account's version then, which orders the entries but has gaps), and
/// whether a numbering already gave it its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsequencedEntry {
    pub key: Key,
    pub written_sequence: u64,
    pub numbered: bool,
}

pub fn unsequenced_entry_from_item(item: &Item) -> Result<UnsequencedEntry, MalformedItem> {
    const KIND: &str = "ledger";
    let key = Key {
        pk: required(KIND, "pk", string(item, "pk"))?.to_owned(),
        sk: required(KIND, "sk", string(item, "sk"))?.to_owned(),
    };
    let numbered_from = number(item, "written_sequence").and_then(|raw| raw.parse().ok());
    // The oldest entries carry no sequence at all: they come first (0), in the order of their
    // ids (UUID v7, by creation time), as the sort key orders them.
    let written_sequence = numbered_from
        .or_else(|| number(item, "sequence").and_then(|raw| raw.parse().ok()))
        .unwrap_or(0);
    Ok(UnsequencedEntry {
        key,
        written_sequence,
        numbered: numbered_from.is_some(),
    })
}

/// One step of numbering `user`'s unsequenced entries under the lease `lock_id`: each entry
/// gets its place (`sequence`), keeping the one it was written with as `written_sequence`, and
/// the account's `entries` becomes `entries` (the last place given), all in one transaction
/// fenced on the lease and on the version read with it.
///
/// `legacy_through` becomes the last place given too (readers after it need not look at the
/// entries keyed by id), and the step keeps the lease until `extend_until`.
#[allow(clippy::too_many_arguments)]
pub fn number_entries(
    user: &UserId,
    lock_id: &LeaseId,
    read_version: u64,
    places: &[(Key, u64, u64)],
    entries: u64,
    extend_until: Millis,
    now: Millis,
) -> Vec<TransactItem> {
    assert!(
        places.len() <= NUMBERED_PER_TRANSACTION,
        "a numbering step fits one transaction"
    );
    let account = Update {
        key: account_key(user),
        update: "SET entries = :entries, legacy_through = :entries, lock_expires_at_ms = :until".to_owned(),
        condition: Some("lock_id = :lock AND lock_expires_at_ms > :now AND version = :version".to_owned()),
        bindings: bindings(
            [],
            [
                (":lock", s(lock_id.as_str())),
                (":now", n(now)),
                (":version", n(read_version)),
                (":entries", n(entries)),
                (":until", n(extend_until)),
            ],
        ),
        return_new: false,
        return_old_on_condition_failure: false,
    };
    let mut items = vec![TransactItem::Update(account)];
    for (key, written, place) in places {
        items.push(TransactItem::Update(Update {
            key: key.clone(),
            update: "SET #sequence = :place, written_sequence = :written".to_owned(),
            condition: Some("attribute_not_exists(written_sequence)".to_owned()),
            bindings: bindings(
                [("#sequence", "sequence")],
                [(":place", n(place)), (":written", n(written))],
            ),
            return_new: false,
            return_old_on_condition_failure: false,
        }));
    }
    items
}

/// A page (ascending) of `user`'s sequenced entries after `after`.
pub fn sequenced_entries_after(user: &UserId, after: u64, limit: u32) -> Query {
    Query {
        pk: user_pk(user),
        sk_prefix: SEQUENCED_PREFIX.to_owned(),
        newest_first: false,
        limit,
        start_after: Some(entry_key(user, after)),
    }
}

/// The feed partition of `user`'s records: FNV-1a of the id, so every coordinator (of any
/// build) puts an account in the same one.
pub fn feed_shard(user: &UserId) -> usize {
    let hash = user.as_str().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % FEED_SHARDS as u64) as usize
}

/// A position in a feed partition: the sort key of a record at `at` (records after it follow).
/// Positions compare as the records' times do (15 digits of milliseconds).
pub fn feed_position(at: Millis, user: &str, first_sequence: u64) -> String {
    format!("{at:015}#{user}#{first_sequence:020}")
}

/// The time of a feed position (None if it is not one): `{15 digits}#`, then nothing, `~`
/// (past every record of that millisecond), or `{user id}#{20 digits}` (a record's key).
pub fn feed_position_time(position: &str) -> Option<Millis> {
    let (at, rest) = position.split_once('#')?;
    let digits = |text: &str, count: usize| text.len() == count && text.bytes().all(|byte| byte.is_ascii_digit());
    if !digits(at, 15) {
        return None;
    }
    let well_formed = rest.is_empty()
        || rest == "~"
        || rest
            .split_once('#')
            .is_some_and(|(user, first)| UserId::parse("user_id", user).is_ok() && digits(first, 20));
    well_formed.then(|| at.parse().ok()).flatten()
}

/// One account's entries of one commit, as the feed's journal keeps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRecord {
    /// Its partition and position (the sort key).
    pub shard: usize,
    pub position: String,
    pub at: Millis,
    pub user: UserId,
    /// In sequence order, consecutive.
    pub entries: Vec<LedgerEntry>,
}

/// The journal's record of `entries` (one account's, consecutive, in order) committed at `at`,
/// deleted after `expires_at_seconds`. Written in the commit's own transaction (and again, at a
/// later time, when that transaction was acknowledged late: `service::feed`).
pub fn feed_item(entries: &[LedgerEntry], at: Millis, expires_at_seconds: u64) -> Item {
    let first = entries.first().expect("a feed record has entries");
    assert!(
        entries
            .iter()
            .map(|entry| (entry.user_id.as_str(), entry.sequence))
            .eq((first.sequence..)
                .take(entries.len())
                .map(|sequence| (first.user_id.as_str(), sequence))),
        "a feed record holds one account's consecutive entries"
    );
    let user = &first.user_id;
    let mut item = key_attributes(&Key {
        pk: format!("{FEED_PREFIX}{:02}", feed_shard(user)),
        sk: feed_position(at, user.as_str(), first.sequence),
    });
    item.insert("user_id".to_owned(), s(user.as_str()));
    item.insert("at_ms".to_owned(), n(at));
    let stored = entries
        .iter()
        .map(|entry| {
            let mut stored = ledger_item(entry);
            stored.remove("pk");
            stored.remove("sk");
            (format!("{:020}", entry.sequence), Value::M(stored))
        })
        .collect();
    item.insert("entries".to_owned(), Value::M(stored));
    item.insert(TTL_ATTRIBUTE.to_owned(), n(expires_at_seconds));
    item
}

/// The same record at a later time `at`: a commit acknowledged after the feed's horizon is
/// recorded again where readers that passed its first time still find it.
pub fn feed_item_again(item: &Item, at: Millis) -> Option<Item> {
    let record = feed_record_from_item(item).ok()?;
    let kept_for = number(item, TTL_ATTRIBUTE)?
        .parse::<u64>()
        .ok()?
        .saturating_sub(epoch_seconds(record.at));
    // Kept as long after its new time as the first was after its own.
    Some(feed_item(&record.entries, at, epoch_seconds(at) + kept_for))
}

pub fn feed_record_from_item(item: &Item) -> Result<FeedRecord, MalformedItem> {
    const KIND: &str = "feed record";
    let shard = string(item, "pk")
        .and_then(|pk| pk.strip_prefix(FEED_PREFIX))
        .and_then(|shard| shard.parse().ok())
        .filter(|shard| *shard < FEED_SHARDS);
    let entries = match item.get("entries") {
        Some(Value::M(stored)) => stored
            .values()
            .map(|stored| match stored {
                Value::M(entry) => ledger_from_item(entry),
                _ => Err(MalformedItem {
                    kind: KIND,
                    attribute: "entries",
                }),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => {
            return Err(MalformedItem {
                kind: KIND,
                attribute: "entries",
            });
        }
    };
    let user = required(
        KIND,
        "user_id",
        string(item, "user_id").and_then(|raw| UserId::parse("user_id", raw).ok()),
    )?;
    if entries.is_empty() || entries.iter().any(|entry| entry.user_id != user) {
        return Err(MalformedItem {
            kind: KIND,
            attribute: "entries",
        });
    }
    Ok(FeedRecord {
        shard: required(KIND, "pk", shard)?,
        position: required(KIND, "sk", string(item, "sk").map(str::to_owned))?,
        at: required(KIND, "at_ms", number(item, "at_ms").and_then(|raw| raw.parse().ok()))?,
        user,
        entries,
    })
}

/// A page (ascending) of feed partition `shard`'s records after `position` (empty: from the
/// first).
pub fn feed_records_after(shard: usize, position: &str, limit: u32) -> Query {
    let pk = format!("{FEED_PREFIX}{shard:02}");
    Query {
        start_after: (!position.is_empty()).then(|| Key {
            pk: pk.clone(),
            sk: position.to_owned(),
        }),
        pk,
        sk_prefix: String::new(),
        newest_first: false,
        limit,
    }
}

/// Whether a ledger item is keyed by its sequence (the unsequenced ones are keyed by their id
/// and carry their place, once numbered, as an attribute).
pub fn is_sequenced(item: &Item) -> bool {
    string(item, "sk").is_some_and(|sk| sk.starts_with(SEQUENCED_PREFIX))
}

// ---------------------------------------------------------------------------------------------
// Pages of a user's ledger and orders

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserCollection {
    Ledger,
    Orders,
}

impl UserCollection {
    fn prefix(self) -> &'static str {
        match self {
            UserCollection::Ledger => LEDGER_PREFIX,
            UserCollection::Orders => ORDER_PREFIX,
        }
    }
}

/// Newest first. `after_sort_key` is the sort key of the last item of the previous page, taken
/// from the caller's cursor; it must belong to the same collection.
pub fn user_page_query(
    user: &UserId,
    collection: UserCollection,
    limit: u32,
    after_sort_key: Option<String>,
) -> Option<Query> {
    let prefix = collection.prefix();
    if after_sort_key
        .as_ref()
        .is_some_and(|sort_key| !sort_key.starts_with(prefix))
    {
        return None;
    }
    Some(Query {
        pk: user_pk(user),
        sk_prefix: prefix.to_owned(),
        newest_first: true,
        limit,
        start_after: after_sort_key.map(|sk| Key { pk: user_pk(user), sk }),
    })
}

// ---------------------------------------------------------------------------------------------
// The sweeper lease

const SWEEPER_PK: &str = "SWEEPER";
const SWEEPER_SK: &str = "LEASE";

/// The one item that says which coordinator runs the sweeper, so that one scans the table per
/// interval instead of every coordinator.
pub fn sweeper_lease_key() -> Key {
    Key {
        pk: SWEEPER_PK.to_owned(),
        sk: SWEEPER_SK.to_owned(),
    }
}

/// Takes (or keeps) the sweeper lease for `owner` until `expires_at`: if nobody holds it, it is
/// `owner`'s already, or its holder let it expire by `now`.
pub fn take_sweeper_lease(owner: &str, expires_at: Millis, now: Millis) -> Update {
    Update {
        key: sweeper_lease_key(),
        update: "SET sweeper_owner = :me, sweeper_expires_at_ms = :expires".to_owned(),
        condition: Some(
            "attribute_not_exists(sweeper_owner) OR sweeper_owner = :me OR sweeper_expires_at_ms <= :now".to_owned(),
        ),
        bindings: bindings([], [(":me", s(owner)), (":expires", n(expires_at)), (":now", n(now))]),
        return_new: false,
        return_old_on_condition_failure: false,
    }
}

// ---------------------------------------------------------------------------------------------
// Instance heartbeat

const INSTANCE_PREFIX: &str = "INSTANCE#";
const HEARTBEAT_SK: &str = "HEARTBEAT";

/// The heartbeat item of a named coordinator instance: which run (incarnation) holds the name,
/// and until when (milliseconds).
pub fn heartbeat_key(instance: &str) -> Key {
    Key {
        pk: format!("{INSTANCE_PREFIX}{instance}"),
        sk: HEARTBEAT_SK.to_owned(),
    }
}

/// Claims `instance` for `incarnation` until `expires_at`: if nobody holds it, it is already
/// ours, or the holder's heartbeat ran out by `now`. With `seen`, only if the item still carries
/// the beat seen then (its holder did not renew it since, whatever the clocks say). On failure the item is
/// returned as it was (ALL_OLD).
pub fn claim_heartbeat(
    instance: &str,
    incarnation: &str,
    expires_at: Millis,
    now: Millis,
    seen: Option<&Heartbeat>,
) -> Update {
    let mut values = vec![(":me", s(incarnation)), (":expires", n(expires_at))];
    let condition = match seen {
        None => {
            values.push((":now", n(now)));
            "attribute_not_exists(incarnation) OR incarnation = :me OR heartbeat_expires_at_ms <= :now"
        }
        // Unchanged since it was seen, or expired: a renewal delayed in the network past its
        // own expiry (sent by a run that died meanwhile) changes the beat but proves no one
        // alive, and the old run's hold ends at that expiry anyway.
        Some(seen) => {
            values.push((":seen_beat", s(&seen.beat)));
            values.push((":now", n(now)));
            "beat = :seen_beat OR heartbeat_expires_at_ms <= :now"
        }
    };
    heartbeat_update(instance, condition, values)
}

/// Extends this incarnation's hold on `instance`, only while it still holds it.
pub fn renew_heartbeat(instance: &str, incarnation: &str, expires_at: Millis) -> Update {
    heartbeat_update(
        instance,
        "incarnation = :me",
        vec![(":me", s(incarnation)), (":expires", n(expires_at))],
    )
}

fn heartbeat_update(instance: &str, condition: &str, values: Vec<(&str, Value)>) -> Update {
    Update {
        key: heartbeat_key(instance),
        update: "SET incarnation = :me, heartbeat_expires_at_ms = :expires, beat = :beat".to_owned(),
        condition: Some(condition.to_owned()),
        bindings: Bindings {
            names: BTreeMap::new(),
            values: values
                .into_iter()
                .chain([(":beat", s(uuid::Uuid::new_v4().to_string()))])
                .map(|(name, value)| (name.to_owned(), value))
                .collect(),
        },
        return_new: false,
        return_old_on_condition_failure: true,
    }
}

/// A named instance's heartbeat as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub incarnation: String,
    pub expires_at: Millis,
    /// A fresh random id at every claim and renewal: proof of life that needs no clock.
    pub beat: String,
}

pub fn heartbeat_from_item(item: &Item) -> Option<Heartbeat> {
    Some(Heartbeat {
        incarnation: string(item, "incarnation")?.to_owned(),
        expires_at: number(item, "heartbeat_expires_at_ms")?.parse().ok()?,
        beat: string(item, "beat")?.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Members (account affinity, docs/scale-out.md)

const MEMBERS_PK: &str = "MEMBERS";
/// Largest page of the member list read at once; a table is shared by a handful of coordinators.
pub const MEMBERS_PAGE_SIZE: u32 = 100;

/// One live coordinator of the table as it announces itself: its name (`--instance`, or the
/// random name of an unnamed run), the address its peers dial (`--advertise-address`), which run
/// wrote it, and until when it counts as live (the writer's clock, milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub address: String,
    pub incarnation: String,
    pub expires_at: Millis,
}

pub fn member_key(name: &str) -> Key {
    Key {
        pk: MEMBERS_PK.to_owned(),
        sk: name.to_owned(),
    }
}

/// Announces (or renews) `member`. Unconditional: a name belongs to one live run (a named
/// instance holds its heartbeat, an unnamed one has a random name).
pub fn put_member(member: &Member) -> Put {
    let mut item = key_attributes(&member_key(&member.name));
    item.insert("address".to_owned(), s(&member.address));
    item.insert("incarnation".to_owned(), s(&member.incarnation));
    item.insert("member_expires_at_ms".to_owned(), n(member.expires_at));
    Put {
        item,
        condition: None,
        bindings: Bindings::default(),
    }
}

/// Removes this run's announcement (a coordinator leaving on drain), only if it is still this
/// run's.
pub fn delete_member(name: &str, incarnation: &str) -> Delete {
    Delete {
        key: member_key(name),
        condition: Some("incarnation = :me".to_owned()),
        bindings: bindings([], [(":me", s(incarnation))]),
    }
}

/// Removes an announcement that ran out before `before` and was not renewed since (a run that
/// died without leaving).
pub fn delete_expired_member(name: &str, before: Millis) -> Delete {
    Delete {
        key: member_key(name),
        condition: Some("member_expires_at_ms <= :before".to_owned()),
        bindings: bindings([], [(":before", n(before))]),
    }
}

pub fn members_query(start_after: Option<Key>) -> Query {
    Query {
        pk: MEMBERS_PK.to_owned(),
        sk_prefix: String::new(),
        newest_first: false,
        limit: MEMBERS_PAGE_SIZE,
        start_after,
    }
}

pub fn member_from_item(item: &Item) -> Option<Member> {
    Some(Member {
        name: string(item, "sk")?.to_owned(),
        address: string(item, "address")?.to_owned(),
        incarnation: string(item, "incarnation")?.to_owned(),
        expires_at: number(item, "member_expires_at_ms")?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_round_trips_through_an_item() {
        let mut item = key_attributes(&account_key(&UserId::parse("u", "alice").unwrap()));
        item.insert("cash".to_owned(), n("100.5"));
        item.insert("deposited_today".to_owned(), n("100.5"));
        item.insert("withdrawn_today".to_owned(), n("0"));
        item.insert("limit_day".to_owned(), s("2026-11-26"));
        item.insert("version".to_owned(), n(3));
        item.insert(
            "holdings".to_owned(),
            Value::M(BTreeMap::from([("BTC".to_owned(), n("0.25"))])),
        );
        let account = account_from_item(&item).unwrap();
        assert!(account.exists());
        assert_eq!(account.cash.to_string(), "100.50");
        assert_eq!(account.version, 3);
        assert_eq!(
            account.holding(&AssetSymbol::parse("a", "BTC").unwrap()).to_string(),
            "0.25"
        );
    }

    #[test]
    fn a_lease_only_item_is_not_an_account() {
        let mut item = Item::new();
        item.insert("lock_id".to_owned(), s("x"));
        item.insert("version".to_owned(), n(0));
        assert!(!account_from_item(&item).unwrap().exists());
    }

    /// Every item kind is named by its key alone, a malformed item keeps its key and its error,
    /// and keys outside the model are foreign.
    #[test]
    fn classify_names_every_item_kind_by_its_key() {
        let alice = UserId::parse("u", "alice").unwrap();
        let item_at = |key: Key| key_attributes(&key);
        let kind = |item: &Item| match classify(item) {
            StoredItem::Account { user, .. } => format!("account of {user}"),
            StoredItem::LedgerEntry { user, .. } => format!("ledger entry of {user}"),
            StoredItem::OrderByUser { user, .. } => format!("order of {user}"),
            StoredItem::OrderById { .. } => "order by id".to_owned(),
            StoredItem::RequestRecord { user, .. } => format!("request record of {user}"),
            StoredItem::Withdrawal { user, .. } => format!("withdrawal of {user}"),
            StoredItem::Asset { .. } => "asset".to_owned(),
            StoredItem::AssetChange { .. } => "asset change".to_owned(),
            StoredItem::InstanceHeartbeat { .. } => "heartbeat".to_owned(),
            StoredItem::SweeperLease { .. } => "sweeper lease".to_owned(),
            StoredItem::FeedRecord { .. } => "feed record".to_owned(),
            StoredItem::Member { .. } => "member".to_owned(),
            StoredItem::PriceCopy { .. } => "price copy".to_owned(),
            StoredItem::Foreign { key } => format!("foreign {key:?}"),
        };
        let by_user = Key {
            pk: user_pk(&alice),
            sk: format!("{ORDER_PREFIX}o1"),
        };
        let cases = [
            (item_at(account_key(&alice)), "account of alice"),
            (item_at(sweeper_lease_key()), "sweeper lease"),
            (item_at(ledger_key(&alice, "e1")), "ledger entry of alice"),
            (item_at(by_user), "order of alice"),
            (item_at(order_key("o1")), "order by id"),
            (
                item_at(request_key(
                    &alice,
                    &RequestId::parse_optional("r", "r1").unwrap().unwrap(),
                )),
                "request record of alice",
            ),
            (item_at(asset_key(&AssetSymbol::parse("a", "BTC").unwrap())), "asset"),
            (item_at(heartbeat_key("coordinator-1")), "heartbeat"),
            (item_at(member_key("coordinator-1")), "member"),
            (
                item_at(price_copy_key(
                    &AssetSymbol::parse("a", "BTC").unwrap(),
                    &UserId::parse("u", "alice").unwrap(),
                )),
                "price copy",
            ),
            (
                item_at(asset_change_key(&AssetSymbol::parse("a", "BTC").unwrap(), "c1")),
                "asset change",
            ),
            (Item::new(), "foreign None"),
        ];
        for (item, expected) in cases {
            assert_eq!(kind(&item), expected, "{item:?}");
        }
        let foreign = Key {
            pk: "ORDER#o1".to_owned(),
            sk: "ELSEWHERE".to_owned(),
        };
        assert_eq!(
            classify(&item_at(foreign.clone())),
            StoredItem::Foreign { key: Some(foreign) }
        );
        let StoredItem::LedgerEntry { key, entry, .. } = classify(&item_at(ledger_key(&alice, "e1"))) else {
            panic!("a ledger entry");
        };
        assert_eq!(key, ledger_key(&alice, "e1"));
        assert_eq!(entry.unwrap_err().kind, "ledger");
    }

    #[test]
    fn cursors_cannot_cross_collections() {
        let user = UserId::parse("u", "alice").unwrap();
        assert!(user_page_query(&user, UserCollection::Ledger, 10, Some("ORDER#x".to_owned())).is_none());
        assert!(user_page_query(&user, UserCollection::Ledger, 10, Some("LEDGER#x".to_owned())).is_some());
    }
}
