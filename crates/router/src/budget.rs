//! The spend ledger behind budgets: USD spent per (tier, API key) in the current UTC day and
//! month.
//!
//! Only the current day and month are kept per pair, so memory stays bounded by the number of
//! tiers × keys; a bucket from an earlier day reads as zero and is replaced on the next write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

const MS_PER_DAY: u64 = 86_400_000;

/// A budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// The current UTC calendar day.
    Daily,
    /// The current UTC calendar month.
    Monthly,
}

/// A civil (proleptic Gregorian, UTC) date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CivilDate {
    /// Year, e.g. 2026.
    pub year: i64,
    /// Month 1..=12.
    pub month: u32,
    /// Day 1..=31.
    pub day: u32,
}

/// Converts days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> CivilDate {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    CivilDate { year, month, day }
}

/// Formats Unix milliseconds as RFC 3339 UTC (`2026-05-01T12:34:56.789Z`).
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let days = (unix_ms / MS_PER_DAY) as i64;
    let d = civil_from_days(days);
    let ms_of_day = unix_ms % MS_PER_DAY;
    let (h, m, s, ms) = (
        ms_of_day / 3_600_000,
        (ms_of_day / 60_000) % 60,
        (ms_of_day / 1_000) % 60,
        ms_of_day % 1_000,
    );
    format!(
        "{:04}-{:02}-{:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z",
        d.year, d.month, d.day
    )
}

fn day_index(unix_ms: u64) -> u64 {
    unix_ms / MS_PER_DAY
}

fn month_index(unix_ms: u64) -> i64 {
    let d = civil_from_days(day_index(unix_ms) as i64);
    d.year * 12 + i64::from(d.month) - 1
}

#[derive(Debug, Clone, Default)]
struct Buckets {
    day: u64,
    day_usd: f64,
    month: i64,
    month_usd: f64,
}

/// USD spent per (tier, API key id) in the current day and month.
#[derive(Debug, Clone, Default)]
pub struct BudgetLedger {
    spend: BTreeMap<(String, String), Buckets>,
}

impl BudgetLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `usd` spent on `tier` by `api_key` at `now_ms`. Negative or non-finite amounts are
    /// ignored (a bad usage block must not refund a budget).
    pub fn record(&mut self, tier: &str, api_key: &str, usd: f64, now_ms: u64) {
        if !usd.is_finite() || usd <= 0.0 {
            return;
        }
        let (day, month) = (day_index(now_ms), month_index(now_ms));
        let b = self
            .spend
            .entry((tier.to_string(), api_key.to_string()))
            .or_default();
        if b.day != day {
            b.day = day;
            b.day_usd = 0.0;
        }
        if b.month != month {
            b.month = month;
            b.month_usd = 0.0;
        }
        b.day_usd += usd;
        b.month_usd += usd;
    }

    /// USD spent in `period` at `now_ms`, summed over the pairs whose tier matches `tier` and
    /// whose key matches `api_key` (`None` matches every tier / every key).
    pub fn spent(
        &self,
        tier: Option<&str>,
        api_key: Option<&str>,
        period: Period,
        now_ms: u64,
    ) -> f64 {
        let (day, month) = (day_index(now_ms), month_index(now_ms));
        self.spend
            .iter()
            .filter(|((t, k), _)| tier.is_none_or(|w| w == t) && api_key.is_none_or(|w| w == k))
            .map(|(_, b)| match period {
                Period::Daily if b.day == day => b.day_usd,
                Period::Monthly if b.month == month => b.month_usd,
                _ => 0.0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-01-31T23:00:00Z
    const JAN31_23H: u64 = 1_769_900_400_000;

    #[test]
    fn civil_dates() {
        assert_eq!(
            civil_from_days(0),
            CivilDate {
                year: 1970,
                month: 1,
                day: 1
            }
        );
        assert_eq!(rfc3339_utc(JAN31_23H), "2026-01-31T23:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn day_and_month_roll_over() {
        let mut l = BudgetLedger::new();
        l.record("frontier", "team-a", 2.0, JAN31_23H);
        l.record("frontier", "team-b", 1.0, JAN31_23H);
        l.record("other", "team-a", 4.0, JAN31_23H);
        assert_eq!(
            l.spent(Some("frontier"), None, Period::Daily, JAN31_23H),
            3.0
        );
        assert_eq!(
            l.spent(None, Some("team-a"), Period::Monthly, JAN31_23H),
            6.0
        );
        let feb1 = JAN31_23H + 2 * 3_600_000;
        assert_eq!(l.spent(None, None, Period::Daily, feb1), 0.0);
        assert_eq!(l.spent(None, None, Period::Monthly, feb1), 0.0);
        l.record("frontier", "team-a", 0.5, feb1);
        assert_eq!(l.spent(None, None, Period::Monthly, feb1), 0.5);
        l.record("frontier", "team-a", f64::NAN, feb1);
        l.record("frontier", "team-a", -3.0, feb1);
        assert_eq!(l.spent(None, None, Period::Daily, feb1), 0.5);
    }
}
