//! The `user-service` binary: parse settings, start logging, bind, run until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use lockstep::process::{init_tracing, shutdown_signal};
use lockstep_user_service::{Settings, run};

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    init_tracing();
    let listener = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("user-service: cannot listen on {}: {error}", settings.listen);
            return ExitCode::FAILURE;
        }
    };
    match run(listener, settings, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("user-service: {error}");
            ExitCode::FAILURE
        }
    }
}
