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
    let transfer = output_of("Coordinator/Transfer");
    assert_eq!(
        (&transfer["fromUserId"], &transfer["toUserId"]),
        (&Value::from("alice"), &Value::from("bob"))
    );
    assert_eq!(transfer["amount"], "25.00");
    assert_eq!(transfer["memo"], "concert tickets");
    assert_eq!(transfer["cashBalance"], "75.00", "alice's balance after the transfer");
    assert!(transfer["transferId"].is_string(), "{transfer}");
    assert_eq!(
        output_of("Coordinator/PlaceBuy")["order"]["status"],
        "ORDER_STATUS_CONFIRMED"
    );
    assert_eq!(output_of("Coordinator/PlaceSell")["holding"], "0.25");
    let account = output_of("Coordinator/GetAccount");
    assert_eq!(account["cashBalance"], output_of("Coordinator/Withdraw")["cashBalance"]);
    assert_eq!(account["transferredToday"], "25.00");
    let ledger = output_of("Coordinator/ListLedger");
    assert_eq!(ledger["entries"].as_array().map(Vec::len), Some(2));
    assert!(ledger["nextPageToken"].is_string(), "a second page: {ledger}");
    assert_eq!(output_of("Health/Check")["status"], "SERVING");
}

/// README's holds session: a reserved order filled in two parts, with ORDER_ID replaced by the
/// id ReserveOrder printed, as the README tells its reader to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_holds_session_runs_as_written() {
    let app = spawn_app(EngineKind::Embedded).await;
    let lines = session("grpcurl-holds");
    assert_eq!(lines.len(), 6, "{lines:?}");
    let mut order_id = String::new();
    let mut outputs = Vec::new();
    for line in &lines {
        let arguments = line
            .strip_prefix("grpcurl ")
            .unwrap_or_else(|| panic!("not a grpcurl line: {line}"))
            .replace("127.0.0.1:50051", &app.address.to_string())
            .replace("ORDER_ID", &order_id);
        let output = shell(&format!("'{}' {arguments}", grpcurl().display())).await;
        let reply = json(line, &output);
        if line.ends_with("Coordinator/ReserveOrder") {
            order_id = reply["order"]["orderId"].as_str().expect("an order id").to_owned();
        }
        outputs.push(reply);
    }
    let reserved = &outputs[1]["order"];
    assert_eq!(reserved["status"], "ORDER_STATUS_OPEN");
    let account = &outputs[2];
    assert_eq!(
        (
            &account["cashBalance"],
            &account["cashOnHold"],
            &account["cashAvailable"]
        ),
        (&Value::from("1000.00"), &Value::from("560.00"), &Value::from("440.00"))
    );
    assert_eq!(outputs[3]["order"]["status"], "ORDER_STATUS_PARTIALLY_FILLED");
    assert_eq!(outputs[3]["cashBalance"], "791.50");
    assert_eq!(outputs[4]["order"]["status"], "ORDER_STATUS_FILLED");
    assert_eq!(outputs[4]["order"]["filledQuantity"], "4");
    assert_eq!(outputs[4]["cashBalance"], "441.50");
    let filled = outputs[5]["orders"].as_array().expect("orders");
    assert_eq!(filled.len(), 1);
    assert_eq!(filled[0]["orderId"], Value::from(order_id));
    let account = app.account("carol").await.expect("account");
    assert_eq!(
        (account.cash_on_hold.as_str(), account.cash_available.as_str()),
        ("0.00", "441.50")
    );
}

/// What `stdout` printed so far (kept in `seen`), once it contains `until`.
async fn read_until(stdout: &mut tokio::process::ChildStdout, seen: &mut String, until: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0_u8; 4096];
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while !seen.contains(until) {
            let read = stdout.read(&mut buffer).await.expect("read the watch");
            assert!(read > 0, "the watch ended early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buffer[..read]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {until} from the watch: {seen}"));
    seen.clone()
}

/// README's watch: the first line (a WatchLedger stream) runs in the background while the
/// second deposits; the stream shows the entry already there, then the deposit's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_watch_session_runs_as_written() {
    let app = spawn_app(EngineKind::Embedded).await;
    app.deposit("alice", "100.00").await.expect("alice's first entry");
    let lines = session("grpcurl-watch");
    let [watch, deposit] = &lines[..] else {
        panic!("README's watch session changed shape: {lines:?}");
    };
    let command = |line: &str| {
        let arguments = line
            .strip_prefix("grpcurl ")
            .unwrap_or_else(|| panic!("not a grpcurl line: {line}"));
        format!(
            "'{}' {}",
            grpcurl().display(),
            arguments.replace("127.0.0.1:50051", &app.address.to_string())
        )
    };
    let mut watching = tokio::process::Command::new("sh")
        .args(["-c", &format!("exec {}", command(watch))])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the watch");
    let mut stdout = watching.stdout.take().expect("stdout");
    let mut seen = String::new();
    let replayed = read_until(&mut stdout, &mut seen, "\"sequence\": \"1\"").await;
    assert!(replayed.contains("\"cashBalance\": \"100.00\""), "{replayed}");
    shell(&command(deposit)).await;
    let live = read_until(&mut stdout, &mut seen, "\"sequence\": \"2\"").await;
    assert!(live.contains("\"cashBalance\": \"105.00\""), "{live}");
    watching.kill().await.ok();
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
        receiver_deposit,
        transfer,
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
    // 100.00 - 72.63 (0.5 × 145.25 = 72.625, a buy rounds up) + 36.31 (0.25 × 145.25 = 36.3125,
    // a sell rounds down) - 20.00.
    assert_eq!(withdraw["cash_balance"], "43.68");
    assert_eq!(receiver_deposit["cash_balance"], "5.00");
    assert_eq!(
        (transfer["to_user_id"].as_str(), transfer["memo"].as_str()),
        (Some("carol"), Some("lunch"))
    );
    assert_eq!(transfer["cash_balance"], "33.68", "the sender's balance");
    assert_eq!(balance["cash_balance"], "33.68", "the deposit applied once");
    assert_eq!(balance["transferred_today"], "10.00");
    assert_eq!(ledger["transactions"].as_array().map(Vec::len), Some(2));
    let newest = &ledger["transactions"][0];
    assert_eq!(newest["kind"], "transfer_out");
    assert_eq!(newest["transfer_id"], transfer["transfer_id"]);
    assert_eq!(
        (newest["counterparty_user_id"].as_str(), newest["memo"].as_str()),
        (Some("carol"), Some("lunch"))
    );
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

/// README's "Running it on a network" session, line by line in a scratch directory holding
/// certificates made by rcgen under the README's file names, with `coordinator` and `grpcurl`
/// on the PATH: tokens hashed by `coordinator hash-token`, the coordinator on 0.0.0.0 with mTLS
/// and tokens, grpcurl calls, and a token rotation through SIGHUP after which the old token is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_network_session_runs_as_written() {
    let pki = crate::auth::Pki::new();
    let scratch = pki.dir.path();
    for (from, to) in [("server.pem", "server.pem"), ("server.key", "server.key")] {
        assert!(scratch.join(from).exists(), "{to}");
    }
    let (client_certificate, client_key) = pki.client("user-service");
    std::fs::rename(client_certificate, scratch.join("client.pem")).expect("client.pem");
    std::fs::rename(client_key, scratch.join("client.key")).expect("client.key");
    let bin = scratch.join("bin");
    std::fs::create_dir(&bin).expect("bin dir");
    std::os::unix::fs::symlink(crate::durability::coordinator_binary(), bin.join("coordinator")).expect("link");
    std::os::unix::fs::symlink(grpcurl(), bin.join("grpcurl")).expect("link");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let port = lockstep_bank::cluster::free_port();

    let mut coordinator: Option<tokio::process::Child> = None;
    let mut pid = String::new();
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut after_hangup = false;
    for line in session("network-session") {
        let line = line
            .replace("0.0.0.0:50051", &format!("0.0.0.0:{port}"))
            .replace("127.0.0.1:50051", &format!("127.0.0.1:{port}"));
        if let Some(arguments) = line.strip_prefix("coordinator --listen") {
            let arguments = arguments.trim_end().trim_end_matches('&');
            let log = std::fs::File::create(scratch.join("coordinator.log")).expect("log");
            let child = tokio::process::Command::new(crate::durability::coordinator_binary())
                .arg("--listen")
                .args(shell_words(arguments))
                .current_dir(scratch)
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("start coordinator");
            pid = child.id().expect("pid").to_string();
            coordinator = Some(child);
            let mut up = false;
            for _ in 0..200 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    up = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let log = std::fs::read_to_string(scratch.join("coordinator.log")).unwrap_or_default();
            assert!(up, "the README's coordinator did not start: {log}");
            continue;
        }
        // A reload is asynchronous: a line right after SIGHUP may run before it; retry it.
        let attempts = if after_hangup { 30 } else { 1 };
        after_hangup = line.starts_with("kill -HUP");
        let mut last = None;
        for _ in 0..attempts {
            let output = tokio::process::Command::new("sh")
                .args(["-c", &line])
                .current_dir(scratch)
                .env("PATH", &path)
                .env("COORDINATOR_PID", &pid)
                .output()
                .await
                .expect("run sh");
            if output.status.success() {
                last = Some(Ok(String::from_utf8_lossy(&output.stdout).into_owned()));
                break;
            }
            last = Some(Err(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        match last.expect("ran") {
            Ok(stdout) => outputs.push((line, stdout)),
            Err(error) => panic!("README line failed: {line}\n{error}"),
        }
    }
    assert!(coordinator.is_some(), "the session starts a coordinator");
    let output_of = |rpc: &str| {
        let (line, output) = outputs
            .iter()
            .find(|(line, _)| line.ends_with(rpc))
            .unwrap_or_else(|| panic!("README's network session has no {rpc}"));
        json(line, output)
    };
    assert!(
        outputs.iter().any(|(line, output)| line.ends_with(" list")
            && output
                .lines()
                .any(|service| service == "lockstep.coordinator.v1.Coordinator")),
        "{outputs:?}"
    );
    assert_eq!(output_of("Coordinator/Deposit")["cashBalance"], "100.00");
    assert_eq!(output_of("Coordinator/UpsertAsset")["price"], "150");
    let changes = output_of("Coordinator/ListAssetChanges");
    assert_eq!(changes["changes"][0]["principal"], "ops");
    assert_eq!(output_of("Coordinator/GetAccount")["cashBalance"], "100.00");

    // After the rotation the old token is refused (once the second reload has happened).
    let old_token_call = format!(
        "grpcurl -cacert ca.pem -cert client.pem -key client.key -H \"authorization: Bearer $(cat user-service.token)\" -d '{{\"user_id\": \"alice\"}}' 127.0.0.1:{port} lockstep.coordinator.v1.Coordinator/GetAccount"
    );
    let mut refused = String::new();
    for _ in 0..30 {
        let output = tokio::process::Command::new("sh")
            .args(["-c", &old_token_call])
            .current_dir(scratch)
            .env("PATH", &path)
            .output()
            .await
            .expect("run sh");
        if !output.status.success() {
            refused = String::from_utf8_lossy(&output.stderr).into_owned();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        refused.contains("Unauthenticated"),
        "the old token still works: {refused}"
    );
    if let Some(mut child) = coordinator {
        child.kill().await.ok();
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
