//! `--watchers N`: WatchLedger streams open on the run's users while the load runs, and the feed
//! lag of every entry they receive: from the entry's `created_at` (the coordinator's clock when
//! it decided the call, just before its commit) to its arrival here. On one machine both clocks
//! are the same; the figure includes the commit itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use lockstep::coordinator::v1 as pb;
use lockstep::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::BenchError;
use crate::settings::WatchKind;

/// Lags above this (a minute) are clamped: the histogram's range.
const LAG_MICROSECONDS_MAX: u64 = 60_000_000;

/// What the watchers saw.
#[derive(Debug, Clone)]
pub struct FeedFigures {
    pub watchers: usize,
    /// Entries received after the streams opened (their replays excluded).
    pub entries: u64,
    /// Microseconds from each entry's created time to its arrival.
    pub lag: Histogram<u64>,
    /// Streams that ended with an error before the run's end.
    pub failed: u64,
}

/// Open streams, counting into one shared histogram until dropped.
pub struct Feed {
    figures: Arc<Mutex<FeedFigures>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Milliseconds since the epoch of an RFC 3339 UTC time as the coordinator writes it
/// (`2026-12-03T13:30:58.123Z`).
pub fn epoch_ms(text: &str) -> Option<i64> {
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    if text.len() != 24 || !text.ends_with('Z') {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second, milli) = (number(11..13)?, number(14..16)?, number(17..19)?, number(20..23)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some((((days * 24 + hour) * 60 + minute) * 60 + second) * 1000 + milli)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

/// One entry received: its lag from its created time to now.
fn record(figures: &Mutex<FeedFigures>, entry: &pb::LedgerEntry) {
    let lag_ms = epoch_ms(&entry.created_at).map_or(0, |created| (now_ms() - created).max(0));
    let mut figures = figures.lock().expect("feed figures");
    figures.entries += 1;
    figures.lag.saturating_record((lag_ms as u64 * 1000).max(1));
}

impl Feed {
    /// Opens `watchers` streams on `users` in turn (several per user when there are more
    /// watchers than users), each from the user's last entry, on `client`.
    pub async fn open(
        client: CoordinatorClient<Channel>,
        users: &[String],
        watchers: usize,
        kind: WatchKind,
    ) -> Result<Feed, BenchError> {
        let figures = Arc::new(Mutex::new(FeedFigures {
            watchers,
            entries: 0,
            lag: Histogram::new_with_bounds(1, LAG_MICROSECONDS_MAX, 3).expect("valid histogram bounds"),
            failed: 0,
        }));
        let mut tasks = Vec::with_capacity(watchers);
        if kind == WatchKind::Feed {
            for _ in 0..watchers {
                let mut stream = client
                    .clone()
                    .watch_feed(pb::WatchFeedRequest {
                        from_now: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(|status| BenchError::Setup(format!("watch the feed: {}", status.message())))?
                    .into_inner();
                let figures = Arc::clone(&figures);
                tasks.push(tokio::spawn(async move {
                    loop {
                        match stream.message().await {
                            Ok(Some(pb::FeedEvent {
                                event: Some(pb::feed_event::Event::Entry(pb::FeedEntry { entry: Some(entry), .. })),
                            })) => record(&figures, &entry),
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => {
                                figures.lock().expect("feed figures").failed += 1;
                                return;
                            }
                        }
                    }
                }));
            }
            return Ok(Feed { figures, tasks });
        }
        for index in 0..watchers {
            let user = users[index % users.len()].clone();
            let mut client = client.clone();
            let last = client
                .list_ledger(pb::ListLedgerRequest {
                    user_id: user.clone(),
                    page_size: 1,
                    ..Default::default()
                })
                .await
                .map_err(|status| BenchError::Setup(format!("the last entry of {user}: {}", status.message())))?
                .into_inner()
                .entries
                .first()
                .map_or(0, |entry| entry.sequence);
            let mut stream = client
                .watch_ledger(pb::WatchLedgerRequest {
                    user_id: user.clone(),
                    after_sequence: last,
                })
                .await
                .map_err(|status| BenchError::Setup(format!("watch {user}: {}", status.message())))?
                .into_inner();
            let figures = Arc::clone(&figures);
            tasks.push(tokio::spawn(async move {
                loop {
                    match stream.message().await {
                        Ok(Some(pb::LedgerEvent {
                            event: Some(pb::ledger_event::Event::Entry(entry)),
                        })) => record(&figures, &entry),
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => {
                            figures.lock().expect("feed figures").failed += 1;
                            return;
                        }
                    }
                }
            }));
        }
        Ok(Feed { figures, tasks })
    }

    /// Waits `settle` for entries still in flight, closes the streams and returns the figures.
    pub async fn close(self, settle: Duration) -> FeedFigures {
        tokio::time::sleep(settle).await;
        for task in &self.tasks {
            task.abort();
        }
        self.figures.lock().expect("feed figures").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_read_to_the_millisecond() {
        assert_eq!(epoch_ms("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(epoch_ms("2000-03-01T00:00:00.001Z"), Some(951_868_800_001));
        assert_eq!(epoch_ms("2026-12-03T13:30:58.123Z"), Some(1_796_304_658_123));
        assert_eq!(epoch_ms("2026-12-03T13:30:58Z"), None);
    }
}
