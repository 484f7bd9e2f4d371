//! What both engines translate alike. dynoxide and aws-sdk-dynamodb each have their own
//! attribute-value type, with the same variants but for one name (dynoxide spells a boolean
//! `BOOL`, the SDK `Bool`): `engine_value!` implements `EngineValue` for either, given that name,
//! and the translation of items, keys and expression bindings is written once, here, over it.
//! What stays in each engine is what really differs: its request types.

use std::collections::HashMap;

use super::{Bindings, Item, Key, Value};

/// An engine's attribute-value type.
pub(super) trait EngineValue: Sized {
    /// The engine's string value.
    fn string(text: String) -> Self;
    fn encode(value: &Value) -> Self;
    /// The value as Lockstep reads it; `None` for attribute types Lockstep never writes, which
    /// therefore cannot be part of its items.
    fn decode(&self) -> Option<Value>;
    /// The text of a string value.
    fn as_string(&self) -> Option<&str>;
}

/// Implements `EngineValue` for an engine's attribute-value enum, which has the variants `S`, `N`
/// and `M` and names its boolean variant `$boolean`. Attribute types Lockstep never writes (sets,
/// lists, binary, null) decode to `None`.
macro_rules! engine_value {
    ($value:ty, $boolean:ident) => {
        impl $crate::storage::translate::EngineValue for $value {
            fn string(text: String) -> Self {
                Self::S(text)
            }

            fn encode(value: &$crate::storage::Value) -> Self {
                use $crate::storage::Value;
                match value {
                    Value::S(text) => Self::S(text.clone()),
                    Value::N(number) => Self::N(number.clone()),
                    Value::Bool(flag) => Self::$boolean(*flag),
                    Value::M(map) => Self::M($crate::storage::translate::encode_item(map)),
                }
            }

            fn decode(&self) -> Option<$crate::storage::Value> {
                use $crate::storage::Value;
                Some(match self {
                    Self::S(text) => Value::S(text.clone()),
                    Self::N(number) => Value::N(number.clone()),
                    Self::$boolean(flag) => Value::Bool(*flag),
                    Self::M(map) => Value::M($crate::storage::translate::decode_item(map)),
                    _ => return None,
                })
            }

            fn as_string(&self) -> Option<&str> {
                match self {
                    Self::S(text) => Some(text),
                    _ => None,
                }
            }
        }
    };
}
pub(super) use engine_value;

/// An item, key or map as the engine's requests and replies hold it.
pub(super) type Attributes<A> = HashMap<String, A>;
/// Expression attribute names, absent rather than empty.
pub(super) type Names = Option<HashMap<String, String>>;
/// Expression attribute values, absent rather than empty.
pub(super) type Values<A> = Option<Attributes<A>>;

pub(super) fn encode_item<A: EngineValue>(item: &Item) -> Attributes<A> {
    item.iter()
        .map(|(name, value)| (name.clone(), A::encode(value)))
        .collect()
}

pub(super) fn decode_item<A: EngineValue>(item: &Attributes<A>) -> Item {
    item.iter()
        .filter_map(|(name, value)| Some((name.clone(), value.decode()?)))
        .collect()
}

pub(super) fn encode_key<A: EngineValue>(key: &Key) -> Attributes<A> {
    HashMap::from([
        ("pk".to_owned(), A::string(key.pk.clone())),
        ("sk".to_owned(), A::string(key.sk.clone())),
    ])
}

/// The key of an item or of a page's last item (LastEvaluatedKey); `None` without string keys.
pub(super) fn decode_key<A: EngineValue>(item: &Attributes<A>) -> Option<Key> {
    Some(Key {
        pk: item.get("pk")?.as_string()?.to_owned(),
        sk: item.get("sk")?.as_string()?.to_owned(),
    })
}

/// A request's expression bindings. DynamoDB refuses an empty map, so an empty half is sent as
/// absent.
pub(super) fn encode_bindings<A: EngineValue>(bindings: &Bindings) -> (Names, Values<A>) {
    let names = (!bindings.names.is_empty()).then(|| bindings.names.clone().into_iter().collect());
    let values = (!bindings.values.is_empty()).then(|| {
        bindings
            .values
            .iter()
            .map(|(name, value)| (name.clone(), A::encode(value)))
            .collect()
    });
    (names, values)
}

/// A request that writes conditionally, single or in a transaction, in either engine: each takes
/// the table, the condition (`C`: optional, except in a dynoxide condition check) and the
/// expression bindings the same way, so they are set in one place per engine.
pub(super) trait Conditional<C>: Sized {
    fn conditional(self, table: &str, condition: C, bindings: &Bindings) -> Self;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn item() -> Item {
        BTreeMap::from([
            ("pk".to_owned(), Value::S("partition".to_owned())),
            ("sk".to_owned(), Value::S("sort".to_owned())),
            ("cash".to_owned(), Value::N("10.5".to_owned())),
            ("active".to_owned(), Value::Bool(true)),
            (
                "holdings".to_owned(),
                Value::M(BTreeMap::from([("BTC".to_owned(), Value::N("0.25".to_owned()))])),
            ),
        ])
    }

    fn round_trips<A: EngineValue>() {
        assert_eq!(decode_item(&encode_item::<A>(&item())), item());
        let key = Key {
            pk: "partition".to_owned(),
            sk: "sort".to_owned(),
        };
        assert_eq!(decode_key(&encode_key::<A>(&key)), Some(key));
        assert_eq!(decode_key::<A>(&encode_item(&BTreeMap::new())), None);
        let (names, values) = encode_bindings::<A>(&Bindings::default());
        assert!(names.is_none() && values.is_none(), "empty bindings are sent as absent");
    }

    /// Items, keys and bindings survive the trip through either engine's value type.
    #[test]
    fn both_engines_translate_items_keys_and_bindings_alike() {
        round_trips::<dynoxide::types::AttributeValue>();
        round_trips::<aws_sdk_dynamodb::types::AttributeValue>();
    }
}
