//! Identifier types. Each has a `parse` constructor that is the only way to make one.

use std::fmt;

/// A rejected input field: which field and why, for INVALID_ARGUMENT replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Longest user id, in characters: long enough for an e-mail address or a UUID with a prefix.
pub const USER_ID_LENGTH_MAX: usize = 64;
/// Longest asset symbol, in characters.
pub const ASSET_SYMBOL_LENGTH_MAX: usize = 10;

/// A user id: 1-64 characters from `[A-Za-z0-9._@-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldError> {
        if raw.is_empty() {
            return Err(FieldError::new(field, "must not be empty"));
        }
        if raw.chars().count() > USER_ID_LENGTH_MAX {
            return Err(FieldError::new(
                field,
                format!("must be at most {USER_ID_LENGTH_MAX} characters"),
            ));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-')))
        {
            return Err(FieldError::new(
                field,
                format!("must use only A-Z a-z 0-9 . _ @ - (found {bad:?})"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An asset symbol: 1-10 uppercase ASCII letters or digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssetSymbol(String);

impl AssetSymbol {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldError> {
        if raw.is_empty() {
            return Err(FieldError::new(field, "must not be empty"));
        }
        if raw.len() > ASSET_SYMBOL_LENGTH_MAX || !raw.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()) {
            return Err(FieldError::new(
                field,
                format!("must be 1-{ASSET_SYMBOL_LENGTH_MAX} uppercase letters or digits"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AssetSymbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest idempotency key, in characters: room for a UUID with a generous prefix.
pub const REQUEST_ID_LENGTH_MAX: usize = 128;

/// A caller-chosen idempotency key: 1-128 characters from `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// An empty string means "no key": the request is not deduplicated.
    pub fn parse_optional(field: &'static str, raw: &str) -> Result<Option<Self>, FieldError> {
        if raw.is_empty() {
            return Ok(None);
        }
        if raw.len() > REQUEST_ID_LENGTH_MAX
            || !raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        {
            return Err(FieldError::new(
                field,
                format!("must be at most {REQUEST_ID_LENGTH_MAX} characters from A-Z a-z 0-9 . _ : -"),
            ));
        }
        if raw.starts_with(FILL_KEY_PREFIX) {
            return Err(FieldError::new(
                field,
                format!("must not start with {FILL_KEY_PREFIX} (the keys of fills, FillOrder's fill_id)"),
            ));
        }
        Ok(Some(Self(raw.to_owned())))
    }

    /// The key a fill's outcome is recorded under: `fill:{order_id}:{fill_id}`. No caller's
    /// request id can take this form (`parse_optional` refuses the prefix), so a request id
    /// can never occupy, and so block, the key of a fill that has yet to arrive.
    pub fn for_fill(order_id: &OrderId, fill_id: &str) -> Self {
        Self(format!("{FILL_KEY_PREFIX}{order_id}:{fill_id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The prefix of the request records of fills.
pub const FILL_KEY_PREFIX: &str = "fill:";

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of one lease acquisition (the design's "lock id": stored as `lock_id` and logged as
/// such). A commit is fenced on it: only the holder of this exact id, before its expiry, can
/// write the account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseId(String);

impl LeaseId {
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// Rebuilds a lock id read back from storage.
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Declares a UUID-v7 id type: made fresh (time-ordered, so newest-first pages are reverse key
/// scans), parsed from a request (any UUID spelling, kept in canonical lowercase hyphenated
/// form), or rebuilt from storage.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn new() -> Self {
                Self(uuid::Uuid::now_v7().to_string())
            }

            pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldError> {
                uuid::Uuid::try_parse(raw)
                    .map(|id| Self(id.hyphenated().to_string()))
                    .map_err(|_| FieldError::new(field, "must be a UUID"))
            }

            /// Rebuilds an id read back from storage.
            pub fn from_stored(raw: impl Into<String>) -> Self {
                Self(raw.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

uuid_id!(
    /// An order's id.
    OrderId
);
uuid_id!(
    /// A ledger entry's id, which is also the transaction id a mutation's reply carries.
    EntryId
);
uuid_id!(
    /// A pending withdrawal's id (Withdraw with settlement PENDING).
    WithdrawalId
);
uuid_id!(
    /// A transfer's id: the same on the sender's TRANSFER_OUT and the receiver's TRANSFER_IN.
    TransferId
);

/// Longest memo of a transfer, in characters: a payment reference or a short note, as card
/// and bank statements show them.
pub const MEMO_LENGTH_MAX: usize = 140;

/// A transfer's note: at most 140 printable characters (any script, no control characters),
/// stored on both ledger entries and returned as given. Empty means none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Memo(String);

impl Memo {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldError> {
        if raw.chars().count() > MEMO_LENGTH_MAX {
            return Err(FieldError::new(
                field,
                format!("must be at most {MEMO_LENGTH_MAX} characters"),
            ));
        }
        if let Some(bad) = raw.chars().find(|c| c.is_control()) {
            return Err(FieldError::new(
                field,
                format!("must hold printable characters only (found {bad:?})"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Rebuilds a memo read back from storage.
    pub fn from_stored(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Memo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_accepts_the_documented_alphabet() {
        assert!(UserId::parse("user_id", "alice.b_c@d-e09").is_ok());
        assert!(UserId::parse("user_id", &"a".repeat(64)).is_ok());
    }

    #[test]
    fn user_id_rejects_bad_shapes() {
        for bad in ["", " alice", "al ice", "ålice", "a/b", &"a".repeat(65)] {
            let error = UserId::parse("user_id", bad).unwrap_err();
            assert_eq!(error.field, "user_id", "{bad:?}");
        }
    }

    #[test]
    fn order_ids_are_uuids_in_canonical_form() {
        let id = OrderId::parse("order_id", "0190A2B4-0000-7000-8000-000000000000").unwrap();
        assert_eq!(id.as_str(), "0190a2b4-0000-7000-8000-000000000000");
        assert_eq!(OrderId::parse("order_id", "nope").unwrap_err().field, "order_id");
    }

    #[test]
    fn memo_rules() {
        assert!(Memo::parse("memo", "").unwrap().is_empty());
        assert_eq!(Memo::parse("memo", "rent — März").unwrap().as_str(), "rent — März");
        assert!(Memo::parse("memo", &"é".repeat(140)).is_ok());
        let long = Memo::parse("memo", &"a".repeat(141)).unwrap_err();
        assert_eq!(
            (long.field, long.reason.as_str()),
            ("memo", "must be at most 140 characters")
        );
        for bad in ["a\nb", "tab\there", "nul\0", "esc\u{1b}[31m"] {
            assert_eq!(Memo::parse("memo", bad).unwrap_err().field, "memo", "{bad:?}");
        }
    }

    #[test]
    fn asset_symbol_rules() {
        assert!(AssetSymbol::parse("asset", "BTC").is_ok());
        assert!(AssetSymbol::parse("asset", "ABCDEFGHI0").is_ok());
        for bad in ["", "btc", "BTC-USD", "ABCDEFGHIJK", "₿"] {
            assert!(AssetSymbol::parse("asset", bad).is_err(), "{bad:?}");
        }
    }
}
