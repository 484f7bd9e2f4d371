//! The audit: reads every item of the table and checks the books. Cash and every holding equal
//! the sums of the ledger; nothing is negative; each CONFIRMED order has its ledger entry and each
//! FAILED one has none; no lease outlived its expiry by more than a margin. Read-only; used by
//! `coordinator audit` and by the tests.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::core::records::{Lease, LedgerEntry, Order, OrderStatus, RecordedOutcome};
use crate::core::{Account, Millis, TradeSide};
use crate::storage::model::{self, StoredItem};
use crate::storage::{Key, Storage, StorageError};

/// Default grace after a lease's expiry before the audit calls it stale: the sweeper releases
/// expired leases every `--sweep-interval-secs` (300 s by default).
pub const LEASE_MARGIN_DEFAULT: Duration = Duration::from_secs(600);

/// Everything found in the table, grouped per user.
#[derive(Debug, Default)]
struct UserBooks {
    account: Option<(Account, Option<Lease>)>,
    ledger: Vec<LedgerEntry>,
    orders: Vec<Order>,
    committed_records: Vec<(String, String)>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AuditReport {
    pub accounts: usize,
    pub ledger_entries: usize,
    pub orders: usize,
    pub request_records: usize,
    pub live_leases: usize,
    pub discrepancies: Vec<String>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.discrepancies.is_empty()
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "audit: {} accounts, {} ledger entries, {} orders, {} request records, {} live leases",
            self.accounts, self.ledger_entries, self.orders, self.request_records, self.live_leases
        )?;
        if self.discrepancies.is_empty() {
            return writeln!(f, "audit: OK, 0 discrepancies");
        }
        writeln!(f, "audit: {} DISCREPANCIES", self.discrepancies.len())?;
        for discrepancy in &self.discrepancies {
            writeln!(f, "  - {discrepancy}")?;
        }
        Ok(())
    }
}

/// Reads the whole table and checks it as of `now`.
pub async fn audit(storage: &Storage, now: Millis, lease_margin: Duration) -> Result<AuditReport, StorageError> {
    let mut report = AuditReport::default();
    let mut users: BTreeMap<String, UserBooks> = BTreeMap::new();
    let mut orders_by_id: BTreeMap<String, Order> = BTreeMap::new();
    let mut scan = storage.scan_table();
    while let Some(page) = scan.next_page().await? {
        for item in &page {
            sort_into_books(model::classify(item), &mut users, &mut orders_by_id, &mut report);
        }
    }
    for (user, books) in &users {
        check_user(user, books, &orders_by_id, now, lease_margin, &mut report);
    }
    Ok(report)
}

/// Files one item under its user (or its order id); a malformed item is a discrepancy.
fn sort_into_books(
    item: StoredItem,
    users: &mut BTreeMap<String, UserBooks>,
    orders_by_id: &mut BTreeMap<String, Order>,
    report: &mut AuditReport,
) {
    let mut malformed = |key: &Key, error: model::MalformedItem| {
        report.discrepancies.push(format!("{} {}: {error}", key.pk, key.sk));
    };
    match item {
        StoredItem::Account {
            key,
            user,
            account,
            lease,
        } => {
            let books = users.entry(user).or_default();
            match account {
                Ok(account) => books.account = Some((account, lease)),
                Err(error) => malformed(&key, error),
            }
        }
        StoredItem::LedgerEntry { key, user, entry } => {
            let books = users.entry(user).or_default();
            match entry {
                Ok(entry) => books.ledger.push(entry),
                Err(error) => malformed(&key, error),
            }
        }
        StoredItem::OrderByUser { key, user, order } => {
            let books = users.entry(user).or_default();
            match order {
                Ok(order) => books.orders.push(order),
                Err(error) => malformed(&key, error),
            }
        }
        StoredItem::RequestRecord { key, user, record } => {
            let books = users.entry(user).or_default();
            report.request_records += 1;
            match record {
                Ok(record) => {
                    if let RecordedOutcome::Committed { entry_id, .. } = record.outcome {
                        books.committed_records.push((key.sk, entry_id.to_string()));
                    }
                }
                Err(error) => malformed(&key, error),
            }
        }
        StoredItem::OrderById { key, order } => match order {
            Ok(order) => {
                orders_by_id.insert(order.order_id.to_string(), order);
            }
            Err(error) => malformed(&key, error),
        },
        // The catalog holds no money, and what Lockstep did not write is not its books.
        StoredItem::Asset { .. }
        | StoredItem::AssetChange { .. }
        | StoredItem::InstanceHeartbeat { .. }
        | StoredItem::SweeperLease { .. }
        | StoredItem::Foreign { .. } => {}
    }
}

fn check_user(
    user: &str,
    books: &UserBooks,
    orders_by_id: &BTreeMap<String, Order>,
    now: Millis,
    lease_margin: Duration,
    report: &mut AuditReport,
) {
    let mut problems = Vec::new();
    let mut ledger = books.ledger.clone();
    ledger.sort_by(|a, b| (a.sequence, &a.entry_id).cmp(&(b.sequence, &b.entry_id)));
    let sums = check_ledger_chain(&ledger, &mut problems);
    let lease = check_account(books, &ledger, &sums, report, &mut problems);
    report.ledger_entries += ledger.len();
    if let Some(lease) = lease {
        if lease.is_live(now) {
            report.live_leases += 1;
        } else if lease.expires_at_ms + (lease_margin.as_millis() as u64) < now {
            problems.push(format!(
                "lease {} of {} expired {} s ago and was never released",
                lease.lock_id,
                lease.owner,
                (now - lease.expires_at_ms) / 1000
            ));
        }
    }
    check_orders(books, &ledger, orders_by_id, report, &mut problems);
    for (record, entry_id) in &books.committed_records {
        if !ledger.iter().any(|entry| entry.entry_id.as_str() == entry_id) {
            problems.push(format!("{record} records entry {entry_id}, which does not exist"));
        }
    }
    let prefixed = problems.into_iter().map(|problem| format!("user {user}: {problem}"));
    report.discrepancies.extend(prefixed);
}

/// What the ledger sums to: cash, and each holding by asset.
struct LedgerSums {
    cash: Decimal,
    holdings: BTreeMap<String, Decimal>,
}

/// The ledger's own chain: each entry's balance follows from the one before, and nothing goes
/// negative along the way.
fn check_ledger_chain(ledger: &[LedgerEntry], problems: &mut Vec<String>) -> LedgerSums {
    let mut sums = LedgerSums {
        cash: Decimal::ZERO,
        holdings: BTreeMap::new(),
    };
    for entry in ledger {
        sums.cash += entry.cash_delta.decimal();
        if sums.cash != entry.cash_after.decimal() {
            problems.push(format!(
                "ledger entry {} says cash {} but the entries sum to {}",
                entry.entry_id, entry.cash_after, sums.cash
            ));
        }
        if let Some(trade) = &entry.trade {
            *sums.holdings.entry(trade.asset.to_string()).or_default() += trade.quantity_delta;
        }
        if sums.cash < Decimal::ZERO {
            problems.push(format!(
                "cash went negative ({}) at ledger entry {}",
                sums.cash, entry.entry_id
            ));
        }
        if sums.holdings.values().any(|quantity| *quantity < Decimal::ZERO) {
            problems.push(format!("a holding went negative at ledger entry {}", entry.entry_id));
        }
    }
    sums
}

/// The account against the ledger's sums; returns the lease the account item carries.
fn check_account(
    books: &UserBooks,
    ledger: &[LedgerEntry],
    sums: &LedgerSums,
    report: &mut AuditReport,
    problems: &mut Vec<String>,
) -> Option<Lease> {
    let Some((account, lease)) = books.account.as_ref().filter(|(account, _)| account.exists()) else {
        if !ledger.is_empty() {
            problems.push("ledger entries but no account".to_owned());
        }
        return books.account.as_ref().and_then(|(_, lease)| lease.clone());
    };
    report.accounts += 1;
    if account.cash.decimal() != sums.cash {
        problems.push(format!(
            "cash {} differs from the ledger's sum {}",
            account.cash, sums.cash
        ));
    }
    if account.cash.decimal() < Decimal::ZERO {
        problems.push(format!("negative cash {}", account.cash));
    }
    let mut assets: Vec<String> = account.holdings.keys().map(ToString::to_string).collect();
    assets.extend(sums.holdings.keys().cloned());
    assets.sort();
    assets.dedup();
    for asset in assets {
        let held = account
            .holdings
            .iter()
            .find(|(symbol, _)| symbol.as_str() == asset)
            .map_or(Decimal::ZERO, |(_, quantity)| quantity.decimal());
        let summed = sums.holdings.get(&asset).copied().unwrap_or_default();
        if held != summed {
            problems.push(format!("holding of {asset} is {held} but the ledger sums to {summed}"));
        }
        if held < Decimal::ZERO {
            problems.push(format!("negative holding of {asset}: {held}"));
        }
    }
    lease.clone()
}

/// Orders against the ledger: CONFIRMED has exactly its entry, FAILED has none, each has its
/// identical by-id copy, and no entry names an order that does not exist.
fn check_orders(
    books: &UserBooks,
    ledger: &[LedgerEntry],
    orders_by_id: &BTreeMap<String, Order>,
    report: &mut AuditReport,
    problems: &mut Vec<String>,
) {
    let mut entries_by_order: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for entry in ledger {
        if let Some(trade) = &entry.trade {
            entries_by_order.entry(trade.order_id.as_str()).or_default().push(entry);
        }
    }
    for order in &books.orders {
        report.orders += 1;
        let entries = entries_by_order.remove(order.order_id.as_str()).unwrap_or_default();
        match (order.status, entries.as_slice()) {
            (OrderStatus::Confirmed, [entry]) => {
                let trade = entry.trade.as_ref().expect("indexed by trade");
                let (quantity, cash) = match order.side {
                    TradeSide::Buy => (order.quantity.decimal(), -order.total.decimal()),
                    TradeSide::Sell => (-order.quantity.decimal(), order.total.decimal()),
                };
                if trade.quantity_delta != quantity || entry.cash_delta.decimal() != cash || trade.asset != order.asset
                {
                    problems.push(format!(
                        "order {} does not match its ledger entry {}",
                        order.order_id, entry.entry_id
                    ));
                }
            }
            (OrderStatus::Confirmed, entries) => problems.push(format!(
                "CONFIRMED order {} has {} ledger entries",
                order.order_id,
                entries.len()
            )),
            (OrderStatus::Failed, []) => {}
            (OrderStatus::Failed, _) => problems.push(format!("FAILED order {} has ledger entries", order.order_id)),
        }
        if orders_by_id.get(order.order_id.as_str()) != Some(order) {
            problems.push(format!("order {} has no identical by-id copy", order.order_id));
        }
    }
    for order_id in entries_by_order.keys() {
        problems.push(format!("ledger entries for order {order_id}, which does not exist"));
    }
}
