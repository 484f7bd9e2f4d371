//! Group commit: the batch commits of several users sent as one TransactWriteItems. On the
//! embedded engine every transaction costs a SQLite transaction and an fsync behind one mutex;
//! a group pays that once for all its members. A transaction may touch an item once, so members
//! never share an item they write: a member whose key another member already writes waits for
//! the next group. Identical condition checks of one item (trades of several users checking the
//! same catalog price) are the exception: the group sends the check once, and its outcome is
//! every sharing member's. A group that is cancelled is split by its cancellation reasons: the
//! members whose items failed get their own reasons, the others are sent again. A group whose
//! outcome is unknown answers every member with that error, and each settles its own user.
//!
//! At most two groups are in flight: while one is at the engine, a second is sent only when it is
//! full, so it waits at dynoxide's mutex and starts the moment the first ends, instead of the
//! engine idling while the committer wakes, answers and forms it (about 10 % of the engine's
//! time at 64 callers). Two groups in flight never share a written item: each member is one
//! user's round, and a user's next round waits for the answer to its last.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::{CancellationReason, ConditionCheck, Storage, StorageError, StorageResult, TransactItem};

/// Items in one transaction: DynamoDB's limit.
pub const GROUP_ITEMS_MAX: usize = 100;
/// Submissions waiting for the committer: past it a commit waits to be queued (back-pressure).
pub const GROUP_QUEUE_MAX: usize = 1024;
/// Groups sent and not yet answered: a second one waits at the engine, so the engine need not
/// wait for the committer between two groups.
pub const GROUPS_IN_FLIGHT_MAX: usize = 2;

/// One batch commit waiting to be sent in a group.
struct Submission {
    items: Vec<TransactItem>,
    reply: oneshot::Sender<StorageResult<()>>,
}

/// The handle through which batch commits join groups; one committer task sends them.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    submissions: mpsc::Sender<Submission>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Submission({} items)", self.items.len())
    }
}

impl GroupCommit {
    /// Starts the committer, which sends through `storage` (counted and observed like any
    /// request); it stops when every handle is dropped.
    pub fn start(storage: Storage) -> Self {
        let (submissions, receiver) = mpsc::channel(GROUP_QUEUE_MAX);
        tokio::spawn(run(storage, receiver));
        Self { submissions }
    }

    /// Sends `items` in the next group and answers as a transaction of their own would.
    pub async fn transact(&self, items: Vec<TransactItem>) -> StorageResult<()> {
        let (reply, answer) = oneshot::channel();
        let submission = Submission { items, reply };
        if self.submissions.send(submission).await.is_err() {
            return Err(StorageError::Unavailable("the group committer stopped".to_owned()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(StorageError::Unavailable("the group committer stopped".to_owned())))
    }
}

/// The committer: takes what is waiting, sends it as one transaction, and while that one is in
/// flight sends a second only when it is full (it then waits for the engine rather than the
/// engine for it; a part-full one would only split what could still join it).
async fn run(storage: Storage, mut receiver: mpsc::Receiver<Submission>) {
    let mut waiting: Vec<Submission> = Vec::new();
    let mut in_flight = JoinSet::new();
    let mut open = true;
    loop {
        while let Ok(next) = receiver.try_recv() {
            waiting.push(next);
        }
        if ready_to_send(&waiting, in_flight.len()) {
            in_flight.spawn(send(storage.clone(), take_group(&mut waiting)));
            continue;
        }
        if !open && waiting.is_empty() && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            received = receiver.recv(), if open => match received {
                Some(submission) => waiting.push(submission),
                None => open = false,
            },
            // The innocent of a cancelled group go first into the next, ahead of the newcomers.
            // (A group task that panicked dropped its members' replies: each sees the committer
            // stopped, UNAVAILABLE, and settles.)
            Some(joined) = in_flight.join_next() => {
                if let Ok(innocent) = joined {
                    waiting.splice(0..0, innocent);
                }
            }
        }
    }
}

/// Whether the waiting submissions go out now: always when no group is in flight; beside one in
/// flight, only when they fill a transaction.
fn ready_to_send(waiting: &[Submission], in_flight: usize) -> bool {
    match in_flight {
        _ if waiting.is_empty() => false,
        0 => true,
        n if n < GROUPS_IN_FLIGHT_MAX => {
            waiting.iter().map(|submission| submission.items.len()).sum::<usize>() >= GROUP_ITEMS_MAX
        }
        _ => false,
    }
}

/// Sends one group and answers its members; returns those to send again (the innocent members
/// of a cancelled group).
async fn send(storage: Storage, group: Group) -> Vec<Submission> {
    match storage.transact(&group.items, None).await {
        Ok(()) => group
            .members
            .into_iter()
            .for_each(|member| answer(member.reply, Ok(()))),
        Err(StorageError::TransactionCanceled { reasons }) if group.members.len() > 1 => {
            // If no member's items failed, the reasons explain nothing: all get the error.
            let size = group.members.len();
            let innocent = split_cancelled(group, &reasons);
            if innocent.len() < size {
                return innocent;
            }
            let error = StorageError::TransactionCanceled { reasons };
            innocent
                .into_iter()
                .for_each(|member| answer(member.reply, Err(error.clone())));
        }
        Err(error) => group
            .members
            .into_iter()
            .for_each(|member| answer(member.reply, Err(error.clone()))),
    }
    Vec::new()
}

/// Members sent together: their items as one transaction, and where each member's items are in
/// it (a shared check sits at one position for all its members).
struct Group {
    members: Vec<Member>,
    items: Vec<TransactItem>,
}

/// A member of a group: its reply, and the positions of its items in the group's transaction.
struct Member {
    reply: oneshot::Sender<StorageResult<()>>,
    positions: Vec<usize>,
}

impl Member {
    /// The member as a submission again, its items copied back out of the group's.
    fn resubmit(self, items: &[TransactItem]) -> Submission {
        Submission {
            items: self.positions.iter().map(|position| items[*position].clone()).collect(),
            reply: self.reply,
        }
    }
}

/// How a group already uses an item: written by a member, or checked (at a position).
enum Use<'a> {
    Written,
    Checked(&'a ConditionCheck, usize),
}

/// Takes, in order, the waiting submissions that fit one transaction and share no item (other
/// than identical checks). The items move into the group; only the keys are looked at, borrowed.
fn take_group(waiting: &mut Vec<Submission>) -> Group {
    let placements = place(waiting);
    let mut group = Group {
        members: Vec::new(),
        items: Vec::new(),
    };
    let mut rest = Vec::new();
    for (submission, placement) in waiting.drain(..).zip(placements) {
        let Some(placement) = placement else {
            rest.push(submission);
            continue;
        };
        let mut positions = Vec::with_capacity(placement.len());
        for (item, shared) in submission.items.into_iter().zip(placement) {
            positions.push(shared.unwrap_or_else(|| {
                group.items.push(item);
                group.items.len() - 1
            }));
        }
        group.members.push(Member {
            reply: submission.reply,
            positions,
        });
    }
    *waiting = rest;
    group
}

/// For each waiting submission in order: `None` if it waits for a later group, or for each of
/// its items the position of an identical check the group already sends (`Some`) or a new
/// position (`None`). The first submission always goes, whatever its size.
fn place(waiting: &[Submission]) -> Vec<Option<Vec<Option<usize>>>> {
    let mut uses: HashMap<(&str, &str), Use<'_>> = HashMap::new();
    let mut sent = 0;
    let mut placements = Vec::with_capacity(waiting.len());
    for submission in waiting {
        let placed: Option<Vec<Option<usize>>> = submission
            .items
            .iter()
            .map(|item| match (item, uses.get(&key_of(item))) {
                (_, None) => Some(None),
                (TransactItem::ConditionCheck(check), Some(Use::Checked(used, position))) if check == *used => {
                    Some(Some(*position))
                }
                _ => None,
            })
            .collect();
        let new_items = placed
            .as_ref()
            .map_or(0, |placed| placed.iter().filter(|position| position.is_none()).count());
        let fits = placed.is_some() && sent + new_items <= GROUP_ITEMS_MAX;
        if !fits && sent > 0 {
            placements.push(None);
            continue;
        }
        let placed = placed.unwrap_or_else(|| vec![None; submission.items.len()]);
        for (item, shared) in submission.items.iter().zip(&placed) {
            let position = shared.unwrap_or_else(|| {
                sent += 1;
                sent - 1
            });
            let used = match item {
                TransactItem::ConditionCheck(check) => Use::Checked(check, position),
                _ => Use::Written,
            };
            uses.entry(key_of(item)).or_insert(used);
        }
        placements.push(Some(placed));
    }
    placements
}

/// The key an item of a transaction touches, borrowed.
fn key_of(item: &TransactItem) -> (&str, &str) {
    fn text<'a>(item: &'a super::Item, name: &str) -> &'a str {
        match item.get(name) {
            Some(super::Value::S(text)) => text,
            _ => "",
        }
    }
    match item {
        TransactItem::Put(put) => (text(&put.item, "pk"), text(&put.item, "sk")),
        TransactItem::Update(update) => (&update.key.pk, &update.key.sk),
        TransactItem::Delete(delete) => (&delete.key.pk, &delete.key.sk),
        TransactItem::ConditionCheck(check) => (&check.key.pk, &check.key.sk),
    }
}

/// Answers the members of a cancelled group whose items failed with their own reasons, and
/// returns the others, whose items were all fine, to be sent again.
fn split_cancelled(group: Group, reasons: &[CancellationReason]) -> Vec<Submission> {
    let mut innocent = Vec::new();
    for member in group.members {
        let own: Vec<CancellationReason> = member
            .positions
            .iter()
            .map(|position| {
                reasons.get(*position).cloned().unwrap_or(CancellationReason {
                    code: "Unknown".to_owned(),
                })
            })
            .collect();
        if own.iter().all(|reason| reason.code == "None") {
            innocent.push(member.resubmit(&group.items));
        } else {
            answer(member.reply, Err(StorageError::TransactionCanceled { reasons: own }));
        }
    }
    innocent
}

fn answer(reply: oneshot::Sender<StorageResult<()>>, result: StorageResult<()>) {
    reply.send(result).ok();
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::embedded::EmbeddedEngine;
    use crate::storage::{Key, Put, Storage, Value};

    fn fresh_put(pk: &str) -> TransactItem {
        let item = [("pk", pk), ("sk", "X")]
            .into_iter()
            .map(|(name, value)| (name.to_owned(), Value::S(value.to_owned())))
            .collect();
        TransactItem::Put(Put {
            item,
            condition: Some("attribute_not_exists(pk)".to_owned()),
            bindings: Default::default(),
        })
    }

    /// A committer, the storage it sends through, and the requests sent before the test.
    async fn committer() -> (GroupCommit, Storage, u64) {
        let storage = Storage::new(Arc::new(EmbeddedEngine::in_memory().unwrap()), "lockstep");
        storage.ensure_table().await.unwrap();
        let group = GroupCommit::start(storage.clone());
        let before = storage.requests();
        (group, storage, before)
    }

    async fn submit_together(group: &GroupCommit, members: Vec<Vec<TransactItem>>) -> Vec<StorageResult<()>> {
        let handles: Vec<_> = members
            .into_iter()
            .map(|items| {
                let group = group.clone();
                tokio::spawn(async move { group.transact(items).await })
            })
            .collect();
        let mut results = Vec::new();
        for handle in handles {
            results.push(handle.await.unwrap());
        }
        results
    }

    /// Commits that arrive together go in one transaction, each answered as its own.
    #[tokio::test]
    async fn commits_arriving_together_share_one_transaction() {
        let (group, storage, before) = committer().await;
        let members = (0..5).map(|index| vec![fresh_put(&format!("U{index}"))]).collect();
        let results = submit_together(&group, members).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(storage.requests() - before, 1, "one transaction for five commits");
        for index in 0..5 {
            let key = Key {
                pk: format!("U{index}"),
                sk: "X".to_owned(),
            };
            assert!(storage.get(key).await.unwrap().is_some());
        }
    }

    /// A member whose condition fails gets its own reasons; the others are sent again and apply.
    #[tokio::test]
    async fn a_failed_member_is_split_off_and_the_others_apply() {
        let (group, storage, _) = committer().await;
        storage.transact(&[fresh_put("TAKEN")], None).await.unwrap();
        let before = storage.requests();
        let members = vec![vec![fresh_put("A")], vec![fresh_put("TAKEN")], vec![fresh_put("B")]];
        let results = submit_together(&group, members).await;
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        match &results[1] {
            Err(StorageError::TransactionCanceled { reasons }) => {
                assert_eq!(reasons.len(), 1);
                assert!(reasons[0].condition_failed(), "{reasons:?}");
            }
            other => panic!("the failed member's own cancellation: {other:?}"),
        }
        assert_eq!(storage.requests() - before, 2, "the group, then the innocent again");
    }

    fn price_check(price: &str) -> TransactItem {
        TransactItem::ConditionCheck(crate::storage::ConditionCheck {
            key: Key {
                pk: "ASSET".to_owned(),
                sk: "SOL".to_owned(),
            },
            condition: "price = :price".to_owned(),
            bindings: crate::storage::Bindings {
                names: Default::default(),
                values: [(":price".to_owned(), Value::N(price.to_owned()))].into(),
            },
        })
    }

    /// Trades of several users checking the same price share one group, the check sent once;
    /// when it fails, every member that shares it gets the failure, and the others apply.
    #[tokio::test]
    async fn identical_checks_of_one_item_share_a_group() {
        let (group, storage, _) = committer().await;
        let asset = [
            ("pk", Value::S("ASSET".to_owned())),
            ("sk", Value::S("SOL".to_owned())),
            ("price", Value::N("150".to_owned())),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
        storage
            .transact(
                &[TransactItem::Put(Put {
                    item: asset,
                    condition: None,
                    bindings: Default::default(),
                })],
                None,
            )
            .await
            .unwrap();
        let before = storage.requests();
        let members = (0..4)
            .map(|index| vec![price_check("150"), fresh_put(&format!("T{index}"))])
            .collect();
        let results = submit_together(&group, members).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(storage.requests() - before, 1, "one transaction, one check");

        let before = storage.requests();
        let members = vec![
            vec![price_check("140"), fresh_put("S0")],
            vec![fresh_put("S1")],
            vec![price_check("140"), fresh_put("S2")],
        ];
        let results = submit_together(&group, members).await;
        for failed in [&results[0], &results[2]] {
            match failed {
                Err(StorageError::TransactionCanceled { reasons }) => {
                    assert_eq!(reasons.len(), 2, "the member's own items: {reasons:?}");
                    assert!(reasons[0].condition_failed(), "{reasons:?}");
                }
                other => panic!("the shared check failed for both: {other:?}"),
            }
        }
        assert!(results[1].is_ok(), "{results:?}");
        assert_eq!(storage.requests() - before, 2, "the group, then the innocent again");
    }

    /// A second group goes out beside one in flight only when it fills a transaction.
    #[test]
    fn a_second_group_goes_out_only_when_full() {
        let waiting = |items: usize| -> Vec<Submission> {
            (0..items)
                .map(|index| Submission {
                    items: vec![fresh_put(&format!("W{index}"))],
                    reply: oneshot::channel().0,
                })
                .collect()
        };
        assert!(!ready_to_send(&waiting(0), 0), "nothing to send");
        assert!(ready_to_send(&waiting(1), 0), "nothing in flight: send at once");
        assert!(!ready_to_send(&waiting(GROUP_ITEMS_MAX - 1), 1), "part-full waits");
        assert!(
            ready_to_send(&waiting(GROUP_ITEMS_MAX), 1),
            "full goes beside the one in flight"
        );
        assert!(!ready_to_send(&waiting(3 * GROUP_ITEMS_MAX), GROUPS_IN_FLIGHT_MAX));
    }

    /// Many members at once (several full groups, two in flight), some of them failing: each
    /// is answered as its own transaction would be, and every innocent one applies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_members_across_groups_in_flight_are_each_answered() {
        let (group, storage, _) = committer().await;
        let taken = |index: usize| index % 7 == 3;
        for index in (0..400).filter(|index| taken(*index)) {
            storage
                .transact(&[fresh_put(&format!("M{index}"))], None)
                .await
                .unwrap();
        }
        let before = storage.requests();
        let members = (0..400).map(|index| vec![fresh_put(&format!("M{index}"))]).collect();
        let results = submit_together(&group, members).await;
        for (index, result) in results.iter().enumerate() {
            match result {
                Ok(()) => assert!(!taken(index), "M{index} was taken and still applied"),
                Err(StorageError::TransactionCanceled { reasons }) => {
                    assert!(
                        taken(index) && reasons.len() == 1 && reasons[0].condition_failed(),
                        "M{index}: {reasons:?}"
                    );
                }
                Err(other) => panic!("M{index}: {other:?}"),
            }
        }
        assert!(
            storage.requests() - before >= 4,
            "400 items need at least four transactions"
        );
    }

    /// Two commits touching one item never share a transaction.
    #[tokio::test]
    async fn members_sharing_an_item_go_in_separate_groups() {
        let (group, storage, before) = committer().await;
        let members = vec![vec![fresh_put("SAME")], vec![fresh_put("SAME")]];
        let results = submit_together(&group, members).await;
        assert!(results[0].is_ok());
        assert!(
            matches!(results[1], Err(StorageError::TransactionCanceled { .. })),
            "{results:?}"
        );
        assert_eq!(storage.requests() - before, 2);
    }
}
