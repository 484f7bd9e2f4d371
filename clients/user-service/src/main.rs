//! The `user-service` binary: parse settings, then start logging, bind and serve its routes until
//! SIGINT/SIGTERM as every service does ([`lockstep_client_common::server::run_binary`]).

use std::process::ExitCode;

use clap::Parser;
use lockstep_user_service::{Settings, routes};

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    lockstep_client_common::server::run_binary(
        "user-service",
        settings.listen,
        &settings.coordinator,
        &settings.end_users,
        routes(),
    )
    .await
}
