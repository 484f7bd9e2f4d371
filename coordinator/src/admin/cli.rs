//! The operator subcommands. With `--server URL` each asks the running coordinator through the
//! Admin service (the only way on the embedded engine while it runs: its SQLite file belongs to
//! that process); without, it opens storage itself (DynamoDB at any time, the embedded store
//! while the coordinator is stopped). Exit codes: 0 done, 1 the audit found discrepancies or
//! the command was refused, 2 it could not run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::core::{SystemClock, UserId};
use crate::server;
use crate::service::{ServiceError, TransactionCoordinator};
use crate::settings::{Settings, StorageKind};

/// An operator command, as parsed from the command line.
#[derive(Debug, Clone)]
pub enum AdminCommand {
    Inspect {
        user: String,
        entries: u32,
    },
    ReleaseLease {
        user: String,
        lock_id: Option<String>,
        yes: bool,
    },
    Audit {
        lease_margin_secs: u64,
    },
    Backup {
        path: PathBuf,
    },
    ContendedUsers {
        limit: u32,
    },
}

/// Why a command did not complete.
#[derive(Debug)]
enum Failure {
    /// Refused (bad input, nothing to do): exit 1.
    Refused(String),
    /// Could not run (no server, storage down): exit 2.
    CannotRun(String),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
                Failure::Refused(status.message().to_owned())
            }
            _ => Failure::CannotRun(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}

impl From<ServiceError> for Failure {
    fn from(error: ServiceError) -> Self {
        Failure::from(crate::transport::status_of(error))
    }
}

/// Runs `command`, printing its result to stdout.
pub async fn run(settings: &Settings, server: Option<&str>, command: AdminCommand) -> ExitCode {
    let result = match server {
        Some(url) => through_server(url, command).await,
        None => on_storage(settings, command).await,
    };
    exit_code(result)
}

/// A command's exit code: its own, or 1 for a refusal and 2 for a command that could not run,
/// with the reason on stderr.
fn exit_code(result: Result<ExitCode, Failure>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(Failure::Refused(message)) => {
            eprintln!("coordinator: {message}");
            ExitCode::from(1)
        }
        Err(Failure::CannotRun(message)) => {
            eprintln!("coordinator: {message}");
            ExitCode::from(2)
        }
    }
}

async fn through_server(url: &str, command: AdminCommand) -> Result<ExitCode, Failure> {
    let channel = Channel::from_shared(url.to_owned())
        .map_err(|error| Failure::CannotRun(format!("--server {url}: {error}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|error| Failure::CannotRun(format!("cannot reach {url}: {error}")))?;
    let mut client = AdminClient::new(channel);
    match command {
        AdminCommand::Inspect { user, entries } => {
            let reply = client
                .inspect(pb::InspectRequest {
                    user_id: user,
                    ledger_entries: entries,
                })
                .await?;
            print!("{}", format_inspection(&reply.into_inner()));
        }
        AdminCommand::ReleaseLease { user, lock_id, yes } => {
            let reply = client
                .release_lease(pb::ReleaseLeaseRequest {
                    user_id: user.clone(),
                    confirm: yes,
                    lock_id: lock_id.unwrap_or_default(),
                })
                .await?;
            print!("{}", format_release(&user, &reply.into_inner()));
        }
        AdminCommand::Audit { lease_margin_secs } => {
            let reply = client.audit(pb::AuditRequest { lease_margin_secs }).await?.into_inner();
            print!("{}", reply.report);
            return Ok(if reply.clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        AdminCommand::Backup { path } => {
            let reply = client
                .backup(pb::BackupRequest {
                    path: path.display().to_string(),
                })
                .await?;
            let reply = reply.into_inner();
            println!("backup: {} ({} bytes)", reply.path, reply.bytes);
        }
        AdminCommand::ContendedUsers { limit } => {
            let reply = client.contended_users(pb::ContendedUsersRequest { limit }).await?;
            print!("{}", format_contended(&reply.into_inner()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn on_storage(settings: &Settings, command: AdminCommand) -> Result<ExitCode, Failure> {
    if let AdminCommand::ContendedUsers { .. } = command {
        return Err(Failure::Refused(
            "contended users are counted by a running coordinator: give --server".to_owned(),
        ));
    }
    let storage = server::connect_storage(settings)
        .await
        .map_err(|error| Failure::CannotRun(error.to_string()))?;
    let config = settings
        .coordinator_config()
        .map_err(|error| Failure::Refused(error.to_string()))?;
    let coordinator = TransactionCoordinator::new(storage, Arc::new(SystemClock), config);
    let parse_user = |raw: &str| UserId::parse("user_id", raw).map_err(|error| Failure::Refused(error.to_string()));
    match command {
        AdminCommand::Inspect { user, entries } => {
            let reply = super::inspect(&coordinator, &parse_user(&user)?, entries).await?;
            print!("{}", format_inspection(&reply));
        }
        AdminCommand::ReleaseLease { user, lock_id, yes } => {
            let reply = super::release_lease(&coordinator, &parse_user(&user)?, lock_id.as_deref(), yes).await?;
            print!("{}", format_release(&user, &reply));
        }
        AdminCommand::Audit { lease_margin_secs } => {
            let reply = super::audit(&coordinator, Duration::from_secs(lease_margin_secs)).await?;
            print!("{}", reply.report);
            return Ok(if reply.clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        AdminCommand::Backup { path } => {
            let reply = super::backup(&coordinator, &path).await?;
            println!("backup: {} ({} bytes)", reply.path, reply.bytes);
        }
        AdminCommand::ContendedUsers { .. } => unreachable!("refused above"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `coordinator restore PATH`: replaces the embedded store under `--data-dir` with a backup.
/// Refused (exit 2, naming the data dir) while a coordinator runs on it: opening the engine
/// takes the data dir's lock, which the running process holds.
pub async fn restore(settings: &Settings, path: &Path) -> ExitCode {
    if settings.storage_kind() != StorageKind::Embedded {
        eprintln!("coordinator restore: only the embedded store; DynamoDB restores through AWS (PITR, backups)");
        return ExitCode::from(1);
    }
    if !path.exists() {
        eprintln!("coordinator restore: {} does not exist", path.display());
        return ExitCode::from(1);
    }
    let engine = match crate::storage::embedded::EmbeddedEngine::open(&settings.data_dir) {
        Ok(engine) => engine,
        Err(error) => {
            eprintln!("coordinator restore: {error}");
            return ExitCode::from(2);
        }
    };
    match engine.restore_from(path).await {
        Ok(()) => {
            println!("restored {} from {}", settings.data_dir.display(), path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("coordinator restore: {error}");
            ExitCode::from(2)
        }
    }
}

pub fn format_inspection(reply: &pb::InspectReply) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "user: {}{}",
        reply.user_id,
        if reply.account_exists { "" } else { " (no account)" }
    );
    let _ = writeln!(
        text,
        "cash: {}  version: {}  ledger: {} entries{}",
        reply.cash,
        reply.version,
        reply.ledger_entries,
        if reply.numbering_pending {
            " (entries written before sequences wait to be numbered at the next write)"
        } else {
            ""
        }
    );
    if !reply.holds.is_empty() {
        let _ = writeln!(
            text,
            "on hold: cash {} (available {}){}",
            reply.cash_on_hold,
            reply.cash_available,
            reply
                .holdings_on_hold
                .iter()
                .map(|(asset, held)| format!(", {asset} {held}"))
                .collect::<String>()
        );
        for hold in &reply.holds {
            let _ = writeln!(
                text,
                "  hold {} {} {} {} limit {} filled {} holds {} until {}{}",
                hold.order_id,
                hold.side,
                hold.quantity,
                hold.asset,
                hold.limit_price,
                hold.filled_quantity,
                hold.held,
                hold.expires_at,
                if hold.live { "" } else { " (expired)" }
            );
        }
    }
    let holdings: Vec<String> = reply
        .holdings
        .iter()
        .map(|(asset, quantity)| format!("{asset} {quantity}"))
        .collect();
    let _ = writeln!(
        text,
        "holdings: {}",
        if holdings.is_empty() {
            "none".to_owned()
        } else {
            holdings.join(", ")
        }
    );
    let _ = writeln!(
        text,
        "today ({}): deposited {} of {}, withdrawn {} of {}, transferred {} of {}",
        reply.today,
        reply.deposited_today,
        reply.daily_deposit_limit,
        reply.withdrawn_today,
        reply.daily_withdrawal_limit,
        reply.transferred_today,
        reply.daily_transfer_limit
    );
    match &reply.lease {
        Some(lease) => {
            let _ = writeln!(
                text,
                "lease: {} held by {} for {} until {} ({})",
                lease.lock_id,
                lease.owner,
                lease.operation,
                lease.expires_at,
                if lease.live { "live" } else { "expired" }
            );
        }
        None => {
            let _ = writeln!(text, "lease: free");
        }
    }
    if !reply.owner.is_empty() {
        let _ = writeln!(text, "served by: {} (account affinity)", reply.owner);
    }
    let _ = writeln!(text, "last ledger entries: {}", reply.last_entries.len());
    for entry in &reply.last_entries {
        let _ = writeln!(
            text,
            "  #{} {} {} {} cash after {} at {}{}",
            entry.sequence,
            entry.entry_id,
            entry.kind,
            entry.cash_delta,
            entry.cash_after,
            entry.created_at,
            if entry.request_id.is_empty() {
                String::new()
            } else {
                format!(" request {}", entry.request_id)
            }
        );
    }
    text
}

pub fn format_release(user: &str, reply: &pb::ReleaseLeaseReply) -> String {
    match &reply.released {
        Some(lease) => format!(
            "released lease {} of {user} (holder {}, {}, {})\n",
            lease.lock_id,
            lease.owner,
            lease.operation,
            if lease.live { "was live" } else { "had expired" }
        ),
        None => format!("{user} holds no lease: nothing released\n"),
    }
}

pub fn format_contended(reply: &pb::ContendedUsersReply) -> String {
    if reply.users.is_empty() {
        return "no contended users yet\n".to_owned();
    }
    reply
        .users
        .iter()
        .map(|user| format!("{} busy {} times (± {})\n", user.user_id, user.count, user.error))
        .collect()
}

/// What `coordinator watch` follows.
#[derive(Debug, Clone)]
pub enum Watched {
    /// One account (WatchLedger) after sequence `from` (text as given).
    Account { user: String, from: String },
    /// Every account (WatchFeed).
    Feed {
        cursor: String,
        from_now: bool,
        kinds: Vec<String>,
        user_prefix: String,
    },
}

/// `coordinator watch`: WatchLedger or WatchFeed on `server`, each event printed as one JSON line.
pub async fn watch(what: Watched, server: &str, token_file: Option<&std::path::Path>) -> ExitCode {
    let followed = match what {
        Watched::Account { user, from } => match from.trim() {
            "" => follow(&user, 0, server, token_file).await,
            from => match from.parse() {
                Ok(from) => follow(&user, from, server, token_file).await,
                Err(_) => Err(Failure::CannotRun(format!(
                    "--from {from}: with --user, a sequence (a whole number)"
                ))),
            },
        },
        Watched::Feed {
            cursor,
            from_now,
            kinds,
            user_prefix,
        } => follow_feed(cursor, from_now, &kinds, user_prefix, server, token_file).await,
    };
    exit_code(followed.map(|()| ExitCode::SUCCESS))
}

/// The authorization header from `--token-file`, if given.
fn bearer(
    token_file: Option<&std::path::Path>,
) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, Failure> {
    Ok(match token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .map_err(|error| Failure::CannotRun(format!("--token-file {}: {error}", path.display())))?;
            let header = format!("Bearer {}", token.trim());
            Some(
                tonic::metadata::MetadataValue::try_from(header)
                    .map_err(|_| Failure::CannotRun(format!("--token-file {}: not a token", path.display())))?,
            )
        }
        None => None,
    })
}

async fn watch_client(server: &str) -> Result<pb::coordinator_client::CoordinatorClient<Channel>, Failure> {
    let channel = Channel::from_shared(server.to_owned())
        .map_err(|error| Failure::CannotRun(format!("--server {server}: {error}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|error| Failure::CannotRun(format!("cannot reach {server}: {error}")))?;
    Ok(pb::coordinator_client::CoordinatorClient::new(channel))
}

async fn follow_feed(
    cursor: String,
    from_now: bool,
    kinds: &[String],
    user_id_prefix: String,
    server: &str,
    token_file: Option<&std::path::Path>,
) -> Result<(), Failure> {
    let token = bearer(token_file)?;
    let kinds = kinds
        .iter()
        .map(|kind| {
            pb::EntryKind::from_str_name(&format!("ENTRY_KIND_{}", kind.to_ascii_uppercase()))
                .filter(|kind| *kind != pb::EntryKind::Unspecified)
                .map(|kind| kind as i32)
                .ok_or_else(|| {
                    Failure::CannotRun(format!(
                        "--kind {kind}: one of DEPOSIT, WITHDRAWAL, BUY, SELL, TRANSFER_OUT, TRANSFER_IN"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut client = watch_client(server).await?;
    let mut request = tonic::Request::new(pb::WatchFeedRequest {
        cursor: cursor.clone(),
        from_now,
        kinds,
        user_id_prefix,
    });
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", token);
    }
    let stream = client
        .watch_feed(request)
        .await
        .map_err(|status| Failure::Refused(format!("{:?}: {}", status.code(), status.message())))?
        .into_inner();
    print_events(
        stream,
        "the feed ended",
        "last cursor printed",
        cursor,
        |event, last| match event.event {
            Some(pb::feed_event::Event::Entry(pb::FeedEntry {
                entry: Some(entry),
                cursor,
            })) => {
                let mut line = entry_json(&entry);
                line["cursor"] = cursor.clone().into();
                *last = cursor;
                Some(line)
            }
            Some(pb::feed_event::Event::Progress(progress)) => {
                last.clone_from(&progress.cursor);
                Some(serde_json::json!({
                    "progress": { "cursor": progress.cursor, "complete_through": progress.complete_through }
                }))
            }
            _ => None,
        },
    )
    .await
}

/// Prints each event of `stream` that `line` turns into a JSON object, one per line, until the
/// stream ends; a stream ended by an error is `ended` naming the `last` cursor printed (which
/// `line` keeps). A closed pipe (`| head`) ends it quietly.
async fn print_events<E>(
    mut stream: tonic::Streaming<E>,
    ended: &str,
    last_printed: &str,
    mut last: String,
    mut line: impl FnMut(E, &mut String) -> Option<serde_json::Value>,
) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout();
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(()),
            Err(status) => {
                return Err(Failure::Refused(format!(
                    "{ended} ({:?}): {} ({last_printed}: {last})",
                    status.code(),
                    status.message()
                )));
            }
        };
        let Some(line) = line(event, &mut last) else {
            continue;
        };
        if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
            return Ok(());
        }
    }
}

async fn follow(user: &str, from: u64, server: &str, token_file: Option<&std::path::Path>) -> Result<(), Failure> {
    let token = bearer(token_file)?;
    let mut client = watch_client(server).await?;
    let mut request = tonic::Request::new(pb::WatchLedgerRequest {
        user_id: user.to_owned(),
        after_sequence: from,
    });
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", token);
    }
    let stream = client
        .watch_ledger(request)
        .await
        .map_err(|status| Failure::Refused(format!("{:?}: {}", status.code(), status.message())))?
        .into_inner();
    print_events(
        stream,
        "the watch ended",
        "last sequence printed",
        from.to_string(),
        |event, last| match event.event {
            Some(pb::ledger_event::Event::Entry(entry)) => {
                *last = entry.sequence.to_string();
                Some(entry_json(&entry))
            }
            Some(pb::ledger_event::Event::Progress(progress)) => Some(serde_json::json!({
                "progress": { "latest_sequence": progress.latest_sequence, "at": progress.at }
            })),
            None => None,
        },
    )
    .await
}

/// A ledger entry as `watch` prints it: every field, empty ones left out.
fn entry_json(entry: &pb::LedgerEntry) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    object.insert("sequence".to_owned(), entry.sequence.into());
    object.insert("user_id".to_owned(), entry.user_id.clone().into());
    object.insert(
        "kind".to_owned(),
        entry.kind().as_str_name().trim_start_matches("ENTRY_KIND_").into(),
    );
    for (name, value) in [
        ("cash_delta", &entry.cash_delta),
        ("cash_balance", &entry.cash_balance),
        ("asset", &entry.asset),
        ("quantity_delta", &entry.quantity_delta),
        ("holding_balance", &entry.holding_balance),
        ("order_id", &entry.order_id),
        ("transfer_id", &entry.transfer_id),
        ("counterparty_user_id", &entry.counterparty_user_id),
        ("memo", &entry.memo),
        ("principal", &entry.principal),
        ("created_at", &entry.created_at),
        ("transaction_id", &entry.transaction_id),
    ] {
        if !value.is_empty() {
            object.insert(name.to_owned(), value.clone().into());
        }
    }
    object.into()
}

/// The subcommands `settings` parses that are operator commands: this layer knows them, so
/// `settings` stays below `admin`.
impl crate::settings::Command {
    /// The operator command and its `--server`, for the commands `admin::cli` runs.
    pub fn admin(self) -> Option<(AdminCommand, Option<String>)> {
        Some(match self {
            crate::settings::Command::Audit {
                lease_margin_secs,
                server,
            } => (AdminCommand::Audit { lease_margin_secs }, server),
            crate::settings::Command::Inspect { user, entries, server } => {
                (AdminCommand::Inspect { user, entries }, server)
            }
            crate::settings::Command::ReleaseLease {
                user,
                lock_id,
                yes,
                server,
            } => (AdminCommand::ReleaseLease { user, lock_id, yes }, server),
            crate::settings::Command::Backup { path, server } => (AdminCommand::Backup { path }, server),
            crate::settings::Command::ContendedUsers { limit, server } => {
                (AdminCommand::ContendedUsers { limit }, server)
            }
            crate::settings::Command::Serve
            | crate::settings::Command::Watch { .. }
            | crate::settings::Command::CreateTables
            | crate::settings::Command::HashToken
            | crate::settings::Command::Restore { .. } => return None,
        })
    }
}
