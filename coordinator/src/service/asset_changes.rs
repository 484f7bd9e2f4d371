//! UpsertAsset's guarded write and its history: the stored asset is read, the price move is
//! checked against `--price-change-max-percent` (unless forced), and the asset, every copy of its
//! price and its change record are written in one transaction conditioned on the asset being as
//! read.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{PageOf, PageRequest, ServiceError, TransactionCoordinator, retry_safe};
use crate::core::asset_change::{AssetChange, check_price_change};
use crate::core::records::Asset;
use crate::core::{AssetSymbol, FieldError, Principal};
use crate::storage::{StorageError, TransactItem, model};

/// Attempts of an upsert whose asset changed between its read and its write (another admin's
/// call): each re-reads and checks the bound again.
pub const UPSERT_ATTEMPTS_MAX: usize = 3;

impl TransactionCoordinator {
    /// Writes `asset` and its change record, refusing a price move beyond the bound unless
    /// `force`. Returns the change as written.
    pub(super) async fn write_asset_change(
        &self,
        principal: &Principal,
        asset: &Asset,
        force: bool,
    ) -> Result<AssetChange, ServiceError> {
        for _ in 0..UPSERT_ATTEMPTS_MAX {
            let stored = retry_safe(|| self.storage.get(model::asset_key(&asset.symbol))).await?;
            let old = stored.as_ref().map(model::asset_from_item).transpose()?;
            if let Some(old) = &old {
                check_price_change(
                    &asset.symbol,
                    old.price,
                    asset.price,
                    self.config.price_change_max_percent,
                    force,
                )
                .map_err(ServiceError::PriceChangeTooLarge)?;
            }
            let change = AssetChange {
                change_id: uuid::Uuid::now_v7().to_string(),
                symbol: asset.symbol.clone(),
                principal: principal.clone(),
                changed_at_ms: self.clock.now(),
                old: old.clone(),
                new: asset.clone(),
                forced: force,
            };
            // The catalog item first (its condition decides a retry), every price copy, and
            // the change record: a trade checks one copy, and all change together.
            let mut items = model::put_asset_everywhere(asset, old.as_ref());
            items.push(TransactItem::Put(model::put_asset_change(&change)));
            match self.storage.transact(&items, None).await {
                Ok(()) => {
                    tracing::info!(
                        symbol = %asset.symbol,
                        old_price = ?old.as_ref().map(|old| old.price.to_string()),
                        new_price = %asset.price,
                        active = asset.active,
                        forced = force,
                        "asset changed"
                    );
                    return Ok(change);
                }
                Err(StorageError::TransactionCanceled { reasons })
                    if reasons.first().is_some_and(|reason| reason.condition_failed()) =>
                {
                    tracing::info!(symbol = %asset.symbol, "asset changed concurrently; reading it again");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(ServiceError::Busy)
    }

    /// A symbol's kept changes, newest first.
    pub async fn asset_changes(
        &self,
        symbol: &AssetSymbol,
        page: PageRequest,
    ) -> Result<PageOf<AssetChange>, ServiceError> {
        let (size, after) = page.into_parts();
        if after
            .as_deref()
            .is_some_and(|after| uuid::Uuid::try_parse(after).is_err())
        {
            return Err(FieldError::new("page_token", "is not a cursor this service issued").into());
        }
        let found = retry_safe(|| {
            self.storage
                .query(model::asset_changes_query(symbol, size + 1, after.clone()))
        })
        .await?;
        let more = found.items.len() > size as usize;
        let items = found
            .items
            .iter()
            .take(size as usize)
            .map(model::asset_change_from_item)
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = more
            .then(|| {
                items
                    .last()
                    .map(|change| URL_SAFE_NO_PAD.encode(change.change_id.as_bytes()))
            })
            .flatten();
        Ok(PageOf { items, next_cursor })
    }
}
