//! WatchLedger: one account's ledger as a stream, replayed from a cursor and then live.
//!
//! A watcher pulls: it reads the entries after its cursor from storage (`entries_after`, in
//! sequence order and stopping before any gap), sends them, and waits for the next commit. It
//! learns of commits made here at once (the commit path hands the account's watchers the
//! entries it committed, and they send those without a read when they continue the cursor
//! exactly) and of commits made by other coordinators sharing the table by reading again every
//! `poll`. Since every entry sent is the one after the last, and sequences have no gaps,
//! nothing can be skipped or sent twice in one stream, whichever coordinator committed it. A consumer that
//! reads slowly holds at most one page and the stream's small buffer in memory: the watcher
//! simply reads from storage later. Streams are bounded by `--max-watchers`, send a progress
//! message at least every `progress`, and end at a drain with UNAVAILABLE and their cursor.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use crate::core::records::LedgerEntry;
use crate::core::{Millis, UserId};
use crate::telemetry::metrics;

use super::{ServiceError, TransactionCoordinator};

/// Entries read per storage query of a watcher (and the most a stream holds beside its buffer).
pub const WATCH_PAGE: u32 = 100;
/// Events buffered per stream before the watcher waits for the consumer (one more place is
/// always kept free for the stream's end).
pub const WATCH_BUFFER: usize = 16;
/// A consumer that leaves a full buffer untouched this long is ended with RESOURCE_EXHAUSTED
/// and its cursor (it resumes from storage), instead of holding a stream forever.
pub const WATCH_SEND_STALL_MAX: Duration = Duration::from_secs(30);
/// Open streams on one account, per coordinator: one caller cannot take every place.
pub const WATCHERS_PER_ACCOUNT_MAX: usize = 64;
/// Default of `--max-watchers`.
pub const WATCHERS_MAX_DEFAULT: usize = 1024;
/// Default of `--watch-poll-ms`: how often a watcher reads storage for commits made by other
/// coordinators (its own coordinator's commits wake it at once).
pub const WATCH_POLL_DEFAULT: Duration = Duration::from_millis(500);
/// A progress message at least this often on an idle stream (the issue asks for 10 s at most).
pub const WATCH_PROGRESS_DEFAULT: Duration = Duration::from_secs(5);
/// The newest entries committed here kept per watched account for its watchers (a watcher
/// further behind reads storage).
pub const RECENT_PER_ACCOUNT: usize = 64;

/// One watched account: the wake-up of its watchers and its newest entries committed here.
#[derive(Debug, Default)]
struct AccountWatch {
    notify: Notify,
    recent: Mutex<std::collections::VecDeque<LedgerEntry>>,
    watchers: AtomicUsize,
}

impl AccountWatch {
    /// The entries after `cursor` committed here, if they continue it exactly (else None: read
    /// storage).
    fn continuing(&self, cursor: u64) -> Option<Vec<LedgerEntry>> {
        let recent = self.recent.lock().expect("recent entries poisoned");
        let newer: Vec<LedgerEntry> = recent.iter().filter(|entry| entry.sequence > cursor).cloned().collect();
        let continues = newer
            .iter()
            .map(|entry| entry.sequence)
            .eq((cursor + 1..).take(newer.len()));
        (continues && !newer.is_empty()).then_some(newer)
    }
}

/// What a watch stream carries.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    Entry(Box<LedgerEntry>),
    /// Nothing new: the last sequence sent (the cursor), and when.
    Progress {
        latest_sequence: u64,
        at: Millis,
    },
    /// The stream ends here; resume from `cursor`.
    Ended {
        reason: WatchEnd,
        cursor: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEnd {
    /// The coordinator is draining.
    Draining,
    /// The consumer left a full buffer untouched for `WATCH_SEND_STALL_MAX`.
    Behind,
    /// Storage failed a read (the detail); another try, here or elsewhere, resumes.
    Unavailable(String),
    /// A bug or foreign data.
    Internal(String),
}

/// The open watchers of one coordinator: their count against the bound, a wake-up per watched
/// account, and the drain signal.
#[derive(Debug)]
pub struct Watchers {
    limit: usize,
    open: AtomicUsize,
    accounts: Mutex<HashMap<UserId, Arc<AccountWatch>>>,
    draining: watch::Sender<bool>,
    pub(super) poll: Duration,
    pub(super) progress: Duration,
    /// `WATCH_SEND_STALL_MAX`, shorter in tests.
    pub(super) stall: Duration,
}

impl Watchers {
    pub fn new(limit: usize, poll: Duration, progress: Duration, stall: Duration) -> Self {
        Self {
            stall,
            limit,
            open: AtomicUsize::new(0),
            accounts: Mutex::new(HashMap::new()),
            draining: watch::Sender::new(false),
            poll,
            progress,
        }
    }

    /// A commit on `user`'s account landed here with `entries` (in sequence order; empty when
    /// the committer does not have them at hand; built only when someone watches the
    /// account): keep them for its watchers and wake them.
    pub(super) fn committed(&self, user: &UserId, entries: impl FnOnce() -> Vec<LedgerEntry>) {
        if self.open.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(account) = self.accounts.lock().expect("watchers poisoned").get(user).cloned() else {
            return;
        };
        let entries = entries();
        if !entries.is_empty() {
            let mut recent = account.recent.lock().expect("recent entries poisoned");
            recent.extend(entries);
            let excess = recent.len().saturating_sub(RECENT_PER_ACCOUNT);
            recent.drain(..excess);
        }
        account.notify.notify_waiters();
    }

    /// Ends every stream (with its cursor) and refuses new ones: the drain.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// A place among the `--max-watchers` open streams (WatchLedger and WatchFeed alike), or
    /// the refusal: draining, or every place taken.
    fn take_place(&self) -> Result<(), ServiceError> {
        if *self.draining.borrow() {
            return Err(ServiceError::Unavailable("the coordinator is shutting down".to_owned()));
        }
        if self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.limit).then_some(open + 1)
            })
            .is_err()
        {
            metrics::watcher_ended("limit");
            return Err(ServiceError::Overloaded("watchers (--max-watchers)"));
        }
        Ok(())
    }

    /// A WatchFeed stream's place, given back when the slot is dropped.
    pub(super) fn open_feed(self: &Arc<Self>) -> Result<FeedSlot, ServiceError> {
        self.take_place()?;
        metrics::watchers("feed", 1);
        Ok(FeedSlot {
            watchers: Arc::clone(self),
        })
    }

    fn open(self: &Arc<Self>, user: &UserId) -> Result<WatchSlot, ServiceError> {
        self.take_place()?;
        let account = {
            let mut accounts = self.accounts.lock().expect("watchers poisoned");
            let account = accounts.entry(user.clone()).or_default();
            if account.watchers.load(Ordering::Acquire) >= WATCHERS_PER_ACCOUNT_MAX {
                drop(accounts);
                self.open.fetch_sub(1, Ordering::AcqRel);
                metrics::watcher_ended("limit");
                return Err(ServiceError::Overloaded("watchers of this account"));
            }
            account.watchers.fetch_add(1, Ordering::AcqRel);
            Arc::clone(account)
        };
        metrics::watchers("ledger", 1);
        Ok(WatchSlot {
            watchers: Arc::clone(self),
            user: user.clone(),
            account,
        })
    }
}

/// One open WatchFeed stream's place among the watchers, given back when it ends.
pub(super) struct FeedSlot {
    pub(super) watchers: Arc<Watchers>,
}

impl Drop for FeedSlot {
    fn drop(&mut self) {
        self.watchers.open.fetch_sub(1, Ordering::AcqRel);
        metrics::watchers("feed", -1);
    }
}

/// One open stream's place among the watchers, given back when it ends.
struct WatchSlot {
    watchers: Arc<Watchers>,
    user: UserId,
    account: Arc<AccountWatch>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut accounts = self.watchers.accounts.lock().expect("watchers poisoned");
        if self.account.watchers.fetch_sub(1, Ordering::AcqRel) == 1 {
            accounts.remove(&self.user);
        }
        self.watchers.open.fetch_sub(1, Ordering::AcqRel);
        metrics::watchers("ledger", -1);
    }
}

impl TransactionCoordinator {
    /// Opens a watch of `user`'s ledger after sequence `after`: refused at once (as the RPC's
    /// status) for a missing account, a cursor past its last entry, or too many watchers; then
    /// the events, from a task that ends when the receiver is dropped.
    pub async fn watch_ledger(
        self: &Arc<Self>,
        user: UserId,
        after: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, ServiceError> {
        let slot = self.watchers.open(&user)?;
        // Numbers an account not numbered yet, and checks the cursor.
        let first = self.ledger_after(&user, after, WATCH_PAGE).await?;
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER + 1);
        let coordinator = Arc::clone(self);
        tokio::spawn(async move { coordinator.follow(slot, after, first, sender).await });
        Ok(receiver)
    }

    async fn follow(
        &self,
        slot: WatchSlot,
        mut cursor: u64,
        first: Vec<LedgerEntry>,
        sender: mpsc::Sender<WatchEvent>,
    ) {
        let watchers = &slot.watchers;
        let mut draining = watchers.draining.subscribe();
        let mut page = Some(first);
        // After the first page, read once more before waiting: a commit between that page's
        // read and the first wait would otherwise wait for the poll.
        let mut reread = true;
        // Entries are live (their lag measured) once a read came back short of a page.
        let mut live = false;
        let mut last_sent = tokio::time::Instant::now();
        // Entries written before sequences hold places up to the account's `legacy_through`:
        // reads below it merge them in. Read again with every progress message, so an old
        // coordinator's entry numbered meanwhile (a rolling upgrade) is sent within `progress`.
        let mut legacy_through = self.legacy_through(&slot.user).await;
        loop {
            let is_draining = *draining.borrow_and_update();
            if is_draining {
                return stopped(&sender, Stop::Draining, cursor);
            }
            // Registered before the read, so a commit between the read and the wait wakes it.
            let woken = slot.account.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let entries = match page.take().or_else(|| slot.account.continuing(cursor)) {
                Some(entries) => entries,
                None => match self
                    .entries_after(&slot.user, cursor, WATCH_PAGE, legacy_through > cursor)
                    .await
                {
                    Ok(entries) => entries,
                    Err(error) => {
                        let reason = match error {
                            ServiceError::Unavailable(detail) => WatchEnd::Unavailable(detail),
                            other => WatchEnd::Internal(other.to_string()),
                        };
                        return end(&sender, reason, cursor);
                    }
                },
            };
            let full = entries.len() >= WATCH_PAGE as usize;
            for entry in entries {
                let sequence = entry.sequence;
                if live {
                    let lag = self.clock.now().saturating_sub(entry.created_at_ms);
                    metrics::watch_lag("ledger", Duration::from_millis(lag));
                }
                let event = WatchEvent::Entry(Box::new(entry));
                if let Err(stop) = deliver(&sender, event, &mut draining, watchers.stall).await {
                    return stopped(&sender, stop, cursor);
                }
                metrics::watch_event("entry");
                cursor = sequence;
                last_sent = tokio::time::Instant::now();
            }
            if full || std::mem::take(&mut reread) {
                continue;
            }
            live = true;
            let progress_due = last_sent + watchers.progress;
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep(watchers.poll) => {}
                () = tokio::time::sleep_until(progress_due) => {
                    let progress = WatchEvent::Progress { latest_sequence: cursor, at: self.clock.now() };
                    if let Err(stop) = deliver(&sender, progress, &mut draining, watchers.stall).await {
                        return stopped(&sender, stop, cursor);
                    }
                    metrics::watch_event("progress");
                    last_sent = tokio::time::Instant::now();
                    legacy_through = self.legacy_through(&slot.user).await;
                }
                // Checked at the top of the loop (a closed sender means the coordinator is gone).
                _ = draining.changed() => {}
                () = sender.closed() => return,
            }
        }
    }

    /// The account's `legacy_through` (when it cannot be read, every read merges).
    async fn legacy_through(&self, user: &UserId) -> u64 {
        self.account(user)
            .await
            .map_or(u64::MAX, |account| account.legacy_through)
    }
}

/// Why a send did not happen.
pub(super) enum Stop {
    /// The consumer is gone (the stream was dropped).
    Gone,
    /// The buffer stayed full for `WATCH_SEND_STALL_MAX`.
    Behind,
    Draining,
}

/// Sends `event`, keeping one place of the buffer free for the stream's end: waits for the
/// consumer at most `WATCH_SEND_STALL_MAX`, and stops at a drain meanwhile.
pub(super) async fn deliver<E>(
    sender: &mpsc::Sender<E>,
    event: E,
    draining: &mut watch::Receiver<bool>,
    stall: Duration,
) -> Result<(), Stop> {
    let stall = tokio::time::sleep(stall);
    tokio::pin!(stall);
    loop {
        tokio::select! {
            permits = sender.reserve_many(2) => {
                let mut permits = permits.map_err(|_| Stop::Gone)?;
                permits.next().expect("two permits").send(event);
                return Ok(());
            }
            () = &mut stall => return Err(Stop::Behind),
            changed = draining.changed() => {
                let is_draining = changed.is_err() || *draining.borrow_and_update();
                if is_draining {
                    return Err(Stop::Draining);
                }
            }
        }
    }
}

/// Ends the stream after `stop`: its end event, with the cursor, in the place kept free.
fn stopped(sender: &mpsc::Sender<WatchEvent>, stop: Stop, cursor: u64) {
    match stop {
        Stop::Gone => {}
        Stop::Behind => {
            metrics::watcher_ended("behind");
            end(sender, WatchEnd::Behind, cursor);
        }
        Stop::Draining => {
            metrics::watcher_ended("drain");
            end(sender, WatchEnd::Draining, cursor);
        }
    }
}

/// The stream's last event: never waits (`deliver` always leaves a place for it).
fn end(sender: &mpsc::Sender<WatchEvent>, reason: WatchEnd, cursor: u64) {
    let _ = sender.try_send(WatchEvent::Ended { reason, cursor });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::core::Principal;
    use crate::core::time::ManualClock;
    use crate::service::CoordinatorConfig;
    use crate::service::testing::{coordinator_on, usd, user};
    use crate::storage::embedded::EmbeddedEngine;

    fn config(poll: Duration, progress: Duration, max_watchers: usize) -> CoordinatorConfig {
        CoordinatorConfig {
            watch_send_stall: Duration::from_millis(300),
            watch_poll: poll,
            watch_progress: progress,
            max_watchers,
            ..CoordinatorConfig::default()
        }
    }

    async fn deposit(coordinator: &Arc<TransactionCoordinator>, who: &str) {
        coordinator
            .deposit(&Principal::local(), &user(who), usd("1"), None, None)
            .await
            .unwrap();
    }

    /// The next event within `wait`.
    async fn next(events: &mut mpsc::Receiver<WatchEvent>, wait: Duration) -> WatchEvent {
        tokio::time::timeout(wait, events.recv())
            .await
            .expect("an event in time")
            .expect("the stream is open")
    }

    fn sequence(event: &WatchEvent) -> u64 {
        match event {
            WatchEvent::Entry(entry) => entry.sequence,
            other => panic!("expected an entry, got {other:?}"),
        }
    }

    /// Replay from the cursor, then a commit of this coordinator arrives at once (the poll is
    /// a minute away), then a progress message on the idle stream.
    #[tokio::test]
    async fn replays_then_follows_commits_here_at_once() {
        let clock = ManualClock::starting_at(1_000_000);
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let coordinator = coordinator_on(
            engine,
            &clock,
            config(Duration::from_secs(60), Duration::from_millis(300), 8),
        )
        .await;
        for _ in 0..3 {
            deposit(&coordinator, "w").await;
        }
        let mut events = coordinator.watch_ledger(user("w"), 1).await.unwrap();
        let wait = Duration::from_secs(5);
        assert_eq!(sequence(&next(&mut events, wait).await), 2);
        assert_eq!(sequence(&next(&mut events, wait).await), 3);
        deposit(&coordinator, "w").await;
        assert_eq!(sequence(&next(&mut events, Duration::from_secs(2)).await), 4);
        match next(&mut events, wait).await {
            WatchEvent::Progress { latest_sequence, .. } => assert_eq!(latest_sequence, 4),
            other => panic!("expected progress, got {other:?}"),
        }
    }

    /// Entries committed here reach the account's watchers without a storage read: each
    /// deposit below costs its one commit (a known account), and nothing else is sent.
    #[tokio::test]
    async fn commits_here_are_handed_to_watchers_without_a_read() {
        let clock = ManualClock::starting_at(1_000_000);
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let coordinator = coordinator_on(
            engine,
            &clock,
            config(Duration::from_secs(60), Duration::from_secs(60), 8),
        )
        .await;
        deposit(&coordinator, "h").await;
        let mut events = coordinator.watch_ledger(user("h"), 1).await.unwrap();
        // Let the stream reach its wait.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = coordinator.storage().requests();
        for expected in 2..=6 {
            deposit(&coordinator, "h").await;
            assert_eq!(sequence(&next(&mut events, Duration::from_secs(5)).await), expected);
        }
        assert_eq!(
            coordinator.storage().requests() - before,
            5,
            "one commit per deposit, no read"
        );
    }

    /// Commits by another coordinator on the same table reach the stream by its poll, in
    /// order, none missing and none twice, while both write concurrently.
    #[tokio::test]
    async fn follows_commits_of_other_coordinators_without_a_gap() {
        let clock = ManualClock::starting_at(1_000_000);
        let engine: Arc<EmbeddedEngine> = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let quick = config(Duration::from_millis(20), Duration::from_secs(5), 8);
        let here = coordinator_on(engine.clone(), &clock, quick.clone()).await;
        let there = coordinator_on(engine, &clock, quick).await;
        deposit(&there, "x").await;
        let mut events = here.watch_ledger(user("x"), 0).await.unwrap();
        let writers: Vec<_> = [Arc::clone(&here), Arc::clone(&there)]
            .into_iter()
            .map(|coordinator| {
                tokio::spawn(async move {
                    for _ in 0..20 {
                        deposit(&coordinator, "x").await;
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let mut seen = Vec::new();
        while seen.len() < 41 {
            match next(&mut events, Duration::from_secs(5)).await {
                WatchEvent::Entry(entry) => seen.push(entry.sequence),
                WatchEvent::Progress { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, (1..=41).collect::<Vec<_>>());
    }

    /// A commit held back after its decision (as a slow or partitioned coordinator's would be)
    /// while another coordinator commits on the same account: the late one cannot take a place
    /// below what the watcher already received. It is refused by its version, decided again
    /// and lands at the next place, and the watcher receives both, in order, with no gap.
    #[tokio::test]
    async fn a_commit_that_lands_late_takes_the_next_place() {
        use std::sync::atomic::{AtomicBool, Ordering};

        use crate::service::CommitHook;
        use crate::service::Operation;

        let clock = ManualClock::starting_at(1_000_000);
        let engine: Arc<EmbeddedEngine> = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let quick = config(Duration::from_millis(20), Duration::from_secs(5), 8);
        let plain = coordinator_on(engine.clone(), &clock, quick.clone()).await;
        let (hook, parked, go) = CommitHook::parking();
        let armed = Arc::new(AtomicBool::new(false));
        let when_armed = {
            let armed = Arc::clone(&armed);
            CommitHook(Arc::new(move |user: &UserId| {
                let pause = armed.swap(false, Ordering::SeqCst).then(|| (hook.0)(user));
                Box::pin(async move {
                    if let Some(pause) = pause {
                        pause.await;
                    }
                })
            }))
        };
        let late = coordinator_on(
            engine,
            &clock,
            CoordinatorConfig {
                before_commit: Some(when_armed),
                ..quick
            },
        )
        .await;
        deposit(&late, "late").await;
        let mut events = plain.watch_ledger(user("late"), 0).await.unwrap();
        let wait = Duration::from_secs(5);
        assert_eq!(sequence(&next(&mut events, wait).await), 1);
        armed.store(true, Ordering::SeqCst);
        let held = {
            let late = Arc::clone(&late);
            tokio::spawn(async move {
                late.mutate(&user("late"), Operation::Deposit(usd("7")), None, None)
                    .await
            })
        };
        parked.notified().await;
        deposit(&plain, "late").await;
        let second = next(&mut events, wait).await;
        assert_eq!(sequence(&second), 2);
        go.notify_one();
        let landed = held.await.unwrap().unwrap();
        assert_eq!(landed.entry.sequence, 3, "decided again on the account as it is now");
        match next(&mut events, wait).await {
            WatchEvent::Entry(entry) => {
                assert_eq!((entry.sequence, entry.cash_after), (3, usd("9")));
            }
            other => panic!("expected the late entry, got {other:?}"),
        }
    }

    /// A consumer that stops reading is ended once its buffer has stayed full for the stall
    /// bound: it gets what was buffered, then the end with the last sequence it received.
    #[tokio::test]
    async fn a_consumer_that_falls_behind_is_ended_with_its_cursor() {
        let clock = ManualClock::starting_at(1_000_000);
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let coordinator = coordinator_on(
            engine,
            &clock,
            config(Duration::from_millis(20), Duration::from_secs(5), 8),
        )
        .await;
        for _ in 0..40 {
            deposit(&coordinator, "slow").await;
        }
        let mut events = coordinator.watch_ledger(user("slow"), 0).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut received = Vec::new();
        let ended = loop {
            match next(&mut events, Duration::from_secs(5)).await {
                WatchEvent::Entry(entry) => received.push(entry.sequence),
                WatchEvent::Ended { reason, cursor } => break (reason, cursor),
                WatchEvent::Progress { .. } => {}
            }
        };
        assert_eq!(received, (1..=WATCH_BUFFER as u64).collect::<Vec<_>>());
        assert_eq!(ended, (WatchEnd::Behind, WATCH_BUFFER as u64));
    }

    /// One account takes at most `WATCHERS_PER_ACCOUNT_MAX` streams of a coordinator; others
    /// are not affected.
    #[tokio::test]
    async fn one_account_cannot_take_every_watcher() {
        let clock = ManualClock::starting_at(1_000_000);
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let coordinator = coordinator_on(
            engine,
            &clock,
            config(Duration::from_secs(60), Duration::from_secs(5), 1024),
        )
        .await;
        deposit(&coordinator, "greedy").await;
        deposit(&coordinator, "other").await;
        let mut open = Vec::new();
        for _ in 0..WATCHERS_PER_ACCOUNT_MAX {
            open.push(coordinator.watch_ledger(user("greedy"), 0).await.unwrap());
        }
        assert!(matches!(
            coordinator.watch_ledger(user("greedy"), 0).await,
            Err(ServiceError::Overloaded(_))
        ));
        coordinator
            .watch_ledger(user("other"), 0)
            .await
            .expect("another account");
    }

    /// A drain ends the stream with its cursor; new watches are refused meanwhile.
    #[tokio::test]
    async fn a_drain_ends_streams_with_their_cursor() {
        let clock = ManualClock::starting_at(1_000_000);
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let coordinator = coordinator_on(
            engine,
            &clock,
            config(Duration::from_secs(60), Duration::from_secs(5), 8),
        )
        .await;
        deposit(&coordinator, "d").await;
        deposit(&coordinator, "d").await;
        let mut events = coordinator.watch_ledger(user("d"), 0).await.unwrap();
        let wait = Duration::from_secs(5);
        assert_eq!(sequence(&next(&mut events, wait).await), 1);
        assert_eq!(sequence(&next(&mut events, wait).await), 2);
        coordinator.drain_watchers();
        match next(&mut events, wait).await {
            WatchEvent::Ended { reason, cursor } => assert_eq!((reason, cursor), (WatchEnd::Draining, 2)),
            other => panic!("expected the end, got {other:?}"),
        }
        assert!(matches!(
            coordinator.watch_ledger(user("d"), 0).await,
            Err(ServiceError::Unavailable(_))
        ));
    }

    /// `--max-watchers` bounds open streams; a closed one gives its place back.
    #[tokio::test]
    async fn watchers_are_bounded() {
        let clock = ManualClock::starting_at(1_000_000);
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let coordinator = coordinator_on(
            engine,
            &clock,
            config(Duration::from_millis(20), Duration::from_secs(5), 1),
        )
        .await;
        deposit(&coordinator, "m").await;
        let first = coordinator.watch_ledger(user("m"), 0).await.unwrap();
        assert!(matches!(
            coordinator.watch_ledger(user("m"), 0).await,
            Err(ServiceError::Overloaded(_))
        ));
        drop(first);
        let reopened = async {
            loop {
                if coordinator.watch_ledger(user("m"), 0).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), reopened)
            .await
            .expect("the closed stream's place is given back");
    }
}
