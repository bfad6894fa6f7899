//! `/healthz` (alive) and `/readyz` (ready), decided from what the stages
//! stamp and count.
//!
//! Alive: each of the settle stage, the workers and the publisher stamps
//! [`stamp`] on every turn of its loop, idle turns included (the settle
//! stage turns at least every 250 ms, an idle worker every second, the
//! publisher at least every few seconds; a reconnect or a backoff may hold
//! the publisher up to about 45 s). A stamp older than [`LIVENESS_BOUND`]
//! means that stage is wedged, and `/healthz` fails naming it. The workers
//! share one stamp: a worker busy hashing a huge file for minutes is not
//! wedged, so only all workers stuck at once counts. A process that stops
//! altogether does not answer at all, which fails any probe.
//!
//! Ready: catch-up is complete (the start-up scan is done and everything it
//! found handled), and the configured broker and database are connected.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::Sources;

/// How old a stage's last loop turn may be before `/healthz` fails.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(60);

/// Milliseconds on a monotonic clock that starts at the first call (never 0
/// once running: a stamp of 0 means "not started yet").
pub fn stamp() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Stages whose stamp is older than `bound` at `now` (stamps of 0, not
/// started yet, are not stale), as "settle (last progress 72 s ago)".
pub fn stale_stages(now: u64, stamps: &[(&str, u64)], bound: Duration) -> Vec<String> {
    let bound = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
    stamps
        .iter()
        .filter(|(_, stamp)| *stamp != 0 && now.saturating_sub(*stamp) > bound)
        .map(|(stage, stamp)| format!("{stage} (last progress {} s ago)", (now - stamp) / 1000))
        .collect()
}

/// `Ok(why)` when alive, `Err(why not)` otherwise: one line either way.
pub fn liveness(sources: &Sources) -> Result<String, String> {
    let stamps = [
        ("settle", sources.watch.settle_alive.load(Ordering::Relaxed)),
        ("workers", sources.worker.alive.load(Ordering::Relaxed)),
        ("publisher", sources.publish.alive.load(Ordering::Relaxed)),
    ];
    let stale = stale_stages(stamp(), &stamps, LIVENESS_BOUND);
    if stale.is_empty() {
        Ok("alive: settle, workers and publisher are making progress".into())
    } else {
        Err(format!("not alive: no progress from {}", stale.join(", ")))
    }
}

/// `Ok(why)` when ready, `Err(every reason it is not)`: one line either way.
pub fn readiness(sources: &Sources) -> Result<String, String> {
    let mut problems = Vec::new();
    if !sources.watch.caught_up.load(Ordering::Relaxed) {
        problems.push("catch-up is not complete");
    }
    if sources.broker && !sources.publish.sink_connected.load(Ordering::Relaxed) {
        problems.push("not connected to RabbitMQ");
    }
    if sources.database && !(sources.deferred.is_set() && sources.health.is_up()) {
        problems.push("not connected to the database");
    }
    if problems.is_empty() {
        Ok("ready: caught up, broker and database connected (where configured)".into())
    } else {
        Err(format!("not ready: {}", problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_stamps_are_stale() {
        let bound = Duration::from_secs(60);
        let now = 100_000;
        let stamps = [("settle", 99_000), ("workers", 0), ("publisher", 30_000)];
        assert_eq!(
            stale_stages(now, &stamps, bound),
            ["publisher (last progress 70 s ago)"]
        );
        assert!(stale_stages(now, &[("settle", 40_000)], bound).is_empty());
    }

    #[test]
    fn stamps_are_never_zero_and_never_go_back() {
        let first = stamp();
        assert!(first >= 1);
        assert!(stamp() >= first);
    }
}
