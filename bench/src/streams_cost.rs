//! `lockstep-bench streams-cost`: why WatchFeed reads a journal written in the commit and not
//! DynamoDB Streams on the embedded engine. One commit-sized TransactWriteItems (4 Puts of new
//! items, as a Lockstep trade writes) on a dynoxide file, as `EmbeddedEngine` opens it, timed as
//! the table's stream grows; beside it, the same table without a stream, with and without the
//! one Put of a feed record more (the journal's whole cost on the commit).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dynoxide::Database;
use dynoxide::actions::create_table::CreateTableRequest;
use dynoxide::actions::transact_write_items::{TransactPut, TransactWriteItem, TransactWriteItemsRequest};
use dynoxide::types::AttributeValue;

const TABLE: &str = "lockstep";

/// How a variant's table is made and what each commit writes.
#[derive(Debug, Clone, Copy)]
enum Variant {
    /// Streams on (NEW_IMAGE), 4 Puts per commit.
    Stream,
    /// No stream, 4 Puts per commit.
    Plain,
    /// No stream, 4 Puts and a feed record per commit.
    Journal,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Stream => "DynamoDB Streams on (4 Puts)",
            Variant::Plain => "no stream (4 Puts)",
            Variant::Journal => "journal (4 Puts + 1 feed record)",
        }
    }
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn put(item: HashMap<String, AttributeValue>) -> TransactWriteItem {
    TransactWriteItem {
        put: Some(TransactPut {
            table_name: TABLE.into(),
            item,
            condition_expression: Some("attribute_not_exists(pk)".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Commit number `i`: a ledger entry, the order under its user and by id, a request record
/// (and, for the journal, its feed record).
fn commit(i: u64, journal: bool) -> TransactWriteItemsRequest {
    let user = format!("USER#u{:05}", i % 1000);
    let order = format!("{:016x}{i:016x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let at = 1_780_000_000_000u64 + i;
    let entry = |pk: String, sk: String| {
        HashMap::from([
            ("pk".to_owned(), s(pk)),
            ("sk".to_owned(), s(sk)),
            ("kind".to_owned(), s("BUY")),
            ("cash_delta".to_owned(), n("-123.45")),
            ("cash_after".to_owned(), n("98765.43")),
            ("created_at_ms".to_owned(), n(at)),
        ])
    };
    let mut items = vec![
        put(entry(user.clone(), format!("LEDGER@{i:020}"))),
        put(entry(user.clone(), format!("ORDER#{order}"))),
        put(entry(format!("ORDER#{order}"), "ORDER".to_owned())),
        put(entry(user.clone(), format!("REQUEST#req-{i}"))),
    ];
    if journal {
        items.push(put(entry(
            format!("FEED#{:02}", i % 8),
            format!("{at:015}#{user}#{i:020}"),
        )));
    }
    TransactWriteItemsRequest {
        transact_items: items,
        ..Default::default()
    }
}

fn open(path: &std::path::Path, variant: Variant) -> Result<Database, String> {
    let database = Database::new(&path.display().to_string()).map_err(|error| error.to_string())?;
    let mut table = serde_json::json!({
        "TableName": TABLE,
        "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
        "BillingMode": "PAY_PER_REQUEST",
    });
    if let Variant::Stream = variant {
        table["StreamSpecification"] = serde_json::json!({"StreamEnabled": true, "StreamViewType": "NEW_IMAGE"});
    }
    let request: CreateTableRequest = serde_json::from_value(table).map_err(|error| error.to_string())?;
    database.create_table(request).map_err(|error| error.to_string())?;
    Ok(database)
}

/// Median and 99th percentile, in milliseconds.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort_unstable();
    let at = |quantile: f64| samples[((samples.len() - 1) as f64 * quantile).round() as usize].as_secs_f64() * 1000.0;
    (at(0.5), at(0.99))
}

/// Runs every variant to each of `sizes` commits already written, timing `samples` commits at
/// each, and prints one line per variant and size.
pub fn run(sizes: &[u64], samples: u64) -> Result<(), String> {
    println!("commit = one TransactWriteItems on a dynoxide file; ms per commit, {samples} timed at each size");
    println!(
        "{:<36} {:>16} {:>9} {:>9}",
        "variant", "commits before", "p50 ms", "p99 ms"
    );
    for variant in [Variant::Plain, Variant::Journal, Variant::Stream] {
        let directory = tempfile::tempdir().map_err(|error| error.to_string())?;
        let database = open(&directory.path().join("streams-cost.db"), variant)?;
        let journal = matches!(variant, Variant::Journal);
        let mut written = 0;
        for &size in sizes {
            let filling = Instant::now();
            while written < size {
                database
                    .transact_write_items(commit(written, journal))
                    .map_err(|error| error.to_string())?;
                written += 1;
            }
            let filled_in = filling.elapsed();
            let mut timed = Vec::with_capacity(samples as usize);
            for _ in 0..samples {
                let started = Instant::now();
                database
                    .transact_write_items(commit(written, journal))
                    .map_err(|error| error.to_string())?;
                timed.push(started.elapsed());
                written += 1;
            }
            let (p50, p99) = percentiles(timed);
            println!(
                "{:<36} {:>16} {p50:>9.2} {p99:>9.2}   (filled in {:.1} s)",
                variant.name(),
                size,
                filled_in.as_secs_f64()
            );
        }
    }
    Ok(())
}
