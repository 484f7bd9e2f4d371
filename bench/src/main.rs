//! `lockstep-bench`: parse the flags, run the load (or serve dynoxide), print the figures.

use std::process::ExitCode;

use clap::Parser;
use lockstep_bench::settings::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::ServeDynoxide { listen, file }) = cli.command {
        return serve_dynoxide(&listen, file.as_deref()).await;
    }
    let settings = cli.settings;
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

/// dynoxide's HTTP server on `listen` until Ctrl-C.
async fn serve_dynoxide(listen: &str, file: Option<&std::path::Path>) -> ExitCode {
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
