//! What came out of the daemons, and when: the announcements one printed on
//! stdout or the messages the run's queue received, keyed by event type and
//! path, each with the moment it was first seen. One reader thread records
//! them; the scenario waits on them.
//!
//! A later copy of a message already seen (at-least-once delivery) counts as
//! a duplicate and keeps the first arrival's time: the change reached the
//! consumer then.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::Deserialize;

use crate::Deadline;

/// A value shared between the thread that changes it and the threads that
/// wait for it to reach some state.
pub struct Watched<T> {
    state: Mutex<T>,
    /// Signalled after every change.
    changed: Condvar,
}

impl<T> Watched<T> {
    pub fn new(value: T) -> Watched<T> {
        Watched {
            state: Mutex::new(value),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, T> {
        // A reader thread that panicked left consistent data: every change is one statement.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn update<R>(&self, change: impl FnOnce(&mut T) -> R) -> R {
        let result = change(&mut self.lock());
        self.changed.notify_all();
        result
    }

    pub fn read<R>(&self, look: impl FnOnce(&T) -> R) -> R {
        look(&self.lock())
    }

    /// Waits until `done` holds or `deadline` passes; true if it holds.
    pub fn wait_until(&self, deadline: Deadline, mut done: impl FnMut(&T) -> bool) -> bool {
        let mut state = self.lock();
        loop {
            if done(&state) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline.instant() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline.instant() - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The two fields of a message the benchmark matches files by.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    file_path: Cow<'a, str>,
}

#[derive(Default)]
pub struct Arrivals {
    /// (event type, path) → when its first message arrived.
    first: HashMap<(String, String), Instant>,
    /// Distinct (event type, path) pairs per event type.
    per_event: HashMap<String, usize>,
    /// Messages that were not JSON with an `event_type` and a `file_path`.
    pub unreadable: usize,
    /// Messages for a pair already seen.
    pub duplicates: usize,
    /// Every message, repeats included, per event type.
    received: HashMap<String, usize>,
}

impl Arrivals {
    /// Records one message body that arrived at `at`.
    pub fn record(&mut self, body: &[u8], at: Instant) {
        let Ok(fields) = serde_json::from_slice::<Fields<'_>>(body) else {
            self.unreadable += 1;
            return;
        };
        *self.received.entry(fields.event_type.to_string()).or_default() += 1;
        let key = (fields.event_type.into_owned(), fields.file_path.into_owned());
        if self.first.contains_key(&key) {
            self.duplicates += 1;
            return;
        }
        *self.per_event.entry(key.0.clone()).or_default() += 1;
        self.first.insert(key, at);
    }

    /// Distinct paths that got a message of this event type.
    pub fn count(&self, event_type: &str) -> usize {
        self.per_event.get(event_type).copied().unwrap_or(0)
    }

    /// Messages of this event type, repeats for one path included.
    pub fn received(&self, event_type: &str) -> usize {
        self.received.get(event_type).copied().unwrap_or(0)
    }

    /// When the latest first arrival was.
    pub fn last_arrival(&self) -> Option<Instant> {
        self.first.values().max().copied()
    }

    /// When the first `event_type` message for `path` arrived.
    pub fn first(&self, event_type: &str, path: &str) -> Option<Instant> {
        // The map is keyed by owned pairs; building one per lookup is fine
        // after a run, which is the only time this is called in bulk.
        self.first.get(&(event_type.to_owned(), path.to_owned())).copied()
    }
}

/// Waits until every path got an `event_type` message; returns when the last
/// did. `before` is how many such messages had arrived before the action.
pub fn wait_for(
    arrivals: &Watched<Arrivals>,
    event_type: &str,
    before: usize,
    paths: &[String],
    deadline: Deadline,
) -> Result<Instant, String> {
    // The paths are looked up only once enough messages have arrived: a
    // lookup of every path per delivery would cost more than the daemon.
    let all_arrived = |arrivals: &Arrivals| {
        arrivals.count(event_type) >= before + paths.len()
            && paths
                .iter()
                .all(|path| arrivals.first(event_type, path).is_some())
    };
    if !arrivals.wait_until(deadline, all_arrived) {
        let missing = arrivals.read(|arrivals| {
            paths
                .iter()
                .filter(|path| arrivals.first(event_type, path).is_none())
                .count()
        });
        return Err(format!(
            "{missing} of {} files got no {event_type:?} message by the deadline",
            paths.len()
        ));
    }
    Ok(arrivals.read(|arrivals| {
        paths
            .iter()
            .filter_map(|path| arrivals.first(event_type, path))
            .max()
            .unwrap_or_else(Instant::now)
    }))
}
