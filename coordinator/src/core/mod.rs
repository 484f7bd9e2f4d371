//! The money path's pure part: value types that can only be made valid, and the decisions that
//! turn (account read under the lease, request) into the exact new account state, or a refusal.
//!
//! Nothing here does I/O or knows about tokio, tonic or DynamoDB; `service` feeds it what storage
//! returned and hands its result to `storage::model`, which turns it into conditional writes.

pub mod account;
pub mod asset_change;
pub mod batch;
pub mod decision;
pub mod ids;
pub mod limits;
pub mod money;
pub mod ops;
pub mod principal;
pub mod records;
pub mod time;

pub use account::{Account, AccountState, Holdings, PendingWithdrawal};
pub use decision::{Decision, Rejection};
pub use ids::{AssetSymbol, EntryId, FieldError, LeaseId, Memo, OrderId, RequestId, TransferId, UserId, WithdrawalId};
pub use limits::Limits;
pub use money::{Price, Quantity, Usd, UsdDelta};
pub use ops::{Operation, Quote, TradeRequest, TradeSide, TransferRequest};
pub use principal::Principal;
pub use time::{Clock, Millis, SystemClock, UtcDay};
