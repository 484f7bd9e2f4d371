//! docs/deploy.md against the code: the IAM policies name exactly the actions the endpoint
//! engine's requests need, and the table commands use the table, keys and TTL attribute the
//! coordinator uses.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::{ACCESS_CONTROL_FLAGS, ACCESS_CONTROL_VARIABLES, Help, read};

/// The IAM actions each aws-sdk-dynamodb call of `storage/dynamodb.rs` needs. A
/// TransactWriteItems has no action of its own: IAM checks each item as PutItem, UpdateItem,
/// DeleteItem or ConditionCheckItem, and the engine translates all four kinds.
const ACTIONS_OF_CALLS: &[(&str, &[&str])] = &[
    ("get_item", &["dynamodb:GetItem"]),
    ("put_item", &["dynamodb:PutItem"]),
    ("update_item", &["dynamodb:UpdateItem"]),
    ("delete_item", &["dynamodb:DeleteItem"]),
    ("query", &["dynamodb:Query"]),
    ("scan", &["dynamodb:Scan"]),
    ("describe_table", &["dynamodb:DescribeTable"]),
    (
        "transact_write_items",
        &[
            "dynamodb:PutItem",
            "dynamodb:UpdateItem",
            "dynamodb:DeleteItem",
            "dynamodb:ConditionCheckItem",
        ],
    ),
    ("create_table", &["dynamodb:CreateTable"]),
    ("update_time_to_live", &["dynamodb:UpdateTimeToLive"]),
];

/// Calls only `coordinator create-tables` makes (with DescribeTable, which `serve` needs too).
const TABLE_ADMIN_CALLS: &[&str] = &["create_table", "update_time_to_live", "describe_table"];

/// Every `client.NAME(` call in the endpoint engine.
fn sdk_calls() -> BTreeSet<String> {
    let source = read("coordinator/src/storage/dynamodb.rs");
    let mut calls = BTreeSet::new();
    let mut rest = source.as_str();
    while let Some(at) = rest.find(".client") {
        rest = &rest[at + ".client".len()..];
        let after = rest.trim_start();
        if let Some(call) = after.strip_prefix('.') {
            let name: String = call
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if call[name.len()..].starts_with('(') && !name.is_empty() {
                calls.insert(name);
            }
        }
    }
    calls
}

fn actions_of(calls: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    calls
        .into_iter()
        .flat_map(|call| {
            ACTIONS_OF_CALLS
                .iter()
                .find(|(name, _)| *name == call)
                .unwrap_or_else(|| {
                    panic!("storage/dynamodb.rs calls {call}: add its IAM actions here and to docs/deploy.md")
                })
                .1
                .iter()
                .map(|action| action.to_string())
        })
        .collect()
}

/// The JSON policy in the ```json block after `<!-- iam-policy:NAME -->` in docs/deploy.md.
fn policy(name: &str) -> Value {
    let guide = read("docs/deploy.md");
    let marker = format!("<!-- iam-policy:{name} -->");
    let after = &guide[guide
        .find(&marker)
        .unwrap_or_else(|| panic!("docs/deploy.md has no {marker}"))..];
    let start = after.find("```json\n").expect("a ```json block after the marker") + "```json\n".len();
    let end = after[start..].find("```").expect("the block's end") + start;
    serde_json::from_str(&after[start..end]).unwrap_or_else(|error| panic!("policy {name} is not JSON: {error}"))
}

fn allowed_actions(policy: &Value) -> BTreeSet<String> {
    let statements = policy["Statement"].as_array().expect("Statement");
    for statement in statements {
        assert_eq!(statement["Effect"], "Allow");
        for resource in statement["Resource"].as_array().expect("Resource is a list") {
            let resource = resource.as_str().expect("an ARN");
            assert!(
                resource.starts_with("arn:aws:dynamodb:") && resource.ends_with(":table/lockstep"),
                "{resource} is not the lockstep table (no indexes exist, so none is granted)"
            );
        }
    }
    statements
        .iter()
        .flat_map(|statement| statement["Action"].as_array().expect("Action is a list").iter())
        .map(|action| action.as_str().expect("an action").to_owned())
        .collect()
}

/// The coordinator's policy grants exactly what `serve` (and `audit`) call, and the table
/// administrator's exactly what `create-tables` calls: nothing missing, nothing extra.
#[test]
fn iam_policies_grant_exactly_the_calls_made() {
    let calls = sdk_calls();
    assert!(
        calls.contains("transact_write_items"),
        "no calls found in storage/dynamodb.rs: {calls:?}"
    );
    let serving = actions_of(
        calls
            .iter()
            .filter(|call| !TABLE_ADMIN_CALLS.contains(&call.as_str()) || *call == "describe_table")
            .cloned(),
    );
    assert_eq!(allowed_actions(&policy("coordinator")), serving, "coordinator policy");
    let admin = actions_of(
        calls
            .iter()
            .filter(|call| TABLE_ADMIN_CALLS.contains(&call.as_str()))
            .cloned(),
    );
    assert_eq!(allowed_actions(&policy("table-admin")), admin, "table-admin policy");
}

/// The aws CLI commands create the table the coordinator expects: its default name, string keys
/// pk and sk, on-demand, point-in-time recovery, and TTL on the attribute request records carry.
#[test]
fn table_commands_match_the_coordinator() {
    let guide = read("docs/deploy.md");
    let table = Help::of("coordinator").default_of("--table").to_owned();
    let ttl_attribute = lockstep_coordinator::storage::model::TTL_ATTRIBUTE;
    for expected in [
        format!("--table-name {table}"),
        "AttributeName=pk,AttributeType=S".to_owned(),
        "AttributeName=sk,AttributeType=S".to_owned(),
        "AttributeName=pk,KeyType=HASH".to_owned(),
        "AttributeName=sk,KeyType=RANGE".to_owned(),
        "--billing-mode PAY_PER_REQUEST".to_owned(),
        "PointInTimeRecoveryEnabled=true".to_owned(),
        format!("Enabled=true,AttributeName={ttl_attribute}"),
    ] {
        assert!(
            guide.contains(&expected),
            "docs/deploy.md's table commands lack `{expected}`"
        );
    }
}

/// Each flag or variable of the access-control work that the deploy files use before it exists
/// is listed in docs/deploy.md, so an operator knows which image the manifests need.
#[test]
fn pending_flags_are_documented() {
    let guide = read("docs/deploy.md");
    for name in ACCESS_CONTROL_FLAGS.iter().chain(ACCESS_CONTROL_VARIABLES) {
        assert!(
            guide.contains(&format!("`{name}")),
            "docs/deploy.md does not list {name}"
        );
    }
}
