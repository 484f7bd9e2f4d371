//! README's sessions run as written: the grpcurl lines against a fresh coordinator with the real
//! grpcurl, and the curl lines against fresh user-service and order-service (with real curl when
//! the machine has it, else replayed by this test's HTTP client), only the ports replaced.

use hyper::Method;
use serde_json::Value;

use crate::helpers::{EngineKind, grpcurl, repo_root, spawn_app};
use crate::services::{Http, spawn_services};

/// The lines between `<!-- {name}:start -->` and `<!-- {name}:end -->`, without fences.
fn session(name: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("read README.md");
    let start = format!("<!-- {name}:start -->");
    let end = format!("<!-- {name}:end -->");
    let (_, rest) = readme
        .split_once(&start)
        .unwrap_or_else(|| panic!("README has no {start}"));
    let (block, _) = rest.split_once(&end).unwrap_or_else(|| panic!("README has no {end}"));
    block
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("```"))
        .map(str::to_owned)
        .collect()
}

/// Runs `line` through `sh -c` and returns its stdout, failing unless it exits 0.
async fn shell(line: &str) -> String {
    let output = tokio::process::Command::new("sh")
        .args(["-c", line])
        .output()
        .await
        .expect("run sh");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "README line failed ({}): {line}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn json(line: &str, output: &str) -> Value {
    serde_json::from_str(output).unwrap_or_else(|error| panic!("{line}: not JSON ({error}): {output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_grpcurl_session_runs_as_written() {
    let app = spawn_app(EngineKind::Embedded).await;
    let lines = session("grpcurl-session");
    assert!(lines.len() >= 8, "{lines:?}");
    let mut outputs = Vec::new();
    for line in &lines {
        let arguments = line
            .strip_prefix("grpcurl ")
            .unwrap_or_else(|| panic!("not a grpcurl line: {line}"));
        let command = format!(
            "'{}' {}",
            grpcurl().display(),
            arguments.replace("127.0.0.1:50051", &app.address.to_string())
        );
        outputs.push((line.as_str(), shell(&command).await));
    }
    let output_of = |rpc: &str| {
        let (line, output) = outputs
            .iter()
            .find(|(line, _)| line.ends_with(rpc))
            .unwrap_or_else(|| panic!("README's grpcurl session has no {rpc}"));
        json(line, output)
    };
    assert_eq!(output_of("Coordinator/Deposit")["cashBalance"], "100.00");
    assert_eq!(
        output_of("Coordinator/PlaceBuy")["order"]["status"],
        "ORDER_STATUS_CONFIRMED"
    );
    assert_eq!(output_of("Coordinator/PlaceSell")["holding"], "0.25");
    let account = output_of("Coordinator/GetAccount");
    assert_eq!(account["cashBalance"], output_of("Coordinator/Withdraw")["cashBalance"]);
    let ledger = output_of("Coordinator/ListLedger");
    assert_eq!(ledger["entries"].as_array().map(Vec::len), Some(2));
    assert!(ledger["nextPageToken"].is_string(), "a second page: {ledger}");
    assert_eq!(output_of("Health/Check")["status"], "SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_curl_session_runs_as_written() {
    let app = spawn_app(EngineKind::Embedded).await;
    let services = spawn_services(app.address).await;
    let lines = session("curl-session");
    assert!(lines.len() >= 8, "{lines:?}");
    let real_curl = std::process::Command::new("curl").arg("--version").output().is_ok();
    let mut replies = Vec::new();
    for line in &lines {
        let line = line
            .replace("127.0.0.1:8081", &services.user.to_string())
            .replace("127.0.0.1:8082", &services.order.to_string());
        let output = if real_curl {
            shell(&line).await
        } else {
            replay_curl(&line).await
        };
        let reply = json(&line, &output);
        assert_eq!(reply["success"], true, "{line}: {reply}");
        replies.push(reply["data"].clone());
    }
    let [
        health,
        deposit,
        deposit_again,
        buy,
        sell,
        withdraw,
        balance,
        ledger,
        orders,
        assets,
    ] = &replies[..]
    else {
        panic!("README's curl session changed shape; update this test: {replies:?}");
    };
    assert_eq!(health["coordinator"], "SERVING");
    assert_eq!(deposit["cash_balance"], "100.00");
    assert_eq!(deposit_again, deposit, "same Idempotency-Key, same reply");
    assert_eq!(buy["order"]["status"], "confirmed");
    assert_eq!(sell["holding"], "0.25");
    assert_eq!(withdraw["cash_balance"], "43.69");
    assert_eq!(balance["cash_balance"], "43.69", "the deposit applied once");
    assert_eq!(ledger["transactions"].as_array().map(Vec::len), Some(2));
    assert!(ledger["next_cursor"].is_string(), "a second page: {ledger}");
    assert_eq!(
        orders["orders"][0]["order_id"], sell["order"]["order_id"],
        "newest first"
    );
    assert!(assets["assets"].as_array().is_some_and(|assets| !assets.is_empty()));
}

/// Without curl on the machine: the README's curl lines parsed (`-s`, `-X`, `-H`, `-d`, a URL,
/// single-quoted words) and sent with this test's HTTP client. Returns the body.
async fn replay_curl(line: &str) -> String {
    let words = shell_words(line);
    assert_eq!(words.first().map(String::as_str), Some("curl"), "{line}");
    let (mut method, mut headers, mut body, mut url) = (Method::GET, Vec::new(), None, None);
    let mut words = words.into_iter().skip(1);
    while let Some(word) = words.next() {
        match word.as_str() {
            "-s" => {}
            "-X" => method = Method::from_bytes(words.next().expect("-X value").as_bytes()).expect("method"),
            "-H" => headers.push(words.next().expect("-H value")),
            "-d" => {
                body = words.next();
                if method == Method::GET {
                    method = Method::POST;
                }
            }
            other if !other.starts_with('-') => url = Some(other.to_owned()),
            other => panic!("{line}: the replay does not know {other}"),
        }
    }
    let url = url.expect("a URL");
    let (address, path) = url.split_at(url.find('/').expect("a path"));
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|header| header.split_once(": ").expect("Name: value"))
        .collect();
    let reply = Http::default()
        .send(
            method,
            address.parse().expect("address"),
            path,
            &headers,
            body.as_deref(),
        )
        .await;
    reply.body.to_string()
}

/// Splits on spaces outside single quotes, as sh does for these lines.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut started) = (Vec::new(), String::new(), false, false);
    for character in line.chars() {
        match character {
            '\'' => (quoted, started) = (!quoted, true),
            ' ' if !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                }
                started = false;
            }
            _ => (word.push(character), started = true).0,
        }
    }
    if started {
        words.push(word);
    }
    words
}

/// The replay parses the README's lines as sh would, so it stays usable without curl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_curl_session_replays_without_curl() {
    let app = spawn_app(EngineKind::Embedded).await;
    let services = spawn_services(app.address).await;
    for line in session("curl-session") {
        let line = line
            .replace("127.0.0.1:8081", &services.user.to_string())
            .replace("127.0.0.1:8082", &services.order.to_string());
        let reply = json(&line, &replay_curl(&line).await);
        assert_eq!(reply["success"], true, "{line}: {reply}");
    }
}

/// README's operator session: each `coordinator` subcommand through a running coordinator's
/// Admin service, with the real binary (address and backup path replaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_operator_session_runs_as_written() {
    let app = spawn_app(EngineKind::Embedded).await;
    app.deposit("alice", "100.00").await.expect("deposit");
    let directory = tempfile::tempdir().expect("temp dir");
    let backup = directory.path().join("lockstep-backup.sqlite3");
    let binary = lockstep_bank::cluster::coordinator_binary();
    let lines = session("operator-session");
    assert!(lines.len() >= 5, "{lines:?}");
    let mut outputs = Vec::new();
    for line in &lines {
        let arguments = line
            .strip_prefix("cargo run --bin coordinator -- ")
            .unwrap_or_else(|| panic!("not a coordinator line: {line}"));
        let command = format!(
            "'{}' {}",
            binary.display(),
            arguments
                .replace("http://127.0.0.1:50051", &format!("http://{}", app.address))
                .replace("/tmp/lockstep-backup.sqlite3", backup.to_str().expect("UTF-8 path"))
        );
        outputs.push(shell(&command).await);
    }
    let all = outputs.concat();
    assert!(all.contains("user: alice"), "{all}");
    assert!(all.contains("cash: 100.00"), "{all}");
    assert!(all.contains("audit: OK, 0 discrepancies"), "{all}");
    assert!(backup.exists(), "the backup was written: {all}");
}
