//! ReserveOrder, FillOrder and CancelOrder on the service side: they run through the queue,
//! the lease and the batch commit like every single-account operation (`core::ops::orders`
//! decides them). What this file adds: a fill is keyed on its fill id instead of a request id.
//! A fill or cancel names an order by id: one its account holds is its own; any other is read
//! under the lease (`commit::closed_orders`), and NOT_FOUND unless it is a reserved order of
//! the user (another user's, guessed or replayed, learns nothing and writes nothing).

use std::sync::Arc;

use tokio::time::Instant;

use super::{CancelRequest, FillRequest, Operation, Receipt, ServiceError, TransactionCoordinator};
use crate::core::{Principal, RequestId, UserId};

impl TransactionCoordinator {
    /// Applies one fill of `user`'s reserved order. Keyed on the fill id: a repeat with the same
    /// figures returns the original reply, with other figures INVALID_ARGUMENT on `fill_id`.
    pub async fn fill(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        fill: FillRequest,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        let key = fill.key();
        self.mutate_as(principal, user, Operation::Fill(fill), Some(key), deadline)
            .await
    }

    /// Cancels `user`'s reserved order: what it still holds is released.
    pub async fn cancel(
        self: &Arc<Self>,
        principal: &Principal,
        user: &UserId,
        cancel: CancelRequest,
        request_id: Option<RequestId>,
        deadline: Option<Instant>,
    ) -> Result<Receipt, ServiceError> {
        self.mutate_as(principal, user, Operation::Cancel(cancel), request_id, deadline)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::core::ops::orders::EXPIRES_IN_DEFAULT;
    use crate::core::records::{EntryKind, OrderStatus};
    use crate::core::time::ManualClock;
    use crate::core::{AssetSymbol, Clock, OrderId, Price, Rejection, TradeSide, Usd};
    use crate::service::Missing;
    use crate::service::ReserveRequest;
    use crate::service::testing::{coordinator, coordinator_on, quantity, usd, user};
    use crate::service::{CoordinatorConfig, PageRequest};
    use crate::storage::embedded::EmbeddedEngine;
    use crate::storage::model;

    fn local() -> Principal {
        Principal::local()
    }

    async fn reserve(
        coordinator: &Arc<TransactionCoordinator>,
        who: &str,
        side: TradeSide,
        qty: &str,
        limit: &str,
        expires_in: Duration,
    ) -> Result<Receipt, ServiceError> {
        let request = ReserveRequest {
            side,
            asset: AssetSymbol::parse("asset", "SOL").unwrap(),
            quantity: quantity(qty),
            limit: Price::parse("limit_price", limit).unwrap(),
            expires_in,
            order_id: OrderId::new(),
            placed_by: local(),
        };
        coordinator
            .mutate_as(&local(), &user(who), Operation::Reserve(request), None, None)
            .await
    }

    async fn fill(
        coordinator: &Arc<TransactionCoordinator>,
        who: &str,
        order: &OrderId,
        fill_id: &str,
        qty: &str,
        price: &str,
    ) -> Result<Receipt, ServiceError> {
        let request = FillRequest {
            order_id: order.clone(),
            fill_id: fill_id.to_owned(),
            quantity: quantity(qty),
            price: Price::parse("price", price).unwrap(),
        };
        coordinator.fill(&local(), &user(who), request, None).await
    }

    async fn cancel(
        coordinator: &Arc<TransactionCoordinator>,
        who: &str,
        order: &OrderId,
    ) -> Result<Receipt, ServiceError> {
        let request = CancelRequest {
            order_id: order.clone(),
        };
        coordinator.cancel(&local(), &user(who), request, None, None).await
    }

    fn order_id(receipt: &Receipt) -> OrderId {
        receipt.trade.as_ref().unwrap().0.order_id.clone()
    }

    /// Reserved, filled in two parts below the limit: the hold shrinks, the difference comes
    /// back to available, the order ends FILLED, and the ledger reads HOLD, FILL, FILL.
    #[tokio::test]
    async fn a_reserved_buy_fills_in_two_parts() {
        let clock = ManualClock::starting_at(1_795_000_000_000);
        let coordinator = coordinator(&clock).await;
        coordinator
            .deposit(&local(), &user("ann"), usd("1000"), None, None)
            .await
            .unwrap();
        let held = reserve(&coordinator, "ann", TradeSide::Buy, "4", "140", EXPIRES_IN_DEFAULT)
            .await
            .unwrap();
        let (order, _) = held.trade.clone().unwrap();
        assert_eq!(order.status, OrderStatus::Open);
        assert_eq!(held.entry.kind, EntryKind::Hold);
        let account = coordinator.account(&user("ann")).await.unwrap();
        assert_eq!(account.available_cash(clock.now()), usd("440"));
        let first = fill(&coordinator, "ann", &order.order_id, "x-1", "1.5", "139")
            .await
            .unwrap();
        assert_eq!(first.trade.as_ref().unwrap().0.status, OrderStatus::PartiallyFilled);
        assert_eq!(first.entry.cash_after, usd("791.50"));
        let second = fill(&coordinator, "ann", &order.order_id, "x-2", "2.5", "140")
            .await
            .unwrap();
        let (done, holding) = second.trade.clone().unwrap();
        assert_eq!((done.status, holding), (OrderStatus::Filled, quantity("4")));
        assert_eq!(done.filled_quantity, quantity("4"));
        let account = coordinator.account(&user("ann")).await.unwrap();
        assert_eq!(account.cash, usd("441.50"));
        assert_eq!(account.available_cash(clock.now()), usd("441.50"));
        let kinds: Vec<EntryKind> = coordinator
            .ledger(&user("ann"), PageRequest::parse(3, "").unwrap())
            .await
            .unwrap()
            .items
            .iter()
            .map(|entry| entry.kind)
            .collect();
        assert_eq!(kinds, [EntryKind::Fill, EntryKind::Fill, EntryKind::Hold]);
        let closed = cancel(&coordinator, "ann", &order.order_id).await.unwrap_err();
        assert_eq!(closed.to_string(), format!("Order {} is FILLED", order.order_id));
    }

    /// A fill id applies once per order: the same figures replay the first reply, other figures
    /// are INVALID_ARGUMENT on fill_id; an order of another user, or none, is NOT_FOUND.
    #[tokio::test]
    async fn fills_apply_once_and_only_to_the_owners_order() {
        let coordinator = coordinator(&ManualClock::starting_at(1_795_000_000_000)).await;
        for who in ["ann", "bob"] {
            coordinator
                .deposit(&local(), &user(who), usd("1000"), None, None)
                .await
                .unwrap();
        }
        let held = reserve(&coordinator, "ann", TradeSide::Buy, "2", "100", EXPIRES_IN_DEFAULT)
            .await
            .unwrap();
        let order = order_id(&held);
        let first = fill(&coordinator, "ann", &order, "e-1", "1", "99").await.unwrap();
        // The fill's key lasts as long as its order can be filled, and the retention after.
        let key = crate::core::RequestId::for_fill(&order, "e-1");
        let record = coordinator
            .storage()
            .get(model::request_key(&user("ann"), &key))
            .await
            .unwrap()
            .expect("the fill's record");
        let expires = model::request_record_from_item(&record).unwrap().expires_at_seconds;
        let order_expires = held.trade.as_ref().unwrap().0.expires_at_ms.unwrap() / 1000;
        assert!(
            expires >= order_expires + crate::service::REQUEST_RETENTION.as_secs(),
            "{expires} < {order_expires} + retention"
        );
        // No caller's request id can take a fill's key.
        let taken = crate::core::RequestId::parse_optional("request_id", key.as_str()).unwrap_err();
        assert_eq!(taken.field, "request_id");
        let again = fill(&coordinator, "ann", &order, "e-1", "1", "99").await.unwrap();
        assert!(again.replayed);
        assert_eq!(again.entry.entry_id, first.entry.entry_id);
        let other = fill(&coordinator, "ann", &order, "e-1", "1", "98").await.unwrap_err();
        assert!(
            matches!(&other, ServiceError::InvalidArgument(field) if field.field == "fill_id"),
            "{other:?}"
        );
        let stolen = fill(&coordinator, "bob", &order, "e-2", "1", "99").await.unwrap_err();
        assert_eq!(stolen, ServiceError::NotFound(Missing::Order(order.to_string())));
        let made_up = fill(&coordinator, "ann", &OrderId::new(), "e-3", "1", "99")
            .await
            .unwrap_err();
        assert!(matches!(made_up, ServiceError::NotFound(Missing::Order(_))));
        assert_eq!(coordinator.account(&user("ann")).await.unwrap().cash, usd("901"));
        assert_eq!(coordinator.account(&user("bob")).await.unwrap().cash, usd("1000"));
    }

    /// From expires_at on: a fill is refused naming the instant, the order reads EXPIRED, and
    /// its hold no longer counts, before anything swept it.
    #[tokio::test]
    async fn expiry_is_exact() {
        let clock = ManualClock::starting_at(1_795_000_000_000);
        let coordinator = coordinator(&clock).await;
        coordinator
            .deposit(&local(), &user("ann"), usd("100"), None, None)
            .await
            .unwrap();
        let held = reserve(&coordinator, "ann", TradeSide::Buy, "1", "100", Duration::from_secs(5))
            .await
            .unwrap();
        let order = order_id(&held);
        let spend = coordinator.withdraw(&local(), &user("ann"), usd("1"), None, None).await;
        assert!(matches!(
            spend,
            Err(ServiceError::Rejected(Rejection::InsufficientBalance { .. }))
        ));
        clock.advance(Duration::from_secs(5));
        let late = fill(&coordinator, "ann", &order, "late", "1", "90").await.unwrap_err();
        assert!(late.to_string().contains("expired at"), "{late}");
        assert_eq!(coordinator.order(&order).await.unwrap().status, OrderStatus::Expired);
        coordinator
            .withdraw(&local(), &user("ann"), usd("100"), None, None)
            .await
            .unwrap();
        let cancelled = cancel(&coordinator, "ann", &order).await.unwrap_err();
        assert!(cancelled.to_string().ends_with("is EXPIRED"), "{cancelled}");
    }

    /// The sweeper releases expired holds in storage: the order is stored EXPIRED, the account
    /// keeps no hold for it, a RELEASE entry balances its HOLD, and a fill is still refused
    /// naming the instant. A live hold is left alone and counted as on hold.
    #[tokio::test]
    async fn the_sweeper_releases_expired_holds() {
        let clock = ManualClock::starting_at(1_795_000_000_000);
        let coordinator = coordinator(&clock).await;
        coordinator
            .deposit(&local(), &user("ann"), usd("100"), None, None)
            .await
            .unwrap();
        let short = reserve(&coordinator, "ann", TradeSide::Buy, "1", "30", Duration::from_secs(5))
            .await
            .unwrap();
        reserve(&coordinator, "ann", TradeSide::Buy, "1", "20", Duration::from_secs(500))
            .await
            .unwrap();
        clock.advance(Duration::from_secs(6));
        let report = crate::sweeper::sweep(coordinator.storage(), clock.now()).await.unwrap();
        assert_eq!(report.expired_holds, 1);
        assert_eq!(report.cash_on_hold, usd("20"));
        let order = order_id(&short);
        let item = coordinator
            .storage()
            .get(model::order_key(order.as_str()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(model::order_from_item(&item).unwrap().status, OrderStatus::Expired);
        let account = coordinator.account(&user("ann")).await.unwrap();
        assert_eq!(account.holds.len(), 1);
        let newest = coordinator
            .ledger(&user("ann"), PageRequest::parse(1, "").unwrap())
            .await
            .unwrap()
            .items
            .remove(0);
        assert_eq!(newest.kind, EntryKind::Release);
        assert_eq!(newest.principal.as_str(), crate::sweeper::SWEEPER_PRINCIPAL);
        assert_eq!(newest.hold.unwrap().held_delta, rust_decimal::Decimal::new(-30, 0));
        let late = fill(&coordinator, "ann", &order, "late", "1", "29").await.unwrap_err();
        assert!(late.to_string().contains("expired at"), "{late}");
        let again = crate::sweeper::sweep(coordinator.storage(), clock.now()).await.unwrap();
        assert_eq!(again.expired_holds, 0, "nothing twice");
        // The release is in the feed twice: as committed, and again after the acknowledgement
        // (a sweep has no later commit of its own that would record it if it landed late).
        let shard = model::feed_shard(&user("ann"));
        let page = coordinator
            .storage()
            .query(model::feed_records_after(shard, "", 100))
            .await
            .unwrap();
        let releases = page
            .items
            .iter()
            .filter_map(|item| model::feed_record_from_item(item).ok())
            .filter(|record| record.entries.iter().any(|entry| entry.kind == EntryKind::Release))
            .count();
        assert_eq!(releases, 2, "the sweeper's release recorded in the feed twice");
        let report = crate::audit::audit(coordinator.storage(), clock.now(), Duration::from_secs(600))
            .await
            .unwrap();
        assert!(report.is_clean(), "{report}");
        // The next writer of the account (a known account: its version moved) still commits.
        coordinator
            .withdraw(&local(), &user("ann"), usd("80"), None, None)
            .await
            .unwrap();
    }

    /// An expiry racing fills and the sweeper, repeated: fills sent while the clock crosses
    /// `expires_at` and the sweeper releases the hold each end once (applied before the instant,
    /// refused from it on), nothing fills after it, and the books stay in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expiry_racing_fills_and_the_sweeper_ends_once() {
        let clock = ManualClock::starting_at(1_795_000_000_000);
        let coordinator = coordinator_on(
            Arc::new(EmbeddedEngine::in_memory().unwrap()),
            &clock,
            CoordinatorConfig {
                lease_wait_max: Duration::from_secs(5),
                ..CoordinatorConfig::default()
            },
        )
        .await;
        coordinator
            .deposit(&local(), &user("ann"), usd("10000"), None, None)
            .await
            .unwrap();
        for round in 0..10 {
            let held = reserve(&coordinator, "ann", TradeSide::Buy, "8", "100", Duration::from_secs(1))
                .await
                .unwrap();
            let order = order_id(&held);
            let expires_at = held.trade.as_ref().unwrap().0.expires_at_ms.unwrap();
            let mut calls = Vec::new();
            for caller in 0..8usize {
                let filler = Arc::clone(&coordinator);
                let order = order.clone();
                calls.push(tokio::spawn(async move {
                    let result = fill(&filler, "ann", &order, &format!("r{round}-{caller}"), "1", "99").await;
                    (result, filler.now())
                }));
                if caller == 3 {
                    clock.advance(Duration::from_secs(1));
                    let storage = coordinator.storage().clone();
                    let now = clock.now();
                    calls.push(tokio::spawn(async move {
                        crate::sweeper::sweep(&storage, now).await.unwrap();
                        (Err(ServiceError::Busy), now)
                    }));
                }
            }
            let mut fills = 0;
            for call in calls {
                match call.await.unwrap() {
                    (Ok(receipt), _) => {
                        fills += 1;
                        assert!(
                            receipt.entry.created_at_ms < expires_at,
                            "round {round}: filled at or after expiry"
                        );
                    }
                    (Err(ServiceError::Rejected(Rejection::OrderExpired { .. })), _) | (Err(ServiceError::Busy), _) => {
                    }
                    (Err(error), _) => panic!("round {round}: {error:?}"),
                }
            }
            let stored = coordinator.order(&order).await.unwrap();
            assert_eq!(stored.status, OrderStatus::Expired, "round {round}");
            assert_eq!(
                stored.filled_quantity.decimal(),
                rust_decimal::Decimal::from(fills),
                "round {round}"
            );
        }
        crate::sweeper::sweep(coordinator.storage(), clock.now()).await.unwrap();
        let account = coordinator.account(&user("ann")).await.unwrap();
        assert!(account.holds.is_empty(), "every expired hold released in storage");
        let report = crate::audit::audit(coordinator.storage(), clock.now(), Duration::from_secs(600))
            .await
            .unwrap();
        assert!(report.is_clean(), "{report}");
    }

    /// Races, repeated: a cancel and fills racing for the same order, and fills racing for the
    /// last units, on two coordinators sharing one table. Each call ends with exactly one
    /// outcome, the order's figures add up, and no money is made or lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_fills_and_cancels_end_once() {
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let clock = ManualClock::starting_at(1_795_000_000_000);
        let config = || CoordinatorConfig {
            lease_wait_max: Duration::from_secs(5),
            ..CoordinatorConfig::default()
        };
        let coordinators = [
            coordinator_on(engine.clone(), &clock, config()).await,
            coordinator_on(engine, &clock, config()).await,
        ];
        coordinators[0]
            .deposit(&local(), &user("ann"), usd("10000"), None, None)
            .await
            .unwrap();
        for round in 0..20 {
            let held = reserve(&coordinators[0], "ann", TradeSide::Buy, "3", "100", EXPIRES_IN_DEFAULT)
                .await
                .unwrap();
            let order = order_id(&held);
            let mut calls = Vec::new();
            for caller in 0..6usize {
                let coordinator = Arc::clone(&coordinators[caller % 2]);
                let order = order.clone();
                calls.push(tokio::spawn(async move {
                    if caller == 5 && round % 2 == 0 {
                        cancel(&coordinator, "ann", &order).await.map(|_| "cancel")
                    } else {
                        fill(&coordinator, "ann", &order, &format!("r{round}-{caller}"), "1", "99.99")
                            .await
                            .map(|_| "fill")
                    }
                }));
            }
            let mut fills = 0;
            for call in calls {
                match call.await.unwrap() {
                    Ok("fill") => fills += 1,
                    Ok(_) => {}
                    Err(ServiceError::Rejected(Rejection::FillTooLarge { .. } | Rejection::OrderNotOpen { .. })) => {}
                    Err(error) => panic!("round {round}: {error:?}"),
                }
            }
            let stored = coordinators[1].order(&order).await.unwrap();
            assert!(fills <= 3, "round {round}: {fills} fills of 3 units");
            assert_eq!(stored.filled_quantity.decimal(), rust_decimal::Decimal::from(fills));
            let expected_total = Usd::ceil(rust_decimal::Decimal::new(9999, 2) * rust_decimal::Decimal::from(fills));
            assert_eq!(stored.total, expected_total, "round {round}");
        }
        let account = coordinators[1].account(&user("ann")).await.unwrap();
        let now = clock.now();
        assert!(account.cash_on_hold(now) <= account.cash);
        let report = crate::audit::audit(coordinators[0].storage(), now, Duration::from_secs(600))
            .await
            .unwrap();
        assert!(report.is_clean(), "{report}");
    }
}
