//! `lockstep-bench`: parse the flags, run the load (or serve dynoxide), print the figures.

use std::process::ExitCode;

use clap::Parser;
use lockstep_bench::settings::{Cli, Command, Settings, WorkloadKind};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::StreamsCost { sizes, samples }) = &cli.command {
        return match lockstep_bench::streams_cost::run(sizes, (*samples).max(1)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("lockstep-bench: {error}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::ServeDynoxide {
        listen,
        file,
        latency_ms,
    }) = cli.command
    {
        return serve_dynoxide(&listen, file.as_deref(), latency_ms).await;
    }
    let settings = cli.settings;
    if settings.workload == WorkloadKind::Orders {
        return orders(&settings).await;
    }
    match lockstep_bench::run(&settings).await {
        Ok(reports) => {
            if settings.json {
                println!("{}", lockstep_bench::json(&settings, &reports));
            } else {
                if let Ok(plan) = lockstep_bench::plan(&settings) {
                    println!("{}", lockstep_bench::describe(&plan, &settings));
                }
                for report in &reports {
                    print!("{}", report.text());
                }
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("lockstep-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The orders workload: its own report, a row per call of the cycle beside PlaceBuy's.
async fn orders(settings: &Settings) -> ExitCode {
    match lockstep_bench::orders::run(settings).await {
        Ok(report) => {
            if settings.json {
                println!("{}", lockstep_bench::orders::json(settings, &report));
            } else {
                if let Ok(plan) = lockstep_bench::plan(settings) {
                    println!("{}", lockstep_bench::describe(&plan, settings));
                }
                print!("{}", report.text());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("lockstep-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

/// dynoxide's HTTP server on `listen` until Ctrl-C; with a latency, behind a proxy on `listen`
/// that delays every chunk that long each way (dynoxide itself on another loopback port).
async fn serve_dynoxide(listen: &str, file: Option<&std::path::Path>, latency_ms: f64) -> ExitCode {
    if !(latency_ms.is_finite() && (0.0..=10_000.0).contains(&latency_ms)) {
        eprintln!("lockstep-bench: --latency-ms {latency_ms}: a number of milliseconds from 0 to 10000");
        return ExitCode::FAILURE;
    }
    let database = match file {
        Some(path) => dynoxide::Database::new(&path.display().to_string()),
        None => dynoxide::Database::memory(),
    };
    let database = match database {
        Ok(database) => database,
        Err(error) => {
            eprintln!("lockstep-bench: cannot open dynoxide's database: {error}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("lockstep-bench: cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let listener = if latency_ms > 0.0 {
        let inner = match tokio::net::TcpListener::bind("127.0.0.1:0").await.and_then(|inner| {
            let address = inner.local_addr()?;
            Ok((inner, address))
        }) {
            Ok(inner) => inner,
            Err(error) => {
                eprintln!("lockstep-bench: cannot listen on loopback: {error}");
                return ExitCode::FAILURE;
            }
        };
        let delay = std::time::Duration::from_secs_f64(latency_ms / 1000.0);
        tokio::spawn(lockstep_bench::latency_proxy::serve(
            listener,
            inner.1.to_string(),
            delay,
        ));
        println!("every chunk to and from dynoxide delayed {latency_ms} ms each way");
        inner.0
    } else {
        listener
    };
    println!("dynoxide serving DynamoDB's API on http://{listen} (Ctrl-C stops it)");
    let stopped = async {
        tokio::signal::ctrl_c().await.ok();
    };
    match dynoxide::server::serve_with_shutdown(listener, database, stopped).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lockstep-bench: dynoxide's server stopped: {error}");
            ExitCode::FAILURE
        }
    }
}
