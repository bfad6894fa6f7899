//! The settle stage: the single owner of per-path state.
//!
//! Raw events become one pending entry per path. An entry is handed to the
//! workers only when the file is finished: closed after a write (or renamed
//! into place) and then quiet for `SETTLE_MS`; in poll mode, unchanged across
//! two polls. Renames rewrite pending entries, so a worker never hashes a path
//! that has merely moved, and a file renamed before it was announced is simply
//! created at its new name.
//!
//! Invariants:
//! - at most one job per path is in flight, and jobs whose paths (or
//!   subtrees) overlap leave in the order they became ready, so messages for
//!   one path leave in the order things happened;
//! - this thread never blocks on a worker: jobs go out with `try_send`, and
//!   whatever does not fit stays in the ready queue;
//! - pending entries are capped at `max_pending`: past it they are dropped and
//!   a full rescan (followed by a sweep) recovers what they described. The
//!   same rescan follows a kernel queue overflow or a full raw-event channel.
//!
//! The stage is one thread and one [`Settle`]; its files follow an event
//! through it:
//! - `events`: raw notify events into pending entries;
//! - `renames`: pairing "moved from" with "moved to", file and directory renames;
//! - `unpaired`: a "moved from" with no "moved to", held for the walks of new
//!   directories and matched by (device, inode);
//! - `pending`: the entries, their timers, and promotion to the ready queue;
//! - `dispatch`: the ready queue, keys in flight, the outage hold, and what
//!   the workers answer;
//! - `root`: the watchdog, watcher restarts, falling back to polling, and the
//!   scans that catch up (with what they discover);
//! - `aside`: files and directories set aside as unreadable, until their
//!   permissions change;
//! - `refused`: changes the registry refused (read-only, disk full), kept
//!   and retried until it takes them.
//!
//! Every `RESCAN_INTERVAL` (and after an overflow, and at start with a
//! database) a full scan walks the tree: every file is checked against the
//! registry (only changed ones are hashed), the watches are rebuilt to one
//! per directory, and whatever is set aside or refused is retried.

mod events;
mod renames;
mod unpaired;
mod pending;
mod dispatch;
mod root;
mod aside;
mod refused;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, select, Receiver, Sender};

use self::aside::Aside;
use self::dispatch::ReadyItem;
use self::pending::Entry;
use self::refused::Refused;
use self::renames::Pairing;
use self::root::WATCHDOG_INTERVAL;
use self::unpaired::Unpaired;
use crate::config::WatchMode;
use crate::filter::Filter;
use crate::job::{Dispatch, Done, Key};
use crate::path_text;
use crate::watch::guard::RootGuard;
use crate::watch::scan::{Discovery, ScanRequest};
use crate::watch::{RawEvent, WatchCounters, Watcher};

/// Tunables of the settle stage, from the configuration.
#[derive(Debug, Clone)]
pub struct SettleOptions {
    pub root: PathBuf,
    pub filter: Filter,
    pub settle: Duration,
    pub mode: WatchMode,
    /// Pending entries before they are dropped in favour of a rescan.
    pub max_pending: usize,
    /// Run a full scan (and sweep) right after start.
    pub initial_scan: bool,
    /// Optional file whose absence means the share is not mounted.
    pub sentinel: Option<PathBuf>,
    /// How often a full scan runs anyway (`RESCAN_INTERVAL`); `None`: never.
    pub rescan_interval: Option<Duration>,
}

/// The channels the settle stage reads and writes.
pub struct SettleChannels {
    pub raw: Receiver<RawEvent>,
    pub discovered: Receiver<Discovery>,
    pub done: Receiver<Done>,
    /// Closed (dropped) by the owner to stop the stage.
    pub stop: Receiver<()>,
    pub jobs: Sender<Dispatch>,
    pub scan_requests: Sender<ScanRequest>,
}

/// Upper bound on one wait, so counters and flags are looked at regularly.
const MAX_WAIT: Duration = Duration::from_millis(250);
/// Raw events handled per pass before timers and dispatch get a turn.
const RAW_BATCH: usize = 4096;
/// Pending and ready entries past which the periodic rescan waits, and for
/// how long (see `Settle::periodic_rescan`).
const PERIODIC_BUSY: usize = 1024;
const PERIODIC_POSTPONE: Duration = Duration::from_secs(60);
/// The target of every log line of the stage, whichever file it comes from:
/// the one they had before the stage became a folder, so log lines stay
/// byte-for-byte the same (issue 7). Child modules pass it explicitly.
const LOG_TARGET: &str = module_path!();

/// A pending path, stored once: the entry's key, its timers, the list of
/// entries touched in a pass and the ready queue share one allocation
/// rather than each holding a `String` of its own. With the entry's 64
/// bytes (`pending::Entry`), a pending path costs about 280 bytes
/// (BENCHMARKS.md).
type PathKey = Arc<str>;

pub struct Settle {
    options: SettleOptions,
    root_text: String,
    channels: SettleChannels,
    counters: Arc<WatchCounters>,
    pending: HashMap<PathKey, Entry>,
    /// When to look at an entry next (lazy: validated against the entry).
    timers: BinaryHeap<Reverse<(Instant, PathKey)>>,
    ready: VecDeque<ReadyItem>,
    in_flight: HashMap<u64, Vec<Key>>,
    /// Every key of `in_flight`, kept as jobs leave and come back.
    held: dispatch::Keys,
    next_id: u64,
    /// Renames whose "moved to" has not come yet.
    pairing: Pairing,
    /// "Moved from" halves held for the walks of new directories.
    unpaired: Unpaired,
    /// Directories to walk once their watch surely exists.
    delayed_scans: Vec<(Instant, PathBuf)>,
    full_scan_running: bool,
    full_scan_again: bool,
    /// Events were lost since the last full scan finished: see
    /// `on_events_lost`.
    closes_lost: bool,
    /// Entries changed since the last pass (their deadlines may have moved).
    touched: Vec<PathKey>,
    /// The registry was unreachable: dispatch nothing before this.
    hold_until: Option<Instant>,
    /// Consecutive unreachable answers, for the hold's backoff.
    outage_attempts: u32,
    /// The notify watcher; owned here so it can be restarted when the root
    /// comes back, or swapped for polling when inotify runs out of watches.
    watcher: Option<Watcher>,
    /// For building a new watcher's callback. Being a sender of
    /// `channels.raw` itself, it keeps that channel connected for as long as
    /// the stage runs: only `stop` ends the loop.
    raw_sender: Sender<RawEvent>,
    /// Shared with the workers: which root identity the watcher serves.
    guard: RootGuard,
    /// The root is gone, replaced or without its sentinel: logged once,
    /// deletions wait.
    root_unavailable: bool,
    next_watchdog: Instant,
    /// Files and directories that could not be read, until their permissions
    /// change (see `aside`); counted in `counters.set_aside`.
    set_aside: HashMap<String, Aside>,
    /// When the periodic full scan is due (postponed by every full scan).
    next_rescan: Option<Instant>,
    /// Changes the registry refused, until it takes them.
    refused: Refused,
}

impl Settle {
    pub fn new(
        options: SettleOptions,
        channels: SettleChannels,
        counters: Arc<WatchCounters>,
        watcher: Watcher,
        raw_sender: Sender<RawEvent>,
        guard: RootGuard,
    ) -> Settle {
        let root_text = path_text::encode(options.root.as_os_str());
        Settle {
            watcher: Some(watcher),
            raw_sender,
            guard,
            root_unavailable: false,
            next_watchdog: Instant::now() + WATCHDOG_INTERVAL,
            options,
            root_text,
            channels,
            counters,
            pending: HashMap::new(),
            timers: BinaryHeap::new(),
            ready: VecDeque::new(),
            in_flight: HashMap::new(),
            held: dispatch::Keys::default(),
            next_id: 0,
            pairing: Pairing::default(),
            unpaired: Unpaired::default(),
            delayed_scans: Vec::new(),
            full_scan_running: false,
            full_scan_again: false,
            closes_lost: false,
            touched: Vec::new(),
            hold_until: None,
            outage_attempts: 0,
            set_aside: HashMap::new(),
            next_rescan: None,
            refused: Refused::default(),
        }
    }

    /// Runs until `stop` closes.
    pub fn run(mut self) {
        let root = self.options.root.clone();
        self.note_watch_failures(&root, Instant::now());
        self.next_rescan = self
            .options
            .rescan_interval
            .map(|interval| Instant::now() + interval);
        if self.options.initial_scan {
            self.request_full_scan("start-up reconciliation");
        }
        loop {
            self.note_progress();
            let now = Instant::now();
            let wait = self.next_wakeup(now).saturating_duration_since(now).min(MAX_WAIT);
            // Stop reading discoveries while enough work is pending: the walk waits.
            let discovered = if self.pending.len() < self.options.max_pending / 2 {
                self.channels.discovered.clone()
            } else {
                never()
            };
            select! {
                recv(self.channels.raw) -> raw => if let Ok(raw) = raw {
                    self.on_raw(raw);
                    // Take what is already queued in one go, but not so
                    // much that timers and dispatch starve under a flood.
                    for _ in 0..RAW_BATCH {
                        let Ok(raw) = self.channels.raw.try_recv() else { break };
                        self.on_raw(raw);
                    }
                },
                recv(discovered) -> discovery => if let Ok(discovery) = discovery {
                    self.on_walked(discovery);
                },
                recv(self.channels.done) -> done => if let Ok(done) = done {
                    self.on_done(done);
                    // Every answer already in before the next dispatch pass:
                    // taken one per pass, answers fell behind the jobs sent
                    // out under a flood, and each pass looks at every job in
                    // flight (100 000 new files took minutes).
                    while let Ok(done) = self.channels.done.try_recv() {
                        self.on_done(done);
                    }
                },
                recv(self.channels.stop) -> _ => break,
                default(wait) => {}
            }
            if self.counters.overflowed.swap(false, Ordering::AcqRel) {
                self.counters.overflows.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "event channel was full: {} events dropped so far; rescanning the tree",
                    self.counters.dropped_events.load(Ordering::Relaxed)
                );
                self.on_events_lost(Instant::now());
                self.request_full_scan("event channel overflow");
            }
            let now = Instant::now();
            if now >= self.next_watchdog {
                self.watchdog(now);
            }
            if self.next_rescan.is_some_and(|at| now >= at) {
                self.periodic_rescan(now);
            }
            self.retry_refused(now, false);
            self.expire_unpaired(now);
            self.start_due_scans(now);
            self.match_held(now);
            self.reschedule_touched();
            self.promote_due(now);
            self.dispatch(now);
        }
        // Stop watching first: nothing new comes in while we wind down.
        self.watcher = None;
        log::debug!(
            "settle stage stopping: {} pending, {} ready, {} in flight",
            self.pending.len(),
            self.ready.len(),
            self.in_flight.len()
        );
    }

    /// The periodic full scan, unless one is under way or the last one's
    /// finds are still being worked through (a catch-up after downtime can
    /// take longer than the interval): then it comes a little later rather
    /// than pile a second walk's 100 000 checks onto the first.
    fn periodic_rescan(&mut self, now: Instant) {
        if self.full_scan_running || self.pending.len() + self.ready.len() >= PERIODIC_BUSY {
            self.next_rescan = Some(now + PERIODIC_POSTPONE);
            return;
        }
        self.request_full_scan("periodic rescan, RESCAN_INTERVAL");
    }

    /// What the metrics and `/healthz` read, once per loop turn (a few
    /// relaxed stores): alive, pending paths, polling, and whether catch-up
    /// is complete (the start-up scan done and everything it found handled).
    fn note_progress(&self) {
        let counters = &self.counters;
        counters
            .settle_alive
            .store(crate::observe::health::stamp(), Ordering::Relaxed);
        counters
            .pending_paths
            .store(self.pending.len() as u64, Ordering::Relaxed);
        let polling = matches!(self.options.mode, WatchMode::Poll(_));
        counters.polling.store(polling, Ordering::Relaxed);
        let idle = self.pending.is_empty() && self.ready.is_empty() && self.in_flight.is_empty();
        if idle && !self.full_scan_running && !counters.caught_up.load(Ordering::Relaxed) {
            counters.caught_up.store(true, Ordering::Relaxed);
        }
    }

    fn settle_time(&self) -> Duration {
        match self.options.mode {
            WatchMode::Inotify => self.options.settle,
            // Unchanged across two polls.
            WatchMode::Poll(interval) => self.options.settle.max(interval * 2),
        }
    }

    fn next_wakeup(&self, now: Instant) -> Instant {
        let mut next = now + MAX_WAIT;
        if let Some(until) = self.hold_until.filter(|until| *until > now) {
            next = next.min(until);
        }
        if let Some(Reverse((at, _))) = self.timers.peek() {
            next = next.min(*at);
        }
        if let Some(expiry) = self.pairing.next_expiry() {
            next = next.min(expiry);
        }
        for (at, _) in &self.delayed_scans {
            next = next.min(*at);
        }
        for at in [self.next_rescan, self.refused.next_retry()]
            .into_iter()
            .flatten()
        {
            next = next.min(at);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Job, Outcome};
    use crate::watch::Callback;
    use crossbeam_channel::{bounded, unbounded, Receiver};

    /// A settle stage on a real (empty) temporary tree, driven by hand. The
    /// stage's other files test their parts with it too.
    pub(super) struct Harness {
        pub(super) settle: Settle,
        pub(super) jobs: Receiver<Dispatch>,
        root: String,
        _dir: tempfile::TempDir,
        _keep: Vec<Box<dyn std::any::Any>>,
    }

    impl Harness {
        pub(super) fn new() -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_owned();
            let (raw_sender, raw) = bounded(16);
            let (discovered_sender, discovered) = bounded(16);
            let (done_sender, done) = unbounded();
            let (stop_sender, stop) = bounded(0);
            let (job_sender, jobs) = bounded(64);
            let (scan_sender, scan_receiver) = unbounded();
            let counters = Arc::new(WatchCounters::default());
            let filter = Filter::new("flac", "").unwrap();
            let watcher = Watcher::start(
                &root,
                WatchMode::Inotify,
                &filter,
                Callback::new(raw_sender.clone(), counters.clone(), false),
            )
            .unwrap();
            let options = SettleOptions {
                root: root.clone(),
                filter,
                settle: Duration::ZERO,
                mode: WatchMode::Inotify,
                max_pending: 1000,
                initial_scan: false,
                sentinel: None,
                rescan_interval: None,
            };
            let channels = SettleChannels {
                raw,
                discovered,
                done,
                stop,
                jobs: job_sender,
                scan_requests: scan_sender,
            };
            let guard = RootGuard::new(root.clone(), None);
            let settle = Settle::new(options, channels, counters, watcher, raw_sender, guard);
            Harness {
                settle,
                jobs,
                root: root.to_str().unwrap().to_owned(),
                _dir: dir,
                _keep: vec![
                    Box::new(discovered_sender),
                    Box::new(done_sender),
                    Box::new(stop_sender),
                    Box::new(scan_receiver),
                ],
            }
        }

        pub(super) fn path(&self, name: &str) -> String {
            format!("{}/{name}", self.root)
        }

        /// One pass of the loop's bookkeeping, far enough in the future that
        /// every settle deadline has passed.
        pub(super) fn pass(&mut self) -> Vec<Dispatch> {
            self.pass_at(Instant::now() + Duration::from_secs(1))
        }

        /// One pass of the loop's bookkeeping as if it were `at`: the jobs
        /// it dispatched.
        pub(super) fn pass_at(&mut self, at: Instant) -> Vec<Dispatch> {
            self.settle.reschedule_touched();
            self.settle.promote_due(at);
            self.settle.dispatch(at);
            self.jobs.try_iter().collect()
        }

        /// The jobs of one [`Harness::pass`].
        pub(super) fn pass_jobs(&mut self) -> Vec<Job> {
            self.pass().into_iter().map(|dispatch| dispatch.job).collect()
        }

        pub(super) fn finish(&mut self, dispatch: Dispatch) {
            self.settle.on_done(Done {
                dispatch,
                outcome: Outcome::Finished,
            });
        }
    }

    #[test]
    fn one_job_per_path_in_flight_and_later_changes_wait_for_it() {
        let mut harness = Harness::new();
        let path = harness.path("a.flac");
        harness.settle.on_closed(path.clone(), Instant::now());
        let first = harness.pass();
        assert_eq!(first.len(), 1);
        // The file changes again while the first job is in flight.
        harness.settle.on_closed(path.clone(), Instant::now());
        assert!(
            harness.pass().is_empty(),
            "a second job for the same path must wait"
        );
        harness.finish(first.into_iter().next().unwrap());
        let second = harness.pass();
        assert_eq!(second.len(), 1);
        assert_eq!(
            second[0].job,
            Job::Check {
                path,
                renamed_from: None
            }
        );
    }

    #[test]
    fn a_rename_waits_for_the_job_on_its_old_name() {
        let mut harness = Harness::new();
        let old = harness.path("a.flac");
        let new = harness.path("b.flac");
        harness.settle.on_closed(old.clone(), Instant::now());
        let in_flight = harness.pass();
        assert_eq!(in_flight.len(), 1);
        std::fs::write(&new, b"x").unwrap();
        harness.settle.on_rename(old.clone(), new.clone(), Instant::now());
        assert!(
            harness.pass().is_empty(),
            "the rename must wait for the job on the old name"
        );
        harness.finish(in_flight.into_iter().next().unwrap());
        let rename = harness.pass();
        assert_eq!(
            rename[0].job,
            Job::Check {
                path: new,
                renamed_from: Some(old)
            }
        );
    }

    #[test]
    fn jobs_below_a_renamed_directory_wait_for_the_directory_rename() {
        let mut harness = Harness::new();
        let from = harness.path("album");
        let to = harness.path("album2");
        std::fs::create_dir(&to).unwrap();
        // A blocker in flight on the old directory keeps the rename waiting ...
        harness.settle.on_closed(format!("{from}/1.flac"), Instant::now());
        let blocker = harness.pass();
        assert_eq!(blocker.len(), 1);
        harness
            .settle
            .on_directory_renamed(from.clone(), to.clone(), Instant::now());
        // ... and a change below the new name, ready later, must not overtake it.
        harness.settle.on_closed(format!("{to}/2.flac"), Instant::now());
        assert!(harness.pass().is_empty());
        harness.finish(blocker.into_iter().next().unwrap());
        let next = harness.pass();
        assert_eq!(
            next.iter()
                .map(|dispatch| dispatch.job.clone())
                .collect::<Vec<_>>(),
            [Job::RenameDirectory {
                from: from.clone(),
                to: to.clone()
            }],
            "the directory rename goes first, alone"
        );
        harness.finish(next.into_iter().next().unwrap());
        let after = harness.pass();
        assert_eq!(
            after[0].job,
            Job::Check {
                path: format!("{to}/2.flac"),
                renamed_from: None
            }
        );
    }

    #[test]
    fn a_vanished_file_that_was_renamed_is_followed_not_deleted() {
        let mut harness = Harness::new();
        let old = harness.path("a.flac");
        let new = harness.path("b.flac");
        harness.settle.on_closed(old.clone(), Instant::now());
        let check = harness.pass().into_iter().next().unwrap();
        // The rename happens while the check is in flight; the worker finds nothing.
        std::fs::write(&new, b"x").unwrap();
        harness.settle.on_rename(old.clone(), new.clone(), Instant::now());
        harness.settle.on_done(Done {
            dispatch: check,
            outcome: Outcome::Vanished,
        });
        let jobs: Vec<Job> = harness.pass_jobs();
        assert_eq!(
            jobs,
            [Job::Check {
                path: new,
                renamed_from: Some(old)
            }],
            "no deletion of the old name: the rename accounts for it"
        );
    }

    #[test]
    fn a_vanished_file_with_no_rename_becomes_a_removal() {
        let mut harness = Harness::new();
        let path = harness.path("a.flac");
        harness.settle.on_closed(path.clone(), Instant::now());
        let check = harness.pass().into_iter().next().unwrap();
        harness.settle.on_done(Done {
            dispatch: check,
            outcome: Outcome::Vanished,
        });
        let jobs: Vec<Job> = harness.pass_jobs();
        assert_eq!(jobs, [Job::Gone { path }]);
    }

    #[test]
    fn renamed_over_a_file_then_removed_removes_both_names() {
        // `mv a b; rm b` within one settle period: `b` may have been recorded
        // before the rename replaced it, so it goes as well as `a`.
        let mut harness = Harness::new();
        let (a, b) = (harness.path("a.flac"), harness.path("b.flac"));
        harness.settle.on_rename(a.clone(), b.clone(), Instant::now());
        harness.settle.mark_removed(b.clone(), Instant::now());
        let mut jobs: Vec<Job> = harness.pass_jobs();
        jobs.sort_by(|one, other| format!("{one:?}").cmp(&format!("{other:?}")));
        assert_eq!(jobs, [Job::Gone { path: a }, Job::Gone { path: b }]);
    }

    #[test]
    fn create_then_remove_before_settling_is_one_gone_job() {
        let mut harness = Harness::new();
        let path = harness.path("a.flac");
        harness.settle.on_closed(path.clone(), Instant::now());
        harness.settle.mark_removed(path.clone(), Instant::now());
        let jobs = harness.pass();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].job, Job::Gone { path });
    }

    #[test]
    fn a_registry_outage_holds_all_dispatch() {
        let mut harness = Harness::new();
        harness.settle.on_closed(harness.path("a.flac"), Instant::now());
        harness.settle.on_closed(harness.path("b.flac"), Instant::now());
        let jobs = harness.pass();
        assert_eq!(jobs.len(), 2);
        let mut jobs = jobs.into_iter();
        harness.settle.on_done(Done {
            dispatch: jobs.next().unwrap(),
            outcome: Outcome::Unavailable,
        });
        harness.settle.on_closed(harness.path("c.flac"), Instant::now());
        // Still within the hold (its backoff is at least 400 ms).
        let now = Instant::now();
        harness.settle.reschedule_touched();
        harness.settle.promote_due(now + Duration::from_millis(10));
        harness.settle.dispatch(now + Duration::from_millis(10));
        assert_eq!(
            harness.jobs.try_iter().count(),
            0,
            "nothing goes out while the registry is down"
        );
        // After the hold, the held job and the new one go out.
        harness.settle.dispatch(now + Duration::from_secs(5));
        assert_eq!(harness.jobs.try_iter().count(), 2);
    }

    #[test]
    fn an_unreadable_file_is_set_aside_until_its_attributes_change() {
        let mut harness = Harness::new();
        let path = harness.path("a.flac");
        let set_aside = |harness: &Harness| harness.settle.counters.set_aside.load(Ordering::SeqCst);
        // What a worker does: count the report, then hand it over.
        let report_unreadable = |harness: &mut Harness, dispatch: Dispatch| {
            harness.settle.counters.set_aside.fetch_add(1, Ordering::SeqCst);
            harness.settle.on_done(Done {
                dispatch,
                outcome: Outcome::Unreadable("Permission denied (os error 13)".into()),
            });
        };
        for _ in 0..2 {
            harness.settle.on_closed(path.clone(), Instant::now());
            let check = harness.pass().into_iter().next().unwrap();
            report_unreadable(&mut harness, check);
            assert!(harness.pass().is_empty(), "nothing to do until it changes");
            assert_eq!(set_aside(&harness), 1, "set aside once, however often reported");
        }
        // Attribute changes of other files are no news.
        let other = harness.path("b.flac");
        harness.settle.on_attributes_changed(other, Instant::now());
        assert!(harness.pass().is_empty());
        // Its own: looked at again, and forgotten once it could be read.
        harness.settle.on_attributes_changed(path.clone(), Instant::now());
        let check = harness.pass().into_iter().next().unwrap();
        assert_eq!(
            check.job,
            Job::Check {
                path: path.clone(),
                renamed_from: None
            }
        );
        harness.finish(check);
        assert_eq!(set_aside(&harness), 0);
        harness.settle.on_attributes_changed(path, Instant::now());
        assert!(harness.pass().is_empty(), "no longer set aside");
    }

    #[test]
    fn an_attribute_change_during_a_check_looks_again_after_it() {
        let mut harness = Harness::new();
        let path = harness.path("a.flac");
        harness.settle.on_closed(path.clone(), Instant::now());
        let check = harness.pass().into_iter().next().unwrap();
        // A chmod lands while the worker looks (it may have just failed).
        harness.settle.on_attributes_changed(path.clone(), Instant::now());
        assert!(harness.pass().is_empty(), "one job per path in flight");
        harness.finish(check);
        let again = harness.pass();
        assert_eq!(again.len(), 1);
        assert_eq!(
            again[0].job,
            Job::Check {
                path,
                renamed_from: None
            }
        );
    }
}
