//! The coordinator's storage request counter, read from its Prometheus text endpoint.
//!
//! Only one figure is needed (`lockstep_storage_requests_total`, summed over its labels), so a
//! minimal parser of the text exposition format does it: sample lines are
//! `name{label="value",...} value [timestamp]`, label values may hold escaped quotes, spaces and
//! braces, and `#` lines are comments.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The counter the coordinator keeps of its requests to storage.
pub const STORAGE_REQUESTS_COUNTER: &str = "lockstep_storage_requests_total";

/// A scrape that takes longer is an error, not a stall of the report.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// A scrape's body larger than this is refused: the endpoint serves a handful of series.
const SCRAPE_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot scrape the metrics endpoint: {0}")]
    Http(String),
    #[error("metrics line {line}: {reason}")]
    Parse { line: usize, reason: &'static str },
    #[error("the endpoint has no {STORAGE_REQUESTS_COUNTER}")]
    Missing,
}

/// The sum over all label sets of the samples named `name`; `None` when there is none.
pub fn sum_samples(text: &str, name: &str) -> Result<Option<f64>, MetricsError> {
    let mut sum: Option<f64> = None;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parse_error = |reason| MetricsError::Parse {
            line: index + 1,
            reason,
        };
        let name_end = line
            .find(|character: char| character == '{' || character.is_ascii_whitespace())
            .ok_or(parse_error("a sample without a value"))?;
        if &line[..name_end] != name {
            continue;
        }
        let rest = &line[name_end..];
        let after_labels = if rest.starts_with('{') {
            skip_labels(rest).ok_or(parse_error("unterminated label set"))?
        } else {
            rest
        };
        let value = after_labels
            .split_ascii_whitespace()
            .next()
            .ok_or(parse_error("a sample without a value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().map_err(|_| parse_error("a value that is not a number"))?,
        };
        *sum.get_or_insert(0.0) += value;
    }
    Ok(sum)
}

/// What follows the label set `{...}` at the start of `text`, honouring quoted values with `\"`
/// and `\\` escapes.
fn skip_labels(text: &str) -> Option<&str> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (position, character) in text.char_indices().skip(1) {
        if escaped {
            escaped = false;
        } else if in_quotes {
            match character {
                '\\' => escaped = true,
                '"' => in_quotes = false,
                _ => {}
            }
        } else {
            match character {
                '"' => in_quotes = true,
                '}' => return Some(&text[position + 1..]),
                _ => {}
            }
        }
    }
    None
}

/// Scrapes `url` and returns the coordinator's storage request count.
pub async fn storage_requests(url: &str) -> Result<f64, MetricsError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|error| MetricsError::Http(format!("{url}: {error}")))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let fetch = async {
        let response = client
            .get(uri)
            .await
            .map_err(|error| MetricsError::Http(format!("{url}: {error}")))?;
        if !response.status().is_success() {
            return Err(MetricsError::Http(format!("{url}: HTTP {}", response.status())));
        }
        let body = http_body_util::Limited::new(response.into_body(), SCRAPE_BODY_BYTES_MAX)
            .collect()
            .await
            .map_err(|error| MetricsError::Http(format!("{url}: {error}")))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| MetricsError::Http(format!("{url}: body is not UTF-8")))
    };
    let text = tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .map_err(|_| MetricsError::Http(format!("{url}: no reply within {SCRAPE_TIMEOUT:?}")))??;
    sum_samples(&text, STORAGE_REQUESTS_COUNTER)?.ok_or(MetricsError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples of the counter are summed over their labels; other series, comments, a
    /// `_created` companion and timestamps are ignored.
    #[test]
    fn sums_over_labels() {
        let text = "\
# HELP lockstep_storage_requests_total Requests sent to storage.
# TYPE lockstep_storage_requests_total counter
lockstep_storage_requests_total{operation=\"get\"} 12
lockstep_storage_requests_total{operation=\"transact_write\",outcome=\"ok\"} 30 1700000000000
lockstep_storage_requests_total_created{operation=\"get\"} 1.7e9
lockstep_rpcs_total{method=\"Deposit\"} 99
";
        assert_eq!(sum_samples(text, STORAGE_REQUESTS_COUNTER).unwrap(), Some(42.0));
    }

    /// A sample without labels, and a float in exponent notation.
    #[test]
    fn reads_an_unlabelled_sample() {
        assert_eq!(
            sum_samples("lockstep_storage_requests_total 1.5e3\n", STORAGE_REQUESTS_COUNTER).unwrap(),
            Some(1500.0)
        );
    }

    /// Label values may hold spaces, braces and escaped quotes.
    #[test]
    fn label_values_are_opaque() {
        let text = "lockstep_storage_requests_total{error=\"a } b \\\" c\",x=\"\\\\\"} 7\n";
        assert_eq!(sum_samples(text, STORAGE_REQUESTS_COUNTER).unwrap(), Some(7.0));
    }

    /// No sample of the counter is `None`, not zero: the endpoint may not be the coordinator's.
    #[test]
    fn missing_counter_is_none() {
        assert_eq!(sum_samples("other_total 3\n", STORAGE_REQUESTS_COUNTER).unwrap(), None);
    }

    /// Malformed samples of the counter are errors with the line number.
    #[test]
    fn malformed_lines_are_errors() {
        let unterminated = sum_samples(
            "\nlockstep_storage_requests_total{a=\"b\" 3\n",
            STORAGE_REQUESTS_COUNTER,
        );
        assert!(matches!(unterminated, Err(MetricsError::Parse { line: 2, .. })));
        let not_a_number = sum_samples("lockstep_storage_requests_total abc\n", STORAGE_REQUESTS_COUNTER);
        assert!(matches!(not_a_number, Err(MetricsError::Parse { line: 1, .. })));
    }
}
