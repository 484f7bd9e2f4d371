//! The bank test in its CI configuration ([`BankConfig::ci`], the one place its figures are set),
//! on the embedded engine and on dynoxide over HTTP with three coordinators.
//! `LOCKSTEP_BANK_SECONDS` shortens or lengthens it; `LOCKSTEP_BANK_SWEEP_SECS` sets the
//! sweeper's interval (5 s in CI, 0 turns it off; see [`BankConfig::ci`]).

use std::time::Duration;

use lockstep_bank::{BankConfig, BankEngine, run};

fn config(engine: BankEngine) -> BankConfig {
    let mut config = BankConfig::ci(engine);
    if let Some(seconds) = std::env::var("LOCKSTEP_BANK_SECONDS")
        .ok()
        .and_then(|raw| raw.parse().ok())
    {
        config.duration = Duration::from_secs(seconds);
    }
    if let Some(seconds) = std::env::var("LOCKSTEP_BANK_SWEEP_SECS")
        .ok()
        .and_then(|raw| raw.parse().ok())
    {
        config.sweep_interval = Duration::from_secs(seconds);
    }
    config
}

async fn bank_holds(engine: BankEngine) {
    let config = config(engine);
    let report = run(config.clone()).await.expect("bank run");
    println!("{report}");
    assert!(report.discrepancies.is_empty(), "{report}");
    assert!(report.audit.is_clean(), "{report}");
    assert_eq!(report.kills, config.kills, "{report}");
    assert!(report.faults_injected > 0, "faults were injected: {report}");
    assert!(report.ok > config.clients * 5, "the workload made progress: {report}");
    // The order flows did too: orders reserved, filled and cancelled.
    for kind in ["RESERVE", "FILL", "CANCEL"] {
        assert!(
            report.by_kind.get(kind).is_some_and(|(ok, _, _)| *ok > 0),
            "some {kind} applied: {report}"
        );
    }
    // The watchers followed their accounts through the kills (gaps and shortfalls are
    // discrepancies, checked above) and did see entries.
    assert_eq!(report.watched.len(), 3, "{report}");
    assert!(report.watched.iter().all(|(_, seen, _, _)| *seen > 0), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_on_the_embedded_engine() {
    bank_holds(BankEngine::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_on_dynoxide_over_http_with_three_coordinators() {
    bank_holds(BankEngine::Endpoint).await;
}
