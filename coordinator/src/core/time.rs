//! Time as the coordinator sees it: milliseconds since the Unix epoch from an injectable clock,
//! so lease tests advance time instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = u64;

const MILLIS_PER_DAY: u64 = 86_400_000;

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

/// The UTC calendar day of `at` as `YYYY-MM-DD`: the key of the daily limits.
pub fn utc_day(at: Millis) -> String {
    let (year, month, day) = civil_from_days((at / MILLIS_PER_DAY) as i64);
    format!("{year:04}-{month:02}-{day:02}")
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-26T19:02:27.123Z`.
pub fn rfc3339(at: Millis) -> String {
    let millis_of_day = at % MILLIS_PER_DAY;
    let seconds = millis_of_day / 1000;
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        utc_day(at),
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        millis_of_day % 1000
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(rfc3339(1_795_719_747_123), "2026-11-26T19:02:27.123Z");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
    }
}
