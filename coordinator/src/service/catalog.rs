//! The asset catalog, cached in memory. A trade's commit checks the cached price against the
//! stored one, so a stale cache can delay a trade by one re-read but never misprice it.

use std::collections::BTreeMap;
use std::sync::RwLock;

use super::ServiceError;
use crate::core::AssetSymbol;
use crate::core::records::Asset;
use crate::storage::{Storage, model};

/// Pages read when loading the catalog; the catalog is a handful of assets, this is a bound.
const CATALOG_PAGES_MAX: usize = 100;

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
            .ok_or_else(|| ServiceError::NotFound(format!("Asset {symbol} not found")))
    }

    /// Replaces the cache with the stored catalog.
    pub async fn refresh(&self, storage: &Storage) -> Result<(), ServiceError> {
        let mut assets = BTreeMap::new();
        let mut start_after = None;
        for _ in 0..CATALOG_PAGES_MAX {
            let page = storage.query(model::assets_query(start_after)).await?;
            for item in &page.items {
                let asset = model::asset_from_item(item).map_err(|error| ServiceError::Internal(error.to_string()))?;
                assets.insert(asset.symbol.clone(), asset);
            }
            start_after = page.last_key;
            if start_after.is_none() {
                break;
            }
        }
        *self.assets.write().expect("catalog lock poisoned") = assets;
        Ok(())
    }
}
