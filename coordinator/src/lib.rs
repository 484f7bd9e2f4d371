//! Lockstep's coordinator: Deposit, Withdraw, PlaceBuy and PlaceSell behind a fenced per-user
//! lease on DynamoDB, each committed atomically.
//!
//! # Layout
//! A request flows inward through these modules, and dependencies point only inward:
//!
//! - [`transport`]: gRPC in and out. Parses requests into validated types and maps every
//!   [`service::ServiceError`] to one gRPC status.
//! - [`service`]: one function per RPC: take the lease (reading the account in the same
//!   write), decide, commit-and-release in one transaction, or roll back.
//! - [`core`]: pure decisions and value types (`UserId`, `Usd`, `Quantity`, `Price`); no I/O,
//!   no tokio, tonic or AWS SDK.
//! - [`storage`]: the DynamoDB data model ([`storage::model`]) built once, and one thin adapter
//!   per engine: [`storage::embedded`] (dynoxide in-process) and [`storage::dynamodb`]
//!   (aws-sdk-dynamodb to any endpoint).
//! - [`server`]: wiring (storage, catalog seed, health, reflection) and `run`, which the
//!   binary and the tests call alike. [`settings`]: flags with environment fallbacks.
//! - [`admin`]: operator commands (inspect, release-lease, audit, backup, restore, contended
//!   users), as the `Admin` gRPC service and as subcommands.
//! - [`auth`]: who may call what: mTLS and bearer tokens, the role table by gRPC path, and the
//!   safe-default rule for the listen address; a tower layer in front of every service.
//! - [`audit`]: reads the whole table and checks the books (`coordinator audit`, and tests).
//!   [`sweeper`]: releases leases whose holder died and deletes expired request records.
//! - [`affinity`]: account affinity across the coordinators of one table: who is live, which
//!   one owns an account, and forwarding a mutation to its owner (the `Peer` service).
//! - [`telemetry`]: metrics (`--metrics-listen`), the per-call span and log line, W3C trace
//!   context, and health read from storage's recent answers.

pub mod admin;
pub mod affinity;
pub mod audit;
pub mod auth;
pub mod core;
pub mod server;
pub mod service;
pub mod settings;
pub mod storage;
pub mod sweeper;
pub mod telemetry;
pub mod transport;
