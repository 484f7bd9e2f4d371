//! Reads: an account, an order, and newest-first pages of a user's orders and ledger.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::core::records::{LedgerEntry, Order};
use crate::core::{Account, FieldError, OrderId, UserId};
use crate::storage::model::{self, UserCollection};
use crate::storage::{Item, Value};

use super::{Missing, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX, PageOf, ServiceError, TransactionCoordinator, retry_safe};

/// Longest page token accepted: a cursor is a sort key (a prefix and a UUID) in base64, far
/// shorter; anything longer was not issued by this service.
pub const PAGE_TOKEN_LENGTH_MAX: usize = 128;

/// Which page of a user's collection to read, as parsed from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    size: u32,
    /// The sort key of the previous page's last item.
    after: Option<String>,
}

impl PageRequest {
    /// `page_size` 0 means the default; `page_token` "" the first page.
    pub fn parse(page_size: u32, page_token: &str) -> Result<Self, FieldError> {
        let size = match page_size {
            0 => PAGE_SIZE_DEFAULT,
            1..=PAGE_SIZE_MAX => page_size,
            _ => return Err(FieldError::new("page_size", format!("must be at most {PAGE_SIZE_MAX}"))),
        };
        let invalid = || FieldError::new("page_token", "is not a cursor this service issued");
        let after = match page_token {
            "" => None,
            token if token.len() > PAGE_TOKEN_LENGTH_MAX => return Err(invalid()),
            token => Some(
                URL_SAFE_NO_PAD
                    .decode(token)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .ok_or_else(invalid)?,
            ),
        };
        Ok(Self { size, after })
    }

    /// The page size and the cursor's sort key, for reads outside this file.
    pub(super) fn into_parts(self) -> (u32, Option<String>) {
        (self.size, self.after)
    }

    /// The page size asked for (the default for 0).
    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn first(size: u32) -> Self {
        Self {
            size: size.clamp(1, PAGE_SIZE_MAX),
            after: None,
        }
    }
}

impl TransactionCoordinator {
    pub async fn account(&self, user: &UserId) -> Result<Account, ServiceError> {
        let item = self.storage.get(model::account_key(user)).await?;
        let account = item.as_ref().map(model::account_from_item).transpose()?;
        account
            .filter(|account| account.exists())
            .ok_or_else(|| ServiceError::NotFound(Missing::Account(user.clone())))
    }

    pub async fn order(&self, order_id: &OrderId) -> Result<Order, ServiceError> {
        let item = self.storage.get(model::order_key(order_id.as_str())).await?;
        let item = item.ok_or_else(|| ServiceError::NotFound(Missing::Order(order_id.to_string())))?;
        let mut order = model::order_from_item(&item)?;
        order.status = order.status_at(self.clock.now());
        Ok(order)
    }

    /// A page of `user`'s orders, newest first, each in its status as it stands now (an open
    /// reserved order past its expiry reads EXPIRED, swept or not).
    pub async fn orders(&self, user: &UserId, page: PageRequest) -> Result<PageOf<Order>, ServiceError> {
        let mut page = self
            .user_page(user, UserCollection::Orders, page, model::order_from_item)
            .await?;
        let now = self.clock.now();
        for order in &mut page.items {
            order.status = order.status_at(now);
        }
        Ok(page)
    }

    pub async fn ledger(&self, user: &UserId, page: PageRequest) -> Result<PageOf<LedgerEntry>, ServiceError> {
        self.user_page(user, UserCollection::Ledger, page, model::ledger_from_item)
            .await
    }

    /// Up to `limit` of `user`'s entries after sequence `after`, in sequence order, with no
    /// gap: the read behind ListLedger's `after_sequence` and WatchLedger. An account not yet
    /// numbered is numbered first (`numbering`). A cursor past the account's last entry is
    /// refused: no client can have seen it.
    pub async fn ledger_after(
        self: &std::sync::Arc<Self>,
        user: &UserId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, ServiceError> {
        let account = self.numbered_account(user).await?;
        if after > account.entries {
            return Err(FieldError::new(
                "after_sequence",
                format!(
                    "is {after}, past {user}'s last ledger entry ({}): it is not a sequence of this account",
                    account.entries
                ),
            )
            .into());
        }
        self.entries_after(user, after, limit, account.legacy_through > after)
            .await
    }

    /// Up to `limit` entries after `after` in sequence order, stopping before any gap, for an
    /// account already numbered (a watcher's next read). `unsequenced`: entries written before
    /// sequences hold places after `after` (the account's `legacy_through` is above it), so
    /// merge them in; a gap in the sequenced entries is always looked into.
    pub async fn entries_after(
        &self,
        user: &UserId,
        after: u64,
        limit: u32,
        unsequenced: bool,
    ) -> Result<Vec<LedgerEntry>, ServiceError> {
        let page = self
            .storage
            .query(model::sequenced_entries_after(user, after, limit))
            .await?;
        let mut entries = page
            .items
            .iter()
            .map(model::ledger_from_item)
            .collect::<Result<Vec<_>, _>>()?;
        let contiguous = entries
            .iter()
            .map(|entry| entry.sequence)
            .eq((after + 1..).take(entries.len()));
        let full = entries.len() >= limit as usize;
        if contiguous && (full || !unsequenced) {
            return Ok(entries);
        }
        // Places taken by entries written before sequences (numbered where they lie, keyed
        // by id): merged in by their sequence.
        for item in self.unsequenced_items(user).await? {
            let numbered = model::unsequenced_entry_from_item(&item)?.numbered;
            let entry = model::ledger_from_item(&item)?;
            if numbered && entry.sequence > after {
                entries.push(entry);
            }
        }
        entries.sort_by_key(|entry| entry.sequence);
        let run = entries
            .iter()
            .zip(after + 1..)
            .take_while(|(entry, expected)| entry.sequence == *expected)
            .count()
            .min(limit as usize);
        entries.truncate(run);
        Ok(entries)
    }

    /// Every entry of `user` written before sequences (keyed by id), page by page.
    pub(super) async fn unsequenced_items(&self, user: &UserId) -> Result<Vec<Item>, ServiceError> {
        let mut items = Vec::new();
        let mut start_after = None;
        loop {
            let query = model::unsequenced_entries(user, start_after);
            let page = retry_safe(|| self.storage.query(query.clone())).await?;
            items.extend(page.items);
            match page.last_key {
                Some(last) => start_after = Some(last),
                None => return Ok(items),
            }
        }
    }

    /// Whether `user` has any entry written before sequences (one item read at most).
    pub(super) async fn may_hold_unsequenced(&self, user: &UserId) -> Result<bool, ServiceError> {
        let mut query = model::unsequenced_entries(user, None);
        query.limit = 1;
        Ok(!self.storage.query(query).await?.items.is_empty())
    }

    async fn user_page<T>(
        &self,
        user: &UserId,
        collection: UserCollection,
        page: PageRequest,
        parse: fn(&Item) -> Result<T, model::MalformedItem>,
    ) -> Result<PageOf<T>, ServiceError> {
        // One item more than the page: its presence says whether there is a next page, so the
        // last page never ends in a cursor to an empty one.
        let query = model::user_page_query(user, collection, page.size + 1, page.after)
            .ok_or_else(|| ServiceError::from(FieldError::new("page_token", "is not a cursor this service issued")))?;
        self.account(user).await?;
        let found = self.storage.query(query).await?;
        let more = found.items.len() > page.size as usize;
        let items = found
            .items
            .iter()
            .take(page.size as usize)
            .map(|item| parse(item).map(|parsed| (parsed, sort_key(item))))
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = more
            .then(|| {
                items
                    .last()
                    .map(|(_, sort_key)| URL_SAFE_NO_PAD.encode(sort_key.as_bytes()))
            })
            .flatten();
        let items = items.into_iter().map(|(parsed, _)| parsed).collect();
        Ok(PageOf { items, next_cursor })
    }
}

fn sort_key(item: &Item) -> String {
    match item.get("sk") {
        Some(Value::S(sort_key)) => sort_key.clone(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page sizes default, cap and refuse; tokens must decode to text and stay short.
    #[test]
    fn page_requests_parse_strictly() {
        assert_eq!(PageRequest::parse(0, "").unwrap().size, PAGE_SIZE_DEFAULT);
        assert_eq!(PageRequest::parse(PAGE_SIZE_MAX, "").unwrap().size, PAGE_SIZE_MAX);
        assert_eq!(
            PageRequest::parse(PAGE_SIZE_MAX + 1, "").unwrap_err().field,
            "page_size"
        );
        assert_eq!(PageRequest::parse(1, "!!").unwrap_err().field, "page_token");
        let long = "A".repeat(PAGE_TOKEN_LENGTH_MAX + 1);
        assert_eq!(PageRequest::parse(1, &long).unwrap_err().field, "page_token");
        let token = URL_SAFE_NO_PAD.encode("LEDGER#x");
        assert_eq!(
            PageRequest::parse(1, &token).unwrap().after.as_deref(),
            Some("LEDGER#x")
        );
    }
}
