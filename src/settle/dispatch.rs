//! Handing ready jobs to the workers, and taking their answers back.
//!
//! This is where the invariants between settle and the workers hold: one job
//! per path (or overlapping subtree) in flight, jobs for one path in the order
//! they became ready, `try_send` only, and a registry outage holds all
//! dispatching instead of retrying every path on its own.

use std::time::Instant;

use crossbeam_channel::TrySendError;
use uuid::Uuid;

use super::pending::State;
use super::{Settle, LOG_TARGET};
use crate::backoff::RETRY;
use crate::job::{Dispatch, Done, Job, Key, Outcome};

/// Ready items looked at per dispatch pass; keeps a huge backlog from making
/// every pass quadratic.
const DISPATCH_WINDOW: usize = 1024;

#[derive(Debug)]
pub(super) enum ReadyItem {
    /// The pending entry at this path.
    Path(String),
    /// A subtree operation, with its retry state.
    Tree {
        job: Job,
        correlation_id: Uuid,
        attempt: u32,
        not_before: Option<Instant>,
    },
}

/// Keys that jobs later in a dispatch pass must not overlap: file keys
/// hashed, subtree keys (rare) in a list.
#[derive(Default)]
struct BlockedKeys {
    files: std::collections::HashSet<String>,
    trees: Vec<String>,
}

impl BlockedKeys {
    fn insert(&mut self, key: Key) {
        match key {
            Key::File(path) => {
                self.files.insert(path);
            }
            Key::Tree(path) => self.trees.push(path),
        }
    }

    fn conflicts(&self, key: &Key) -> bool {
        let trees = self.trees.iter().map(|tree| Key::Tree(tree.clone()));
        match key {
            Key::File(path) => self.files.contains(path) || trees.into_iter().any(|tree| tree.conflicts(key)),
            Key::Tree(_) => {
                self.files
                    .iter()
                    .any(|file| key.conflicts(&Key::File(file.clone())))
                    || trees.into_iter().any(|tree| tree.conflicts(key))
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
    pub(super) fn dispatch(&mut self, now: Instant) {
        if self.hold_until.is_some_and(|until| until > now) {
            return; // the registry is down: nothing would get through
        }
        let mut blocked = BlockedKeys::default();
        for key in self.in_flight.values().flatten() {
            blocked.insert(key.clone());
        }
        let mut skipped = Vec::new();
        while skipped.len() < DISPATCH_WINDOW {
            let Some(item) = self.ready.pop_front() else {
                break;
            };
            let Some((job, correlation_id, attempt, not_before)) = self.job_for(&item) else {
                continue; // the entry went away meanwhile
            };
            let keys = job.keys();
            let waiting = not_before.is_some_and(|at| at > now);
            if waiting || keys.iter().any(|key| blocked.conflicts(key)) {
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
                        self.pending.remove(path);
                    }
                    keys.iter().cloned().for_each(|key| blocked.insert(key));
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
                        path: path.clone(),
                        renamed_from: entry.renamed_from.clone(),
                    },
                    State::Removed => Job::Gone { path: path.clone() },
                };
                Some((job, entry.correlation_id, entry.attempt, entry.not_before))
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
        self.in_flight.remove(&done.dispatch.id);
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
                let fresher = self.pending.contains_key(&path);
                let entry = self.touch(path.clone(), now);
                if !fresher {
                    entry.state = State::Changed;
                    entry.closed = true;
                    entry.correlation_id = correlation_id;
                }
                // The rename was not recorded yet: whatever came later, it still has to be.
                let replaced = match (&entry.renamed_from, renamed_from) {
                    // Removed since, before it was recorded here: the name
                    // it came from goes too (as in `mark_removed`).
                    (None, Some(from)) if entry.state == State::Removed => Some(from),
                    (None, renamed_from) => {
                        entry.renamed_from = renamed_from;
                        None
                    }
                    // Another rename onto this path came meanwhile: the file
                    // that came from `earlier` was replaced before it was
                    // recorded here, so it is gone.
                    (Some(later), Some(earlier)) if *later != earlier && earlier != path => Some(earlier),
                    (Some(_), _) => None,
                };
                entry.not_before = retry_after;
                entry.attempt = if changing { 0 } else { attempt + 1 };
                if let Some(earlier) = replaced {
                    self.mark_removed(earlier, now);
                }
            }
            Job::Gone { path } => {
                let fresher = self.pending.contains_key(&path);
                let entry = self.touch(path, now);
                if !fresher {
                    // `Changing` here means the file is back: look at it as a change.
                    entry.state = if changing { State::Changed } else { State::Removed };
                    entry.closed = true;
                    entry.correlation_id = correlation_id;
                }
                entry.not_before = retry_after;
                entry.attempt = if changing { 0 } else { attempt + 1 };
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
