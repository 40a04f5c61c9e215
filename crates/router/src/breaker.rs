//! Per-tier circuit breaker: closed → open after N consecutive failures → half-open after a
//! cool-down → closed on one success (or open again on one failure).
//!
//! The classic three-state breaker (as in Hystrix / resilience4j), counting consecutive failures
//! rather than a failure rate: upstream tiers see few requests per second, where a rate window
//! is noisy. Time is passed in as Unix milliseconds so tests drive it with a manual clock.

use serde::{Deserialize, Serialize};

/// How a breaker is tuned (per tier in the policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker rejects calls before it lets one trial through.
    pub cooldown_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        // Five straight failures is past what retries with backoff absorb inside one request,
        // and 30 s is long enough for a provider's brief outage to clear without hammering it.
        BreakerConfig {
            failure_threshold: 5,
            cooldown_ms: 30_000,
        }
    }
}

/// The observable phase of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerPhase {
    /// Calls flow.
    Closed,
    /// Calls are rejected until the cool-down ends.
    Open,
    /// The cool-down ended: one trial call decides whether to close or reopen.
    HalfOpen,
}

/// One tier's breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    consecutive_failures: u32,
    opened_at_ms: Option<u64>,
    trial_in_flight: bool,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            config,
            consecutive_failures: 0,
            opened_at_ms: None,
            trial_in_flight: false,
        }
    }

    /// The configuration this breaker runs with.
    pub fn config(&self) -> BreakerConfig {
        self.config
    }

    /// Replaces the tuning (a reloaded policy); the current phase is kept.
    pub fn set_config(&mut self, config: BreakerConfig) {
        self.config = config;
    }

    /// The phase at `now_ms`, without changing anything (for explaining a decision).
    pub fn phase(&self, now_ms: u64) -> BreakerPhase {
        match self.opened_at_ms {
            None => BreakerPhase::Closed,
            Some(at) if now_ms.saturating_sub(at) >= self.config.cooldown_ms => {
                BreakerPhase::HalfOpen
            }
            Some(_) => BreakerPhase::Open,
        }
    }

    /// Whether a call may go out now; in half-open only one trial is admitted at a time.
    pub fn try_acquire(&mut self, now_ms: u64) -> bool {
        match self.phase(now_ms) {
            BreakerPhase::Closed => true,
            BreakerPhase::Open => false,
            BreakerPhase::HalfOpen => {
                if self.trial_in_flight {
                    false
                } else {
                    self.trial_in_flight = true;
                    true
                }
            }
        }
    }

    /// A call succeeded: the breaker closes.
    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.opened_at_ms = None;
        self.trial_in_flight = false;
    }

    /// A call failed at `now_ms`: a failed trial reopens at once; otherwise the breaker opens
    /// when the consecutive failures reach the threshold.
    pub fn on_failure(&mut self, now_ms: u64) {
        let was_trial = self.trial_in_flight || self.phase(now_ms) == BreakerPhase::HalfOpen;
        self.trial_in_flight = false;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if was_trial || self.consecutive_failures >= self.config.failure_threshold.max(1) {
            self.opened_at_ms = Some(now_ms);
        }
    }

    /// Consecutive failures seen since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            failure_threshold: 3,
            cooldown_ms: 1_000,
        })
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let mut b = breaker();
        b.on_failure(0);
        b.on_failure(1);
        assert_eq!(b.phase(2), BreakerPhase::Closed);
        b.on_success();
        b.on_failure(3);
        b.on_failure(4);
        assert_eq!(b.phase(5), BreakerPhase::Closed, "success resets the count");
        b.on_failure(5);
        assert_eq!(b.phase(6), BreakerPhase::Open);
        assert!(!b.try_acquire(6));
    }

    #[test]
    fn half_open_admits_one_trial_then_closes_on_success() {
        let mut b = breaker();
        for t in 0..3 {
            b.on_failure(t);
        }
        assert_eq!(b.phase(1_001), BreakerPhase::Open);
        assert_eq!(b.phase(1_002), BreakerPhase::HalfOpen);
        assert!(b.try_acquire(1_002));
        assert!(!b.try_acquire(1_003), "only one trial at a time");
        b.on_success();
        assert_eq!(b.phase(1_004), BreakerPhase::Closed);
        assert!(b.try_acquire(1_004));
    }

    #[test]
    fn failed_trial_reopens_for_a_full_cooldown() {
        let mut b = breaker();
        for t in 0..3 {
            b.on_failure(t);
        }
        assert!(b.try_acquire(2_000));
        b.on_failure(2_000);
        assert_eq!(b.phase(2_500), BreakerPhase::Open);
        assert_eq!(b.phase(3_000), BreakerPhase::HalfOpen);
    }
}
