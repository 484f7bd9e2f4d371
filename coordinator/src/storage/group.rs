//! Group commit: the batch commits of several users sent as one TransactWriteItems. On the
//! embedded engine every transaction costs a SQLite transaction and an fsync behind one mutex;
//! a group pays that once for all its members. Members never share an item (a transaction may
//! touch an item once), so a member whose key another member already uses waits for the next
//! group. A group that is cancelled is split by its cancellation reasons: the members whose
//! items failed get their own reasons, the others are sent again. A group whose outcome is
//! unknown answers every member with that error, and each settles its own user.

use std::collections::BTreeSet;

use tokio::sync::{mpsc, oneshot};

use super::{CancellationReason, Key, Storage, StorageError, StorageResult, TransactItem};

/// Items in one transaction: DynamoDB's limit.
pub const GROUP_ITEMS_MAX: usize = 100;
/// Submissions waiting for the committer: past it a commit waits to be queued (back-pressure).
pub const GROUP_QUEUE_MAX: usize = 1024;

/// One batch commit waiting to be sent in a group.
struct Submission {
    items: Vec<TransactItem>,
    keys: BTreeSet<(String, String)>,
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
        let keys = items.iter().map(item_key).map(|key| (key.pk, key.sk)).collect();
        let (reply, answer) = oneshot::channel();
        let submission = Submission { items, keys, reply };
        if self.submissions.send(submission).await.is_err() {
            return Err(StorageError::Unavailable("the group committer stopped".to_owned()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(StorageError::Unavailable("the group committer stopped".to_owned())))
    }
}

/// The committer: takes what is waiting, sends it as one transaction, answers, repeats.
async fn run(storage: Storage, mut receiver: mpsc::Receiver<Submission>) {
    let mut waiting: Vec<Submission> = Vec::new();
    loop {
        if waiting.is_empty() {
            match receiver.recv().await {
                Some(first) => waiting.push(first),
                None => return,
            }
        }
        while let Ok(next) = receiver.try_recv() {
            waiting.push(next);
        }
        let group = take_group(&mut waiting);
        let items: Vec<TransactItem> = group.iter().flat_map(|member| member.items.iter().cloned()).collect();
        match storage.transact(items, None).await {
            Ok(()) => group.into_iter().for_each(|member| answer(member, Ok(()))),
            Err(StorageError::TransactionCanceled { reasons }) if group.len() > 1 => {
                // The innocent go first into the next group, ahead of the newcomers. (If no
                // member's items failed, the reasons explain nothing: all get the error.)
                let size = group.len();
                let innocent = split_cancelled(group, &reasons);
                if innocent.len() == size {
                    let error = StorageError::TransactionCanceled { reasons };
                    innocent
                        .into_iter()
                        .for_each(|member| answer(member, Err(error.clone())));
                } else {
                    waiting.splice(0..0, innocent);
                }
            }
            Err(error) => group.into_iter().for_each(|member| answer(member, Err(error.clone()))),
        }
    }
}

/// Takes, in order, the waiting submissions that fit one transaction and share no item.
fn take_group(waiting: &mut Vec<Submission>) -> Vec<Submission> {
    let mut group = Vec::new();
    let mut keys = BTreeSet::new();
    let mut items = 0;
    let mut rest = Vec::new();
    for submission in waiting.drain(..) {
        let fits = items + submission.items.len() <= GROUP_ITEMS_MAX && keys.is_disjoint(&submission.keys);
        if fits || group.is_empty() {
            items += submission.items.len();
            keys.extend(submission.keys.iter().cloned());
            group.push(submission);
        } else {
            rest.push(submission);
        }
    }
    *waiting = rest;
    group
}

/// Answers the members of a cancelled group whose items failed with their own reasons, and
/// returns the others, whose items were all fine, to be sent again.
fn split_cancelled(group: Vec<Submission>, reasons: &[CancellationReason]) -> Vec<Submission> {
    let mut innocent = Vec::new();
    let mut offset = 0;
    for member in group {
        let own: Vec<CancellationReason> = (offset..offset + member.items.len())
            .map(|index| {
                reasons.get(index).cloned().unwrap_or(CancellationReason {
                    code: "Unknown".to_owned(),
                })
            })
            .collect();
        offset += member.items.len();
        if own.iter().all(|reason| reason.code == "None") {
            innocent.push(member);
        } else {
            answer(member, Err(StorageError::TransactionCanceled { reasons: own }));
        }
    }
    innocent
}

fn answer(member: Submission, result: StorageResult<()>) {
    member.reply.send(result).ok();
}

/// The key an item of a transaction touches.
pub fn item_key(item: &TransactItem) -> Key {
    let text = |item: &super::Item, name: &str| match item.get(name) {
        Some(super::Value::S(text)) => text.clone(),
        _ => String::new(),
    };
    match item {
        TransactItem::Put(put) => Key {
            pk: text(&put.item, "pk"),
            sk: text(&put.item, "sk"),
        },
        TransactItem::Update(update) => update.key.clone(),
        TransactItem::Delete(delete) => delete.key.clone(),
        TransactItem::ConditionCheck(check) => check.key.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::embedded::EmbeddedEngine;
    use crate::storage::{Put, Storage, Value};

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
        storage.transact(vec![fresh_put("TAKEN")], None).await.unwrap();
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
