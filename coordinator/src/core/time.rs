//! Time as the coordinator sees it: milliseconds since the Unix epoch from an injectable clock,
//! so lease tests advance time instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = u64;

pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Millis;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as Millis)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to; shared between a test and the coordinator it drives.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn starting_at(now: Millis) -> Self {
        Self(Arc::new(AtomicU64::new(now)))
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// A UTC calendar day: the key of the daily limits. Days compare as dates, never as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcDay(time::Date);

impl UtcDay {
    /// The day of the instant `at`.
    pub fn of(at: Millis) -> Self {
        Self(utc(at).date())
    }

    /// Noon UTC of this day: an instant on it (tests decide at it).
    pub fn noon(self) -> Millis {
        let noon = self.0.with_hms(12, 0, 0).expect("noon exists").assume_utc();
        (noon.unix_timestamp() * 1000) as Millis
    }

    /// The day after this one.
    pub fn next(self) -> Self {
        Self(self.0.next_day().unwrap_or(self.0))
    }

    /// Rebuilds a day stored as `YYYY-MM-DD`; None for anything else.
    pub fn from_stored(raw: &str) -> Option<Self> {
        let mut parts = raw.splitn(3, '-');
        let year = parts.next()?.parse().ok()?;
        let month: u8 = parts.next()?.parse().ok()?;
        let day = parts.next()?.parse().ok()?;
        let date = time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
        let day = Self(date);
        // Only the canonical spelling: "2026-1-5" would not compare with stored days.
        (day.to_string() == raw).then_some(day)
    }
}

impl std::fmt::Display for UtcDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let date = self.0;
        write!(f, "{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
    }
}

fn utc(at: Millis) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .expect("a u64 of milliseconds is within time's range")
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-26T19:02:27.123Z`.
pub fn rfc3339(at: Millis) -> String {
    let instant = utc(at);
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        UtcDay::of(at),
        instant.hour(),
        instant.minute(),
        instant.second(),
        instant.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(UtcDay::of(0).to_string(), "1970-01-01");
        assert_eq!(rfc3339(1_795_719_747_123), "2026-11-26T19:02:27.123Z");
        assert_eq!(UtcDay::of(951_782_400_000).to_string(), "2000-02-29");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }

    /// Days order as dates and parse only in their canonical spelling.
    #[test]
    fn days_compare_as_dates() {
        let day = UtcDay::from_stored("2026-11-27").unwrap();
        assert_eq!(day, UtcDay::of(1_795_784_400_000));
        assert!(UtcDay::from_stored("2026-12-01").unwrap() > day);
        assert!(UtcDay::from_stored("2027-01-01").unwrap() > UtcDay::from_stored("2026-12-31").unwrap());
        for bad in [
            "",
            "2026-11-7",
            "2026-13-01",
            "2026-02-30",
            "20261127",
            "2026-11-27x",
            "-5",
        ] {
            assert_eq!(UtcDay::from_stored(bad), None, "{bad:?}");
        }
    }
}
