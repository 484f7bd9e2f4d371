//! The asset catalog, cached in memory, and its admin writes. A trade's commit checks the cached
//! price against the stored one, so a stale cache can delay a trade by one re-read but never
//! misprice it.

use std::collections::BTreeMap;
use std::sync::RwLock;

use super::{Missing, ServiceError, TransactionCoordinator, retry_safe};
use crate::core::AssetSymbol;
use crate::core::records::Asset;
use crate::storage::{Storage, StorageError, model};

/// Pages read when loading the catalog; the catalog is a handful of assets, this is a bound
/// that fails loudly when reached instead of serving part of the catalog.
pub const CATALOG_PAGES_MAX: usize = 100;

#[derive(Debug, Default)]
pub struct Catalog {
    assets: RwLock<BTreeMap<AssetSymbol, Asset>>,
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
    /// inactive (another coordinator may have added or re-activated it).
    pub async fn asset(&self, storage: &Storage, symbol: &AssetSymbol) -> Result<Asset, ServiceError> {
        if let Some(asset) = self.cached(symbol).filter(|asset| asset.active) {
            return Ok(asset);
        }
        self.refresh(storage).await?;
        self.cached(symbol)
            .ok_or_else(|| ServiceError::NotFound(Missing::Asset(symbol.clone())))
    }

    /// Replaces the cache with the stored catalog.
    pub async fn refresh(&self, storage: &Storage) -> Result<(), ServiceError> {
        let mut assets = BTreeMap::new();
        let mut start_after = None;
        for _ in 0..CATALOG_PAGES_MAX {
            let page = retry_safe(|| storage.query(model::assets_query(start_after.clone()))).await?;
            for item in &page.items {
                let asset = model::asset_from_item(item)?;
                assets.insert(asset.symbol.clone(), asset);
            }
            start_after = page.last_key;
            if start_after.is_none() {
                *self.assets.write().expect("catalog lock poisoned") = assets;
                return Ok(());
            }
        }
        Err(ServiceError::Internal(format!(
            "the catalog has more than {CATALOG_PAGES_MAX} pages of assets; refusing to serve part of it"
        )))
    }
}

impl TransactionCoordinator {
    pub async fn assets(&self) -> Result<Vec<Asset>, ServiceError> {
        self.catalog.refresh(&self.storage).await?;
        Ok(self.catalog.all())
    }

    pub async fn upsert_asset(&self, asset: Asset) -> Result<Asset, ServiceError> {
        self.storage.put(model::put_asset(&asset, false)).await?;
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
        self.catalog.refresh(&self.storage).await
    }
}
