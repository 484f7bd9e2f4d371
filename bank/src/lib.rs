//! Lockstep's resilience tests: the pieces that make storage and coordinators misbehave on
//! purpose, so a test can show that every balance stays exact through it.
//!
//! # Layout
//! - [`fault_proxy`]: an HTTP/1.1 reverse proxy between the coordinator and a DynamoDB endpoint
//!   (dynoxide's HTTP server, moto) that, at a configurable rate, answers 500s or throttling
//!   errors, delays requests past the coordinator's attempt timeout, resets connections before a
//!   request reaches storage, and drops replies after storage applied the request.
//! - [`dynoxide_server`]: dynoxide's HTTP server on a loopback port, the DynamoDB endpoint of
//!   the endpoint runs (and of the end-to-end tests and the storage benchmark).
//! - [`cluster`]: coordinator processes from the real binary, killed with SIGKILL and restarted.
//! - [`workload`]: clients issuing random operations (transfers between the bank's users, and
//!   order flows: a reserve, fills, a cancel, among them) with request ids, retrying with the same
//!   id, recording each operation as ok, failed or unknown with the amounts it asked for.
//! - [`run`]: one bank run in the style of Jepsen's bank test, and its verdict: the audit plus
//!   a check that the ledger is explained by the ok operations and a subset of the unknown ones
//!   (a transfer on both of its accounts or on neither), that each account's cash and the
//!   total of all accounts add up from the amounts the clients asked for (fills replayed per
//!   order), and that what each account has on hold is what its open orders hold.

pub mod cluster;
pub mod dynoxide_server;
pub mod fault_proxy;
pub mod run;
pub mod workload;

pub use run::{BankConfig, BankEngine, BankReport, run};
