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

/// The defaults of every flag: the CI run on the endpoint engine.
const CI: BankConfig = BankConfig::ci(BankEngine::Endpoint);

/// Jepsen-style bank test: random deposits, withdrawals, buys, sells, transfers and order flows
/// (reserve, fills, cancel) with request ids, under storage faults and coordinator kills; then the audit and the history check. Without
/// flags it is the CI run on the endpoint.
#[derive(Debug, Parser)]
struct Arguments {
    #[arg(long, value_enum, default_value_t = Engine::Endpoint)]
    engine: Engine,
    #[arg(long, default_value_t = CI.clients)]
    clients: usize,
    #[arg(long, default_value_t = CI.users)]
    users: usize,
    #[arg(long, default_value_t = CI.duration.as_secs())]
    duration_secs: u64,
    /// Share of storage requests that fail, 0.0-1.0.
    #[arg(long, default_value_t = CI.fault_rate)]
    fault_rate: f64,
    #[arg(long, default_value_t = CI.kills)]
    kills: usize,
    /// Coordinator processes (the embedded engine runs one).
    #[arg(long, default_value_t = CI.coordinators)]
    coordinators: usize,
    #[arg(long, default_value_t = CI.seed)]
    seed: u64,
    /// Seconds between the coordinators' sweeps; 0 turns the sweeper off.
    #[arg(long, default_value_t = CI.sweep_interval.as_secs())]
    sweep_interval_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let engine = match arguments.engine {
        Engine::Embedded => BankEngine::Embedded,
        Engine::Endpoint => BankEngine::Endpoint,
    };
    let ci = BankConfig::ci(engine);
    let config = BankConfig {
        clients: arguments.clients,
        users: arguments.users,
        duration: Duration::from_secs(arguments.duration_secs),
        fault_rate: arguments.fault_rate,
        kills: arguments.kills,
        coordinators: match engine {
            BankEngine::Embedded => ci.coordinators,
            BankEngine::Endpoint => arguments.coordinators.max(1),
        },
        seed: arguments.seed,
        sweep_interval: Duration::from_secs(arguments.sweep_interval_secs),
        ..ci
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
