//! End-to-end tests: the real coordinator on a loopback port, over real storage engines
//! (embedded dynoxide, dynoxide's HTTP server, moto's server), compiled into one binary.

mod affinity;
mod audit;
mod auth;
mod bounded;
mod clients;
mod durability;
mod exactly_once;
mod feed;
mod grpcurl;
mod health;
mod helpers;
mod holds;
mod leases;
mod ledger_feed;
mod lifecycle;
mod money;
mod operations;
mod python_stubs;
mod readme;
mod recovery;
mod services;
mod transfers;
mod validation;
