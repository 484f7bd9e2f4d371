//! The asset catalog, cached in memory, and its admin writes. A trade's commit checks the cached
//! price against the stored one, so a stale cache can delay a trade by one re-read but never
//! misprice it.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use tokio::time::Instant;

use super::{Missing, ServiceError, TransactionCoordinator, retry_safe};
use crate::core::records::Asset;
use crate::core::{AssetSymbol, Price, Principal};
use crate::storage::{Storage, StorageError, model};

/// Pages read when loading the catalog; the catalog is a handful of assets, this is a bound
/// that fails loudly when reached instead of serving part of the catalog.
pub const CATALOG_PAGES_MAX: usize = 100;

/// How stale the cache may be before a lookup that misses it (an unknown or inactive symbol),
/// a ListAssets or a refusal that rests on a price reads the catalog again. Within it, a miss is
/// answered from the cache (a negative entry for every unknown symbol), so no caller can make
/// each of its requests cost a whole-catalog read. A commit is still checked against the stored
/// price, so staleness can only delay or refuse a trade, never misprice it.
pub const CATALOG_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Most assets the catalog holds: UpsertAsset refuses a new symbol beyond it, so the refresh
/// (bounded by `CATALOG_PAGES_MAX` pages of `model::ASSET_PAGE_SIZE`) never meets its bound.
pub const CATALOG_ASSETS_MAX: usize = 1_000;

const _: () = assert!(CATALOG_ASSETS_MAX < CATALOG_PAGES_MAX * model::ASSET_PAGE_SIZE as usize);

#[derive(Debug, Default)]
pub struct Catalog {
    assets: RwLock<BTreeMap<AssetSymbol, Asset>>,
    /// The assets whose catalog items the last load found without the price-copies mark (seeded
    /// just now, written before the copies existed, or by a coordinator of an older version).
    unmarked: RwLock<Vec<Asset>>,
    /// When the cache was last loaded from storage; one refresh at a time.
    refreshed_at: tokio::sync::Mutex<Option<Instant>>,
}

impl Catalog {
    pub fn cached(&self, symbol: &AssetSymbol) -> Option<Asset> {
        self.assets.read().expect("catalog lock poisoned").get(symbol).cloned()
    }

    pub fn all(&self) -> Vec<Asset> {
        self.assets
            .read()
            .expect("catalog lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    pub fn remember(&self, asset: Asset) {
        self.assets
            .write()
            .expect("catalog lock poisoned")
            .insert(asset.symbol.clone(), asset);
    }

    /// The asset from the cache, or from storage when the cache does not know it or has it
    /// inactive (another coordinator may have added or re-activated it) and is older than
    /// `CATALOG_REFRESH_INTERVAL`.
    pub async fn asset(&self, storage: &Storage, symbol: &AssetSymbol) -> Result<Asset, ServiceError> {
        match self.cached(symbol) {
            Some(asset) if asset.active => return Ok(asset),
            // Inactive in the cache: a refusal is final, so it never rests on the cache (another
            // coordinator may have just activated it); read the catalog again first.
            Some(_) => self.refresh_since(storage, Instant::now()).await?,
            // Unknown: at most one read per interval, so a flood of made-up symbols cannot turn
            // into a flood of catalog reads. A symbol created elsewhere less than a second ago
            // may be NOT_FOUND, which writes nothing; a retry finds it.
            None => self.refresh_if_older_than(storage, CATALOG_REFRESH_INTERVAL).await?,
        }
        self.cached(symbol)
            .ok_or_else(|| ServiceError::NotFound(Missing::Asset(symbol.clone())))
    }

    /// Reloads the cache unless it was loaded within `age`; concurrent callers share one load.
    pub async fn refresh_if_older_than(&self, storage: &Storage, age: Duration) -> Result<(), ServiceError> {
        let mut refreshed_at = self.refreshed_at.lock().await;
        if refreshed_at.is_some_and(|at| at.elapsed() < age) {
            return Ok(());
        }
        let started = Instant::now();
        self.load(storage).await?;
        *refreshed_at = Some(started);
        Ok(())
    }

    /// Makes sure the cache holds a load that started at or after `asked`: reloads unless such a
    /// load already finished. Callers that ask together share one load, so a burst of refusals
    /// costs one read, not one each.
    pub async fn refresh_since(&self, storage: &Storage, asked: Instant) -> Result<(), ServiceError> {
        let mut refreshed_at = self.refreshed_at.lock().await;
        if refreshed_at.is_some_and(|at| at >= asked) {
            return Ok(());
        }
        let started = Instant::now();
        self.load(storage).await?;
        *refreshed_at = Some(started);
        Ok(())
    }

    /// Reloads the cache now (the stored price is known to differ from the cached one).
    pub async fn refresh(&self, storage: &Storage) -> Result<(), ServiceError> {
        self.refresh_if_older_than(storage, Duration::ZERO).await
    }

    /// The assets the last load found without their price copies marked, handed out once.
    fn take_unmarked(&self) -> Vec<Asset> {
        std::mem::take(&mut *self.unmarked.write().expect("catalog lock poisoned"))
    }

    /// Replaces the cache with the stored catalog.
    async fn load(&self, storage: &Storage) -> Result<(), ServiceError> {
        let mut assets = BTreeMap::new();
        let mut unmarked = Vec::new();
        let mut start_after = None;
        for _ in 0..CATALOG_PAGES_MAX {
            let page = retry_safe(|| storage.query(model::assets_query(start_after.clone()))).await?;
            for item in &page.items {
                let asset = model::asset_from_item(item)?;
                if !model::has_price_copies(item) {
                    unmarked.push(asset.clone());
                }
                assets.insert(asset.symbol.clone(), asset);
            }
            start_after = page.last_key;
            if start_after.is_none() {
                *self.assets.write().expect("catalog lock poisoned") = assets;
                *self.unmarked.write().expect("catalog lock poisoned") = unmarked;
                return Ok(());
            }
        }
        Err(ServiceError::Internal(format!(
            "the catalog has more than {CATALOG_PAGES_MAX} pages of assets; refusing to serve part of it"
        )))
    }
}

/// The catalog seeded on first start when no --catalog is given: fixed prices, no price feed.
pub const DEFAULT_CATALOG: &str = include_str!("../../catalog.json");

#[derive(serde::Deserialize)]
struct CatalogEntry {
    symbol: String,
    price: String,
    active: bool,
}

/// Parses a catalog file: a JSON list of `{"symbol", "price", "active"}`; the error says why not.
pub fn parse_catalog(json: &str) -> Result<Vec<Asset>, String> {
    let entries: Vec<CatalogEntry> = serde_json::from_str(json).map_err(|error| error.to_string())?;
    entries
        .into_iter()
        .map(|entry| {
            Ok(Asset {
                symbol: AssetSymbol::parse("symbol", &entry.symbol).map_err(|error| error.to_string())?,
                price: Price::parse("price", &entry.price).map_err(|error| error.to_string())?,
                active: entry.active,
            })
        })
        .collect()
}

impl TransactionCoordinator {
    pub async fn assets(&self) -> Result<Vec<Asset>, ServiceError> {
        self.catalog
            .refresh_if_older_than(&self.storage, CATALOG_REFRESH_INTERVAL)
            .await?;
        Ok(self.catalog.all())
    }

    /// Creates or replaces an asset on behalf of `principal`, keeping the change; a price move
    /// beyond `--price-change-max-percent` needs `force`.
    pub async fn upsert_asset(&self, principal: &Principal, asset: Asset, force: bool) -> Result<Asset, ServiceError> {
        if self.catalog.cached(&asset.symbol).is_none() {
            self.catalog.refresh(&self.storage).await?;
            let count = self.catalog.assets.read().expect("catalog lock poisoned").len();
            if count >= CATALOG_ASSETS_MAX && self.catalog.cached(&asset.symbol).is_none() {
                return Err(ServiceError::CatalogFull(CATALOG_ASSETS_MAX));
            }
        }
        self.write_asset_change(principal, &asset, force).await?;
        self.catalog.remember(asset.clone());
        Ok(asset)
    }

    /// Writes each asset that does not exist yet, then loads the catalog.
    pub async fn seed_catalog(&self, assets: &[Asset]) -> Result<(), ServiceError> {
        for asset in assets {
            match retry_safe(|| self.storage.put(model::put_asset(asset, true))).await {
                Ok(()) | Err(StorageError::ConditionFailed { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        self.catalog.refresh(&self.storage).await?;
        self.make_price_copies(&self.storage).await
    }

    /// Writes the price copies of every asset the last catalog load found without the mark
    /// (seeded just now, written before the copies existed, or written by a coordinator of an
    /// older version during a rolling upgrade, whose Put drops the mark and leaves the copies
    /// behind): the 16 copies and the mark in one transaction, conditioned on the item still
    /// holding the price and flag read, so no copy ever holds a price the catalog item does not.
    async fn make_price_copies(&self, storage: &Storage) -> Result<(), ServiceError> {
        // Taken, not read: until the next load says otherwise, each is repaired once (a pass
        // that finds the load recent must not write the same copies again).
        for asset in self.catalog.take_unmarked() {
            match storage.transact(&model::repair_price_copies(&asset), None).await {
                Ok(()) => {
                    tracing::info!(symbol = %asset.symbol, price = %asset.price, copies = model::PRICE_COPIES, "price copies written from the catalog item");
                }
                // Changed meanwhile: its writer wrote copies (or the next pass repairs them).
                Err(StorageError::TransactionCanceled { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Every `CATALOG_REFRESH_INTERVAL`, until aborted: repairs price copies a coordinator of an
    /// older version left behind (during a rolling upgrade) and reloads the cache, so that a
    /// price changed elsewhere reaches every check within about a second.
    pub async fn keep_catalog_fresh(&self) {
        // Counted apart: `requests()` stays the calls' own count.
        let storage = self.storage.counted_apart();
        let mut interval = tokio::time::interval(CATALOG_REFRESH_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            // One load a second at most (shared with the loads calls make), then the repairs it
            // calls for.
            if let Err(error) = self
                .catalog
                .refresh_if_older_than(&storage, CATALOG_REFRESH_INTERVAL)
                .await
            {
                tracing::warn!(%error, "could not reload the catalog");
            } else if let Err(error) = self.make_price_copies(&storage).await {
                tracing::warn!(%error, "could not write the price copies");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Price;
    use crate::core::time::ManualClock;
    use crate::service::testing::coordinator;

    fn symbol(raw: &str) -> AssetSymbol {
        AssetSymbol::parse("asset", raw).unwrap()
    }

    /// Unknown symbols are answered from the cache between refreshes: a flood of trades on
    /// made-up symbols costs at most one catalog read per interval, not one per call.
    #[tokio::test]
    async fn unknown_symbols_cost_at_most_one_read_per_interval() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        coordinator.catalog.refresh(coordinator.storage()).await.unwrap();
        let before = coordinator.storage().requests();
        for _ in 0..50 {
            let error = coordinator
                .catalog
                .asset(coordinator.storage(), &symbol("NOPE"))
                .await
                .unwrap_err();
            assert!(matches!(error, ServiceError::NotFound(Missing::Asset(_))));
        }
        assert_eq!(
            coordinator.storage().requests(),
            before,
            "all within the refresh interval"
        );
        coordinator.assets().await.unwrap();
        assert_eq!(
            coordinator.storage().requests(),
            before,
            "ListAssets serves the fresh cache"
        );
    }

    /// A user for each price copy of `symbol`: every copy some trade checks.
    fn one_user_per_copy(symbol: &AssetSymbol) -> Vec<crate::core::UserId> {
        let mut found: BTreeMap<String, crate::core::UserId> = BTreeMap::new();
        for index in 0.. {
            let user = crate::core::UserId::parse("user_id", &format!("copy-{index}")).unwrap();
            found.entry(model::price_copy_key(symbol, &user).pk).or_insert(user);
            if found.len() == model::PRICE_COPIES as usize {
                return found.into_values().collect();
            }
        }
        unreachable!()
    }

    /// The stored copy of `symbol`'s price that `user`'s trades check.
    async fn copy_seen_by(
        coordinator: &TransactionCoordinator,
        symbol: &AssetSymbol,
        user: &crate::core::UserId,
    ) -> Asset {
        let item = coordinator
            .storage()
            .get(model::price_copy_key(symbol, user))
            .await
            .unwrap()
            .expect("the copy exists");
        model::asset_from_item(&item).unwrap()
    }

    /// UpsertAsset changes every copy of the price a trade checks together with the catalog
    /// item: whichever copy a user's trade checks, it holds the price in force, and a commit
    /// decided at the old price is refused on every one of them.
    #[tokio::test]
    async fn an_upsert_changes_every_price_copy_at_once() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        let sol = symbol("SOL");
        let users = one_user_per_copy(&sol);
        let before = coordinator.catalog.cached(&sol).unwrap();
        for user in &users {
            assert_eq!(copy_seen_by(&coordinator, &sol, user).await, before, "seeded");
        }
        let after = Asset {
            price: Price::parse("price", "101.5").unwrap(),
            ..before.clone()
        };
        coordinator
            .upsert_asset(&Principal::local(), after.clone(), true)
            .await
            .unwrap();
        for user in &users {
            assert_eq!(copy_seen_by(&coordinator, &sol, user).await, after);
            let stale = crate::storage::TransactItem::ConditionCheck(crate::storage::ConditionCheck {
                key: model::price_copy_key(&sol, user),
                condition: "price = :price AND active = :active".to_owned(),
                bindings: crate::storage::Bindings {
                    names: BTreeMap::new(),
                    values: [
                        (":price".to_owned(), crate::storage::Value::N(before.price.to_string())),
                        (":active".to_owned(), crate::storage::Value::Bool(true)),
                    ]
                    .into(),
                },
            });
            let refused = coordinator.storage().transact(&[stale], None).await;
            assert!(
                matches!(refused, Err(StorageError::TransactionCanceled { .. })),
                "{user}: {refused:?}"
            );
        }
    }

    /// A catalog written before the copies existed (items without them) gets its copies at
    /// start, at the stored price; and a price changed by an older coordinator (which writes the
    /// catalog item alone) reaches every copy at the next check.
    #[tokio::test]
    async fn a_catalog_from_before_the_copies_gets_them_at_start() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        let legacy = Asset {
            symbol: symbol("OLDCOIN"),
            price: Price::parse("price", "3.25").unwrap(),
            active: true,
        };
        coordinator
            .storage()
            .put(model::put_asset(&legacy, false))
            .await
            .unwrap();
        let user = crate::core::UserId::parse("user_id", "legacy-trader").unwrap();
        assert!(
            coordinator
                .storage()
                .get(model::price_copy_key(&legacy.symbol, &user))
                .await
                .unwrap()
                .is_none()
        );
        coordinator.seed_catalog(&[]).await.unwrap();
        assert_eq!(copy_seen_by(&coordinator, &legacy.symbol, &user).await, legacy);
        let item = coordinator
            .storage()
            .get(model::asset_key(&legacy.symbol))
            .await
            .unwrap()
            .unwrap();
        assert!(model::has_price_copies(&item), "marked, so the next start does nothing");
        let before = coordinator.storage().requests();
        coordinator.seed_catalog(&[]).await.unwrap();
        assert!(
            coordinator.storage().requests() - before <= 3,
            "one catalog read, one refresh"
        );

        // A coordinator of the older version changes the price during a rolling upgrade: its
        // Put writes the catalog item alone (no mark). The next check rewrites every copy.
        let changed = Asset {
            price: Price::parse("price", "4.75").unwrap(),
            ..legacy.clone()
        };
        coordinator
            .storage()
            .put(model::put_asset(&changed, false))
            .await
            .unwrap();
        coordinator.catalog.refresh(coordinator.storage()).await.unwrap();
        coordinator.make_price_copies(coordinator.storage()).await.unwrap();
        for user in one_user_per_copy(&legacy.symbol) {
            assert_eq!(copy_seen_by(&coordinator, &legacy.symbol, &user).await, changed);
        }
    }

    /// A new symbol past `CATALOG_ASSETS_MAX` is refused; existing ones can still be changed.
    #[tokio::test]
    async fn the_catalog_has_a_maximum_size() {
        let coordinator = coordinator(&ManualClock::starting_at(1_000_000)).await;
        let asset = |raw: &str| Asset {
            symbol: symbol(raw),
            price: Price::parse("price", "1").unwrap(),
            active: true,
        };
        let existing = coordinator.assets().await.unwrap().len();
        for index in existing..CATALOG_ASSETS_MAX {
            let put = model::put_asset(&asset(&format!("X{index}")), false);
            coordinator.storage().put(put).await.unwrap();
        }
        let error = coordinator
            .upsert_asset(&Principal::local(), asset("ONEMORE"), false)
            .await
            .unwrap_err();
        assert_eq!(error, ServiceError::CatalogFull(CATALOG_ASSETS_MAX));
        assert!(
            coordinator
                .upsert_asset(&Principal::local(), asset("X10"), false)
                .await
                .is_ok(),
            "an existing symbol"
        );
    }
}
