//! Mutable router state that a decision reads: spend, circuit breakers, local queue depth, the
//! clock and where API keys come from.
//!
//! One [`RouterState`] is shared (behind an `Arc`) by every request handler; each piece has its
//! own lock or atomic so a decision never waits on an unrelated update. Decisions only read it;
//! the server and the upstream client write to it as requests finish.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::breaker::{BreakerConfig, BreakerPhase, CircuitBreaker};
use crate::budget::{BudgetLedger, Period};

/// A source of wall-clock time in Unix milliseconds (injectable for tests).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start_ms)))
    }
    /// Moves the clock forward.
    pub fn advance_ms(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    /// Sets the clock.
    pub fn set_ms(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where a tier's `api_key_env` is looked up. Its Debug output lists variable names only.
#[derive(Clone, Default)]
pub enum EnvSource {
    /// The process environment.
    #[default]
    Process,
    /// A fixed map (tests, or keys injected from a secret store).
    Fixed(BTreeMap<String, String>),
}

impl std::fmt::Debug for EnvSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvSource::Process => f.write_str("Process"),
            EnvSource::Fixed(map) => f
                .debug_map()
                .entries(map.keys().map(|k| (k, crate::secret::REDACTED)))
                .finish(),
        }
    }
}

impl EnvSource {
    /// The value of `var`, if set.
    pub fn get(&self, var: &str) -> Option<String> {
        match self {
            EnvSource::Process => std::env::var(var).ok(),
            EnvSource::Fixed(map) => map.get(var).cloned(),
        }
    }
}

/// The API key id used for requests that carry none.
pub const ANONYMOUS_KEY: &str = "anonymous";

/// Shared, mutable router state.
#[derive(Debug)]
pub struct RouterState {
    clock: Arc<dyn Clock>,
    env: EnvSource,
    ledger: Mutex<BudgetLedger>,
    breakers: Mutex<BTreeMap<String, CircuitBreaker>>,
    local_queue_depth: AtomicUsize,
}

impl Default for RouterState {
    fn default() -> Self {
        RouterState::new(Arc::new(SystemClock), EnvSource::Process)
    }
}

// A poisoned lock only means another handler panicked mid-update; the data (sums, counters) is
// still usable, and refusing every later request would turn one bug into an outage.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RouterState {
    /// State with the given clock and key source.
    pub fn new(clock: Arc<dyn Clock>, env: EnvSource) -> Self {
        RouterState {
            clock,
            env,
            ledger: Mutex::new(BudgetLedger::new()),
            breakers: Mutex::new(BTreeMap::new()),
            local_queue_depth: AtomicUsize::new(0),
        }
    }

    /// Now, from the state's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Where API keys are read from.
    pub fn env(&self) -> &EnvSource {
        &self.env
    }

    /// Records money spent on a tier by an API key id (`None` → [`ANONYMOUS_KEY`]).
    pub fn record_spend(&self, tier: &str, api_key: Option<&str>, usd: f64) {
        let now = self.now_ms();
        lock(&self.ledger).record(tier, api_key.unwrap_or(ANONYMOUS_KEY), usd, now);
    }

    /// USD spent in `period`; `None` filters match everything.
    pub fn spent(&self, tier: Option<&str>, api_key: Option<&str>, period: Period) -> f64 {
        let now = self.now_ms();
        lock(&self.ledger).spent(tier, api_key, period, now)
    }

    /// The phase of `tier`'s breaker now (closed when the tier has never failed).
    pub fn breaker_phase(&self, tier: &str) -> BreakerPhase {
        let now = self.now_ms();
        lock(&self.breakers)
            .get(tier)
            .map_or(BreakerPhase::Closed, |b| b.phase(now))
    }

    /// Asks `tier`'s breaker to admit a call now (half-open admits one trial).
    pub fn breaker_try_acquire(&self, tier: &str, config: BreakerConfig) -> bool {
        let now = self.now_ms();
        let mut map = lock(&self.breakers);
        let b = map
            .entry(tier.to_string())
            .or_insert_with(|| CircuitBreaker::new(config));
        b.set_config(config);
        b.try_acquire(now)
    }

    /// Reports a successful call to `tier`.
    pub fn record_success(&self, tier: &str) {
        if let Some(b) = lock(&self.breakers).get_mut(tier) {
            b.on_success();
        }
    }

    /// Reports a failed call to `tier` (after its retries).
    pub fn record_failure(&self, tier: &str, config: BreakerConfig) {
        let now = self.now_ms();
        let mut map = lock(&self.breakers);
        let b = map
            .entry(tier.to_string())
            .or_insert_with(|| CircuitBreaker::new(config));
        b.set_config(config);
        b.on_failure(now);
    }

    /// Requests waiting in the local engine's queue (set by the engine or server).
    pub fn local_queue_depth(&self) -> usize {
        self.local_queue_depth.load(Ordering::Relaxed)
    }

    /// Updates the local queue depth.
    pub fn set_local_queue_depth(&self, depth: usize) {
        self.local_queue_depth.store(depth, Ordering::Relaxed);
    }
}
