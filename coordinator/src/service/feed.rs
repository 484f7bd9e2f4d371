//! WatchFeed: every account's ledger entries as one stream, resumable from an opaque cursor.
//!
//! **Where the entries come from: a journal written in the commit.** Every commit that writes
//! ledger entries also writes, in the same transaction, one feed record per account: a copy of
//! that account's new entries, in partition `FEED#{shard}` (`model::feed_shard`, fixed per
//! account), sorted by the commit's time (`model::feed_position`). No counter is shared: each
//! record is a new item, so commits never wait on each other for it. docs/feed.md explains why
//! this and not DynamoDB Streams (measured: dynoxide's stream makes every write scan it).
//!
//! **Why nothing is skipped.** A reader reads each partition in key order, and only records at
//! least `horizon` old: a commit's record becomes visible when its transaction lands, and a
//! transaction acknowledged within `horizon / 2` of its time landed by then (with coordinators'
//! clocks within `horizon / 2` of each other). A transaction acknowledged later than that, or
//! whose outcome was unknown and later proved applied, has its feed records written again at a
//! fresh time (`journal_again`), before the account's next commit: a reader that passed the
//! first time finds the second. So every entry reaches every reader at least once; re-deliveries
//! are dropped within a stream by the account's last sequence sent, and per-account order holds
//! because an account's records are all in one partition, in commit order, and a gap (a
//! re-written record behind a later one) is filled from the ledger before the later entries.
//!
//! **The cursor** holds, per partition, the position of the last record sent. It is valid on
//! any coordinator of the table; one older than `FEED_RETENTION` is OUT_OF_RANGE (its records
//! may have been deleted), naming the oldest position still kept.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::{broadcast, mpsc, watch};

use crate::core::records::{EntryKind, FEED_RETENTION, LedgerEntry};
use crate::core::{FieldError, Millis, UserId};
use crate::storage::Item;
use crate::storage::model::{self, FEED_SHARDS};
use crate::telemetry::metrics;

use super::watch::{FeedSlot, Stop, WatchEnd, deliver};
use super::{ServiceError, TransactionCoordinator, retry_safe};

/// Default of `--feed-horizon-ms`: a reader sends a commit's record once it is this old; a
/// commit acknowledged later than half of it after its time is recorded again.
pub const FEED_HORIZON_DEFAULT: Duration = Duration::from_millis(100);
/// Default of `--feed-poll-ms`: how often a caught-up feed stream reads the journal again.
pub const FEED_POLL_DEFAULT: Duration = Duration::from_millis(50);
/// Records read per query of one partition.
pub const FEED_PAGE: u32 = 100;
/// Accounts whose last sequence a stream remembers (to drop re-deliveries and fill gaps); past
/// it the stream forgets them all and may re-deliver, which at least once allows.
pub const FEED_ACCOUNTS_REMEMBERED: usize = 10_000;
/// Attempts at writing a late commit's feed records again before giving up (logged, counted).
const JOURNAL_AGAIN_ATTEMPTS: usize = 8;
/// Of those, writes that land but are acknowledged late again, before the last one stands.
const JOURNAL_AGAIN_LATE_ATTEMPTS: usize = 3;

/// How writing a feed record again ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    InTime,
    /// Landed, acknowledged later than half the horizon each time.
    Late,
    Failed,
}

impl Written {
    fn label(self) -> &'static str {
        match self {
            Written::InTime => "written",
            Written::Late => "late",
            Written::Failed => "failed",
        }
    }
}
/// The cursor's version prefix.
const CURSOR_VERSION: &str = "f1.";
/// The longest cursor text: eight positions of at most 101 characters, base64.
const CURSOR_TEXT_MAX: usize = 1200;

/// Where a feed stream stands: per partition, the position of the last record sent (records
/// after it come next), or empty: from the partition's oldest record still kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedCursor {
    positions: Vec<String>,
}

impl FeedCursor {
    /// Every partition at `at`: the records from that millisecond on come next.
    pub fn at(at: Millis) -> Self {
        Self {
            positions: vec![format!("{at:015}#"); FEED_SHARDS],
        }
    }

    /// Partition `shard` was read through `through`: its position moves past every record
    /// stamped up to then (`~` sorts after every character of a user id), so a cursor of a
    /// quiet partition does not age past what the feed keeps.
    fn passed(&mut self, shard: usize, through: Millis) {
        let passed = format!("{through:015}#~");
        if passed > self.positions[shard] {
            self.positions[shard] = passed;
        }
    }

    /// Each partition's position moved up to `other`'s where that is further.
    fn raise_to(&mut self, other: &FeedCursor) {
        for (mine, theirs) in self.positions.iter_mut().zip(&other.positions) {
            if *theirs > *mine {
                mine.clone_from(theirs);
            }
        }
    }

    /// Every partition from its oldest record still kept (an empty position).
    pub fn oldest_kept() -> Self {
        Self {
            positions: vec![String::new(); FEED_SHARDS],
        }
    }

    /// The opaque text a client keeps and sends back.
    pub fn encode(&self) -> String {
        let joined = self.positions.join("\n");
        format!(
            "{CURSOR_VERSION}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(joined)
        )
    }

    pub fn decode(field: &'static str, text: &str) -> Result<Self, FieldError> {
        let bad = || {
            FieldError::new(
                field,
                "is not a cursor this feed gave out (resume with the last cursor received)",
            )
        };
        if text.len() > CURSOR_TEXT_MAX {
            return Err(bad());
        }
        let encoded = text.strip_prefix(CURSOR_VERSION).ok_or_else(bad)?;
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| bad())?;
        let joined = String::from_utf8(decoded).map_err(|_| bad())?;
        let positions: Vec<String> = joined.split('\n').map(str::to_owned).collect();
        let known = |position: &String| position.is_empty() || model::feed_position_time(position).is_some();
        if positions.len() != FEED_SHARDS || !positions.iter().all(known) {
            return Err(bad());
        }
        Ok(Self { positions })
    }

    /// The oldest time it names (every record after it in every partition is still to come);
    /// None when every partition starts from its oldest record still kept.
    pub fn oldest(&self) -> Option<Millis> {
        self.positions
            .iter()
            .filter_map(|position| model::feed_position_time(position))
            .min()
    }

    /// The newest time it names.
    pub fn newest(&self) -> Millis {
        self.positions
            .iter()
            .filter_map(|position| model::feed_position_time(position))
            .max()
            .unwrap_or(0)
    }
}

/// Where a WatchFeed stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedStart {
    /// After this cursor (from a previous stream).
    After(FeedCursor),
    /// From the oldest record still kept.
    Oldest,
    /// From now: only commits from here on.
    Now,
}

/// Which entries a stream sends (the cursor moves past the others all the same).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedFilter {
    /// Empty: every kind.
    pub kinds: BTreeSet<EntryKind>,
    /// Only accounts whose id starts with it (empty: every account).
    pub user_prefix: String,
}

impl FeedFilter {
    fn passes(&self, entry: &LedgerEntry) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&entry.kind))
            && entry.user_id.as_str().starts_with(&self.user_prefix)
    }

    fn passes_account(&self, user: &UserId) -> bool {
        user.as_str().starts_with(&self.user_prefix)
    }
}

/// What a feed stream carries.
#[derive(Debug, Clone)]
pub enum FeedEvent {
    /// An entry, and the cursor to resume from after it.
    Entry { entry: Box<LedgerEntry>, cursor: String },
    /// Nothing new to send: the cursor, and the time through which every commit was read.
    Progress { cursor: String, complete_through: Millis },
    /// The stream ends here; resume from `cursor`.
    Ended { reason: WatchEnd, cursor: String },
}

impl TransactionCoordinator {
    /// Opens a WatchFeed stream: refused at once (as the RPC's status) for a cursor past what
    /// the journal keeps (OUT_OF_RANGE), one from the future, or too many watchers; then the
    /// events, from a task that ends when the receiver is dropped.
    pub fn watch_feed(
        self: &Arc<Self>,
        start: FeedStart,
        filter: FeedFilter,
    ) -> Result<mpsc::Receiver<FeedEvent>, ServiceError> {
        let now = self.clock.now();
        let oldest_kept = now.saturating_sub(FEED_RETENTION.as_millis() as u64);
        let cursor = match start {
            FeedStart::After(cursor) => {
                if let Some(oldest) = cursor.oldest().filter(|oldest| *oldest < oldest_kept) {
                    return Err(ServiceError::OutOfRange(format!(
                        "the cursor is from {}, older than the feed keeps ({} h): entries may be missing from there on. \
                         Re-read the accounts with ListLedger (after_sequence), then resume from the oldest position \
                         still kept: cursor={}",
                        crate::core::time::rfc3339(oldest),
                        FEED_RETENTION.as_secs() / 3600,
                        FeedCursor::at(oldest_kept + OLDEST_MARGIN.as_millis() as u64).encode()
                    )));
                }
                let ahead_max = now + crate::core::records::CLOCK_SKEW_MAX.as_millis() as u64;
                if cursor.newest() > ahead_max {
                    return Err(ServiceError::InvalidArgument(FieldError::new(
                        "cursor",
                        "is ahead of this coordinator's clock by more than the tolerated skew: it was not given out by this table's feed",
                    )));
                }
                cursor
            }
            FeedStart::Oldest => FeedCursor::oldest_kept(),
            FeedStart::Now => FeedCursor::at(now),
        };
        let slot = self.watchers.open_feed()?;
        let (sender, receiver) = mpsc::channel(super::watch::WATCH_BUFFER + 1);
        let coordinator = Arc::clone(self);
        tokio::spawn(coordinator.follow_feed(slot, cursor, filter, sender));
        Ok(receiver)
    }

    /// A stream: reads the journal itself until it has caught up, then follows the
    /// coordinator's one reader of the journal's tail (`FeedTail`), which reads each partition
    /// once per `--feed-poll-ms` for every caught-up stream; a stream that falls behind the
    /// tail's buffer reads storage again from its cursor.
    async fn follow_feed(
        self: Arc<Self>,
        slot: FeedSlot,
        cursor: FeedCursor,
        filter: FeedFilter,
        sender: mpsc::Sender<FeedEvent>,
    ) {
        let watchers = &slot.watchers;
        let mut draining = watchers.draining();
        let mut reading = FeedReading {
            cursor,
            filter,
            sent: HashMap::new(),
            live: false,
            last_sent: tokio::time::Instant::now(),
        };
        let mut tail: Option<broadcast::Receiver<Arc<TailBatch>>> = None;
        let mut complete_through = 0;
        loop {
            if *draining.borrow_and_update() {
                return feed_stopped(&sender, Stop::Draining, &reading.cursor);
            }
            let outcome = match tail.as_mut() {
                None => {
                    // Records this old have landed (or will be written again later).
                    let through = self
                        .clock
                        .now()
                        .saturating_sub(self.config.feed_horizon.as_millis() as u64);
                    let mut outcome = self
                        .read_partitions(Bound::Through(through), &mut reading, &sender, &mut draining)
                        .await;
                    if outcome.is_ok() {
                        complete_through = through;
                        // Caught up: join the tail, first reading what it read past this stream.
                        let (receiver, current) = self.feed_tail.join(&self);
                        outcome = self
                            .read_partitions(Bound::Positions(&current), &mut reading, &sender, &mut draining)
                            .await;
                        tail = Some(receiver);
                        reading.live = true;
                    }
                    outcome
                }
                Some(receiver) => {
                    let progress_due = reading.last_sent + watchers.progress;
                    tokio::select! {
                        batch = receiver.recv() => match batch {
                            Ok(batch) => {
                                complete_through = batch.through;
                                self.send_batch(&batch, &mut reading, &sender, &mut draining).await
                            }
                            // Behind the tail's buffer (or the tail stopped): storage again.
                            Err(_) => {
                                tail = None;
                                Ok(())
                            }
                        },
                        () = tokio::time::sleep_until(progress_due) => {
                            let progress = FeedEvent::Progress { cursor: reading.cursor.encode(), complete_through };
                            match deliver(&sender, progress, &mut draining, watchers.stall).await {
                                Ok(()) => {
                                    metrics::watch_event("progress");
                                    reading.last_sent = tokio::time::Instant::now();
                                    Ok(())
                                }
                                Err(stop) => Err(PartitionStop::Send(stop)),
                            }
                        }
                        _ = draining.changed() => Ok(()),
                        () = sender.closed() => return,
                    }
                }
            };
            if let Err(stop) = outcome {
                return match stop {
                    PartitionStop::Send(stop) => feed_stopped(&sender, stop, &reading.cursor),
                    PartitionStop::Failed(reason) => feed_end(&sender, reason, &reading.cursor),
                };
            }
        }
    }

    /// Every partition's records after the stream's position up to `bound`.
    async fn read_partitions(
        &self,
        bound: Bound<'_>,
        reading: &mut FeedReading,
        sender: &mpsc::Sender<FeedEvent>,
        draining: &mut watch::Receiver<bool>,
    ) -> Result<(), PartitionStop> {
        // One page of each partition in turn, so that every position moves on together during a
        // long catch-up (a cursor never holds one partition's position far behind the others').
        let mut left: Vec<usize> = (0..FEED_SHARDS).collect();
        while !left.is_empty() {
            let mut still = Vec::with_capacity(left.len());
            for shard in left {
                if !self.read_partition(shard, &bound, reading, sender, draining).await? {
                    still.push(shard);
                }
            }
            left = still;
        }
        Ok(())
    }

    /// The tail's batch: its records past the stream's positions, then its positions.
    async fn send_batch(
        &self,
        batch: &TailBatch,
        reading: &mut FeedReading,
        sender: &mpsc::Sender<FeedEvent>,
        draining: &mut watch::Receiver<bool>,
    ) -> Result<(), PartitionStop> {
        for record in &batch.records {
            if record.position > reading.cursor.positions[record.shard] {
                self.send_record(record.clone(), reading, sender, draining).await?;
            }
        }
        reading.cursor.raise_to(&batch.after);
        Ok(())
    }

    /// Sends one page of partition `shard`'s records up to `bound`, moving the cursor: true when
    /// the partition is read to the bound.
    async fn read_partition(
        &self,
        shard: usize,
        bound: &Bound<'_>,
        reading: &mut FeedReading,
        sender: &mpsc::Sender<FeedEvent>,
        draining: &mut watch::Receiver<bool>,
    ) -> Result<bool, PartitionStop> {
        {
            // Between pages: a drain or a gone consumer ends a long catch-up too.
            if *draining.borrow() {
                return Err(PartitionStop::Send(Stop::Draining));
            }
            if sender.is_closed() {
                return Err(PartitionStop::Send(Stop::Gone));
            }
            let query = model::feed_records_after(shard, &reading.cursor.positions[shard], FEED_PAGE);
            let page = retry_safe(|| self.storage.query(query.clone()))
                .await
                .map_err(|error| PartitionStop::Failed(WatchEnd::Unavailable(error.to_string())))?;
            let full = page.items.len() >= FEED_PAGE as usize;
            for item in &page.items {
                let record = model::feed_record_from_item(item).map_err(|error| {
                    PartitionStop::Failed(WatchEnd::Internal(format!("a malformed feed record: {error}")))
                })?;
                if bound.excludes(&record) {
                    bound.reached(shard, &mut reading.cursor);
                    return Ok(true);
                }
                self.send_record(record, reading, sender, draining).await?;
            }
            if !full {
                bound.reached(shard, &mut reading.cursor);
                return Ok(true);
            }
            Ok(false)
        }
    }

    /// Sends one record's entries that pass the filter and were not sent yet, after any of the
    /// account's entries missing before them (a record written again behind a later one).
    async fn send_record(
        &self,
        record: model::FeedRecord,
        reading: &mut FeedReading,
        sender: &mpsc::Sender<FeedEvent>,
        draining: &mut watch::Receiver<bool>,
    ) -> Result<(), PartitionStop> {
        // The stream's cursor moves past the record only once every entry of it was delivered:
        // a stream that ends on the way (a failed read, a drain, a slow consumer) names the
        // cursor before it, and the resumed stream sends the record again.
        let mut past = reading.cursor.clone();
        past.positions[record.shard].clone_from(&record.position);
        let after = past.encode();
        let last = record.entries.last().map_or(0, |entry| entry.sequence);
        let first = record.entries.first().map_or(0, |entry| entry.sequence);
        let sent_through = reading.sent.get(&record.user).copied();
        let mut entries = Vec::new();
        if let Some(sent) = sent_through
            && first > sent + 1
            && reading.filter.passes_account(&record.user)
        {
            entries = self.missing_entries(&record.user, sent, first).await?;
        }
        entries.extend(
            record
                .entries
                .into_iter()
                .filter(|entry| sent_through.is_none_or(|sent| entry.sequence > sent)),
        );
        // Only accounts the filter lets through are remembered: others send nothing.
        if reading.filter.passes_account(&record.user) {
            if reading.sent.len() >= FEED_ACCOUNTS_REMEMBERED && !reading.sent.contains_key(&record.user) {
                reading.sent.clear();
            }
            let newest = sent_through.map_or(last, |sent| sent.max(last));
            reading.sent.insert(record.user.clone(), newest);
        }
        let count = entries.len();
        // Encoded once per record, and the cursor before it only when it sends several entries.
        let before = (count > 1).then(|| reading.cursor.encode());
        for (index, entry) in entries.into_iter().enumerate() {
            if !reading.filter.passes(&entry) {
                continue;
            }
            if reading.live {
                let lag = self.clock.now().saturating_sub(entry.created_at_ms);
                metrics::watch_lag("feed", Duration::from_millis(lag));
            }
            // Resuming after an entry that is not its record's last reads the record again.
            let cursor = match &before {
                Some(before) if index + 1 < count => before.clone(),
                _ => after.clone(),
            };
            let event = FeedEvent::Entry {
                entry: Box::new(entry),
                cursor,
            };
            deliver(sender, event, draining, self.watchers.stall)
                .await
                .map_err(PartitionStop::Send)?;
            metrics::watch_event("entry");
            reading.last_sent = tokio::time::Instant::now();
        }
        reading.cursor = past;
        Ok(())
    }

    /// `user`'s entries after `sent` and before `first`, from the ledger.
    async fn missing_entries(&self, user: &UserId, sent: u64, first: u64) -> Result<Vec<LedgerEntry>, PartitionStop> {
        let mut missing = Vec::new();
        let mut after = sent;
        while after + 1 < first {
            let page = self
                .entries_after(user, after, FEED_PAGE, false)
                .await
                .map_err(|error| PartitionStop::Failed(WatchEnd::Unavailable(error.to_string())))?;
            let Some(newest) = page.last().map(|entry| entry.sequence) else {
                break;
            };
            missing.extend(page.into_iter().filter(|entry| entry.sequence < first));
            after = newest;
        }
        metrics::feed_gap_filled(missing.len());
        Ok(missing)
    }

    /// A transaction with `feed` records goes out for `user`: until it is confirmed, the account's
    /// next lease here records its last commit in the feed again.
    pub(super) fn feed_sent(&self, user: &UserId, feed: &[Item]) {
        if !feed.is_empty() {
            self.feed_unconfirmed
                .lock()
                .expect("feed unconfirmed poisoned")
                .insert(user.clone());
        }
    }

    /// `user`'s last transaction was acknowledged and its feed records are where readers find them.
    pub(super) fn feed_confirmed(&self, user: &UserId) {
        self.feed_unconfirmed
            .lock()
            .expect("feed unconfirmed poisoned")
            .remove(user);
    }

    /// Writes `feed` (the feed records of a transaction that applied) again at a fresh time if
    /// the transaction, stamped `at`, was acknowledged later than half the horizon after it: a
    /// reader may have passed `at` before it landed. False if it had to and could not.
    pub(super) async fn journal_again_if_late(&self, at: Millis, feed: &[Item]) -> bool {
        let late_after = self.config.feed_horizon.as_millis() as u64 / 2;
        if !feed.is_empty() && self.clock.now().saturating_sub(at) > late_after {
            return self.journal_again(feed).await;
        }
        true
    }

    /// Just after taking `held`'s lease: if the account's last commit was made by another
    /// process more than half the horizon ago, its feed record is written again now, so that a
    /// commit that landed past the horizon (its writer gone, or its own second record not yet
    /// written) still reaches every reader, and before this lease's commits (per-account order).
    ///
    /// Also for this process's own last commit when its answer never came clear
    /// (`feed_unconfirmed`). Returns false if the record could not be written; the account then
    /// stays marked, and its next lease here tries again.
    pub(super) async fn journal_taken_over(&self, held: &super::HeldLease) -> bool {
        let unconfirmed = self
            .feed_unconfirmed
            .lock()
            .expect("feed unconfirmed poisoned")
            .remove(&held.user);
        let Some(mark) = &held.feed_mark else { return true };
        let late_after = self.config.feed_horizon.as_millis() as u64 / 2;
        if (mark.writer == self.incarnation() && !unconfirmed)
            || self.clock.now().saturating_sub(mark.at) <= late_after
            || mark.first == 0
            || mark.first > held.account.entries
        {
            return true;
        }
        let count = held.account.entries - mark.first + 1;
        let entries = match retry_safe(|| {
            self.storage
                .query(model::sequenced_entries_after(&held.user, mark.first - 1, count as u32))
        })
        .await
        {
            Ok(page) => page
                .items
                .iter()
                .filter_map(|item| model::ledger_from_item(item).ok())
                .collect::<Vec<_>>(),
            Err(error) => {
                tracing::warn!(%error, "reading the previous writer's last entries for the feed failed");
                metrics::feed_recorded_again("failed");
                self.feed_unconfirmed
                    .lock()
                    .expect("feed unconfirmed poisoned")
                    .insert(held.user.clone());
                return false;
            }
        };
        let consecutive = entries
            .iter()
            .map(|entry| entry.sequence)
            .eq(mark.first..=held.account.entries);
        if !consecutive {
            tracing::warn!("the previous writer's last entries are not all keyed by sequence; not recorded again");
            return true;
        }
        let expires = model::epoch_seconds(self.clock.now()) + FEED_RETENTION.as_secs();
        let item = model::feed_item(&entries, self.clock.now(), expires);
        let written = self.journal_again(std::slice::from_ref(&item)).await;
        if !written {
            self.feed_unconfirmed
                .lock()
                .expect("feed unconfirmed poisoned")
                .insert(held.user.clone());
        }
        written
    }

    /// Writes `feed` again at a fresh time: its transaction applied, but when is not known to
    /// within the horizon. Tried until a write is acknowledged within half the horizon of its
    /// own time (one acknowledged later may itself have landed behind a reader), at most
    /// `JOURNAL_AGAIN_ATTEMPTS` times.
    pub(super) async fn journal_again(&self, feed: &[Item]) -> bool {
        let mut all_written = true;
        let late_after = self.config.feed_horizon.as_millis() as u64 / 2;
        for item in feed {
            let mut outcome = Written::Failed;
            for attempt in 0..JOURNAL_AGAIN_ATTEMPTS {
                let at = self.clock.now();
                let Some(again) = model::feed_item_again(item, at) else {
                    break;
                };
                let put = crate::storage::Put {
                    item: again,
                    condition: None,
                    bindings: crate::storage::Bindings::default(),
                };
                match self.storage.put(put).await {
                    // This write, too, should land within half the horizon of its own time.
                    Ok(()) if self.clock.now().saturating_sub(at) <= late_after => {
                        outcome = Written::InTime;
                        break;
                    }
                    // Landed, late: once more, a few times; past that storage is slower than the
                    // horizon allows for (`--feed-horizon-ms` is too short for it), and the copy
                    // that landed stands.
                    Ok(()) => {
                        outcome = Written::Late;
                        if attempt + 1 >= JOURNAL_AGAIN_LATE_ATTEMPTS {
                            tracing::warn!(
                                "feed records are acknowledged later than half of --feed-horizon-ms: raise it for this storage"
                            );
                            break;
                        }
                        tokio::time::sleep(super::SAFE_RETRY_DELAY * (attempt as u32 + 1)).await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, attempt, "writing a late commit's feed record again failed; retrying");
                        tokio::time::sleep(super::SAFE_RETRY_DELAY * (attempt as u32 + 1)).await;
                    }
                }
            }
            metrics::feed_recorded_again(outcome.label());
            if outcome == Written::Failed {
                all_written = false;
                tracing::error!(
                    "a late commit's feed record could not be written again: WatchFeed readers that passed its time miss it (the ledger and WatchLedger have it)"
                );
            }
        }
        all_written
    }
}

/// How far a read of the journal goes.
enum Bound<'a> {
    /// Records stamped up to this time (the horizon's edge).
    Through(Millis),
    /// Records up to these positions (the tail's, when a stream joins it).
    Positions(&'a FeedCursor),
}

impl Bound<'_> {
    fn excludes(&self, record: &model::FeedRecord) -> bool {
        match self {
            Bound::Through(through) => record.at > *through,
            Bound::Positions(positions) => record.position > positions.positions[record.shard],
        }
    }

    /// Partition `shard` was read to the bound: the cursor's position moves up to it.
    fn reached(&self, shard: usize, cursor: &mut FeedCursor) {
        match self {
            Bound::Through(through) => cursor.passed(shard, *through),
            Bound::Positions(positions) => {
                if positions.positions[shard] > cursor.positions[shard] {
                    cursor.positions[shard].clone_from(&positions.positions[shard]);
                }
            }
        }
    }
}

/// Pages of one partition the tail reads per poll: a backlog (after storage failed for a while)
/// is read over several polls, so a batch holds at most 8 x 10 pages of records.
pub const TAIL_PAGES_PER_POLL: usize = 10;
/// Batches of the tail kept for streams that have not taken them yet; a stream further behind
/// reads storage again from its cursor.
pub const TAIL_BATCHES: usize = 32;

/// One read of the journal's tail: its records in partition order, the positions after it,
/// and the time through which every partition was read.
#[derive(Debug)]
pub struct TailBatch {
    records: Vec<model::FeedRecord>,
    after: FeedCursor,
    through: Millis,
}

/// The coordinator's one reader of the journal's tail, shared by every caught-up WatchFeed
/// stream: one Query per partition per `--feed-poll-ms` however many streams follow, started
/// by the first stream that joins and stopped when none is left.
#[derive(Debug, Default)]
pub struct FeedTail {
    state: std::sync::Mutex<TailState>,
}

#[derive(Debug, Default)]
struct TailState {
    sender: Option<broadcast::Sender<Arc<TailBatch>>>,
    /// The positions after the last batch sent (the next batch starts there).
    current: Option<FeedCursor>,
}

impl FeedTail {
    /// A receiver of the batches after the positions returned with it (taken together, so no
    /// batch falls between), starting the reader if it is not running.
    fn join(&self, coordinator: &Arc<TransactionCoordinator>) -> (broadcast::Receiver<Arc<TailBatch>>, FeedCursor) {
        let mut state = self.state.lock().expect("feed tail poisoned");
        if let (Some(sender), Some(current)) = (&state.sender, &state.current) {
            return (sender.subscribe(), current.clone());
        }
        let (sender, receiver) = broadcast::channel(TAIL_BATCHES);
        let now = coordinator.clock.now();
        let start = FeedCursor::at(now.saturating_sub(coordinator.config.feed_horizon.as_millis() as u64));
        state.sender = Some(sender.clone());
        state.current = Some(start.clone());
        tokio::spawn(Arc::clone(coordinator).read_tail(sender, start.clone()));
        (receiver, start)
    }
}

impl TransactionCoordinator {
    /// The tail reader: every `--feed-poll-ms`, each partition's records after its positions
    /// up to the horizon, sent to the streams as one batch. A partition whose read fails is read
    /// again from the same position next time. Ends when no stream follows it, or at a drain.
    async fn read_tail(self: Arc<Self>, sender: broadcast::Sender<Arc<TailBatch>>, mut cursor: FeedCursor) {
        let mut draining = self.watchers.draining();
        let mut complete_through = cursor.oldest().unwrap_or(0);
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config.feed_poll) => {}
                _ = draining.changed() => {}
            }
            {
                let mut state = self.feed_tail.state.lock().expect("feed tail poisoned");
                if sender.receiver_count() == 0 || *draining.borrow() {
                    state.sender = None;
                    state.current = None;
                    return;
                }
            }
            let through = self
                .clock
                .now()
                .saturating_sub(self.config.feed_horizon.as_millis() as u64);
            let mut records = Vec::new();
            // Every partition read to the horizon (none failed, none left for the next poll).
            let mut complete = true;
            for shard in 0..FEED_SHARDS {
                let mut pages = 0;
                'pages: loop {
                    if pages == TAIL_PAGES_PER_POLL {
                        complete = false;
                        break 'pages;
                    }
                    pages += 1;
                    let query = model::feed_records_after(shard, &cursor.positions[shard], FEED_PAGE);
                    let Ok(page) = self.storage.query(query).await else {
                        complete = false;
                        break 'pages;
                    };
                    let full = page.items.len() >= FEED_PAGE as usize;
                    for item in &page.items {
                        let Ok(record) = model::feed_record_from_item(item) else {
                            tracing::error!("a malformed feed record; the tail stops before it");
                            complete = false;
                            break 'pages;
                        };
                        if record.at > through {
                            cursor.passed(shard, through);
                            break 'pages;
                        }
                        cursor.positions[shard].clone_from(&record.position);
                        records.push(record);
                    }
                    if !full {
                        cursor.passed(shard, through);
                        break 'pages;
                    }
                }
            }
            if complete {
                complete_through = through;
            }
            let batch = Arc::new(TailBatch {
                records,
                after: cursor.clone(),
                through: complete_through,
            });
            let mut state = self.feed_tail.state.lock().expect("feed tail poisoned");
            state.current = Some(cursor.clone());
            let _ = sender.send(batch);
        }
    }
}

/// A margin added to the oldest position named in OUT_OF_RANGE, so that it is still kept when
/// the consumer comes back with it.
const OLDEST_MARGIN: Duration = Duration::from_secs(60);

/// One stream's reading state.
struct FeedReading {
    cursor: FeedCursor,
    filter: FeedFilter,
    /// Per account seen: the last sequence sent (or passed by the filter).
    sent: HashMap<UserId, u64>,
    /// Past the first pass over every partition: entries' lag is measured.
    live: bool,
    last_sent: tokio::time::Instant,
}

enum PartitionStop {
    Send(Stop),
    Failed(WatchEnd),
}

fn feed_stopped(sender: &mpsc::Sender<FeedEvent>, stop: Stop, cursor: &FeedCursor) {
    match stop {
        Stop::Gone => {}
        Stop::Behind => {
            metrics::watcher_ended("behind");
            feed_end(sender, WatchEnd::Behind, cursor);
        }
        Stop::Draining => {
            metrics::watcher_ended("drain");
            feed_end(sender, WatchEnd::Draining, cursor);
        }
    }
}

fn feed_end(sender: &mpsc::Sender<FeedEvent>, reason: WatchEnd, cursor: &FeedCursor) {
    let _ = sender.try_send(FeedEvent::Ended {
        reason,
        cursor: cursor.encode(),
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio::sync::{Notify, mpsc};

    use super::*;
    use crate::core::Principal;
    use crate::core::time::ManualClock;
    use crate::service::CoordinatorConfig;
    use crate::service::testing::{coordinator_on, usd, user};
    use crate::storage::embedded::EmbeddedEngine;
    use crate::storage::{Delete, Engine, Key, Page, Put, Query, StorageResult, TransactItem, Update};

    const START: Millis = 1_000_000_000;
    const WAIT: Duration = Duration::from_secs(5);

    fn config() -> CoordinatorConfig {
        CoordinatorConfig {
            feed_poll: Duration::from_millis(10),
            watch_progress: Duration::from_secs(5),
            watch_send_stall: Duration::from_millis(300),
            ..CoordinatorConfig::default()
        }
    }

    async fn deposit(coordinator: &Arc<TransactionCoordinator>, who: &str) {
        coordinator
            .deposit(&Principal::local(), &user(who), usd("1"), None, None)
            .await
            .unwrap();
    }

    /// The next entry (skipping progress) and its cursor.
    async fn next_entry(events: &mut mpsc::Receiver<FeedEvent>) -> (LedgerEntry, String) {
        loop {
            let event = tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("an event in time")
                .expect("the stream is open");
            match event {
                FeedEvent::Entry { entry, cursor } => return (*entry, cursor),
                FeedEvent::Progress { .. } => {}
                FeedEvent::Ended { reason, .. } => panic!("the stream ended: {reason:?}"),
            }
        }
    }

    /// Nothing but progress for `quiet`.
    async fn no_entry_within(events: &mut mpsc::Receiver<FeedEvent>, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(event) = tokio::time::timeout_at(deadline, events.recv()).await {
            if let Some(FeedEvent::Entry { entry, .. }) = event {
                panic!("unexpected entry {} #{}", entry.user_id, entry.sequence);
            }
        }
    }

    /// Every account's entries reach one stream, from both coordinators of a table writing at
    /// once: each entry exactly once, in per-account order; then new commits follow, once
    /// older than the horizon.
    #[tokio::test]
    async fn every_accounts_entries_in_per_account_order_from_every_coordinator() {
        let clock = ManualClock::starting_at(START);
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let here = coordinator_on(engine.clone(), &clock, config()).await;
        let there = coordinator_on(engine, &clock, config()).await;
        let users = ["fa", "fb", "fc", "fd", "fe"];
        let writers: Vec<_> = [Arc::clone(&here), Arc::clone(&there)]
            .into_iter()
            .flat_map(|coordinator| {
                users.map(|who| {
                    let coordinator = Arc::clone(&coordinator);
                    tokio::spawn(async move {
                        for _ in 0..6 {
                            deposit(&coordinator, who).await;
                        }
                    })
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        clock.advance(Duration::from_secs(1));
        let mut events = here.watch_feed(FeedStart::Oldest, FeedFilter::default()).unwrap();
        let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for _ in 0..users.len() * 12 {
            let (entry, _) = next_entry(&mut events).await;
            seen.entry(entry.user_id.to_string()).or_default().push(entry.sequence);
        }
        for who in users {
            assert_eq!(seen[who], (1..=12).collect::<Vec<_>>(), "{who}");
        }
        no_entry_within(&mut events, Duration::from_millis(200)).await;
        deposit(&there, "fb").await;
        // Not yet older than the horizon: not sent.
        no_entry_within(&mut events, Duration::from_millis(100)).await;
        clock.advance(Duration::from_secs(1));
        let (entry, _) = next_entry(&mut events).await;
        assert_eq!((entry.user_id.as_str(), entry.sequence), ("fb", 13));
    }

    /// A consumer resumes with the last cursor it received on another coordinator: it gets
    /// every entry after it, and only re-deliveries of entries it already had.
    #[tokio::test]
    async fn a_cursor_resumes_on_another_coordinator_missing_nothing() {
        let clock = ManualClock::starting_at(START);
        let engine = Arc::new(EmbeddedEngine::in_memory().unwrap());
        let here = coordinator_on(engine.clone(), &clock, config()).await;
        let there = coordinator_on(engine, &clock, config()).await;
        for round in 0..10 {
            deposit(&here, "ra").await;
            deposit(&there, "rb").await;
            clock.advance(Duration::from_millis(1 + round));
        }
        clock.advance(Duration::from_secs(1));
        let mut first = here.watch_feed(FeedStart::Oldest, FeedFilter::default()).unwrap();
        let mut had = Vec::new();
        let mut cursor = String::new();
        for _ in 0..7 {
            let (entry, at) = next_entry(&mut first).await;
            had.push((entry.user_id.to_string(), entry.sequence));
            cursor = at;
        }
        drop(first);
        let resumed = FeedCursor::decode("cursor", &cursor).unwrap();
        let mut second = there
            .watch_feed(FeedStart::After(resumed), FeedFilter::default())
            .unwrap();
        let mut all = had.clone();
        while all.iter().collect::<std::collections::BTreeSet<_>>().len() < 20 {
            let (entry, _) = next_entry(&mut second).await;
            let key = (entry.user_id.to_string(), entry.sequence);
            if all.contains(&key) {
                assert!(had.contains(&key), "{key:?} sent twice by the second stream");
            }
            all.push(key);
        }
        no_entry_within(&mut second, Duration::from_millis(200)).await;
    }

    /// Caught-up streams share the coordinator's one reader of the journal's tail: ten of them
    /// cost the reads of one (eight Queries a poll), and each gets every new entry.
    #[tokio::test]
    async fn caught_up_streams_share_one_reader_of_the_tail() {
        let clock = ManualClock::starting_at(START);
        let poll = Duration::from_millis(20);
        let config = CoordinatorConfig {
            feed_poll: poll,
            ..config()
        };
        let coordinator = coordinator_on(Arc::new(EmbeddedEngine::in_memory().unwrap()), &clock, config).await;
        let mut streams: Vec<_> = (0..10)
            .map(|_| coordinator.watch_feed(FeedStart::Now, FeedFilter::default()).unwrap())
            .collect();
        // Every stream has caught up and joined the tail.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = coordinator.storage().requests();
        let window = Duration::from_millis(600);
        tokio::time::sleep(window).await;
        let reads = coordinator.storage().requests() - before;
        let polls = (window.as_millis() / poll.as_millis()) as u64;
        assert!(
            reads <= (polls + 2) * FEED_SHARDS as u64,
            "{reads} reads in {polls} polls: one reader's worth is at most {}",
            (polls + 2) * FEED_SHARDS as u64
        );
        deposit(&coordinator, "shared").await;
        clock.advance(Duration::from_secs(1));
        for stream in &mut streams {
            let (entry, _) = next_entry(stream).await;
            assert_eq!((entry.user_id.as_str(), entry.sequence), ("shared", 1));
        }
    }

    #[tokio::test]
    async fn filters_send_only_the_kinds_and_accounts_asked_for() {
        let clock = ManualClock::starting_at(START);
        let coordinator = coordinator_on(Arc::new(EmbeddedEngine::in_memory().unwrap()), &clock, config()).await;
        for who in ["desk.1", "desk.2", "retail.1"] {
            deposit(&coordinator, who).await;
            coordinator
                .withdraw(&Principal::local(), &user(who), usd("0.25"), None, None)
                .await
                .unwrap();
        }
        clock.advance(Duration::from_secs(1));
        let filter = FeedFilter {
            kinds: BTreeSet::from([EntryKind::Withdrawal]),
            user_prefix: "desk.".to_owned(),
        };
        let mut events = coordinator.watch_feed(FeedStart::Oldest, filter).unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            let (entry, _) = next_entry(&mut events).await;
            assert_eq!(entry.kind, EntryKind::Withdrawal);
            got.push(entry.user_id.to_string());
        }
        got.sort();
        assert_eq!(got, ["desk.1", "desk.2"]);
        no_entry_within(&mut events, Duration::from_millis(200)).await;
    }

    #[tokio::test]
    async fn a_cursor_older_than_the_feed_keeps_is_out_of_range_naming_the_oldest_kept() {
        let clock = ManualClock::starting_at(START);
        let coordinator = coordinator_on(Arc::new(EmbeddedEngine::in_memory().unwrap()), &clock, config()).await;
        let old = FeedCursor::at(START - FEED_RETENTION.as_millis() as u64 - 1);
        let Err(ServiceError::OutOfRange(message)) =
            coordinator.watch_feed(FeedStart::After(old), FeedFilter::default())
        else {
            panic!("expected OUT_OF_RANGE");
        };
        let oldest = message.split("cursor=").nth(1).expect("names a cursor");
        let oldest = FeedCursor::decode("cursor", oldest).unwrap();
        assert!(
            coordinator
                .watch_feed(FeedStart::After(oldest), FeedFilter::default())
                .is_ok()
        );
        let future = FeedCursor::at(START + 3_600_000);
        assert!(matches!(
            coordinator.watch_feed(FeedStart::After(future), FeedFilter::default()),
            Err(ServiceError::InvalidArgument(field)) if field.field == "cursor"
        ));
    }

    #[test]
    fn cursors_round_trip_and_foreign_text_is_refused() {
        let cursor = FeedCursor::at(START);
        assert_eq!(FeedCursor::decode("cursor", &cursor.encode()).unwrap(), cursor);
        for bad in ["", "f1.", "f2.AAAA", "f1.!!!", "garbage"] {
            let error = FeedCursor::decode("cursor", bad).unwrap_err();
            assert_eq!(error.field, "cursor", "{bad}");
        }
    }

    /// The embedded engine, but while `hold` is set a transaction waits for `release` before
    /// it reaches storage: a commit that lands late.
    #[derive(Debug, Default)]
    struct HeldEngine {
        inner: Option<EmbeddedEngine>,
        hold: AtomicBool,
        holding: Notify,
        release: Notify,
    }

    impl HeldEngine {
        fn inner(&self) -> &EmbeddedEngine {
            self.inner.as_ref().expect("an engine")
        }
    }

    #[async_trait::async_trait]
    impl Engine for HeldEngine {
        async fn create_table(&self, table: &str) -> StorageResult<()> {
            self.inner().create_table(table).await
        }
        async fn table_exists(&self, table: &str) -> StorageResult<bool> {
            self.inner().table_exists(table).await
        }
        async fn get(&self, table: &str, key: Key) -> StorageResult<Option<Item>> {
            self.inner().get(table, key).await
        }
        async fn update(&self, table: &str, update: Update) -> StorageResult<Option<Item>> {
            self.inner().update(table, update).await
        }
        async fn put(&self, table: &str, put: Put) -> StorageResult<()> {
            self.inner().put(table, put).await
        }
        async fn delete(&self, table: &str, delete: Delete) -> StorageResult<()> {
            self.inner().delete(table, delete).await
        }
        async fn query(&self, table: &str, query: Query) -> StorageResult<Page> {
            self.inner().query(table, query).await
        }
        async fn scan(&self, table: &str, limit: u32, start_after: Option<Key>) -> StorageResult<Page> {
            self.inner().scan(table, limit, start_after).await
        }
        async fn enable_ttl(&self, table: &str, attribute: &str) -> StorageResult<()> {
            self.inner().enable_ttl(table, attribute).await
        }
        async fn transact(&self, table: &str, items: &[TransactItem], token: Option<String>) -> StorageResult<()> {
            if self.hold.swap(false, Ordering::SeqCst) {
                let released = self.release.notified();
                self.holding.notify_one();
                released.await;
            }
            self.inner().transact(table, items, token).await
        }
    }

    /// A commit that lands past the horizon while its writer does not notice (here: a writer
    /// whose own horizon is a minute; in life, one that died before the answer came): the next
    /// coordinator to take the account records it again before its own commit, so a reader
    /// that passed its time still gets it, before the entry after it.
    #[tokio::test]
    async fn the_next_writer_records_a_late_commit_that_its_writer_did_not() {
        let clock = ManualClock::starting_at(START);
        let engine = Arc::new(HeldEngine {
            inner: Some(EmbeddedEngine::in_memory().unwrap()),
            ..HeldEngine::default()
        });
        let unaware = CoordinatorConfig {
            feed_horizon: Duration::from_secs(60),
            ..config()
        };
        let writer = coordinator_on(engine.clone(), &clock, unaware).await;
        let next = coordinator_on(engine.clone(), &clock, config()).await;
        deposit(&writer, "taken").await;
        clock.advance(Duration::from_secs(1));
        let mut events = next.watch_feed(FeedStart::Now, FeedFilter::default()).unwrap();
        let held = engine.holding.notified();
        engine.hold.store(true, Ordering::SeqCst);
        let committing = {
            let writer = Arc::clone(&writer);
            tokio::spawn(async move { deposit(&writer, "taken").await })
        };
        held.await;
        clock.advance(Duration::from_secs(1));
        // The reader passes the held commit's time in every partition.
        no_entry_within(&mut events, Duration::from_millis(100)).await;
        engine.release.notify_one();
        committing.await.unwrap();
        deposit(&next, "taken").await;
        clock.advance(Duration::from_secs(1));
        let (second, _) = next_entry(&mut events).await;
        let (third, _) = next_entry(&mut events).await;
        assert_eq!((second.sequence, third.sequence), (2, 3));
        no_entry_within(&mut events, Duration::from_millis(200)).await;
    }

    /// A commit stamped before a reader passed its time, landing only after: the reader's
    /// partition is past it, so only the record written again at the acknowledgement's time
    /// brings it to the consumer.
    #[tokio::test]
    async fn a_commit_that_lands_past_the_horizon_still_reaches_the_consumer() {
        let clock = ManualClock::starting_at(START);
        let engine = Arc::new(HeldEngine {
            inner: Some(EmbeddedEngine::in_memory().unwrap()),
            ..HeldEngine::default()
        });
        let coordinator = coordinator_on(engine.clone(), &clock, config()).await;
        // An account in the same partition: the reader moves past the held commit's time there.
        let other = (0..)
            .map(|n| format!("other{n}"))
            .find(|other| model::feed_shard(&user(other)) == model::feed_shard(&user("late")))
            .unwrap();
        let other = other.as_str();
        deposit(&coordinator, "late").await;
        deposit(&coordinator, other).await;
        clock.advance(Duration::from_secs(1));
        let mut events = coordinator
            .watch_feed(FeedStart::Oldest, FeedFilter::default())
            .unwrap();
        for _ in 0..2 {
            next_entry(&mut events).await;
        }
        let held = engine.holding.notified();
        engine.hold.store(true, Ordering::SeqCst);
        let committing = {
            let coordinator = Arc::clone(&coordinator);
            tokio::spawn(async move { deposit(&coordinator, "late").await })
        };
        held.await;
        // The reader passes the held commit's time while it is in flight...
        clock.advance(Duration::from_secs(1));
        deposit(&coordinator, other).await;
        clock.advance(Duration::from_secs(1));
        let (entry, _) = next_entry(&mut events).await;
        assert_eq!((entry.user_id.as_str(), entry.sequence), (other, 2));
        // Let the reader pass it before the held commit lands.
        no_entry_within(&mut events, Duration::from_millis(100)).await;
        // ...and it lands behind the reader, acknowledged a second after its time.
        engine.release.notify_one();
        committing.await.unwrap();
        clock.advance(Duration::from_secs(1));
        let (entry, _) = next_entry(&mut events).await;
        assert_eq!((entry.user_id.as_str(), entry.sequence), ("late", 2));
        no_entry_within(&mut events, Duration::from_millis(200)).await;
    }
}
