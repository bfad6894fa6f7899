//! Workers: look at a file, hash it, and let the registry decide what changed.
//!
//! Each worker takes jobs from the shared queue, which the settle stage fills
//! so that no two jobs for one path are ever in flight together. Problems with
//! one file (vanished, unreadable) are counted and handed back to the settle
//! stage, which follows a vanished file up and sets an unreadable one aside
//! (warning once); the worker goes on. An unreachable registry hands the job
//! back for a retry.

pub mod hash;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use self::hash::FileId;
use crate::backoff::RETRY;
use crate::job::{Dispatch, Done, Job, Moved, Outcome};
use crate::message::EventType;
use crate::path_text;
use crate::registry::{
    regular_file_metadata, Applied, Change, Health, Observed, Registry, RegistryError, Stat,
};
use crate::watch::guard::RootGuard;
use crate::watch::WatchCounters;

/// Hard (non-connection) registry errors a job survives before it is handed
/// back as refused (the settle stage keeps it and retries it later).
pub(crate) const MAX_ATTEMPTS: u32 = 5;
/// Rows fetched per page when walking a subtree in the registry.
const PAGE: usize = 500;
/// The target of this module's log lines: the one they had before the move to
/// `work/`, so log lines stay byte-for-byte the same (issue 7).
const LOG_TARGET: &str = "file_watcher::worker";

/// Per-process counters, readable by the status reporting.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    pub files_hashed: AtomicU64,
    /// Bytes read while hashing (exported as a metric).
    pub bytes_hashed: AtomicU64,
    pub messages_recorded: AtomicU64,
    /// Files that vanished or could not be read while we looked at them.
    pub file_errors: AtomicU64,
    /// Registry errors other than an outage (the job is retried, then kept
    /// by the settle stage as refused); exported with the errors by kind.
    pub registry_errors: AtomicU64,
    /// Messages recorded, by event type (slots in [`EventType::ALL`] order).
    pub recorded_by_type: [AtomicU64; EventType::ALL.len()],
    /// Changes the registry recorded (a row written).
    pub registry_writes: AtomicU64,
    /// Observations that turned out to be nothing new (same stat as the
    /// row, or recorded without a message).
    pub unchanged: AtomicU64,
    /// The most recent loop turn of any worker, idle ticks included, as
    /// [`crate::observe::health::stamp`]: all workers wedged makes it old.
    pub alive: AtomicU64,
}

/// How often an idle worker wakes to say it is alive.
const ALIVE_TICK: Duration = Duration::from_secs(1);

pub struct Worker {
    pub registry: Arc<dyn Registry>,
    pub counters: Arc<WorkerCounters>,
    /// Nudges the publisher after something was recorded (`try_send`: one
    /// pending nudge is enough).
    pub wake_publisher: Sender<()>,
    /// Raised at shutdown: do not start new jobs, hand them back.
    pub stopping: Arc<AtomicBool>,
    /// Whether the registry answered last time (outages are logged once).
    pub health: Arc<Health>,
    /// Asked before every deletion: an unmounted tree deletes nothing.
    pub guard: RootGuard,
    /// Shared with the notify callback: an unreadable file is counted in
    /// `set_aside` before it is reported, so attribute changes get through.
    pub watch_counters: Arc<WatchCounters>,
    /// Files over this many bytes are hashed in the huge-file lane.
    pub huge_file_bytes: u64,
    /// The huge-file lane, for the ordinary workers; `None` for the lane's
    /// own worker, which hashes whatever it is given.
    pub huge_lane: Option<Sender<Dispatch>>,
    /// Test hook ([`Config::test_open_gate`](crate::config::Config::test_open_gate)):
    /// while this file exists, wait between looking at a file and opening it.
    pub test_open_gate: Option<PathBuf>,
}

/// How long deletions wait while the tree looks unmounted.
const ROOT_RETRY: Duration = Duration::from_secs(5);

/// What became of a job in a worker.
enum Handled {
    /// The answer for the settle stage.
    Answered(Outcome),
    /// A file over `HUGE_FILE_BYTES` needs hashing: the huge-file lane takes
    /// the job over, and answers it.
    ToHugeLane,
}

impl Worker {
    pub fn run(&self, jobs: Receiver<Dispatch>, done: Sender<Done>) {
        loop {
            self.counters
                .alive
                .store(crate::observe::health::stamp(), Ordering::Relaxed);
            let dispatch = match jobs.recv_timeout(ALIVE_TICK) {
                Ok(dispatch) => dispatch,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let (dispatch, outcome) = if self.stopping.load(Ordering::Acquire) {
                (dispatch, Outcome::Retry(Duration::ZERO))
            } else {
                match self.perform(&dispatch) {
                    Handled::Answered(outcome) => (dispatch, outcome),
                    Handled::ToHugeLane => match self.hand_to_huge_lane(dispatch) {
                        None => continue,
                        // The lane has stopped (shutdown): hand the job back.
                        Some(returned) => (returned, Outcome::Retry(Duration::ZERO)),
                    },
                }
            };
            if done.send(Done { dispatch, outcome }).is_err() {
                return;
            }
        }
    }

    /// Queues `dispatch` for the huge-file lane; its keys stay in flight
    /// until the lane answers. Returns it if the lane is gone.
    fn hand_to_huge_lane(&self, dispatch: Dispatch) -> Option<Dispatch> {
        let lane = self
            .huge_lane
            .as_ref()
            .expect("only workers with a lane hand jobs to it");
        lane.send(dispatch).err().map(|returned| returned.into_inner())
    }

    fn perform(&self, dispatch: &Dispatch) -> Handled {
        let correlation = dispatch.correlation_id;
        let result = match &dispatch.job {
            Job::Check { path, renamed_from } => self.check(path, renamed_from.as_deref(), correlation),
            Job::Gone { path } => self.gone(path, correlation).map(Handled::Answered),
            Job::GoneTree { path } => self.gone_tree(path, correlation).map(Handled::Answered),
            Job::RenameDirectory { from, to } => self
                .record(
                    &Change::DirectoryRenamed {
                        from: from.clone(),
                        to: to.clone(),
                    },
                    correlation,
                )
                .map(Handled::Answered),
            Job::Sweep { dir, files_found } => {
                self.sweep(dir, *files_found, correlation).map(Handled::Answered)
            }
            Job::MatchMoves { origins, found } => self.match_moves(origins, found).map(Handled::Answered),
        };
        Handled::Answered(match result {
            Ok(Handled::ToHugeLane) => return Handled::ToHugeLane,
            Ok(Handled::Answered(outcome)) => {
                self.health.up();
                outcome
            }
            Err(error) if error.is_unavailable() => {
                self.health.down(&error);
                Outcome::Unavailable
            }
            Err(error) => {
                self.counters.registry_errors.fetch_add(1, Ordering::Relaxed);
                let kept = !matches!(dispatch.job, Job::Sweep { .. } | Job::MatchMoves { .. });
                if dispatch.attempt + 1 >= MAX_ATTEMPTS && kept {
                    // The settle stage warns once per path and retries it.
                    log::debug!(
                        target: LOG_TARGET,
                        "{:?} refused {MAX_ATTEMPTS} times: {error}",
                        dispatch.job
                    );
                    Outcome::Refused(error.to_string())
                } else if dispatch.attempt + 1 >= MAX_ATTEMPTS {
                    // A sweep runs again at the next full scan; unmatched moves stay as they are.
                    log::error!(
                        target: LOG_TARGET,
                        "giving up on {:?} after {MAX_ATTEMPTS} attempts: {error}",
                        dispatch.job
                    );
                    Outcome::Finished
                } else {
                    // A kept job that keeps failing is warned about once, by the settle stage.
                    let level = if kept { log::Level::Debug } else { log::Level::Warn };
                    log::log!(
                        target: LOG_TARGET,
                        level,
                        "{:?} failed (attempt {}): {error}",
                        dispatch.job,
                        dispatch.attempt + 1
                    );
                    Outcome::Retry(RETRY.delay(dispatch.attempt))
                }
            }
        })
    }

    fn record(&self, change: &Change, correlation: uuid::Uuid) -> Result<Outcome, RegistryError> {
        match self.registry.apply(change, correlation)? {
            Applied::Changed => Ok(Outcome::Changing),
            Applied::Recorded(messages) => {
                self.counters.registry_writes.fetch_add(1, Ordering::Relaxed);
                if messages.is_empty() {
                    self.counters.unchanged.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters
                        .messages_recorded
                        .fetch_add(messages.len() as u64, Ordering::Relaxed);
                    for message in &messages {
                        let slot = EventType::ALL.iter().position(|kind| *kind == message.event_type);
                        self.counters.recorded_by_type[slot.unwrap_or(0)].fetch_add(1, Ordering::Relaxed);
                        log::debug!(
                            target: LOG_TARGET,
                            "recorded {} {}",
                            message.event_type,
                            message.file_path
                        );
                    }
                    let _ = self.wake_publisher.try_send(());
                }
                Ok(Outcome::Finished)
            }
        }
    }

    fn check(
        &self,
        path: &str,
        renamed_from: Option<&str>,
        correlation: uuid::Uuid,
    ) -> Result<Handled, RegistryError> {
        let answer = |outcome| Ok(Handled::Answered(outcome));
        let (before, id) = match look(path) {
            Ok(Some(found)) => found,
            Ok(None) => return self.vanished(path).map(Handled::Answered),
            Err(error) => return answer(self.unreadable(path, None, &error)),
        };
        // Unchanged size and mtime: the recorded hashes still hold (renames keep both).
        let known = self.registry.lookup(renamed_from.unwrap_or(path))?;
        if renamed_from.is_none() && known.as_ref().is_some_and(|row| row.stat == before) {
            // The very observation already recorded (a rescan of an unchanged file).
            self.counters.unchanged.fetch_add(1, Ordering::Relaxed);
            return answer(Outcome::Finished);
        }
        let reusable = known.filter(|row| {
            !row.sha256.is_empty() && row.stat.size == before.size && row.stat.mtime_ns == before.mtime_ns
        });
        let (sha256, xxh128) = match reusable {
            Some(row) => (row.sha256, row.xxh128),
            // One huge file at a time, in its own lane: the others keep flowing.
            None if before.size > self.huge_file_bytes && self.huge_lane.is_some() => {
                return Ok(Handled::ToHugeLane);
            }
            None => match self.hash(path, before, id) {
                Ok(Some(digests)) => (digests.sha256, digests.xxh128),
                Ok(None) => return answer(Outcome::Changing),
                // Shutting down: hand the job back; the next start picks the file up.
                Err(error) if hash::is_stopped(&error) => return answer(Outcome::Retry(Duration::ZERO)),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    return self.vanished(path).map(Handled::Answered);
                }
                Err(error) => return answer(self.unreadable(path, Some(before), &error)),
            },
        };
        let observed = Observed {
            path: path.to_owned(),
            stat: before,
            sha256,
            xxh128,
        };
        self.record(
            &Change::Present {
                observed,
                renamed_from: renamed_from.map(str::to_owned),
            },
            correlation,
        )
        .map(Handled::Answered)
    }

    /// Hashes the regular file `id` at `path`, seen as `before`. `None` when
    /// what was read is not one complete version of it: something else took
    /// its place (a rename over it, a FIFO, a symlink), or it changed while
    /// it was read. Then it settles and is hashed again.
    fn hash(&self, path: &str, before: Stat, id: FileId) -> std::io::Result<Option<hash::Digests>> {
        if let Some(gate) = &self.test_open_gate {
            hold_at_gate(gate, path);
        }
        if before.size > self.huge_file_bytes {
            log::info!(
                target: LOG_TARGET,
                "hashing {path} ({} bytes) in the huge-file lane; other files keep flowing",
                before.size
            );
        }
        let file = match hash::open_regular(&path_text::decode(path), id) {
            Ok(file) => file,
            Err(error) if hash::is_replaced(&error) => {
                log::debug!(target: LOG_TARGET, "{path} was {error}; looking again once it settles");
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        let digests = hash::hash_file_until(&file, path, before.size, &self.stopping)?;
        self.counters.files_hashed.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_hashed
            .fetch_add(digests.bytes, Ordering::Relaxed);
        // The path still names the file that was read, unchanged since the
        // first look: what was read is that version, whole.
        let after = look(path).ok().flatten();
        if after != Some((before, id)) || digests.bytes != before.size {
            log::debug!(
                target: LOG_TARGET,
                "{path} changed or was replaced while it was read; waiting for it to settle"
            );
            return Ok(None);
        }
        Ok(Some(digests))
    }

    /// The file disappeared before we could read it. Most likely it was just
    /// renamed or deleted, and that event is on its way to the settle stage
    /// (or, for another instance watching the same tree, already recorded as
    /// a rename): recording a deletion now would turn a rename into
    /// `deleted` + `created`. The settle stage decides, after a settle period.
    fn vanished(&self, path: &str) -> Result<Outcome, RegistryError> {
        log::debug!(target: LOG_TARGET, "{path} vanished before it was read");
        Ok(Outcome::Vanished)
    }

    /// Records that `path` is gone, unless the whole tree looks unmounted:
    /// then the deletion waits.
    fn gone(&self, path: &str, correlation: uuid::Uuid) -> Result<Outcome, RegistryError> {
        if let Err(reason) = self.guard.check() {
            log::debug!(target: LOG_TARGET, "holding the deletion of {path}: {reason}");
            return Ok(Outcome::Retry(ROOT_RETRY));
        }
        self.record(
            &Change::Gone {
                path: path.to_owned(),
            },
            correlation,
        )
    }

    fn gone_tree(&self, path: &str, correlation: uuid::Uuid) -> Result<Outcome, RegistryError> {
        let outcome = self.gone(path, correlation)?;
        if let Outcome::Retry(_) = outcome {
            return Ok(outcome);
        }
        // A file below that is back (Changing) is left to its own events.
        self.for_each_recorded_below(path, |worker, file| worker.gone(file, correlation))
    }

    /// After a full scan: recorded files that no longer exist are gone.
    fn sweep(&self, dir: &str, files_found: u64, correlation: uuid::Uuid) -> Result<Outcome, RegistryError> {
        if files_found == 0 && !self.registry.present_under(dir, None, 1)?.is_empty() {
            log::error!(
                target: LOG_TARGET,
                "{dir} looks empty but the registry holds files under it (an unmounted share?): \
                 publishing no mass deletion; set SENTINEL_FILE to make mounts explicit, or create a file \
                 in the tree if it really is empty"
            );
            return Ok(Outcome::Finished);
        }
        let mut swept = 0u64;
        let outcome = self.for_each_recorded_below(dir, |worker, file| {
            if matches!(Stat::of(&path_text::decode(file)), Ok(None)) {
                swept += 1;
                return worker.gone(file, correlation);
            }
            Ok(Outcome::Finished)
        })?;
        if swept > 0 {
            log::info!(target: LOG_TARGET, "sweep of {dir}: {swept} recorded files no longer exist");
        }
        Ok(outcome)
    }

    /// Which of the files in `found` (the walks of new directories found
    /// them) is a file last recorded at one of `origins` (where a "moved
    /// from" with no "moved to" left): the same (device, inode), and the same
    /// size and mtime (a rename keeps both; a reused inode rarely does), while
    /// nothing with that identity is left at the origin (a second hard link
    /// is not a move). Records nothing: the settle stage follows each match
    /// with an ordinary check.
    fn match_moves(&self, origins: &[String], found: &[String]) -> Result<Outcome, RegistryError> {
        let mut by_identity = HashMap::new();
        for path in found {
            if let Ok(Some(stat)) = Stat::of(&path_text::decode(path)) {
                if let Some(identity) = stat.identity {
                    by_identity.entry(identity).or_insert((path, stat));
                }
            }
        }
        let mut moves = Vec::new();
        for origin in origins {
            if by_identity.is_empty() {
                break;
            }
            let Some(row) = self.registry.lookup(origin)? else {
                continue; // never recorded: nothing to follow
            };
            let Some(identity) = row.stat.identity else {
                continue; // recorded before identities were kept
            };
            let Some((to, stat)) = by_identity.get(&identity) else {
                continue;
            };
            let same_file = stat.size == row.stat.size && stat.mtime_ns == row.stat.mtime_ns;
            let still_at_origin = matches!(
                Stat::of(&path_text::decode(origin)),
                Ok(Some(at_origin)) if at_origin.identity == Some(identity)
            );
            if same_file && !still_at_origin {
                moves.push(Moved {
                    from: origin.clone(),
                    to: (*to).clone(),
                });
                by_identity.remove(&identity);
            }
        }
        Ok(Outcome::Matched(moves))
    }

    /// Visits recorded files below `dir` page by page; stops early (and
    /// returns it) when a visit asks for a retry.
    fn for_each_recorded_below(
        &self,
        dir: &str,
        mut visit: impl FnMut(&Worker, &str) -> Result<Outcome, RegistryError>,
    ) -> Result<Outcome, RegistryError> {
        let mut after: Option<String> = None;
        loop {
            let page = self.registry.present_under(dir, after.as_deref(), PAGE)?;
            for file in &page {
                if let retry @ Outcome::Retry(_) = visit(self, file)? {
                    return Ok(retry);
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE => after = Some(last.clone()),
                _ => return Ok(Outcome::Finished),
            }
        }
    }

    /// `path` cannot be read (seen as `before`, if a `stat` worked). It is
    /// counted as set aside first, so that from now on attribute changes get
    /// through; then, if it changed since `before` after all (a `chmod` just
    /// now), it is looked at again instead. The settle stage warns, once.
    fn unreadable(&self, path: &str, before: Option<Stat>, error: &std::io::Error) -> Outcome {
        self.counters.file_errors.fetch_add(1, Ordering::Relaxed);
        self.watch_counters.set_aside.fetch_add(1, Ordering::SeqCst);
        if before.is_some() && Stat::of(&path_text::decode(path)).ok().flatten() != before {
            self.watch_counters.set_aside.fetch_sub(1, Ordering::SeqCst);
            log::debug!(target: LOG_TARGET, "cannot read {path} ({error}), but it changed meanwhile");
            return Outcome::Changing;
        }
        log::debug!(target: LOG_TARGET, "cannot read {path}: {error}");
        Outcome::Unreadable(error.to_string())
    }
}

/// The regular file at `path` (symlinks not followed) and which file it is;
/// `None` when nothing, or something else, is there.
fn look(path: &str) -> std::io::Result<Option<(Stat, FileId)>> {
    Ok(regular_file_metadata(&path_text::decode(path))?
        .map(|metadata| (Stat::from_metadata(&metadata), FileId::of(&metadata))))
}

/// Test hook: waits while `gate` exists, after saying which file is held.
fn hold_at_gate(gate: &Path, path: &str) {
    if gate.exists() {
        log::info!(target: LOG_TARGET, "test hook: holding {path} before opening it");
        while gate.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
