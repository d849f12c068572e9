//! Upstream health: which upstreams to try, in which order.
//!
//! An upstream that fails to connect, times out, breaks a response or answers
//! 5xx is backed off exponentially (1 s doubling to 5 min, with jitter so a fleet
//! of relays does not retry in step); one that sent bytes that failed
//! verification is *suspect* for 10 minutes. Unavailable upstreams are skipped
//! while any other remains, and tried last (soonest retry first) when none
//! does: a relay should keep trying rather than give up.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const SUSPECT_FOR: Duration = Duration::from_secs(600);

#[derive(Default)]
struct State {
    consecutive_failures: u32,
    retry_at: Option<Instant>,
    suspect_until: Option<Instant>,
    last_error: Option<String>,
    last_ok: Option<SystemTime>,
    integrity_failures: u64,
    /// Time to response headers, smoothed (seconds).
    latency: Option<f64>,
}

#[derive(Default)]
pub struct Health(Mutex<State>);

/// A point-in-time view for `/admin/status`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    pub available: bool,
    pub consecutive_failures: u32,
    pub retry_in_seconds: Option<f64>,
    pub suspect: bool,
    pub integrity_failures: u64,
    pub last_error: Option<String>,
    pub last_ok: Option<String>,
    /// Time to response headers, smoothed over the last few requests.
    pub latency_ms: Option<f64>,
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    // +0..25%
    d + d.mul_f64(f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 4.0)
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn available(&self, now: Instant) -> bool {
        let s = self.lock();
        s.retry_at.is_none_or(|t| now >= t) && s.suspect_until.is_none_or(|t| now >= t)
    }

    /// When it may be tried again (now if available).
    pub fn next_try(&self, now: Instant) -> Instant {
        let s = self.lock();
        s.retry_at.into_iter().chain(s.suspect_until).max().unwrap_or(now).max(now)
    }

    pub fn record_ok(&self) {
        let mut s = self.lock();
        s.consecutive_failures = 0;
        s.retry_at = None;
        s.last_ok = Some(SystemTime::now());
    }

    /// A response's headers came after `seconds`.
    pub fn record_latency(&self, seconds: f64) {
        let mut s = self.lock();
        s.latency = Some(match s.latency {
            Some(l) => l * 0.8 + seconds * 0.2,
            None => seconds,
        });
    }

    pub fn record_failure(&self, why: &str) {
        let mut s = self.lock();
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        let exp = BACKOFF_START.saturating_mul(1u32 << (s.consecutive_failures - 1).min(16));
        s.retry_at = Some(Instant::now() + jitter(exp.min(BACKOFF_MAX)));
        s.last_error = Some(why.to_string());
    }

    pub fn record_integrity_failure(&self, why: &str) {
        let mut s = self.lock();
        s.integrity_failures += 1;
        s.suspect_until = Some(Instant::now() + SUSPECT_FOR);
        s.last_error = Some(why.to_string());
    }

    pub fn report(&self) -> HealthReport {
        let now = Instant::now();
        let available = self.available(now);
        let s = self.lock();
        let retry = s.retry_at.into_iter().chain(s.suspect_until).max().filter(|t| *t > now);
        HealthReport {
            available,
            consecutive_failures: s.consecutive_failures,
            retry_in_seconds: retry.map(|t| (t - now).as_secs_f64()),
            suspect: s.suspect_until.is_some_and(|t| t > now),
            integrity_failures: s.integrity_failures,
            last_error: s.last_error.clone(),
            last_ok: s.last_ok.map(crate::repo::manifest::format_time),
            latency_ms: s.latency.map(|l| (l * 1e5).round() / 100.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_and_recovery() {
        let h = Health::default();
        let now = Instant::now();
        assert!(h.available(now));
        h.record_failure("refused");
        assert!(!h.available(Instant::now()));
        assert!(h.available(Instant::now() + Duration::from_secs(2)));
        h.record_failure("refused");
        assert!(!h.available(Instant::now() + Duration::from_millis(1500)));
        h.record_ok();
        assert!(h.available(Instant::now()));
        h.record_integrity_failure("chunk 3 mismatch");
        assert!(!h.available(Instant::now() + Duration::from_secs(300)));
        assert!(h.report().suspect);
    }
}
