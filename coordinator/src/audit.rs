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
use crate::storage::{Item, Storage, StorageError, Value, model};

/// Items read per scan page.
pub const SCAN_PAGE_SIZE: u32 = 500;
/// Scan pages read at most: a bound on the audit of a table of up to 50 million items.
pub const SCAN_PAGES_MAX: usize = 100_000;
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
    let mut start_after = None;
    for _ in 0..SCAN_PAGES_MAX {
        let page = storage.scan(SCAN_PAGE_SIZE, start_after).await?;
        for item in &page.items {
            classify(item, &mut users, &mut orders_by_id, &mut report);
        }
        start_after = page.last_key;
        if start_after.is_none() {
            break;
        }
    }
    for (user, books) in &users {
        check_user(user, books, &orders_by_id, now, lease_margin, &mut report);
    }
    Ok(report)
}

fn text<'a>(item: &'a Item, name: &str) -> &'a str {
    match item.get(name) {
        Some(Value::S(text)) => text,
        _ => "",
    }
}

fn classify(
    item: &Item,
    users: &mut BTreeMap<String, UserBooks>,
    orders_by_id: &mut BTreeMap<String, Order>,
    report: &mut AuditReport,
) {
    let (pk, sk) = (text(item, "pk"), text(item, "sk"));
    let mut malformed = |error: model::MalformedItem| report.discrepancies.push(format!("{pk} {sk}: {error}"));
    if let Some(user) = pk.strip_prefix("USER#") {
        let books = users.entry(user.to_owned()).or_default();
        if sk == "ACCOUNT" {
            match model::account_from_item(item) {
                Ok(account) => books.account = Some((account, model::lease_from_item(item))),
                Err(error) => malformed(error),
            }
        } else if sk.starts_with("LEDGER#") {
            match model::ledger_from_item(item) {
                Ok(entry) => books.ledger.push(entry),
                Err(error) => malformed(error),
            }
        } else if sk.starts_with("ORDER#") {
            match model::order_from_item(item) {
                Ok(order) => books.orders.push(order),
                Err(error) => malformed(error),
            }
        } else if sk.starts_with("REQUEST#") {
            report.request_records += 1;
            match model::request_record_from_item(item) {
                Ok(record) => {
                    if let RecordedOutcome::Committed { entry_id, .. } = record.outcome {
                        books.committed_records.push((sk.to_owned(), entry_id));
                    }
                }
                Err(error) => malformed(error),
            }
        }
    } else if pk.starts_with("ORDER#") {
        match model::order_from_item(item) {
            Ok(order) => {
                orders_by_id.insert(order.order_id.clone(), order);
            }
            Err(error) => malformed(error),
        }
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
        Some((account, lease)) if account.exists => {
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
        } else if lease.expires_at + (lease_margin.as_millis() as u64) < now {
            problem(format!(
                "lease {} of {} expired {} s ago and was never released",
                lease.lock_id,
                lease.owner,
                (now - lease.expires_at) / 1000
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
