//! `bank`: the bank test from the command line, for the CI configuration or a long soak.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lockstep_bank::{BankConfig, BankEngine};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Engine {
    Embedded,
    Endpoint,
}

/// Jepsen-style bank test: random deposits, withdrawals, buys and sells with request ids, under
/// storage faults and coordinator kills; then the audit and the history check.
#[derive(Debug, Parser)]
struct Arguments {
    #[arg(long, value_enum, default_value_t = Engine::Endpoint)]
    engine: Engine,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    #[arg(long, default_value_t = 16)]
    users: usize,
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Share of storage requests that fail, 0.0-1.0.
    #[arg(long, default_value_t = 0.10)]
    fault_rate: f64,
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Coordinator processes (the embedded engine runs one).
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let engine = match arguments.engine {
        Engine::Embedded => BankEngine::Embedded,
        Engine::Endpoint => BankEngine::Endpoint,
    };
    let config = BankConfig {
        engine,
        clients: arguments.clients,
        users: arguments.users,
        duration: Duration::from_secs(arguments.duration_secs),
        fault_rate: arguments.fault_rate,
        kills: arguments.kills,
        coordinators: if engine == BankEngine::Embedded {
            1
        } else {
            arguments.coordinators.max(1)
        },
        seed: arguments.seed,
    };
    match lockstep_bank::run(config).await {
        Ok(report) => {
            print!("{report}");
            if report.discrepancies.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("bank: {error}");
            ExitCode::from(2)
        }
    }
}
