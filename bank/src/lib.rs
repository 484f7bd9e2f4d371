//! Lockstep's resilience tests: the pieces that make storage and coordinators misbehave on
//! purpose, so a test can show that every balance stays exact through it.
//!
//! # Layout
//! - [`fault_proxy`]: an HTTP/1.1 reverse proxy between the coordinator and a DynamoDB endpoint
//!   (dynoxide's HTTP server, moto) that, at a configurable rate, answers 500s or throttling
//!   errors, delays requests past the coordinator's attempt timeout, resets connections before a
//!   request reaches storage, and drops replies after storage applied the request.

pub mod fault_proxy;
