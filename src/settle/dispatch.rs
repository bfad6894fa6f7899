//! Handing ready jobs to the workers, and taking their answers back.
//!
//! This is where the invariants between settle and the workers hold: one job
//! per path (or overlapping subtree) in flight, jobs for one path in the order
//! they became ready, `try_send` only, and a registry outage holds all
//! dispatching instead of retrying every path on its own.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::Instant;

use crossbeam_channel::TrySendError;
use uuid::Uuid;

use super::pending::State;
use super::{Settle, LOG_TARGET};
use crate::backoff::RETRY;
use crate::job::{below, Dispatch, Done, Job, Key, Outcome};

/// Ready items looked at per dispatch pass; keeps a huge backlog from making
/// every pass quadratic.
const DISPATCH_WINDOW: usize = 1024;

#[derive(Debug)]
pub(super) enum ReadyItem {
    /// The pending entry at this path.
    Path(super::PathKey),
    /// A subtree operation, with its retry state.
    Tree {
        job: Job,
        correlation_id: Uuid,
        attempt: u32,
        not_before: Option<Instant>,
    },
}

/// A set of keys: file keys in byte order (so the files below a subtree are
/// one range), subtree keys (rare) in a list. Counted, so that a key held
/// twice stays held until both holders let it go.
#[derive(Debug, Default)]
pub(super) struct Keys {
    files: BTreeMap<String, u32>,
    trees: Vec<String>,
}

impl Keys {
    fn insert(&mut self, key: Key) {
        match key {
            Key::File(path) => *self.files.entry(path).or_default() += 1,
            Key::Tree(path) => self.trees.push(path),
        }
    }

    fn remove(&mut self, key: &Key) {
        match key {
            Key::File(path) => {
                if let Some(count) = self.files.get_mut(path) {
                    *count -= 1;
                    if *count == 0 {
                        self.files.remove(path);
                    }
                }
            }
            Key::Tree(path) => {
                if let Some(index) = self.trees.iter().position(|tree| tree == path) {
                    self.trees.swap_remove(index);
                }
            }
        }
    }

    fn holds_file(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    /// Whether `key` overlaps a key of the set: the same file, a file in or
    /// below a subtree, or nested subtrees. Costs a lookup plus the subtrees
    /// held (a few), not the size of the set.
    fn conflicts(&self, key: &Key) -> bool {
        let tree_conflicts = |key: &Key| self.trees.iter().any(|tree| key.conflicts_with_tree(tree));
        match key {
            Key::File(path) => self.files.contains_key(path) || tree_conflicts(key),
            Key::Tree(tree) => {
                // Every file in or below `tree` starts with it, and such keys
                // are contiguous in byte order.
                self.files
                    .range::<str, _>((Bound::Included(tree.as_str()), Bound::Unbounded))
                    .take_while(|(file, _)| file.starts_with(tree.as_str()))
                    .any(|(file, _)| below(file, tree))
                    || tree_conflicts(key)
            }
        }
    }
}

impl Settle {
    /// Hands ready jobs to the workers, oldest first. A job whose keys
    /// overlap a job in flight, or an older job still waiting, is skipped (and
    /// blocks its keys for the rest of the pass, which keeps per-path order).
    /// Only a window at the front of the queue is looked at, and the rest is
    /// never moved, so a pass costs the same with ten or a million ready jobs.
    /// The keys in flight are kept as jobs leave and come back (`held`), so
    /// a pass costs the same with a few or many jobs in flight too. Jobs go
    /// out with `try_send` into the workers' bounded queue, and every answer
    /// is taken before the next pass, so what is in flight stays bounded by
    /// that queue, the jobs in the workers' hands and the huge-file lane's.
    pub(super) fn dispatch(&mut self, now: Instant) {
        if self.hold_until.is_some_and(|until| until > now) {
            return; // the registry is down: nothing would get through
        }
        // Keys of older jobs skipped in this pass (empty, unallocated, unless one is).
        let mut blocked = Keys::default();
        let mut skipped = Vec::new();
        while skipped.len() < DISPATCH_WINDOW && !self.channels.jobs.is_full() {
            let Some(item) = self.ready.pop_front() else {
                break;
            };
            // The common skip, made cheap: a file whose path is held (in
            // flight, or by an older job skipped in this pass) and that has
            // no other key. Its key already blocks what comes after it.
            if let ReadyItem::Path(path) = &item {
                let lone_key = self
                    .pending
                    .get(path)
                    .is_some_and(|entry| entry.ready && entry.renamed_from().is_none());
                if lone_key && (self.held.holds_file(path) || blocked.holds_file(path)) {
                    skipped.push(item);
                    continue;
                }
            }
            let Some((job, correlation_id, attempt, not_before)) = self.job_for(&item) else {
                continue; // the entry went away meanwhile
            };
            let keys = job.keys();
            let waiting = not_before.is_some_and(|at| at > now);
            if waiting
                || keys
                    .iter()
                    .any(|key| self.held.conflicts(key) || blocked.conflicts(key))
            {
                keys.into_iter().for_each(|key| blocked.insert(key));
                skipped.push(item);
                continue;
            }
            let dispatch = Dispatch {
                id: self.next_id,
                job,
                correlation_id,
                attempt,
            };
            match self.channels.jobs.try_send(dispatch) {
                Ok(()) => {
                    if let ReadyItem::Path(path) = &item {
                        if let Some(entry) = self.pending.remove(path) {
                            if entry.state == State::Changed {
                                self.unpaired.dispatched(path, now);
                            }
                        }
                    }
                    keys.iter().cloned().for_each(|key| self.held.insert(key));
                    self.in_flight.insert(self.next_id, keys);
                    self.next_id += 1;
                }
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    skipped.push(item);
                    break;
                }
            }
        }
        // Skipped jobs go back to the front, in their order.
        for item in skipped.into_iter().rev() {
            self.ready.push_front(item);
        }
    }

    fn job_for(&self, item: &ReadyItem) -> Option<(Job, Uuid, u32, Option<Instant>)> {
        match item {
            ReadyItem::Path(path) => {
                let entry = self.pending.get(path).filter(|entry| entry.ready)?;
                let job = match entry.state {
                    State::Changed => Job::Check {
                        path: path.to_string(),
                        renamed_from: entry.renamed_from().cloned(),
                    },
                    State::Removed => Job::Gone {
                        path: path.to_string(),
                    },
                };
                Some((job, entry.correlation_id, entry.attempt(), entry.not_before()))
            }
            ReadyItem::Tree {
                job,
                correlation_id,
                attempt,
                not_before,
            } => Some((job.clone(), *correlation_id, *attempt, *not_before)),
        }
    }

    pub(super) fn on_done(&mut self, done: Done) {
        let now = Instant::now();
        if let Some(keys) = self.in_flight.remove(&done.dispatch.id) {
            keys.iter().for_each(|key| self.held.remove(key));
        }
        self.note_done(&done.dispatch.job, &done.outcome);
        self.note_retried(&done.dispatch.job, &done.outcome);
        let Dispatch {
            job,
            correlation_id,
            attempt,
            ..
        } = done.dispatch;
        let (retry_after, changing) = match done.outcome {
            Outcome::Matched(moves) => {
                self.outage_attempts = 0;
                if let Job::MatchMoves { found, .. } = job {
                    self.on_matched(found, moves, now);
                }
                return;
            }
            Outcome::Finished => {
                self.outage_attempts = 0;
                // Given up after hard errors: nothing matched.
                if let Job::MatchMoves { found, .. } = job {
                    self.on_matched(found, Vec::new(), now);
                    return;
                }
                if let Job::Sweep { dir, files_found } = &job {
                    log::info!(
                        target: LOG_TARGET,
                        "catch-up complete: {dir} scanned ({files_found} files) and the registry swept; \
                         changes found are being recorded and published"
                    );
                }
                return;
            }
            // Set aside (`note_done`) until its permissions change.
            Outcome::Unreadable(_) => return,
            // Kept (`refused`) and retried until the registry takes it.
            Outcome::Refused(reason) => return self.refuse(job, correlation_id, &reason, now),
            Outcome::Changing => (None, true),
            Outcome::Vanished => {
                if let Job::Check { path, renamed_from } = job {
                    self.on_vanished(path, renamed_from, now);
                }
                return;
            }
            Outcome::Retry(after) => (Some(now + after), false),
            Outcome::Unavailable => {
                self.hold_until = Some(now + RETRY.delay(self.outage_attempts));
                self.outage_attempts = self.outage_attempts.saturating_add(1);
                (None, false)
            }
        };
        match job {
            Job::Check { path, renamed_from } => {
                let fresher = self.pending.contains_key(&*path);
                let entry = self.touch(path.clone(), now);
                if !fresher {
                    entry.state = State::Changed;
                    entry.closed = true;
                    entry.correlation_id = correlation_id;
                }
                // The rename was not recorded yet: whatever came later, it still has to be.
                let replaced = match (entry.renamed_from(), renamed_from) {
                    // Removed since, before it was recorded here: the name
                    // it came from goes too (as in `mark_removed`).
                    (None, Some(from)) if entry.state == State::Removed => Some(from),
                    (None, renamed_from) => {
                        entry.set_renamed_from(renamed_from);
                        None
                    }
                    // Another rename onto this path came meanwhile: the file
                    // that came from `earlier` was replaced before it was
                    // recorded here, so it is gone.
                    (Some(later), Some(earlier)) if *later != earlier && earlier != path => Some(earlier),
                    (Some(_), _) => None,
                };
                entry.set_not_before(retry_after);
                entry.set_attempt(if changing { 0 } else { attempt + 1 });
                if let Some(earlier) = replaced {
                    self.mark_removed(earlier, now);
                }
            }
            Job::Gone { path } => {
                let fresher = self.pending.contains_key(&*path);
                let entry = self.touch(path, now);
                if !fresher {
                    // `Changing` here means the file is back: look at it as a change.
                    entry.state = if changing { State::Changed } else { State::Removed };
                    entry.closed = true;
                    entry.correlation_id = correlation_id;
                }
                entry.set_not_before(retry_after);
                entry.set_attempt(if changing { 0 } else { attempt + 1 });
            }
            job @ (Job::GoneTree { .. }
            | Job::RenameDirectory { .. }
            | Job::Sweep { .. }
            | Job::MatchMoves { .. }) => {
                // Keep its place in front of anything that overlaps it.
                self.ready.push_front(ReadyItem::Tree {
                    job,
                    correlation_id,
                    attempt: attempt + 1,
                    not_before: retry_after.or(Some(now + self.settle_time())),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set answers as the pairwise rule would, and lets a key go only
    /// when every holder did.
    #[test]
    fn keys_conflict_as_the_pairwise_rule_says() {
        let file = |path: &str| Key::File(path.to_owned());
        let tree = |path: &str| Key::Tree(path.to_owned());
        let held = [
            file("/m/a"),
            file("/m/a/x"),
            file("/m/ab"),
            tree("/m/c"),
            file("/m/a"),
        ];
        let probes = [
            file("/m/a"),
            file("/m/b"),
            file("/m/a/x"),
            file("/m/c/y"),
            file("/m/c"),
            file("/m/cd"),
            tree("/m/a"),
            tree("/m/a/x"),
            tree("/m/ab"),
            tree("/m/b"),
            tree("/m"),
            tree("/m/c/d"),
            tree("/"),
        ];
        let mut keys = Keys::default();
        held.iter().cloned().for_each(|key| keys.insert(key));
        for probe in &probes {
            let expected = held.iter().any(|key| key.conflicts(probe));
            assert_eq!(keys.conflicts(probe), expected, "{probe:?}");
        }
        keys.remove(&file("/m/a"));
        assert!(keys.conflicts(&file("/m/a")), "still held once");
        keys.remove(&file("/m/a"));
        assert!(!keys.conflicts(&file("/m/a")));
        keys.remove(&tree("/m/c"));
        assert!(!keys.conflicts(&file("/m/c/y")));
        assert!(keys.conflicts(&tree("/m/a")), "/m/a/x is still held");
    }
}
