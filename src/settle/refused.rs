//! Changes the registry refused for a reason other than a lost connection,
//! kept until it takes them.
//!
//! A database that is up can still refuse every write for a long while:
//! read-only after a failover (SQLSTATE 25006), disk full (53100), statement
//! timeouts (57014). A worker retries such a job a few times
//! ([`MAX_ATTEMPTS`]) and then hands it back as [`Outcome::Refused`]. The
//! change is not the file's fault and must not be lost, so it is kept here:
//! one WARN naming the path and the SQLSTATE, then retried (one attempt per
//! round) on a backoff of its own ([`REFUSED_RETRY`]) and at every full scan,
//! the periodic rescan included. When it goes through, one INFO says so.
//!
//! The job is kept whole, not only its path: a rename retried is still a
//! rename (a rescan alone would see a new file and a vanished one).
//!
//! Bounded: past [`MAX_REFUSED`] jobs, further ones are only counted (and
//! logged once); the next full scan finds their files again (a new or
//! changed file is checked, a vanished one swept), losing only the pairing
//! of renames.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::dispatch::ReadyItem;
use super::{Settle, LOG_TARGET};
use crate::backoff::Backoff;
use crate::job::{Job, Outcome};
use crate::work::MAX_ATTEMPTS;

/// Jobs kept at most; see the module docs for what happens past it.
const MAX_REFUSED: usize = 10_000;

/// Between rounds of retries of one refused job: 1 min, doubling up to 30 min
/// (the periodic rescan retries everything kept, whatever this says).
pub(super) const REFUSED_RETRY: Backoff = Backoff {
    first: Duration::from_secs(60),
    doublings: 5,
    cap: Duration::from_secs(30 * 60),
    jitter: 0.8..1.2,
};

/// The jobs the registry refused, by the path they are about.
#[derive(Debug, Default)]
pub(super) struct Refused {
    kept: HashMap<String, Kept>,
    /// Refused jobs not kept because `kept` was full.
    dropped: u64,
}

#[derive(Debug)]
struct Kept {
    job: Job,
    correlation_id: Uuid,
    /// The SQLSTATE of the last refusal, for the log lines.
    sqlstate: String,
    /// Rounds of retries so far.
    rounds: u32,
    /// Not retried before this.
    retry_at: Instant,
    /// Handed back to dispatch; waiting for its outcome.
    retrying: bool,
}

impl Refused {
    /// Pending entries were dropped (see `Settle::shed_pending`): the file
    /// jobs being retried went with them, and are due again.
    pub(super) fn forget_retries(&mut self) {
        for kept in self.kept.values_mut() {
            if matches!(kept.job, Job::Check { .. } | Job::Gone { .. }) {
                kept.retrying = false;
            }
        }
    }

    /// When the next kept job is due for a retry.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.kept
            .values()
            .filter(|kept| !kept.retrying)
            .map(|kept| kept.retry_at)
            .min()
    }
}

/// The path a job is kept under.
fn subject(job: &Job) -> Option<&str> {
    match job {
        Job::Check { path, .. } | Job::Gone { path } | Job::GoneTree { path } => Some(path),
        Job::RenameDirectory { to, .. } => Some(to),
        Job::Sweep { .. } | Job::MatchMoves { .. } => None,
    }
}

/// The SQLSTATE in a registry error's text (`… (SQLSTATE 25006)`), if any.
fn sqlstate(reason: &str) -> &str {
    reason
        .split_once("SQLSTATE ")
        .and_then(|(_, rest)| rest.get(..5))
        .unwrap_or("none")
}

impl Settle {
    /// A worker gave up on `job` after hard registry errors (`reason`).
    pub(super) fn refuse(&mut self, job: Job, correlation_id: Uuid, reason: &str, now: Instant) {
        let Some(path) = subject(&job).map(str::to_owned) else {
            return; // never handed back as refused (see `work`)
        };
        let code = sqlstate(reason).to_owned();
        if let Some(kept) = self.refused.kept.get_mut(&path) {
            kept.rounds = kept.rounds.saturating_add(1);
            kept.retry_at = now + REFUSED_RETRY.delay(kept.rounds);
            kept.retrying = false;
            kept.sqlstate = code;
            kept.job = job;
            log::debug!(
                target: LOG_TARGET,
                "the registry still refuses {path} (SQLSTATE {}, round {}); next retry in {:?}",
                kept.sqlstate,
                kept.rounds,
                kept.retry_at - now
            );
            return;
        }
        if self.refused.kept.len() >= MAX_REFUSED {
            self.refused.dropped += 1;
            if self.refused.dropped == 1 {
                log::warn!(
                    target: LOG_TARGET,
                    "the registry refused more than {MAX_REFUSED} changes (the latest: {path}, SQLSTATE {code}): \
                     further ones are not kept; the next full scan finds them again"
                );
            }
            return;
        }
        log::warn!(
            target: LOG_TARGET,
            "the registry refused the change to {path} (SQLSTATE {code}): {reason}; kept and retried \
             every few minutes and at every full scan until it is taken"
        );
        self.refused.kept.insert(
            path,
            Kept {
                job,
                correlation_id,
                sqlstate: code,
                rounds: 0,
                retry_at: now + REFUSED_RETRY.delay(0),
                retrying: false,
            },
        );
    }

    /// A job finished one way or another: if it was a kept one and the
    /// registry took it (or it no longer applies), it is forgotten.
    pub(super) fn note_retried(&mut self, job: &Job, outcome: &Outcome) {
        let taken = matches!(
            outcome,
            Outcome::Finished | Outcome::Vanished | Outcome::Unreadable(_) | Outcome::Matched(_)
        );
        let Some(path) = subject(job).filter(|_| taken) else {
            return;
        };
        if let Some(kept) = self.refused.kept.remove(path) {
            log::info!(
                target: LOG_TARGET,
                "the registry took the change to {path} after refusing it (SQLSTATE {}, {} rounds of retries)",
                kept.sqlstate,
                kept.rounds + 1
            );
        }
    }

    /// Hands back the kept jobs that are due (all of them when `all`, at a
    /// full scan), for one attempt each.
    pub(super) fn retry_refused(&mut self, now: Instant, all: bool) {
        if self.refused.kept.is_empty() {
            return;
        }
        let due: Vec<String> = self
            .refused
            .kept
            .iter()
            .filter(|(_, kept)| !kept.retrying && (all || kept.retry_at <= now))
            .map(|(path, _)| path.clone())
            .collect();
        for path in due {
            let kept = self.refused.kept.get_mut(&path).expect("listed above");
            kept.retrying = true;
            let (job, correlation_id) = (kept.job.clone(), kept.correlation_id);
            // One attempt: the worker hands it back at once if it fails again.
            let attempt = MAX_ATTEMPTS - 1;
            match job {
                // A pending entry for the path is newer news: it goes instead.
                Job::Check { .. } | Job::Gone { .. } if self.pending.contains_key(&*path) => {}
                Job::Check { path, renamed_from } => {
                    let entry = self.touch(path, now);
                    entry.closed = true;
                    entry.set_renamed_from(renamed_from);
                    entry.correlation_id = correlation_id;
                    entry.set_attempt(attempt);
                }
                Job::Gone { path } => {
                    self.mark_removed(path.clone(), now);
                    if let Some(entry) = self.pending.get_mut(&*path) {
                        entry.correlation_id = correlation_id;
                        entry.set_attempt(attempt);
                    }
                }
                job => self.ready.push_back(ReadyItem::Tree {
                    job,
                    correlation_id,
                    attempt,
                    not_before: None,
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Done;

    #[test]
    fn sqlstate_is_read_from_the_error_text() {
        assert_eq!(
            sqlstate("registry query failed (record): ERROR: cannot execute INSERT in a read-only transaction (SQLSTATE 25006)"),
            "25006"
        );
        assert_eq!(sqlstate("something else"), "none");
    }

    #[test]
    fn a_refused_check_is_kept_retried_once_per_round_and_forgotten_once_taken() {
        let mut harness = super::super::tests::Harness::new();
        let path = harness.path("a.flac");
        let correlation_id = Uuid::new_v4();
        let job = Job::Check {
            path: path.clone(),
            renamed_from: Some(harness.path("old.flac")),
        };
        let now = Instant::now();
        harness
            .settle
            .refuse(job.clone(), correlation_id, "(SQLSTATE 53100)", now);
        assert!(harness.pass().is_empty(), "nothing before its retry is due");
        assert!(harness.settle.refused.next_retry().unwrap() > now + Duration::from_secs(30));
        harness.settle.retry_refused(now, true);
        assert_eq!(
            harness.settle.refused.next_retry(),
            None,
            "retrying: not due again"
        );
        let retried = harness.pass();
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].job, job, "the rename is retried as a rename");
        assert_eq!(retried[0].correlation_id, correlation_id);
        assert_eq!(retried[0].attempt, MAX_ATTEMPTS - 1, "one attempt per round");
        // Refused again: kept, not warned again, due later.
        let again = retried.into_iter().next().unwrap();
        harness.settle.on_done(Done {
            dispatch: again,
            outcome: Outcome::Refused("(SQLSTATE 53100)".into()),
        });
        assert_eq!(harness.settle.refused.kept.len(), 1);
        harness.settle.retry_refused(now, false);
        assert!(harness.pass().is_empty(), "not due yet");
        harness.settle.refused.kept.get_mut(&path).unwrap().retry_at = now;
        harness.settle.retry_refused(Instant::now(), false);
        let third = harness.pass().into_iter().next().unwrap();
        harness.settle.on_done(Done {
            dispatch: third,
            outcome: Outcome::Finished,
        });
        assert!(harness.settle.refused.kept.is_empty(), "taken: forgotten");
    }
}
