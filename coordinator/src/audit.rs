//! The audit: reads every item of the table and checks the books. Cash and every holding equal
//! the sums of the ledger; nothing is negative; each CONFIRMED order has its ledger entry and each
//! FAILED one has none; every transfer has its two entries, a TRANSFER_OUT and a TRANSFER_IN
//! naming each other, of opposite amounts; all accounts together hold what deposits, withdrawals
//! and trades explain (transfers only move money); no lease outlived its expiry by more than a
//! margin. Read-only; used by `coordinator audit` and by the tests.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::core::records::{Asset, EntryKind, Lease, LedgerEntry, Order, OrderStatus, RecordedOutcome};
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
    /// The entries the feed's journal holds copies of.
    fed: Vec<LedgerEntry>,
    /// Withdrawals made with settlement PENDING.
    withdrawals: Vec<crate::core::records::Withdrawal>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AuditReport {
    pub accounts: usize,
    pub ledger_entries: usize,
    pub orders: usize,
    pub request_records: usize,
    pub live_leases: usize,
    /// Distinct transfer ids on ledger entries.
    pub transfers: usize,
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
            "audit: {} accounts, {} ledger entries, {} orders, {} request records, {} live leases, {} transfers",
            self.accounts, self.ledger_entries, self.orders, self.request_records, self.live_leases, self.transfers
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
    let mut prices = Prices::default();
    let mut scan = storage.scan_table();
    while let Some(page) = scan.next_page().await? {
        for item in &page {
            sort_into_books(
                model::classify(item),
                &mut users,
                &mut orders_by_id,
                &mut prices,
                &mut report,
            );
        }
    }
    report.discrepancies.extend(prices.problems());
    for (user, books) in &users {
        check_user(user, books, &orders_by_id, now, lease_margin, &mut report);
    }
    let entries = || users.values().flat_map(|books| books.ledger.iter());
    let transfers = check_transfers(entries());
    report.transfers = transfers.count;
    report.discrepancies.extend(transfers.problems);
    let total_cash = users
        .values()
        .filter_map(|books| books.account.as_ref())
        .filter(|(account, _)| account.exists())
        .map(|(account, _)| account.cash.decimal())
        .sum();
    report.discrepancies.extend(check_conservation(total_cash, entries()));
    Ok(report)
}

/// The catalog items and the copies of their prices that trades check.
#[derive(Default)]
struct Prices {
    catalog: BTreeMap<String, Asset>,
    copies: Vec<(Key, Asset)>,
}

impl Prices {
    /// Every copy must hold its catalog item's price and flag: UpsertAsset writes them together,
    /// so a copy that differs would let a trade execute at a price not in force.
    fn problems(&self) -> Vec<String> {
        self.copies
            .iter()
            .filter_map(|(key, copy)| match self.catalog.get(copy.symbol.as_str()) {
                Some(asset) if asset.price == copy.price && asset.active == copy.active => None,
                Some(asset) => Some(format!(
                    "{}: price copy {} (active {}) differs from the catalog's {} (active {})",
                    key.pk, copy.price, copy.active, asset.price, asset.active
                )),
                None => Some(format!("{}: price copy of an asset the catalog does not hold", key.pk)),
            })
            .collect()
    }
}

/// Files one item under its user (or its order id); a malformed item is a discrepancy.
fn sort_into_books(
    item: StoredItem,
    users: &mut BTreeMap<String, UserBooks>,
    orders_by_id: &mut BTreeMap<String, Order>,
    prices: &mut Prices,
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
        StoredItem::Withdrawal { key, user, withdrawal } => {
            let books = users.entry(user).or_default();
            match withdrawal {
                Ok(withdrawal) => books.withdrawals.push(withdrawal),
                Err(error) => malformed(&key, error),
            }
        }
        StoredItem::OrderById { key, order } => match order {
            Ok(order) => {
                orders_by_id.insert(order.order_id.to_string(), order);
            }
            Err(error) => malformed(&key, error),
        },
        StoredItem::Asset { key, asset } => match asset {
            Ok(asset) => {
                prices.catalog.insert(asset.symbol.to_string(), asset);
            }
            Err(error) => malformed(&key, error),
        },
        StoredItem::PriceCopy { key, asset } => match asset {
            Ok(asset) => prices.copies.push((key, asset)),
            Err(error) => malformed(&key, error),
        },
        StoredItem::FeedRecord { key, record, .. } => match record {
            Ok(record) => users
                .entry(record.user.to_string())
                .or_default()
                .fed
                .extend(record.entries),
            Err(error) => malformed(&key, error),
        },
        // No money here, and what Lockstep did not write is not its books.
        StoredItem::AssetChange { .. }
        | StoredItem::InstanceHeartbeat { .. }
        | StoredItem::SweeperLease { .. }
        | StoredItem::Member { .. }
        | StoredItem::Foreign { .. } => {}
    }
}

/// Every entry the feed's journal holds is the ledger's entry at that place, word for word: the
/// feed never tells a consumer of money the ledger does not hold.
fn check_feed_copies(books: &UserBooks, ledger: &[LedgerEntry], problems: &mut Vec<String>) {
    let by_sequence: BTreeMap<u64, &LedgerEntry> = ledger.iter().map(|entry| (entry.sequence, entry)).collect();
    for fed in &books.fed {
        match by_sequence.get(&fed.sequence).copied() {
            Some(entry) if entry == fed => {}
            Some(entry) => problems.push(format!(
                "the feed's copy of entry #{} ({}) differs from the ledger's ({})",
                fed.sequence, fed.entry_id, entry.entry_id
            )),
            None => problems.push(format!(
                "the feed holds entry #{} ({}), which the ledger does not",
                fed.sequence, fed.entry_id
            )),
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
    let mut problems = Vec::new();
    let mut ledger = books.ledger.clone();
    ledger.sort_by(|a, b| (a.sequence, &a.entry_id).cmp(&(b.sequence, &b.entry_id)));
    let sums = check_ledger_chain(&ledger, &mut problems);
    check_sequences(books, &ledger, &mut problems);
    check_feed_copies(books, &ledger, &mut problems);
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
    check_orders(books, &ledger, orders_by_id, now, report, &mut problems);
    check_holds(books, &ledger, now, &mut problems);
    for (record, entry_id) in &books.committed_records {
        if !ledger.iter().any(|entry| entry.entry_id.as_str() == entry_id) {
            problems.push(format!("{record} records entry {entry_id}, which does not exist"));
        }
    }
    let prefixed = problems.into_iter().map(|problem| format!("user {user}: {problem}"));
    report.discrepancies.extend(prefixed);
}

/// A numbered account's entries are exactly 1, 2, … up to its `entries`: none missing, none
/// twice (an account not numbered yet holds entries written before sequences).
fn check_sequences(books: &UserBooks, ledger: &[LedgerEntry], problems: &mut Vec<String>) {
    let Some((account, _)) = books.account.as_ref().filter(|(account, _)| !account.needs_numbering) else {
        return;
    };
    if !ledger.iter().map(|entry| entry.sequence).eq(1..=account.entries) {
        let mut expected = 1..=account.entries;
        let first_wrong = ledger
            .iter()
            .map(|entry| entry.sequence)
            .find(|sequence| expected.next() != Some(*sequence));
        problems.push(format!(
            "the account has {} entries numbered but its ledger holds {} (first out of place: {})",
            account.entries,
            ledger.len(),
            first_wrong.map_or_else(
                || "a missing last one".to_owned(),
                |sequence| format!("sequence {sequence}")
            )
        ));
    }
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
    now: Millis,
    report: &mut AuditReport,
    problems: &mut Vec<String>,
) {
    let mut entries_by_order: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for entry in ledger {
        let order_id = match (&entry.hold, &entry.trade) {
            (Some(hold), _) => match &hold.order_id {
                Some(order_id) => order_id.as_str(),
                None => continue,
            },
            (None, Some(trade)) => trade.order_id.as_str(),
            (None, None) => continue,
        };
        entries_by_order.entry(order_id).or_default().push(entry);
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
            (_, entries) => check_reserved_order(books, order, entries, now, problems),
        }
        if orders_by_id.get(order.order_id.as_str()) != Some(order) {
            problems.push(format!("order {} has no identical by-id copy", order.order_id));
        }
    }
    for order_id in entries_by_order.keys() {
        problems.push(format!("ledger entries for order {order_id}, which does not exist"));
    }
}

/// A reserved order against its entries and its account's hold: one HOLD, FILL entries that
/// sum to its filled quantity and cash moved, a RELEASE only if cancelled; while it holds, the
/// account keeps its hold with the same fills, and what the hold sets aside equals the sum of
/// the entries' `held_delta`.
fn check_reserved_order(
    books: &UserBooks,
    order: &Order,
    entries: &[&LedgerEntry],
    now: Millis,
    problems: &mut Vec<String>,
) {
    let id = &order.order_id;
    let count = |kind: EntryKind| entries.iter().filter(|entry| entry.kind == kind).count();
    if count(EntryKind::Hold) != 1 {
        problems.push(format!(
            "reserved order {id} has {} HOLD entries",
            count(EntryKind::Hold)
        ));
    }
    let releases = count(EntryKind::Release);
    // A cancel releases once; so does the sweeper, for an order it marked EXPIRED.
    let released = matches!(order.status, OrderStatus::Cancelled | OrderStatus::Expired);
    if releases > usize::from(released) {
        problems.push(format!(
            "order {id} ({}) has {releases} RELEASE entries",
            order.status.as_str()
        ));
    }
    let fills = entries.iter().filter(|entry| entry.kind == EntryKind::Fill);
    let (quantity, cash): (Decimal, Decimal) = fills.fold((Decimal::ZERO, Decimal::ZERO), |(quantity, cash), entry| {
        let moved = entry.trade.as_ref().map_or(Decimal::ZERO, |trade| trade.quantity_delta);
        (quantity + moved.abs(), cash + entry.cash_delta.decimal().abs())
    });
    if quantity != order.filled_quantity.decimal() || cash != order.total.decimal() {
        problems.push(format!(
            "order {id} says {} filled for ${} but its FILL entries sum to {quantity} for ${cash}",
            order.filled_quantity, order.total
        ));
    }
    let hold = books.account.as_ref().and_then(|(account, _)| account.holds.get(id));
    let live = order.status_at(now).is_open();
    match (live, hold) {
        (true, None) => problems.push(format!("open order {id} has no hold on its account")),
        (false, Some(hold)) if hold.is_live(now) => problems.push(format!(
            "order {id} is {} but its account still holds for it",
            order.status.as_str()
        )),
        (true, Some(hold)) => {
            if hold.filled != order.filled_quantity {
                problems.push(format!(
                    "order {id} says {} filled but its hold {}",
                    order.filled_quantity, hold.filled
                ));
            }
            let held: Decimal = entries
                .iter()
                .filter_map(|entry| entry.hold.as_ref())
                .map(|hold| hold.held_delta)
                .sum();
            let holds = hold.cash_held().decimal() + hold.quantity_held().decimal();
            if held != holds {
                problems.push(format!(
                    "order {id} holds {holds} but its entries' held_delta sum to {held}"
                ));
            }
        }
        (false, _) => {}
    }
}

/// Every hold on an account is an open order of the account, every pending withdrawal it holds
/// has its PENDING record and the entries that hold its amount (and an ended one holds nothing
/// and has the entries of its ending), and nothing is on hold beyond its total.
fn check_holds(books: &UserBooks, ledger: &[LedgerEntry], now: Millis, problems: &mut Vec<String>) {
    use crate::core::records::WithdrawalStatus;
    let Some((account, _)) = books.account.as_ref() else {
        return;
    };
    for withdrawal in &books.withdrawals {
        let id = &withdrawal.withdrawal_id;
        let entries: Vec<&LedgerEntry> = ledger
            .iter()
            .filter(|entry| entry.hold.as_ref().and_then(|hold| hold.withdrawal_id.as_ref()) == Some(id))
            .collect();
        let held: Decimal = entries
            .iter()
            .filter_map(|entry| entry.hold.as_ref())
            .map(|hold| hold.held_delta)
            .sum();
        let pending = account.withdrawals.get(id);
        let kinds: Vec<EntryKind> = entries.iter().map(|entry| entry.kind).collect();
        let (expected_kinds, expected_held): (&[EntryKind], Decimal) = match withdrawal.status {
            WithdrawalStatus::Pending => (&[EntryKind::Hold], withdrawal.amount.decimal()),
            WithdrawalStatus::Settled => (&[EntryKind::Hold, EntryKind::Withdrawal], Decimal::ZERO),
            WithdrawalStatus::Returned => (&[EntryKind::Hold, EntryKind::Release], Decimal::ZERO),
        };
        let holds_it = pending.is_some_and(|pending| pending.amount == withdrawal.amount);
        if kinds != expected_kinds
            || held != expected_held
            || holds_it != (withdrawal.status == WithdrawalStatus::Pending)
        {
            problems.push(format!(
                "withdrawal {id} is {} but its entries are {kinds:?} holding {held}, and the account {} it",
                withdrawal.status.as_str(),
                if pending.is_some() { "holds" } else { "does not hold" }
            ));
        }
    }
    for id in account.withdrawals.keys() {
        if !books
            .withdrawals
            .iter()
            .any(|withdrawal| withdrawal.withdrawal_id == *id)
        {
            problems.push(format!("the account holds for withdrawal {id}, which has no record"));
        }
    }
    for (order_id, _) in account.live_holds(now) {
        let order = books.orders.iter().find(|order| order.order_id == *order_id);
        if !order.is_some_and(|order| order.status.is_open()) {
            problems.push(format!(
                "the account holds for order {order_id}, which is not an open order of it"
            ));
        }
    }
    if account.cash_on_hold(now) > account.cash {
        problems.push(format!(
            "cash on hold {} exceeds cash {}",
            account.cash_on_hold(now),
            account.cash
        ));
    }
    for asset in account.holds.values().map(|hold| &hold.asset) {
        if account.holding_on_hold(asset, now) > account.holding(asset) {
            problems.push(format!("{asset} on hold exceeds the holding"));
        }
    }
}

/// What the transfer check found: how many transfers, and what is wrong with them.
#[derive(Debug, Default)]
struct TransferFindings {
    count: usize,
    problems: Vec<String>,
}

/// Every transfer id has exactly two entries: a TRANSFER_OUT on the sender taking money out and a
/// TRANSFER_IN on the receiver putting the same amount in, each naming the other party, with one
/// memo. A half-transfer created or destroyed money on one side only. `entries` is the whole
/// ledger, every user's.
fn check_transfers<'a>(entries: impl Iterator<Item = &'a LedgerEntry>) -> TransferFindings {
    let mut findings = TransferFindings::default();
    let mut by_transfer: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for entry in entries {
        let is_transfer_kind = matches!(entry.kind, EntryKind::TransferOut | EntryKind::TransferIn);
        match (&entry.transfer, is_transfer_kind) {
            (Some(transfer), true) => by_transfer
                .entry(transfer.transfer_id.as_str())
                .or_default()
                .push(entry),
            (None, true) => findings.problems.push(format!(
                "user {}: ledger entry {} is {} but carries no transfer id",
                entry.user_id,
                entry.entry_id,
                entry.kind.as_str()
            )),
            (Some(transfer), false) => findings.problems.push(format!(
                "user {}: ledger entry {} is {} but carries transfer id {}",
                entry.user_id,
                entry.entry_id,
                entry.kind.as_str(),
                transfer.transfer_id
            )),
            (None, false) => {}
        }
    }
    findings.count = by_transfer.len();
    for (transfer_id, entries) in by_transfer {
        let of_kind = |kind: EntryKind| -> Vec<&LedgerEntry> {
            entries.iter().copied().filter(|entry| entry.kind == kind).collect()
        };
        let (outs, ins) = (of_kind(EntryKind::TransferOut), of_kind(EntryKind::TransferIn));
        let ([out], [into]) = (outs.as_slice(), ins.as_slice()) else {
            let named: Vec<String> = entries
                .iter()
                .map(|entry| format!("{} of {} ({})", entry.kind.as_str(), entry.user_id, entry.entry_id))
                .collect();
            findings.problems.push(format!(
                "transfer {transfer_id}: {} TRANSFER_OUT and {} TRANSFER_IN entries, not one of each: {}",
                outs.len(),
                ins.len(),
                named.join(", ")
            ));
            continue;
        };
        let (out_transfer, in_transfer) = match (&out.transfer, &into.transfer) {
            (Some(out_transfer), Some(in_transfer)) => (out_transfer, in_transfer),
            _ => unreachable!("grouped by the transfer id they carry"),
        };
        let sent = out.cash_delta.decimal();
        let received = into.cash_delta.decimal();
        if sent >= Decimal::ZERO || received != -sent {
            findings.problems.push(format!(
                "transfer {transfer_id}: TRANSFER_OUT of {} moves {sent} but TRANSFER_IN of {} moves {received}",
                out.user_id, into.user_id
            ));
        }
        if out_transfer.counterparty != into.user_id || in_transfer.counterparty != out.user_id {
            findings.problems.push(format!(
                "transfer {transfer_id}: TRANSFER_OUT of {} names {} and TRANSFER_IN of {} names {}",
                out.user_id, out_transfer.counterparty, into.user_id, in_transfer.counterparty
            ));
        }
        if out.user_id == into.user_id {
            findings.problems.push(format!(
                "transfer {transfer_id}: sender and receiver are both {}",
                out.user_id
            ));
        }
        if out_transfer.memo != in_transfer.memo {
            findings.problems.push(format!(
                "transfer {transfer_id}: the memos differ ({:?} and {:?})",
                out_transfer.memo.as_str(),
                in_transfer.memo.as_str()
            ));
        }
    }
    findings
}

/// Conservation: all accounts together hold what came in and went out of the system, deposits
/// − withdrawals − buys + sells; transfers only move money between accounts, so their entries
/// sum to zero. `total_cash` is the sum of every open account's cash, `entries` the whole ledger.
fn check_conservation<'a>(total_cash: Decimal, entries: impl Iterator<Item = &'a LedgerEntry>) -> Option<String> {
    let mut by_kind: BTreeMap<&'static str, Decimal> = BTreeMap::new();
    for entry in entries {
        *by_kind.entry(entry.kind.as_str()).or_default() += entry.cash_delta.decimal();
    }
    let sum = |kind: EntryKind| by_kind.get(kind.as_str()).copied().unwrap_or_default();
    // Money out as a positive amount (subtracted, so that none is "-0").
    let out = |kind: EntryKind| Decimal::ZERO - sum(kind);
    let (deposits, withdrawals) = (sum(EntryKind::Deposit), out(EntryKind::Withdrawal));
    // Fills of reserved orders move cash like trades: a buy's out, a sell's in.
    let (buys, sells) = (out(EntryKind::Buy), sum(EntryKind::Sell) + sum(EntryKind::Fill));
    let transfers = sum(EntryKind::TransferOut) + sum(EntryKind::TransferIn);
    let explained = deposits - withdrawals - buys + sells;
    (total_cash != explained).then(|| {
        format!(
            "conservation: the accounts hold {total_cash} in all, but deposits {deposits} − withdrawals \
             {withdrawals} − buys {buys} + sells {sells} = {explained} (transfer entries sum to {transfers})"
        )
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::records::LedgerTransfer;
    use crate::core::{Clock, EntryId, Memo, Principal, SystemClock, TransferId, Usd, UsdDelta, UserId};
    use crate::service::{CoordinatorConfig, TransactionCoordinator, TransferRequest};
    use crate::storage::embedded::EmbeddedEngine;
    use crate::storage::{Put, Value};

    fn user(raw: &str) -> UserId {
        UserId::parse("user_id", raw).unwrap()
    }

    fn usd(raw: &str) -> Usd {
        Usd::parse_amount("amount", raw).unwrap()
    }

    /// A ledger entry of `kind` moving `delta` on `owner`, for a transfer when `transfer` is set.
    fn entry(owner: &str, kind: EntryKind, delta: &str, transfer: Option<(&TransferId, &str, &str)>) -> LedgerEntry {
        LedgerEntry {
            hold: None,
            entry_id: EntryId::new(),
            user_id: user(owner),
            kind,
            cash_delta: UsdDelta::from_stored(delta).unwrap(),
            cash_after: Usd::ZERO,
            trade: None,
            transfer: transfer.map(|(transfer_id, counterparty, memo)| LedgerTransfer {
                transfer_id: transfer_id.clone(),
                counterparty: user(counterparty),
                memo: Memo::from_stored(memo),
            }),
            created_at_ms: 1,
            request_id: None,
            sequence: 1,
            principal: Principal::local(),
        }
    }

    /// The two entries of a transfer of `amount` from `from` to `to`.
    fn transfer_pair(from: &str, to: &str, amount: &str) -> [LedgerEntry; 2] {
        let transfer_id = TransferId::new();
        [
            entry(
                from,
                EntryKind::TransferOut,
                &format!("-{amount}"),
                Some((&transfer_id, to, "rent")),
            ),
            entry(to, EntryKind::TransferIn, amount, Some((&transfer_id, from, "rent"))),
        ]
    }

    /// A whole transfer is clean; half of one, either half, is named by its transfer id.
    #[test]
    fn a_half_transfer_is_found() {
        let [out, into] = transfer_pair("ann", "bob", "30.00");
        let whole = check_transfers([&out, &into].into_iter());
        assert_eq!((whole.count, whole.problems.len()), (1, 0), "{:?}", whole.problems);
        for half in [&out, &into] {
            let findings = check_transfers([half].into_iter());
            assert_eq!(findings.count, 1);
            let transfer_id = half.transfer.as_ref().unwrap().transfer_id.as_str();
            assert_eq!(findings.problems.len(), 1, "{:?}", findings.problems);
            assert!(
                findings.problems[0].starts_with(&format!("transfer {transfer_id}: "))
                    && findings.problems[0].contains("not one of each"),
                "{:?}",
                findings.problems
            );
        }
        let [second_out, _] = transfer_pair("ann", "bob", "30.00");
        let mut doubled = second_out.clone();
        doubled.transfer = out.transfer.clone();
        let findings = check_transfers([&out, &doubled, &into].into_iter());
        assert!(
            findings.problems[0].contains("2 TRANSFER_OUT and 1 TRANSFER_IN"),
            "{:?}",
            findings.problems
        );
    }

    /// Entries of one transfer id must move opposite amounts, name each other, and agree on the memo.
    #[test]
    fn a_mismatched_pair_is_found() {
        let problems = |out: &LedgerEntry, into: &LedgerEntry| check_transfers([out, into].into_iter()).problems;
        let [out, into] = transfer_pair("ann", "bob", "30.00");

        let mut more = into.clone();
        more.cash_delta = UsdDelta::from_stored("31.00").unwrap();
        let found = problems(&out, &more);
        assert!(
            found.len() == 1 && found[0].contains("moves -30.00 but TRANSFER_IN of bob moves 31.00"),
            "{found:?}"
        );

        let mut elsewhere = into.clone();
        elsewhere.user_id = user("cat");
        let found = problems(&out, &elsewhere);
        assert!(
            found.len() == 1 && found[0].contains("TRANSFER_OUT of ann names bob and TRANSFER_IN of cat names ann"),
            "{found:?}"
        );

        let mut memo = into.clone();
        memo.transfer.as_mut().unwrap().memo = Memo::from_stored("other");
        let found = problems(&out, &memo);
        assert!(found.len() == 1 && found[0].contains("memos differ"), "{found:?}");

        let mut untagged = out.clone();
        untagged.transfer = None;
        let found = check_transfers([&untagged].into_iter()).problems;
        assert!(
            found.len() == 1 && found[0].contains("TRANSFER_OUT but carries no transfer id"),
            "{found:?}"
        );
    }

    /// Transfers move money without making any: the accounts' total is deposits − withdrawals −
    /// buys + sells, and a half-transfer breaks it.
    #[test]
    fn conservation_counts_deposits_withdrawals_and_trades_only() {
        let deposit = entry("ann", EntryKind::Deposit, "100.00", None);
        let withdrawal = entry("ann", EntryKind::Withdrawal, "-10.00", None);
        let buy = entry("ann", EntryKind::Buy, "-5.08", None);
        let sell = entry("ann", EntryKind::Sell, "2.54", None);
        let [out, into] = transfer_pair("ann", "bob", "30.00");
        let all = [&deposit, &withdrawal, &buy, &sell, &out, &into];
        let total = Decimal::new(8746, 2);
        assert_eq!(check_conservation(total, all.into_iter()), None);
        let half = [&deposit, &withdrawal, &buy, &sell, &into];
        let found = check_conservation(Decimal::new(11746, 2), half.into_iter()).expect("money from nowhere");
        assert!(
            found.starts_with("conservation: the accounts hold 117.46 in all, but deposits 100.00")
                && found.contains("= 87.46 (transfer entries sum to 30.00)"),
            "{found}"
        );
    }

    /// Through the real books: a committed transfer audits clean. Then a TRANSFER_IN is forged
    /// behind the coordinator's back, with the receiver's cash raised to match (so the receiver's
    /// own books balance) and its TRANSFER_OUT never written: money from nowhere, which only the
    /// transfer and conservation checks can see.
    #[tokio::test]
    async fn the_audit_finds_a_forged_half_transfer() {
        let storage = Storage::new(Arc::new(EmbeddedEngine::in_memory().unwrap()), "lockstep");
        storage.ensure_table().await.unwrap();
        let coordinator = Arc::new(TransactionCoordinator::new(
            storage.clone(),
            Arc::new(SystemClock),
            CoordinatorConfig::default(),
        ));
        let local = Principal::local();
        for (owner, amount) in [("ann", "100.00"), ("bob", "10.00")] {
            coordinator
                .deposit(&local, &user(owner), usd(amount), None, None)
                .await
                .unwrap();
        }
        let request = TransferRequest {
            from: user("ann"),
            to: user("bob"),
            amount: usd("30.00"),
            memo: Memo::from_stored("rent"),
        };
        coordinator.transfer(&local, request, None, None).await.unwrap();
        let margin = LEASE_MARGIN_DEFAULT;
        let report = audit(&storage, SystemClock.now(), margin).await.unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(
            (report.accounts, report.ledger_entries, report.transfers),
            (2, 4, 1),
            "{report}"
        );

        let transfer_id = TransferId::new();
        let entry_id = EntryId::new();
        // A careful forger: the entry at bob's next sequence, counted on his account.
        let key = model::entry_key(&user("bob"), 3);
        let s = |text: &str| Value::S(text.to_owned());
        let n = |number: &str| Value::N(number.to_owned());
        let forged_entry = BTreeMap::from([
            ("pk".to_owned(), s(&key.pk)),
            ("sk".to_owned(), s(&key.sk)),
            ("entry_id".to_owned(), s(entry_id.as_str())),
            ("user_id".to_owned(), s("bob")),
            ("kind".to_owned(), s("TRANSFER_IN")),
            ("cash_delta".to_owned(), n("5.00")),
            ("cash_after".to_owned(), n("45.00")),
            ("created_at_ms".to_owned(), n("1")),
            ("sequence".to_owned(), n("3")),
            ("principal".to_owned(), s("local")),
            ("transfer_id".to_owned(), s(transfer_id.as_str())),
            ("counterparty".to_owned(), s("ann")),
        ]);
        let mut forged_account = storage
            .get(model::account_key(&user("bob")))
            .await
            .unwrap()
            .expect("bob's account");
        forged_account.insert("cash".to_owned(), n("45.00"));
        forged_account.insert("entries".to_owned(), n("3"));
        for item in [forged_entry, forged_account] {
            let put = Put {
                item,
                condition: None,
                bindings: Default::default(),
            };
            storage.put(put).await.unwrap();
        }
        let report = audit(&storage, SystemClock.now(), margin).await.unwrap();
        assert_eq!(report.transfers, 2, "{report}");
        assert_eq!(report.discrepancies.len(), 2, "{report}");
        assert_eq!(
            report.discrepancies[0],
            format!(
                "transfer {transfer_id}: 0 TRANSFER_OUT and 1 TRANSFER_IN entries, not one of each: TRANSFER_IN of bob ({entry_id})"
            )
        );
        assert_eq!(
            report.discrepancies[1],
            "conservation: the accounts hold 115.00 in all, but deposits 110.00 − withdrawals 0 − buys 0 + sells 0 = 110.00 (transfer entries sum to 5.00)"
        );
    }
}
