//! The `coordinator` binary: parse settings, start telemetry, open storage, bind, run.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use lockstep_coordinator::core::SystemClock;
use lockstep_coordinator::server;
use lockstep_coordinator::settings::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    // Before anything else, so that no moment of start-up dies of a fleet-wide SIGHUP; the
    // listener itself is not read here (the server answers SIGHUP with its own, see
    // `server::answer_hangups`), only kept for the life of the process.
    let _hangups = match lockstep::process::catch_hangups() {
        Ok(hangups) => hangups,
        Err(error) => {
            eprintln!("coordinator: cannot catch SIGHUP, which would then stop this process: {error}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse();
    #[cfg(feature = "otlp")]
    let _exporter = match &cli.settings.otlp_endpoint {
        Some(endpoint) => match lockstep_coordinator::telemetry::otlp::pipeline(endpoint, "lockstep-coordinator") {
            Ok((provider, layer)) => {
                lockstep::process::init_tracing_with(cli.settings.log_format.into(), Box::new(layer));
                Some(FlushOnExit(provider))
            }
            Err(error) => {
                eprintln!("coordinator: {error}");
                return ExitCode::from(2);
            }
        },
        None => {
            lockstep::process::init_tracing_as(cli.settings.log_format.into());
            None
        }
    };
    #[cfg(not(feature = "otlp"))]
    lockstep::process::init_tracing_as(cli.settings.log_format.into());
    let settings = cli.settings;
    let command = cli.command.unwrap_or(Command::Serve);
    if let Some((admin, server)) = command.clone().admin() {
        return lockstep_coordinator::admin::cli::run(&settings, server.as_deref(), admin).await;
    }
    let result = match command {
        Command::CreateTables => server::create_tables(&settings).await.map(|()| {
            tracing::info!(table = %settings.table, "table ready");
        }),
        Command::Serve => serve(&settings).await,
        Command::HashToken => return hash_token(),
        Command::Restore { path } => return lockstep_coordinator::admin::cli::restore(&settings, &path).await,
        Command::Watch {
            user,
            from,
            from_now,
            kinds,
            user_prefix,
            server,
            token_file,
        } => {
            let what = match user {
                Some(user) => lockstep_coordinator::admin::cli::Watched::Account { user, from },
                None => lockstep_coordinator::admin::cli::Watched::Feed {
                    cursor: from,
                    from_now,
                    kinds,
                    user_prefix,
                },
            };
            return lockstep_coordinator::admin::cli::watch(what, &server, token_file.as_deref()).await;
        }
        _ => unreachable!("operator commands ran above"),
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

/// Flushes the spans still batched when `main` returns.
#[cfg(feature = "otlp")]
struct FlushOnExit(opentelemetry_sdk::trace::SdkTracerProvider);

#[cfg(feature = "otlp")]
impl Drop for FlushOnExit {
    fn drop(&mut self) {
        if let Err(error) = self.0.shutdown() {
            eprintln!("coordinator: flushing spans: {error}");
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
    let peers =
        lockstep_coordinator::affinity::peer_setup(&settings.affinity_flags()).map_err(server::StartError::Settings)?;
    if settings.insecure {
        tracing::warn!(
            listen = %settings.listen,
            "--insecure: serving without requiring TLS and authentication on this address; never do this in production"
        );
    }
    if let Some(address) = settings.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|error| server::StartError::Serve(format!("cannot listen for metrics on {address}: {error}")))?;
        tokio::spawn(async move {
            if let Err(error) = lockstep_coordinator::telemetry::serve_metrics(listener).await {
                tracing::error!(%error, "metrics listener failed");
            }
        });
    }
    let storage = server::open_storage(settings).await?;
    let coordinator =
        server::build_coordinator(storage, Arc::new(SystemClock), settings, settings.catalog.as_deref()).await?;
    let affinity = peers.map(|(address, credentials)| {
        lockstep_coordinator::affinity::Affinity::new(&coordinator.config().owner, &address, credentials)
    });
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|error| server::StartError::Serve(format!("cannot listen on {}: {error}", settings.listen)))?;
    let health_listener = match settings.health_listen {
        Some(address) => Some(tokio::net::TcpListener::bind(address).await.map_err(|error| {
            server::StartError::Serve(format!("cannot listen for health checks on {address}: {error}"))
        })?),
        None => None,
    };
    server::run_clustered(
        listener,
        health_listener,
        coordinator,
        settings.drain_timeout(),
        server::shutdown_signal(),
        security,
        affinity,
    )
    .await
}
