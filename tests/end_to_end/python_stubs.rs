//! `proto/` compiles unchanged with grpcio-tools (pinned in scripts/requirements-test.txt), and
//! the generated Python client calls a running coordinator: Deposit, Withdraw, PlaceBuy,
//! PlaceSell and Transfer, checked by tests/python/stub_client.py.

use std::path::PathBuf;

use crate::helpers::{AppOptions, EngineKind, TestApp, repo_root, spawn_app, spawn_app_with, venv_tool};

/// LOCKSTEP_PYTHON, else the venv that scripts/python-tools.sh makes (with grpcio-tools).
fn python() -> PathBuf {
    venv_tool("LOCKSTEP_PYTHON", "bin/python")
}

async fn run(command: &mut tokio::process::Command) -> String {
    let output = command.output().await.expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_generated_from_proto_calls_the_coordinator() {
    let app = spawn_app(EngineKind::Embedded).await;
    python_client_calls(&app, &[]).await;
}

/// The same client over TLS with a trader token, against a coordinator that requires one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_calls_over_tls_with_a_token() {
    let pki = crate::auth::Pki::new();
    crate::auth::write_auth_file(&pki.path("auth"));
    let options = pki
        .server_flags(AppOptions::default(), false)
        .flag("--auth-file", pki.path("auth").display());
    let app = spawn_app_with(EngineKind::Embedded, options).await;
    let ca = pki.path("ca.pem").display().to_string();
    python_client_calls(
        &app,
        &[
            ("LOCKSTEP_TLS_CA", ca.as_str()),
            ("LOCKSTEP_TOKEN", crate::auth::TRADER_TOKEN),
        ],
    )
    .await;
    let mut client = crate::auth::tls_client(&app, &pki, None)
        .await
        .expect("connect over TLS");
    let request = lockstep::coordinator::v1::ListLedgerRequest {
        user_id: "python-stub".to_owned(),
        page_size: 100,
        ..Default::default()
    };
    let entries = client
        .list_ledger(crate::auth::with_token(request, Some(crate::auth::READER_TOKEN)))
        .await
        .expect("ledger")
        .into_inner()
        .entries;
    assert_eq!(
        entries.len(),
        5,
        "five mutations (the last a transfer), each applied once"
    );
    assert!(
        entries.iter().all(|entry| entry.principal == "trader-svc"),
        "{entries:?}"
    );
}

async fn python_client_calls(app: &TestApp, environment: &[(&str, &str)]) {
    let generated = tempfile::tempdir().expect("temp dir");
    let out = generated.path().display().to_string();
    run(tokio::process::Command::new(python())
        .current_dir(repo_root())
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={out}"))
        .arg(format!("--grpc_python_out={out}"))
        .arg("proto/lockstep/coordinator/v1/coordinator.proto"))
    .await;
    for file in ["coordinator_pb2.py", "coordinator_pb2_grpc.py"] {
        let path = generated.path().join("lockstep/coordinator/v1").join(file);
        assert!(path.exists(), "grpcio-tools did not generate {}", path.display());
    }

    let stdout = run(tokio::process::Command::new(python())
        .current_dir(repo_root())
        .arg("tests/python/stub_client.py")
        .arg(app.address.to_string())
        .envs(environment.iter().copied())
        .env("PYTHONPATH", generated.path()))
    .await;
    assert_eq!(stdout.trim(), "ok");
    if environment.is_empty() {
        assert_eq!(
            app.full_ledger("python-stub").await.len(),
            5,
            "five mutations (the last a transfer), each applied once"
        );
    }
}
