//! The `coordinator` binary: parse settings, start telemetry, open storage, bind, run.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use lockstep_coordinator::core::SystemClock;
use lockstep_coordinator::server;
use lockstep_coordinator::settings::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    lockstep::process::init_tracing();
    let settings = cli.settings;
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::CreateTables => server::create_tables(&settings).await.map(|()| {
            tracing::info!(table = %settings.table, "table ready");
        }),
        Command::Serve => serve(&settings).await,
        Command::Audit { lease_margin_secs } => return audit(&settings, lease_margin_secs).await,
        Command::HashToken => return hash_token(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "coordinator failed");
            eprintln!("coordinator: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `coordinator audit`: prints the report; exit code 1 on any discrepancy, 2 if it cannot run.
async fn audit(settings: &lockstep_coordinator::settings::Settings, lease_margin_secs: u64) -> ExitCode {
    use lockstep_coordinator::core::Clock;
    let storage = match server::connect_storage(settings).await {
        Ok(storage) => storage,
        Err(error) => {
            eprintln!("coordinator audit: {error}");
            return ExitCode::from(2);
        }
    };
    let margin = std::time::Duration::from_secs(lease_margin_secs);
    match lockstep_coordinator::audit::audit(&storage, SystemClock.now(), margin).await {
        Ok(report) => {
            print!("{report}");
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("coordinator audit: {error}");
            ExitCode::from(2)
        }
    }
}

/// `coordinator hash-token`: the token on stdin, its SHA-256 on stdout; the token is never
/// echoed.
fn hash_token() -> ExitCode {
    use std::io::Read;
    let mut input = String::new();
    if let Err(error) = std::io::stdin().take(8192).read_to_string(&mut input) {
        eprintln!("coordinator hash-token: cannot read stdin: {error}");
        return ExitCode::FAILURE;
    }
    match lockstep_coordinator::auth::tokens::token_from_input(&input) {
        Ok(token) => {
            println!("{}", lockstep_coordinator::auth::hash_token(token));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("coordinator hash-token: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: &lockstep_coordinator::settings::Settings) -> Result<(), server::StartError> {
    // Settings first: a refused listen address or a bad certificate stops before storage opens.
    let security = lockstep_coordinator::auth::Security::from_flags(&settings.auth_flags(), settings.listen)
        .map_err(server::StartError::Settings)?;
    if settings.insecure {
        tracing::warn!(
            listen = %settings.listen,
            "--insecure: serving without requiring TLS and authentication on this address; never do this in production"
        );
    }
    let storage = server::open_storage(settings).await?;
    let coordinator =
        server::build_coordinator(storage, Arc::new(SystemClock), settings, settings.catalog.as_deref()).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|error| server::StartError::Serve(format!("cannot listen on {}: {error}", settings.listen)))?;
    server::run_secured(
        listener,
        coordinator,
        settings.drain_timeout(),
        server::shutdown_signal(),
        security,
    )
    .await
}
