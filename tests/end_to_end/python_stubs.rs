//! `proto/` compiles unchanged with grpcio-tools (pinned in scripts/requirements-test.txt), and
//! the generated Python client calls a running coordinator: Deposit, Withdraw, PlaceBuy and
//! PlaceSell, checked by tests/python/stub_client.py.

use std::path::PathBuf;

use crate::helpers::{EngineKind, repo_root, spawn_app, venv_tool};

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
        .env("PYTHONPATH", generated.path()))
    .await;
    assert_eq!(stdout.trim(), "ok");
    assert_eq!(
        app.full_ledger("python-stub").await.len(),
        4,
        "four mutations, each applied once"
    );
}
