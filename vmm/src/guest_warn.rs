//! Warnings a guest can trigger, rate-limited per call site.
//!
//! A malformed descriptor chain or a bad vsock packet costs the guest nothing to send, and
//! each used to write one line to the VMM's log: a guest looping on them filled the host's
//! `/run`. [`guest_warn!`] logs at most [`PER_SECOND`] lines per second from each call site
//! and, when that site logs again, one line saying how many it dropped meanwhile; what no
//! later line reported is counted in one line when the VMM exits ([`report_unreported`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may log per second.
pub const PER_SECOND: u32 = 5;

const WINDOW: Duration = Duration::from_secs(1);

/// Lines dropped at every call site and not yet reported by a later line of their site: a
/// site that goes quiet after a flood would otherwise never say what it dropped.
static UNREPORTED: AtomicU64 = AtomicU64::new(0);

/// Log how many guest-triggered warnings were dropped and never reported since, if any (the
/// VMM does at exit). Returns that number.
pub fn report_unreported() -> u64 {
    let n = UNREPORTED.swap(0, Ordering::Relaxed);
    if n > 0 {
        tracing::warn!(
            "{n} guest-triggered warnings were dropped (rate limit) and not reported before"
        );
    }
    n
}

/// The budget of one call site.
pub struct RateLimit {
    state: Mutex<State>,
}

struct State {
    window_start: Option<Instant>,
    in_window: u32,
    dropped: u64,
}

impl RateLimit {
    /// A full budget.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                window_start: None,
                in_window: 0,
                dropped: 0,
            }),
        }
    }

    /// Whether a line may be logged at `now`: `Some(n)` with the number of lines dropped
    /// since the last one logged, or `None` when this one is dropped (and counted).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means a panic elsewhere while counting: the counts still do.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match s.window_start {
            Some(start) => now.saturating_duration_since(start) >= WINDOW,
            None => true,
        };
        if fresh {
            s.window_start = Some(now);
            s.in_window = 0;
        }
        if s.in_window >= PER_SECOND {
            s.dropped = s.dropped.saturating_add(1);
            UNREPORTED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        s.in_window += 1;
        let dropped = std::mem::take(&mut s.dropped);
        // Reported by this line now. (Saturating: a report at exit may have taken them.)
        let _ = UNREPORTED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
            Some(u.saturating_sub(dropped))
        });
        Some(dropped)
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for a warning the guest can cause, limited per call site (see the
/// module's documentation).
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::guest_warn::RateLimit = $crate::guest_warn::RateLimit::new();
        if let Some(dropped) = LIMIT.admit(::std::time::Instant::now()) {
            if dropped > 0 {
                ::tracing::warn!("{dropped} similar warnings dropped");
            }
            ::tracing::warn!($($arg)+);
        }
    }};
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_budget_and_the_dropped_are_counted() {
        let limit = RateLimit::new();
        let t0 = Instant::now();
        let admitted: Vec<Option<u64>> = (0..1000).map(|_| limit.admit(t0)).collect();
        assert_eq!(
            admitted.iter().filter(|a| a.is_some()).count(),
            PER_SECOND as usize
        );
        assert!(admitted[..PER_SECOND as usize]
            .iter()
            .all(|a| *a == Some(0)));
        // The next window logs again and first reports what the last one dropped.
        let later = t0 + WINDOW;
        assert_eq!(limit.admit(later), Some(1000 - u64::from(PER_SECOND)));
        assert_eq!(limit.admit(later), Some(0));
    }

    #[test]
    fn call_sites_have_budgets_of_their_own() {
        let (a, b) = (RateLimit::new(), RateLimit::new());
        let t0 = Instant::now();
        for _ in 0..PER_SECOND {
            assert!(a.admit(t0).is_some());
        }
        assert!(a.admit(t0).is_none());
        assert_eq!(b.admit(t0), Some(0));
    }

    #[test]
    fn drops_a_site_never_reported_are_reported_at_the_end() {
        let limit = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..100 {
            limit.admit(t0);
        }
        // Other tests' sites count too: at least this one's 95 are there, and once reported
        // they are gone.
        assert!(report_unreported() >= 100 - u64::from(PER_SECOND));
        // Drops the site's own next line reports are not counted for the end any more.
        let other = RateLimit::new();
        for _ in 0..PER_SECOND + 10 {
            other.admit(t0);
        }
        assert_eq!(other.admit(t0 + WINDOW), Some(10));
        assert_eq!(limit.admit(t0 + WINDOW), Some(100 - u64::from(PER_SECOND)));
    }

    #[test]
    fn the_macro_logs_from_a_loop_without_panicking() {
        for i in 0..100 {
            guest_warn!("malformed chain {i}");
        }
    }
}
