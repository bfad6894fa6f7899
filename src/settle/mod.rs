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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, select, Receiver, Sender, TrySendError};
use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};
use notify::{Event, EventKind};
use uuid::Uuid;

use crate::backoff::RETRY;
use crate::config::WatchMode;
use crate::filter::Filter;
use crate::guard::RootGuard;
use crate::job::{Dispatch, Done, Job, Key, Outcome};
use crate::registry::rebase;
use crate::scan::{Discovery, ScanKind, ScanRequest};
use crate::watcher::{
    start_with_fallback, Callback, RawEvent, WatchCounters, Watcher, WATCH_LIMIT_POLL_INTERVAL,
};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Changed,
    Removed,
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// The writer is done with it: closed after writing, renamed into place,
    /// removed, discovered by a scan, or (poll mode) always.
    closed: bool,
    last_activity: Instant,
    /// Where the file was when it was last recorded, if it got here by rename.
    renamed_from: Option<String>,
    /// Not before this instant (a retry's backoff).
    not_before: Option<Instant>,
    attempt: u32,
    correlation_id: Uuid,
    /// Already in the ready queue.
    ready: bool,
    /// The earliest time a timer for this entry is queued for.
    scheduled: Instant,
}

impl Entry {
    fn new(state: State, now: Instant) -> Entry {
        Entry {
            state,
            closed: false,
            last_activity: now,
            renamed_from: None,
            not_before: None,
            attempt: 0,
            correlation_id: Uuid::new_v4(),
            ready: false,
            scheduled: now,
        }
    }
}

#[derive(Debug)]
enum ReadyItem {
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

/// A writer that keeps a file open without writing for this long is taken as
/// finished anyway (some tools never close, or write through mmap); a later
/// write produces a `modified`.
const OPEN_WRITER_TIMEOUT: Duration = Duration::from_secs(60);
/// When a new directory is walked the second time (see `schedule_scan`).
const SECOND_WALK: Duration = Duration::from_secs(5);
/// How long an unpaired "moved from" waits for its "moved to".
const RENAME_PAIRING: Duration = Duration::from_millis(100);
/// Upper bound on one wait, so counters and flags are looked at regularly.
const MAX_WAIT: Duration = Duration::from_millis(250);
/// How often the root's presence and identity are checked.
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(2);
/// Raw events handled per pass before timers and dispatch get a turn.
const RAW_BATCH: usize = 4096;
/// Ready items looked at per dispatch pass; keeps a huge backlog from making
/// every pass quadratic.
const DISPATCH_WINDOW: usize = 1024;

pub struct Settle {
    options: SettleOptions,
    root_text: String,
    channels: SettleChannels,
    counters: Arc<WatchCounters>,
    pending: HashMap<String, Entry>,
    /// When to look at an entry next (lazy: validated against the entry).
    timers: BinaryHeap<Reverse<(Instant, String)>>,
    ready: VecDeque<ReadyItem>,
    in_flight: HashMap<u64, Vec<Key>>,
    next_id: u64,
    /// A "moved from" waiting for its pair: (tracker, path, seen at).
    unpaired_from: Option<(usize, String, Instant)>,
    /// Directories to walk once their watch surely exists.
    delayed_scans: Vec<(Instant, PathBuf)>,
    full_scan_running: bool,
    full_scan_again: bool,
    /// Entries changed since the last pass (their deadlines may have moved).
    touched: Vec<String>,
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
        let root_text = options.root.to_string_lossy().into_owned();
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
            next_id: 0,
            unpaired_from: None,
            delayed_scans: Vec::new(),
            full_scan_running: false,
            full_scan_again: false,
            touched: Vec::new(),
            hold_until: None,
            outage_attempts: 0,
        }
    }

    /// Runs until `stop` closes.
    pub fn run(mut self) {
        if self.options.initial_scan {
            self.request_full_scan("start-up reconciliation");
        }
        loop {
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
                    self.on_discovery(discovery);
                },
                recv(self.channels.done) -> done => if let Ok(done) = done {
                    self.on_done(done);
                },
                recv(self.channels.stop) -> _ => break,
                default(wait) => {}
            }
            if self.counters.overflowed.swap(false, Ordering::AcqRel) {
                log::warn!(
                    "event channel was full: {} events dropped so far; rescanning the tree",
                    self.counters.dropped_events.load(Ordering::Relaxed)
                );
                self.request_full_scan("event channel overflow");
            }
            let now = Instant::now();
            if now >= self.next_watchdog {
                self.watchdog(now);
            }
            self.flush_unpaired_from(now, false);
            self.start_due_scans(now);
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
        if let Some((_, _, seen)) = &self.unpaired_from {
            next = next.min(*seen + RENAME_PAIRING);
        }
        for (at, _) in &self.delayed_scans {
            next = next.min(*at);
        }
        next
    }

    // ----- raw events -------------------------------------------------------

    fn on_raw(&mut self, raw: RawEvent) {
        match raw {
            RawEvent::Fs(event) => self.on_event(event),
            RawEvent::Error(error) => match error.kind {
                notify::ErrorKind::MaxFilesWatch => self.fall_back_to_polling(&format!(
                    "inotify watch limit reached while adding {:?}",
                    error.paths
                )),
                notify::ErrorKind::WatchNotFound | notify::ErrorKind::PathNotFound => {
                    log::debug!("watch already gone: {error}")
                }
                _ => log::warn!("watcher error: {error}"),
            },
        }
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        if event.need_rescan() {
            log::warn!("the kernel event queue overflowed: rescanning the tree");
            self.request_full_scan("kernel event queue overflow");
            return;
        }
        // A "moved from" stays unpaired unless the very next event is its "moved to".
        let pairs_with_from = matches!(
            event.kind,
            EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        ) && self
            .unpaired_from
            .as_ref()
            .is_some_and(|(tracker, _, _)| event.attrs.tracker() == Some(*tracker));
        if !pairs_with_from {
            self.flush_unpaired_from(now, true);
        }
        let poll = matches!(self.options.mode, WatchMode::Poll(_));
        let paths: Vec<String> = event.paths.iter().filter_map(|path| self.inside(path)).collect();
        let mut paths = paths.into_iter();
        match event.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                let (Some(from), Some(to)) = (paths.next(), paths.next()) else {
                    return;
                };
                self.unpaired_from = None;
                self.on_rename(from, to, now);
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                if let (Some(path), Some(tracker)) = (paths.next(), event.attrs.tracker()) {
                    self.unpaired_from = Some((tracker, path, now));
                } else if let Some(path) = paths.next() {
                    // MOVE_SELF of a watched directory: its parent reports the rename.
                    log::debug!("{path} moved (no tracker)");
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                if pairs_with_from {
                    return; // the Both event that follows carries both names
                }
                if let Some(path) = paths.next() {
                    self.on_moved_in(path, now);
                }
            }
            EventKind::Create(CreateKind::Folder) => {
                if let Some(path) = paths.next().filter(|path| !self.excluded(path)) {
                    self.schedule_scan(PathBuf::from(path), now);
                }
            }
            EventKind::Create(_) | EventKind::Modify(_) => {
                for path in paths {
                    if poll && Path::new(&path).is_dir() {
                        continue; // the poll watcher walks new directories itself
                    }
                    self.on_write(path, poll, now);
                }
            }
            EventKind::Access(_) => {
                // Only close-after-write reaches us (the callback filters the rest).
                for path in paths {
                    if self.announces(&path) {
                        self.on_closed(path, now);
                    }
                }
            }
            EventKind::Remove(RemoveKind::Folder) => {
                for path in paths {
                    if !self.excluded(&path) {
                        self.on_tree_gone(path, now);
                    }
                }
            }
            EventKind::Remove(_) => {
                for path in paths {
                    if path == self.root_text {
                        self.watchdog(now);
                    } else if self.announces(&path) || self.pending.contains_key(&path) {
                        self.mark_removed(path, now);
                    }
                }
            }
            EventKind::Any | EventKind::Other => {}
        }
    }

    /// The path as UTF-8 text, if it is inside the watched tree (exclusion is
    /// decided later: a rename from an excluded name is still news).
    fn inside(&self, path: &Path) -> Option<String> {
        path.strip_prefix(&self.options.root).ok()?;
        match path.to_str() {
            Some(text) => Some(text.to_owned()),
            None => {
                log::warn!("ignoring {}: the path is not valid UTF-8", path.display());
                None
            }
        }
    }

    /// True for the root itself, and for paths with an excluded component.
    fn excluded(&self, path: &str) -> bool {
        Path::new(path)
            .strip_prefix(&self.options.root)
            .map_or(true, |relative| {
                relative.as_os_str().is_empty() || self.options.filter.excludes(relative)
            })
    }

    fn announces(&self, path: &str) -> bool {
        Path::new(path)
            .strip_prefix(&self.options.root)
            .is_ok_and(|relative| !relative.as_os_str().is_empty() && self.options.filter.announces(relative))
    }

    /// The entry for `path`, created if new, with its activity time set to
    /// `now`. Callers change it in place; `reschedule_touched` then makes sure
    /// a timer fires at its (possibly earlier) deadline.
    fn touch(&mut self, path: String, now: Instant) -> &mut Entry {
        if !self.pending.contains_key(&path) && self.pending.len() >= self.options.max_pending {
            self.shed_pending();
        }
        self.touched.push(path.clone());
        let entry = self.pending.entry(path).or_insert_with(|| {
            let mut entry = Entry::new(State::Changed, now);
            entry.scheduled = now + OPEN_WRITER_TIMEOUT * 2; // no timer queued yet
            entry
        });
        entry.last_activity = now;
        entry
    }

    /// A close or a cleared backoff moves a deadline earlier than the timer
    /// already queued: queue one for the new deadline.
    fn reschedule_touched(&mut self) {
        let settle = self.settle_time();
        for path in std::mem::take(&mut self.touched) {
            let Some(entry) = self.pending.get_mut(&path) else {
                continue;
            };
            let deadline = deadline(entry, settle);
            if !entry.ready && deadline < entry.scheduled {
                entry.scheduled = deadline;
                self.timers.push(Reverse((deadline, path)));
            }
        }
    }

    /// Data was written (or, polling, the file changed since the last poll).
    fn on_write(&mut self, path: String, poll: bool, now: Instant) {
        if !self.announces(&path) {
            return;
        }
        let entry = self.touch(path, now);
        entry.state = State::Changed;
        // A write after a close means the file was opened again: wait for the next close.
        entry.closed = poll;
    }

    fn on_closed(&mut self, path: String, now: Instant) {
        let entry = self.touch(path, now);
        entry.state = State::Changed;
        entry.closed = true;
    }

    fn mark_removed(&mut self, path: String, now: Instant) {
        if let Some(from) = self
            .pending
            .get(&path)
            .and_then(|entry| entry.renamed_from.clone())
        {
            // It was renamed here and never recorded here: the old name goes,
            // and so does whatever was recorded here before the rename replaced it.
            self.pending.remove(&path);
            self.mark_removed(from, now);
        }
        let entry = self.touch(path, now);
        entry.state = State::Removed;
        entry.closed = true;
    }

    /// A file was gone when a worker looked. If a pending rename starts at
    /// it, the rename accounts for it; otherwise it (and where it was renamed
    /// from) is removed, after the usual settle period.
    fn on_vanished(&mut self, path: String, renamed_from: Option<String>, now: Instant) {
        let claimed = |candidate: &str| {
            self.pending
                .values()
                .any(|entry| entry.renamed_from.as_deref() == Some(candidate))
        };
        if self.pending.contains_key(&path) || claimed(&path) {
            return;
        }
        if let Some(from) = renamed_from {
            if !claimed(&from) {
                self.mark_removed(from, now);
            }
        }
        self.mark_removed(path, now);
    }

    fn on_rename(&mut self, from: String, to: String, now: Instant) {
        let to_is_directory = match std::fs::symlink_metadata(&to) {
            Ok(metadata) => metadata.is_dir(),
            // Renamed again before we looked (A → B → C): a name we would not
            // announce as a file is taken as a directory. If it was not one,
            // the registry holds nothing below it and the rename is a no-op.
            Err(_) => !self.announces(&from) && !self.announces(&to),
        };
        if to_is_directory {
            self.on_directory_renamed(from, to, now);
            return;
        }
        match (self.announces(&from), self.announces(&to)) {
            (true, true) => {
                let carried = self.pending.remove(&from);
                let renamed_from = carried
                    .as_ref()
                    .map_or(Some(from.clone()), |entry| {
                        entry.renamed_from.clone().or(Some(from.clone()))
                    })
                    .filter(|original| *original != to);
                let correlation_id = carried.map(|entry| entry.correlation_id);
                let entry = self.touch(to, now);
                entry.state = State::Changed;
                entry.closed = true;
                entry.renamed_from = renamed_from;
                if let Some(correlation_id) = correlation_id {
                    entry.correlation_id = correlation_id;
                }
            }
            // `.x.flac.AbC123` → `x.flac`: the file is finished at its new name.
            (false, true) => self.on_closed(to, now),
            // `x.flac` → `x.flac.bak`: gone as far as consumers are concerned.
            (true, false) => self.mark_removed(from, now),
            (false, false) => {}
        }
    }

    fn on_directory_renamed(&mut self, from: String, to: String, now: Instant) {
        // A directory entering or leaving the excluded names behaves like a move in or out.
        match (!self.excluded(&from), !self.excluded(&to)) {
            (true, true) => {}
            (true, false) => return self.on_tree_gone(from, now),
            (false, true) => return self.schedule_scan(PathBuf::from(to), now),
            (false, false) => return,
        }
        // Pending entries below the old name follow it. The registry moves the
        // rows of recorded files itself (RenameDirectory), so only renames that
        // started below the old name are rebased, not created.
        let moved: Vec<String> = self
            .pending
            .keys()
            .filter(|path| rebase(path, &from, "").is_some())
            .cloned()
            .collect();
        for old_path in moved {
            let mut entry = self.pending.remove(&old_path).expect("key listed above");
            if let Some(renamed_from) = &entry.renamed_from {
                if let Some(rebased) = rebase(renamed_from, &from, &to) {
                    entry.renamed_from = Some(rebased);
                }
            }
            let new_path = rebase(&old_path, &from, &to).expect("filtered above");
            entry.ready = false;
            entry.scheduled = now + self.settle_time();
            self.timers.push(Reverse((entry.scheduled, new_path.clone())));
            self.pending.insert(new_path, entry);
        }
        for item in self.ready.iter_mut() {
            if let ReadyItem::Path(path) = item {
                if let Some(rebased) = rebase(path, &from, &to) {
                    *path = rebased;
                }
            }
        }
        self.ready.push_back(ReadyItem::Tree {
            job: Job::RenameDirectory { from, to: to.clone() },
            correlation_id: Uuid::new_v4(),
            attempt: 0,
            not_before: None,
        });
        // Watches are re-added by notify; what was written in between is found by this walk.
        self.schedule_scan(PathBuf::from(to), now);
    }

    fn on_moved_in(&mut self, path: String, now: Instant) {
        if std::fs::symlink_metadata(&path).is_ok_and(|metadata| metadata.is_dir()) {
            self.schedule_scan(PathBuf::from(path), now);
        } else if self.announces(&path) {
            self.on_closed(path, now);
        }
    }

    /// `path` (a file or a directory) is no longer in the tree.
    fn on_tree_gone(&mut self, path: String, now: Instant) {
        let below: Vec<String> = self
            .pending
            .keys()
            .filter(|pending| **pending == path || rebase(pending, &path, "").is_some())
            .cloned()
            .collect();
        for pending in below {
            let entry = self.pending.remove(&pending).expect("key listed above");
            if let Some(original) = entry.renamed_from {
                if original != path && rebase(&original, &path, "").is_none() {
                    self.mark_removed(original, now);
                }
            }
        }
        self.ready.push_back(ReadyItem::Tree {
            job: Job::GoneTree { path },
            correlation_id: Uuid::new_v4(),
            attempt: 0,
            not_before: None,
        });
    }

    /// A "moved from" whose "moved to" never came: the file or directory left the tree.
    fn flush_unpaired_from(&mut self, now: Instant, force: bool) {
        let expired = self
            .unpaired_from
            .as_ref()
            .is_some_and(|(_, _, seen)| force || now.duration_since(*seen) >= RENAME_PAIRING);
        if expired {
            let (_, path, _) = self.unpaired_from.take().expect("checked above");
            self.on_tree_gone(path, now);
        }
    }

    // ----- the root ---------------------------------------------------------

    /// Looks at the root: gone (an unmounted share, a removed directory), or
    /// back under a new identity (remounted): then the old watches are dead,
    /// so the watcher is restarted and the tree rescanned to catch up.
    fn watchdog(&mut self, now: Instant) {
        self.next_watchdog = now + WATCHDOG_INTERVAL;
        let current = self.guard.current();
        match self.guard.check() {
            Ok(()) => {
                if std::mem::take(&mut self.root_unavailable) {
                    log::info!(
                        "watched directory {} is available again: catching up",
                        self.root_text
                    );
                    self.restart_watcher("the watched directory came back");
                }
            }
            // Back, but as another directory (remounted, recreated): the old watches are dead.
            Err(_)
                if current.is_some()
                    && current != self.guard.expected()
                    && self.sentinel_present()
                    && !self.guard.looks_unmounted() =>
            {
                log::info!(
                    "watched directory {} was remounted or replaced: watching it again and catching up",
                    self.root_text
                );
                self.root_unavailable = false;
                self.guard.accept(current);
                self.restart_watcher("the watched directory was remounted");
            }
            Err(reason) => {
                if !self.root_unavailable {
                    self.root_unavailable = true;
                    log::error!(
                        "watched directory unavailable: {reason}; publishing no deletions until it is back"
                    );
                }
            }
        }
    }

    fn sentinel_present(&self) -> bool {
        self.options
            .sentinel
            .as_ref()
            .is_none_or(|sentinel| std::fs::symlink_metadata(sentinel).is_ok())
    }

    /// A directory appeared (created, renamed, moved in): watch it and
    /// everything below it before it is walked.
    fn watch_tree(&mut self, dir: &Path) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        if let Err(error) = watcher.watch_tree(dir) {
            self.fall_back_to_polling(&error);
        }
    }

    /// inotify ran out of watches: poll the whole tree rather than leave
    /// part of it unwatched, and rescan to catch what was missed.
    fn fall_back_to_polling(&mut self, reason: &dyn std::fmt::Display) {
        log::error!(
            "{reason}; raise it with `sysctl fs.inotify.max_user_watches=524288` (persist it in \
             /etc/sysctl.d); polling the tree every {} s until then (restart after raising it)",
            WATCH_LIMIT_POLL_INTERVAL.as_secs()
        );
        self.options.mode = WatchMode::Poll(WATCH_LIMIT_POLL_INTERVAL);
        self.restart_watcher("inotify watch limit reached");
    }

    fn restart_watcher(&mut self, reason: &str) {
        self.watcher = None;
        let sender = self.raw_sender.clone();
        let counters = self.counters.clone();
        let started = start_with_fallback(
            &self.options.root,
            self.options.mode,
            &self.options.filter,
            |poll| Callback::new(sender.clone(), counters.clone(), poll),
        );
        match started {
            Ok((watcher, mode)) => {
                self.watcher = Some(watcher);
                self.options.mode = mode;
                self.request_full_scan(reason);
            }
            Err(error) => {
                log::error!("{error}; trying again in {} s", WATCHDOG_INTERVAL.as_secs());
                self.root_unavailable = true;
            }
        }
    }

    // ----- scans ------------------------------------------------------------

    /// New directories are walked one settle period later: by then notify has
    /// added their watch, so anything written after the walk raises events
    /// and anything written before it is found by the walk.
    ///
    /// notify adds a new directory's watch only once it has drained the
    /// kernel queue, which under a sustained stream of events can take longer
    /// than the settle time; a second walk a few seconds later finds what was
    /// written before the watch existed. Files found twice cost a `stat`.
    fn schedule_scan(&mut self, dir: PathBuf, now: Instant) {
        self.watch_tree(&dir);
        self.delayed_scans.push((now + self.settle_time(), dir.clone()));
        self.delayed_scans
            .push((now + self.settle_time() + SECOND_WALK, dir));
    }

    fn start_due_scans(&mut self, now: Instant) {
        let (due, waiting): (Vec<_>, Vec<_>) = self.delayed_scans.drain(..).partition(|(at, _)| *at <= now);
        self.delayed_scans = waiting;
        for (_, dir) in due {
            let request = ScanRequest {
                dir,
                kind: ScanKind::Directory,
            };
            let _ = self.channels.scan_requests.send(request);
        }
    }

    fn request_full_scan(&mut self, reason: &str) {
        if self.full_scan_running {
            self.full_scan_again = true;
            return;
        }
        log::info!("full scan of {} ({reason})", self.root_text);
        self.full_scan_running = true;
        let request = ScanRequest {
            dir: self.options.root.clone(),
            kind: ScanKind::Full,
        };
        let _ = self.channels.scan_requests.send(request);
    }

    fn on_discovery(&mut self, discovery: Discovery) {
        let now = Instant::now();
        match discovery {
            Discovery::File(path) => {
                // Known pending entries keep their own state; new ones are checked.
                if !self.pending.contains_key(&path) {
                    let entry = self.touch(path, now);
                    entry.closed = true;
                }
            }
            Discovery::Finished {
                request,
                files,
                failed,
            } => {
                if request.kind != ScanKind::Full {
                    return;
                }
                self.full_scan_running = false;
                log::info!("full scan of {} found {files} files", self.root_text);
                if failed {
                    log::error!(
                        "cannot read {}: skipping the sweep for vanished files",
                        self.root_text
                    );
                } else {
                    self.ready.push_back(ReadyItem::Tree {
                        job: Job::Sweep {
                            dir: self.root_text.clone(),
                            files_found: files,
                        },
                        correlation_id: Uuid::new_v4(),
                        attempt: 0,
                        not_before: None,
                    });
                }
                if std::mem::take(&mut self.full_scan_again) {
                    self.request_full_scan("changes were dropped during the last scan");
                }
            }
        }
    }

    /// Too much pending: drop it all and let a full scan and sweep recover.
    fn shed_pending(&mut self) {
        log::warn!(
            "more than {} changes pending: dropping them and rescanning the tree instead",
            self.options.max_pending
        );
        self.pending.clear();
        self.timers.clear();
        self.ready.retain(|item| matches!(item, ReadyItem::Tree { .. }));
        self.request_full_scan("too many pending changes");
    }

    // ----- dispatch ---------------------------------------------------------

    fn promote_due(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, path)) = self.timers.pop().expect("peeked");
            let Some(entry) = self.pending.get(&path) else {
                continue; // dispatched or dropped since
            };
            if entry.ready {
                continue;
            }
            let deadline = deadline(entry, self.settle_time());
            if deadline > now {
                self.pending.get_mut(&path).expect("looked up above").scheduled = deadline;
                self.timers.push(Reverse((deadline, path)));
                continue;
            }
            self.pending.get_mut(&path).expect("looked up above").ready = true;
            self.ready.push_back(ReadyItem::Path(path));
        }
    }

    /// Hands ready jobs to the workers, oldest first. A job whose keys
    /// overlap a job in flight, or an older job still waiting, is skipped (and
    /// blocks its keys for the rest of the pass, which keeps per-path order).
    /// Only a window at the front of the queue is looked at, and the rest is
    /// never moved, so a pass costs the same with ten or a million ready jobs.
    fn dispatch(&mut self, now: Instant) {
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

    fn on_done(&mut self, done: Done) {
        let now = Instant::now();
        self.in_flight.remove(&done.dispatch.id);
        let Dispatch {
            job,
            correlation_id,
            attempt,
            ..
        } = done.dispatch;
        let (retry_after, changing) = match done.outcome {
            Outcome::Finished => {
                self.outage_attempts = 0;
                if let Job::Sweep { dir, files_found } = &job {
                    log::info!(
                        "catch-up complete: {dir} scanned ({files_found} files) and the registry swept; \
                         changes found are being recorded and published"
                    );
                }
                return;
            }
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
                let entry = self.touch(path, now);
                if !fresher {
                    entry.state = State::Changed;
                    entry.closed = true;
                    entry.correlation_id = correlation_id;
                }
                // The rename was not recorded yet: whatever came later, it still has to be.
                if entry.renamed_from.is_none() {
                    entry.renamed_from = renamed_from;
                }
                entry.not_before = retry_after;
                entry.attempt = if changing { 0 } else { attempt + 1 };
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
            job @ (Job::GoneTree { .. } | Job::RenameDirectory { .. } | Job::Sweep { .. }) => {
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

/// When an entry is ready: quiet for the settle time after the writer closed
/// it (or for `OPEN_WRITER_TIMEOUT` while it stays open), and not before a
/// retry's backoff.
fn deadline(entry: &Entry, settle: Duration) -> Instant {
    let quiet = if entry.closed { settle } else { OPEN_WRITER_TIMEOUT };
    let settled = entry.last_activity + quiet;
    entry
        .not_before
        .map_or(settled, |not_before| not_before.max(settled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{bounded, unbounded, Receiver};

    /// A settle stage on a real (empty) temporary tree, driven by hand.
    struct Harness {
        settle: Settle,
        jobs: Receiver<Dispatch>,
        root: String,
        _dir: tempfile::TempDir,
        _keep: Vec<Box<dyn std::any::Any>>,
    }

    impl Harness {
        fn new() -> Harness {
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

        fn path(&self, name: &str) -> String {
            format!("{}/{name}", self.root)
        }

        /// One pass of the loop's bookkeeping, far enough in the future that
        /// every settle deadline has passed.
        fn pass(&mut self) -> Vec<Dispatch> {
            let later = Instant::now() + Duration::from_secs(1);
            self.settle.reschedule_touched();
            self.settle.promote_due(later);
            self.settle.dispatch(later);
            self.jobs.try_iter().collect()
        }

        fn finish(&mut self, dispatch: Dispatch) {
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
        let jobs: Vec<Job> = harness.pass().into_iter().map(|dispatch| dispatch.job).collect();
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
        let jobs: Vec<Job> = harness.pass().into_iter().map(|dispatch| dispatch.job).collect();
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
        let mut jobs: Vec<Job> = harness.pass().into_iter().map(|dispatch| dispatch.job).collect();
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
}
