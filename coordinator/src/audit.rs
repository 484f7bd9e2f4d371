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
                        books.committed_records.push((key.sk, entry_id));
                    }
                }
                Err(error) => malformed(&key, error),
            }
        }
        StoredItem::OrderById { key, order } => match order {
            Ok(order) => {
                orders_by_id.insert(order.order_id.clone(), order);
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
    let mut problem = |text: String| report.discrepancies.push(format!("user {user}: {text}"));
    let mut ledger = books.ledger.clone();
    ledger.sort_by(|a, b| (a.sequence, &a.entry_id).cmp(&(b.sequence, &b.entry_id)));

    // The ledger's own chain: each entry's balance follows from the one before.
    let mut running_cash = Decimal::ZERO;
    let mut running_holdings: BTreeMap<String, Decimal> = BTreeMap::new();
    for entry in &ledger {
        running_cash += entry.cash_delta;
        if running_cash != entry.cash_after.decimal() {
            problem(format!(
                "ledger entry {} says cash {} but the entries sum to {running_cash}",
                entry.entry_id, entry.cash_after
            ));
        }
        if let Some(trade) = &entry.trade {
            *running_holdings.entry(trade.asset.to_string()).or_default() += trade.quantity_delta;
        }
        if running_cash < Decimal::ZERO {
            problem(format!(
                "cash went negative ({running_cash}) at ledger entry {}",
                entry.entry_id
            ));
        }
        if running_holdings.values().any(|quantity| *quantity < Decimal::ZERO) {
            problem(format!("a holding went negative at ledger entry {}", entry.entry_id));
        }
    }

    let lease = match &books.account {
        Some((account, lease)) if account.exists() => {
            report.accounts += 1;
            if account.cash.decimal() != running_cash {
                problem(format!(
                    "cash {} differs from the ledger's sum {running_cash}",
                    account.cash
                ));
            }
            if account.cash.decimal() < Decimal::ZERO {
                problem(format!("negative cash {}", account.cash));
            }
            let mut assets: Vec<String> = account.holdings.keys().map(ToString::to_string).collect();
            assets.extend(running_holdings.keys().cloned());
            assets.sort();
            assets.dedup();
            for asset in assets {
                let held = account
                    .holdings
                    .iter()
                    .find(|(symbol, _)| symbol.as_str() == asset)
                    .map_or(Decimal::ZERO, |(_, quantity)| quantity.decimal());
                let summed = running_holdings.get(&asset).copied().unwrap_or_default();
                if held != summed {
                    problem(format!("holding of {asset} is {held} but the ledger sums to {summed}"));
                }
                if held < Decimal::ZERO {
                    problem(format!("negative holding of {asset}: {held}"));
                }
            }
            lease.clone()
        }
        Some((_, lease)) => {
            if !ledger.is_empty() {
                problem("ledger entries but no account".to_owned());
            }
            lease.clone()
        }
        None => {
            if !ledger.is_empty() {
                problem("ledger entries but no account".to_owned());
            }
            None
        }
    };
    report.ledger_entries += ledger.len();

    if let Some(lease) = lease {
        if lease.is_live(now) {
            report.live_leases += 1;
        } else if lease.expires_at_ms + (lease_margin.as_millis() as u64) < now {
            problem(format!(
                "lease {} of {} expired {} s ago and was never released",
                lease.lock_id,
                lease.owner,
                (now - lease.expires_at_ms) / 1000
            ));
        }
    }

    // Orders against the ledger: CONFIRMED has exactly its entry, FAILED has none.
    let mut entries_by_order: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for entry in &ledger {
        if let Some(trade) = &entry.trade {
            entries_by_order.entry(trade.order_id.as_str()).or_default().push(entry);
        }
    }
    for order in &books.orders {
        report.orders += 1;
        let entries = entries_by_order.remove(order.order_id.as_str()).unwrap_or_default();
        match order.status {
            OrderStatus::Confirmed => {
                let [entry] = entries.as_slice() else {
                    problem(format!(
                        "CONFIRMED order {} has {} ledger entries",
                        order.order_id,
                        entries.len()
                    ));
                    continue;
                };
                let trade = entry.trade.as_ref().expect("indexed by trade");
                let (quantity, cash) = match order.side {
                    TradeSide::Buy => (order.quantity.decimal(), -order.total.decimal()),
                    TradeSide::Sell => (-order.quantity.decimal(), order.total.decimal()),
                };
                if trade.quantity_delta != quantity || entry.cash_delta != cash || trade.asset != order.asset {
                    problem(format!(
                        "order {} does not match its ledger entry {}",
                        order.order_id, entry.entry_id
                    ));
                }
            }
            OrderStatus::Failed if !entries.is_empty() => {
                problem(format!("FAILED order {} has ledger entries", order.order_id));
            }
            OrderStatus::Failed => {}
        }
        if orders_by_id.get(&order.order_id) != Some(order) {
            problem(format!("order {} has no identical by-id copy", order.order_id));
        }
    }
    for order_id in entries_by_order.keys() {
        problem(format!("ledger entries for order {order_id}, which does not exist"));
    }
    for (record, entry_id) in &books.committed_records {
        if !ledger.iter().any(|entry| &entry.entry_id == entry_id) {
            problem(format!("{record} records entry {entry_id}, which does not exist"));
        }
    }
}
