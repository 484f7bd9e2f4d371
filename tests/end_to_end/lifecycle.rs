//! The coordinator process's life (issue 18): SIGHUP never stops it, with or without an auth
//! file, in the middle of its start or while it serves; and its data dir is its own while it
//! runs, so `coordinator restore` and a second coordinator on that dir refuse instead of writing
//! beside it. Each test runs the real binary.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use lockstep_coordinator::auth::hash_token;

use crate::auth::with_token;
use crate::durability::{coordinator_binary, start_coordinator_process};

/// How long a coordinator may take to start, or a refused one to exit, on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A coordinator process started with `arguments` (and RUST_LOG=info), its stderr lines sent to
/// the returned receiver as they come.
fn spawn_coordinator(arguments: &[&str]) -> (Child, Receiver<String>) {
    let mut child = Command::new(coordinator_binary())
        .args(arguments)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator");
    let stderr = child.stderr.take().expect("piped stderr");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    (child, receiver)
}

/// Lines a process has written so far, appended to `seen`.
fn drain_lines(lines: &Receiver<String>, seen: &mut Vec<String>) {
    seen.extend(lines.try_iter());
}

/// The address of the "serving gRPC" line, once there is one.
fn serving_address(seen: &[String]) -> Option<String> {
    seen.iter()
        .filter(|line| line.contains("serving gRPC"))
        .find_map(|line| line.split("address=").nth(1))
        .map(|address| format!("http://{}", address.trim()))
}

fn hang_up(pid: u32) {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success(), "kill -HUP {pid} failed");
}

/// Panics, with what the process wrote, if it has exited.
fn assert_running(child: &mut Child, lines: &Receiver<String>, seen: &mut Vec<String>, when: &str) {
    if let Some(status) = child.try_wait().expect("try_wait") {
        std::thread::sleep(Duration::from_millis(100));
        drain_lines(lines, seen);
        panic!(
            "the coordinator stopped {when} ({status}); its log:\n{}",
            seen.join("\n")
        );
    }
}

/// `open(2)`'s O_NONBLOCK on Linux: opening a FIFO's write end with it fails at once, instead of
/// waiting, while no process has the read end open.
const OPEN_NONBLOCK: i32 = 0o4000;

/// Starts a coordinator with `arguments` and holds it in the middle of its start: its `--catalog`
/// is a FIFO, which it reads after opening storage and before serving, and which this function
/// fills only after `during_start` ran (and the process survived it). Returns the process, its
/// stderr, the lines seen so far and its address once it serves.
fn start_held_at_catalog(
    scratch: &Path,
    arguments: &[&str],
    during_start: impl FnOnce(u32),
) -> (Child, Receiver<String>, Vec<String>, String) {
    let catalog = scratch.join("catalog.fifo");
    let status = Command::new("mkfifo").arg(&catalog).status().expect("mkfifo");
    assert!(status.success(), "mkfifo {}", catalog.display());
    let mut arguments = arguments.to_vec();
    arguments.extend(["--catalog", catalog.to_str().expect("UTF-8 path")]);
    let (mut child, lines) = spawn_coordinator(&arguments);
    let pid = child.id();
    let mut seen = Vec::new();
    let deadline = Instant::now() + START_TIMEOUT;
    let mut writer = loop {
        // Succeeds once the coordinator waits on the FIFO's read end: mid-start.
        let opened = std::fs::File::options()
            .write(true)
            .custom_flags(OPEN_NONBLOCK)
            .open(&catalog);
        if let Ok(writer) = opened {
            break writer;
        }
        drain_lines(&lines, &mut seen);
        assert_running(&mut child, &lines, &mut seen, "before reading its catalog");
        assert!(Instant::now() < deadline, "the coordinator never read its catalog");
        std::thread::sleep(Duration::from_millis(5));
    };
    during_start(pid);
    std::thread::sleep(Duration::from_millis(200));
    drain_lines(&lines, &mut seen);
    assert_running(&mut child, &lines, &mut seen, "on a SIGHUP during start");
    assert!(serving_address(&seen).is_none(), "held before serving");
    writer
        .write_all(lockstep_coordinator::server::DEFAULT_CATALOG.as_bytes())
        .expect("write the catalog");
    drop(writer);
    let address = loop {
        drain_lines(&lines, &mut seen);
        if let Some(address) = serving_address(&seen) {
            break address;
        }
        assert_running(&mut child, &lines, &mut seen, "after its catalog");
        assert!(
            Instant::now() < deadline,
            "the coordinator did not serve within {START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    (child, lines, seen, address)
}

/// Waits up to 5 s for one more line containing `text` than the `seen` lines hold now.
fn wait_for_another_line(lines: &Receiver<String>, seen: &mut Vec<String>, text: &str) -> bool {
    let count = |seen: &[String]| seen.iter().filter(|line| line.contains(text)).count();
    let before = count(seen);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        drain_lines(lines, seen);
        if count(seen) > before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Stops `child` as an orchestrator does (SIGTERM) and checks it drained and exited cleanly.
fn terminate(mut child: Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "SIGTERM: a clean stop, got {status}");
}

async fn deposit(address: &str, user: &str, amount: &str, token: Option<&str>) -> Result<String, tonic::Status> {
    let mut client = CoordinatorClient::connect(address.to_owned())
        .await
        .expect("connect to the coordinator");
    let request = pb::DepositRequest {
        user_id: user.to_owned(),
        amount: amount.to_owned(),
        ..Default::default()
    };
    client
        .deposit(with_token(request, token))
        .await
        .map(|reply| reply.into_inner().cash_balance)
}

/// A coordinator without --auth-file survives SIGHUP in the middle of its start and while it
/// serves: it keeps serving, and logs that there is nothing to reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_never_stops_a_coordinator_without_an_auth_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let (mut child, lines, mut seen, address) = start_held_at_catalog(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().expect("UTF-8 path"),
        ],
        hang_up,
    );
    assert_eq!(
        deposit(&address, "hangup", "10.00", None).await.expect("deposit"),
        "10.00"
    );

    drain_lines(&lines, &mut seen);
    hang_up(child.id());
    assert!(
        wait_for_another_line(&lines, &mut seen, "nothing to reload"),
        "a SIGHUP while serving says there is nothing to reload:\n{}",
        seen.join("\n")
    );
    assert_running(&mut child, &lines, &mut seen, "on a SIGHUP while serving");
    assert_eq!(
        deposit(&address, "hangup", "5.00", None)
            .await
            .expect("deposit after SIGHUP"),
        "15.00"
    );
    terminate(child);
}

/// With --auth-file, SIGHUP in the middle of start does not stop the coordinator either, and an
/// auth file rotated then (after it was read, before anything reloads it: a new token's line,
/// then SIGHUP) is in force once it serves, without another SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_start_with_an_auth_file_neither_stops_nor_loses_a_rotation() {
    const FIRST: &str = "first-token-0123456789abcdef";
    const ROTATED: &str = "rotated-token-0123456789abcdef";
    let dir = tempfile::tempdir().expect("temp dir");
    let auth_file = dir.path().join("auth");
    std::fs::write(&auth_file, format!("first trader {}\n", hash_token(FIRST))).expect("write auth file");
    let data_dir = dir.path().join("data");
    let rotate = |pid| {
        std::fs::write(&auth_file, format!("rotated trader {}\n", hash_token(ROTATED))).expect("rotate");
        hang_up(pid);
    };
    let (mut child, lines, mut seen, address) = start_held_at_catalog(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().expect("UTF-8 path"),
            "--auth-file",
            auth_file.to_str().expect("UTF-8 path"),
        ],
        rotate,
    );
    // The catch-up runs in a task started just before the "serving gRPC" line: allow it a moment.
    let mut rotated = deposit(&address, "rotation", "10.00", Some(ROTATED)).await;
    for _ in 0..20 {
        match &rotated {
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                rotated = deposit(&address, "rotation", "10.00", Some(ROTATED)).await;
            }
            _ => break,
        }
    }
    assert_eq!(rotated.expect("the rotated token is in force"), "10.00");
    let refused = deposit(&address, "rotation", "10.00", Some(FIRST)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "the old token is gone");
    assert_running(&mut child, &lines, &mut seen, "after start");
    terminate(child);
}

/// user-service and order-service survive SIGHUP too (a fleet-wide one meant for coordinators'
/// auth files), and log that they have nothing to reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_never_stops_the_services() {
    for service in ["user-service", "order-service"] {
        let binary = coordinator_binary().with_file_name(service);
        let mut child = Command::new(&binary)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("start {}: {error}", binary.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + START_TIMEOUT;
        while !seen.iter().any(|line: &String| line.contains("serving HTTP")) {
            assert_running(&mut child, &lines, &mut seen, "before serving");
            assert!(Instant::now() < deadline, "{service} did not serve");
            std::thread::sleep(Duration::from_millis(20));
            drain_lines(&lines, &mut seen);
        }
        hang_up(child.id());
        assert!(
            wait_for_another_line(&lines, &mut seen, "nothing to reload"),
            "{service} logs the SIGHUP:\n{}",
            seen.join("\n")
        );
        assert_running(&mut child, &lines, &mut seen, "on a SIGHUP");
        terminate(child);
    }
}

/// Runs the coordinator binary to completion (it must exit within START_TIMEOUT): exit code
/// and stderr.
fn run_to_exit(arguments: &[&str]) -> (Option<i32>, String) {
    let (mut child, lines) = spawn_coordinator(arguments);
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            child.kill().ok();
            child.wait().ok();
            let seen: Vec<String> = lines.try_iter().collect();
            panic!(
                "`coordinator {}` did not exit: it runs beside the live coordinator; its log:\n{}",
                arguments.join(" "),
                seen.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(50));
    let stderr: Vec<String> = lines.try_iter().collect();
    (status.code(), stderr.join("\n"))
}

/// What `audit` without --server reports for `data_dir`: its exit code and stdout.
fn offline_audit(data_dir: &Path) -> (Option<i32>, String) {
    let output = Command::new(coordinator_binary())
        .args(["audit", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run audit");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
    )
}

/// While a coordinator runs on a data dir, `coordinator restore` into that dir, a second
/// coordinator on it and an offline audit of it refuse, naming the dir and that another
/// coordinator holds it, and the live data is untouched; once it stops, restore works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_data_dir_refuses_restore_and_a_second_coordinator() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let data_dir_arg = data_dir.to_str().expect("UTF-8 path");
    let (child, address) = start_coordinator_process(&data_dir);
    assert_eq!(
        deposit(&address, "kept", "10.00", None).await.expect("deposit"),
        "10.00"
    );
    let backup = dir.path().join("backup.sqlite3");
    let backup_arg = backup.to_str().expect("UTF-8 path");
    let (code, stderr) = run_to_exit(&["backup", backup_arg, "--server", &address]);
    assert_eq!(code, Some(0), "backup through the server: {stderr}");
    assert_eq!(deposit(&address, "kept", "5.00", None).await.expect("deposit"), "15.00");

    let (code, stderr) = run_to_exit(&["restore", backup_arg, "--data-dir", data_dir_arg]);
    assert_ne!(code, Some(0), "restore into a live data dir must refuse: {stderr}");
    assert!(
        stderr.contains(&format!("data dir {data_dir_arg} is in use")) && stderr.contains("another coordinator"),
        "the refusal names the dir and its holder: {stderr}"
    );
    assert_eq!(
        deposit(&address, "kept", "1.00", None).await.expect("deposit"),
        "16.00",
        "the live data was not rolled back"
    );

    let (code, stderr) = run_to_exit(&["--listen", "127.0.0.1:0", "--data-dir", data_dir_arg]);
    assert_ne!(code, Some(0), "a second coordinator on the same data dir must refuse");
    assert!(
        stderr.contains(&format!("data dir {data_dir_arg} is in use")) && stderr.contains("another coordinator"),
        "{stderr}"
    );
    let (code, output) = offline_audit(&data_dir);
    assert_eq!(
        code,
        Some(2),
        "an offline audit of a live data dir cannot run: {output}"
    );
    assert!(output.contains("is in use"), "{output}");
    assert_eq!(
        deposit(&address, "kept", "1.00", None)
            .await
            .expect("the first one serves on"),
        "17.00"
    );

    terminate(child);
    let (code, stderr) = run_to_exit(&["restore", backup_arg, "--data-dir", data_dir_arg]);
    assert_eq!(code, Some(0), "restore once the coordinator stopped: {stderr}");
    let (child, address) = start_coordinator_process(&data_dir);
    assert_eq!(
        deposit(&address, "kept", "0.50", None).await.expect("deposit"),
        "10.50",
        "the backup is in place"
    );
    terminate(child);
}
