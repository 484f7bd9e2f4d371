//! What Lockstep's requests cost on DynamoDB, in capacity units (docs/performance.md, "What an
//! operation costs"): item sizes by DynamoDB's rules, and the write units of a transaction, 2 per
//! started KB of each item it writes or checks (transactional writes cost twice plain ones).

use super::{Item, Key, TransactItem, Value};

pub const KB: usize = 1024;

/// An item's size as DynamoDB counts it: each attribute's name (UTF-8 bytes) plus its value. A
/// string counts its UTF-8 bytes; a number one byte per two significant digits, plus one; a
/// boolean one byte; a map 3 bytes plus each entry's name and value and one byte per entry.
pub fn item_size(item: &Item) -> usize {
    item.iter().map(|(name, value)| name.len() + value_size(value)).sum()
}

fn value_size(value: &Value) -> usize {
    match value {
        Value::S(text) => text.len(),
        Value::N(number) => {
            let digits = number
                .trim_start_matches('-')
                .replace('.', "")
                .trim_start_matches('0')
                .trim_end_matches('0')
                .len();
            digits.div_ceil(2) + 1
        }
        Value::Bool(_) => 1,
        Value::M(entries) => {
            3 + entries
                .iter()
                .map(|(name, value)| name.len() + value_size(value) + 1)
                .sum::<usize>()
        }
    }
}

/// Write units of one item in a transaction: 2 per started KB, at least 2.
pub fn transactional_units(size: usize) -> u64 {
    2 * size.div_ceil(KB).max(1) as u64
}

/// Write units of one TransactWriteItems. A Put counts the item it writes; an Update, a Delete or
/// a ConditionCheck the item it names, whose size `stored` gives (the larger of before and after
/// is what DynamoDB charges; a caller that reads the item after the transaction passes that).
pub fn transaction_units(items: &[TransactItem], stored: impl Fn(&Key) -> usize) -> u64 {
    items
        .iter()
        .map(|item| match item {
            TransactItem::Put(put) => transactional_units(item_size(&put.item)),
            TransactItem::Update(update) => transactional_units(stored(&update.key)),
            TransactItem::Delete(delete) => transactional_units(stored(&delete.key)),
            TransactItem::ConditionCheck(check) => transactional_units(stored(&check.key)),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizing rules on examples from DynamoDB's documentation of item sizes.
    #[test]
    fn sizes_follow_dynamodbs_rules() {
        let item: Item = [
            ("pk".to_owned(), Value::S("USER#alice".to_owned())),
            ("cash".to_owned(), Value::N("100.50".to_owned())),
            ("active".to_owned(), Value::Bool(true)),
        ]
        .into();
        // "pk" 2 + 10; "cash" 4 + (4 significant digits: 2 + 1); "active" 6 + 1.
        assert_eq!(item_size(&item), 12 + 7 + 7);
        assert_eq!(value_size(&Value::N("0.001".to_owned())), 2);
        assert_eq!(transactional_units(1), 2);
        assert_eq!(transactional_units(KB), 2);
        assert_eq!(transactional_units(KB + 1), 4);
    }
}
