//! The notify side: kernel (or poll) events into a bounded channel, never blocking.
//!
//! notify runs its own thread and calls [`Callback::handle`] for every event.
//! That thread must never wait on us: while it waits, the kernel's inotify
//! queue fills and overflows, and events are lost where nobody can see it.
//!
//! **Full-channel policy.** The callback uses `try_send`. When the channel is
//! full the event is dropped, a shared `overflowed` flag is raised and the
//! drop is counted; the settle stage sees the flag and rescans the whole tree,
//! which recovers every change the dropped events described (the same path
//! the kernel's own queue overflow takes). Access events (open, close without
//! write, reads caused by our own hashing) are filtered here, before they can
//! take a slot, and so are attribute changes (touch, chmod, chown) while
//! nothing is set aside as unreadable: only then can a permission change be
//! news (see [`WatchCounters::set_aside`]), and a `chmod -R` of a healthy
//! tree costs nothing.
//!
//! The rest of the watch stage lives beside it: [`guard`] tells whether the
//! tree is still the one being watched (an unmounted share must not read as
//! mass deletion), and [`scan`] walks directories for the settle stage.

pub mod guard;
pub mod scan;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, PollWatcher, RecommendedWatcher, RecursiveMode, Watcher as _};

use self::guard::Identity;
use crate::config::WatchMode;
use crate::filter::Filter;

/// The log target these lines had before the layout move, kept so that log
/// lines (and anyone's filters on them) stay the same.
const LOG_TARGET: &str = "file_watcher::watcher";

/// Events between notify's thread and the settle stage.
pub const CHANNEL_CAPACITY: usize = 16 * 1024;

/// What the notify thread hands to the settle stage.
#[derive(Debug)]
pub enum RawEvent {
    Fs(Event),
    /// notify reported an error (e.g. the inotify watch limit was reached).
    Error(notify::Error),
}

/// Counters shared between the callback and the settle stage; one set per
/// pipeline, handed to every callback it makes (watcher restarts included).
#[derive(Debug, Default)]
pub struct WatchCounters {
    /// Raised when an event was dropped on a full channel; the settle stage
    /// clears it and rescans.
    pub overflowed: AtomicBool,
    pub dropped_events: AtomicU64,
    /// Files and directories set aside as unreadable, plus workers' reports
    /// of them on their way to the settle stage (a worker counts its report
    /// before it looks at the file a last time, so a `chmod` right after that
    /// look is let through). While non-zero, attribute changes reach the
    /// settle stage, which rechecks what was set aside when its permissions
    /// change; at zero they are dropped in the callback.
    pub set_aside: AtomicUsize,
    /// Test hook, `None` unless the pipeline was given one (see
    /// [`WatchCounters::with_test_stall_file`]). It rides here, not on
    /// [`Callback::new`], because this is what every callback of one
    /// pipeline shares, including the ones the settle stage makes when it
    /// restarts the watcher.
    test_stall_file: Option<PathBuf>,
    /// Events notify reported, by kind ([`EVENT_KINDS`] names the slots),
    /// before any filtering; exported as metrics.
    pub events_seen: [AtomicU64; EVENT_KINDS.len()],
    /// Full rescans the settle stage started (start-up, overflow, root back).
    pub rescans: AtomicU64,
    /// Times the event channel overflowed and a rescan had to recover.
    pub overflows: AtomicU64,
    /// Paths the settle stage holds, set on each turn of its loop.
    pub pending_paths: AtomicU64,
    /// Whether the tree is polled (configured, or the inotify fallback).
    pub polling: AtomicBool,
    /// Set once the start-up scan (if any) is done and everything it found
    /// has been handled: catch-up is complete (for `/readyz`).
    pub caught_up: AtomicBool,
    /// The settle stage's last loop turn, as [`crate::observe::health::stamp`].
    pub settle_alive: AtomicU64,
}

/// The kinds of notify event counted in [`WatchCounters::events_seen`], as
/// metric labels, in slot order.
pub const EVENT_KINDS: [&str; 8] = [
    "create",
    "modify",
    "close_write",
    "attributes",
    "rename",
    "remove",
    "access",
    "other",
];

/// The slot of `kind` in [`WatchCounters::events_seen`].
pub fn event_kind_slot(kind: &EventKind) -> usize {
    match kind {
        EventKind::Create(_) => 0,
        EventKind::Modify(ModifyKind::Metadata(_)) => 3,
        EventKind::Modify(ModifyKind::Name(_)) => 4,
        EventKind::Modify(_) => 1,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => 2,
        EventKind::Access(_) => 6,
        EventKind::Remove(_) => 5,
        EventKind::Any | EventKind::Other => 7,
    }
}

impl WatchCounters {
    /// Test hook: counters whose callbacks stall while `file` exists (see
    /// `stall_while_present`). Only the pipeline passes one, from
    /// [`Config::test_stall_file`](crate::config::Config::test_stall_file);
    /// `WatchCounters::default()` never stalls.
    pub fn with_test_stall_file(file: Option<PathBuf>) -> WatchCounters {
        WatchCounters {
            test_stall_file: file,
            ..WatchCounters::default()
        }
    }
}

/// The notify event handler. Public so the full-channel policy can be tested.
pub struct Callback {
    sender: Sender<RawEvent>,
    counters: Arc<WatchCounters>,
    poll_mode: bool,
}

impl Callback {
    pub fn new(sender: Sender<RawEvent>, counters: Arc<WatchCounters>, poll_mode: bool) -> Callback {
        Callback {
            sender,
            counters,
            poll_mode,
        }
    }

    pub fn handle(&self, result: notify::Result<Event>) {
        if let Some(stall_file) = &self.counters.test_stall_file {
            stall_while_present(stall_file);
        }
        if let Ok(event) = &result {
            self.counters.events_seen[event_kind_slot(&event.kind)].fetch_add(1, Ordering::Relaxed);
        }
        let raw = match result {
            Ok(event) if !self.is_activity(&event) => return,
            Ok(event) => RawEvent::Fs(event),
            Err(error) => RawEvent::Error(error),
        };
        match self.sender.try_send(raw) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.counters.dropped_events.fetch_add(1, Ordering::Relaxed);
                self.counters.overflowed.store(true, Ordering::Release);
            }
            // The settle stage has stopped: we are shutting down.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Only real activity counts: create, data modification, close after
    /// write, rename, remove and rescan requests. In poll mode a changed mtime
    /// arrives as a metadata change, so it counts there; with inotify,
    /// attribute changes count while something is set aside as unreadable.
    fn is_activity(&self, event: &Event) -> bool {
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            EventKind::Modify(ModifyKind::Metadata(_)) => {
                self.poll_mode || self.counters.set_aside.load(Ordering::SeqCst) > 0
            }
            _ => true,
        }
    }
}

/// Test-only: while `file` exists, the notify thread sleeps before handing
/// over each event, as a stuck consumer would. Lets tests overflow the kernel
/// queue without touching the machine-wide `max_queued_events` sysctl.
fn stall_while_present(file: &Path) {
    while file.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Owns the notify watcher; dropping it stops notify's thread and with it the
/// sender side of the raw-event channel.
///
/// With inotify, every directory that is not excluded gets a watch of its
/// own (non-recursive): excluded directories such as `@eaDir` are never
/// watched, so their churn costs neither watches nor events. New directories
/// get their watches from the settle stage ([`Watcher::watch_tree`]) before
/// they are walked, so nothing written into them is missed. Polling watches
/// the whole tree recursively (it has no watches to spare) and the settle
/// stage drops events for excluded names.
///
/// **Watches follow directories, not names.** notify maps each watch to the
/// name the directory had when it was watched; when the rename of a
/// directory is lost (a queue overflow), events inside it keep arriving
/// under the old name, and a directory created meanwhile has no watch at
/// all. So the watcher remembers which directory (device, inode) each watch
/// was made for: a full rescan reports every directory it enters
/// ([`Watcher::is_watched`] says whether it needs a watch), watching a
/// directory that is still watched under another name drops that name
/// first, and [`Watcher::prune`] drops the names whose directory is gone.
/// Afterwards there is one watch per directory of the tree.
pub struct Watcher {
    inner: Box<dyn notify::Watcher + Send>,
    mode: WatchMode,
    root: PathBuf,
    /// Shared so that a walk can borrow it while the watcher changes.
    filter: Arc<Filter>,
    /// Directories that could not be watched (permission denied, an I/O
    /// error) since the settle stage last took them, with the reason.
    unwatchable: Vec<(PathBuf, String)>,
    /// Inotify only: every name watched, and the directory it was watched for.
    watched: HashMap<PathBuf, Identity>,
    /// The other way round: which name each watched directory is watched under.
    names: HashMap<Identity, PathBuf>,
}

/// The command that raises the inotify watch limit: the one advice every
/// message about the limit gives (OPERATIONS.md too; a test keeps it in step).
pub const WATCH_LIMIT_SYSCTL: &str = "sysctl fs.inotify.max_user_watches=524288";

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "cannot watch {path}: the inotify watch limit is reached; raise it with \
         `{sysctl}` (and persist it in /etc/sysctl.d), \
         or set POLL_INTERVAL_MS to poll instead",
        sysctl = WATCH_LIMIT_SYSCTL
    )]
    WatchLimit { path: PathBuf },
    #[error("cannot watch {path}: {source}")]
    Notify { path: PathBuf, source: notify::Error },
}

impl WatchError {
    fn from_notify(path: &Path, source: notify::Error) -> WatchError {
        match source.kind {
            notify::ErrorKind::MaxFilesWatch => WatchError::WatchLimit {
                path: path.to_owned(),
            },
            _ => WatchError::Notify {
                path: path.to_owned(),
                source,
            },
        }
    }
}

impl Watcher {
    /// Starts watching the tree at `root`, without following symlinks.
    pub fn start(
        root: &Path,
        mode: WatchMode,
        filter: &Filter,
        callback: Callback,
    ) -> Result<Watcher, WatchError> {
        let handler = move |result: notify::Result<Event>| callback.handle(result);
        let inner: Box<dyn notify::Watcher + Send> = match mode {
            WatchMode::Inotify => Box::new(
                RecommendedWatcher::new(handler, notify::Config::default().with_follow_symlinks(false))
                    .map_err(|source| WatchError::from_notify(root, source))?,
            ),
            WatchMode::Poll(interval) => Box::new(
                PollWatcher::new(
                    handler,
                    notify::Config::default()
                        .with_poll_interval(interval)
                        .with_follow_symlinks(false),
                )
                .map_err(|source| WatchError::from_notify(root, source))?,
            ),
        };
        let mut watcher = Watcher {
            inner,
            mode,
            root: root.to_owned(),
            filter: Arc::new(filter.clone()),
            unwatchable: Vec::new(),
            watched: HashMap::new(),
            names: HashMap::new(),
        };
        match mode {
            WatchMode::Inotify => watcher.watch_tree(root)?,
            WatchMode::Poll(_) => watcher
                .inner
                .watch(root, RecursiveMode::Recursive)
                .map_err(|source| WatchError::from_notify(root, source))?,
        }
        Ok(watcher)
    }

    /// Watches `dir` and every directory below it that is not excluded (a
    /// no-op when polling, which covers the whole tree already). Directories
    /// that vanish meanwhile are skipped.
    pub fn watch_tree(&mut self, dir: &Path) -> Result<(), WatchError> {
        if matches!(self.mode, WatchMode::Poll(_)) {
            return Ok(());
        }
        let (root, filter) = (self.root.clone(), Arc::clone(&self.filter));
        // Each directory is watched as soon as the walk meets it, before the
        // walk goes into it: a subdirectory made meanwhile raises an event.
        for entry in scan::tree_walk(&root, &filter, dir).flatten() {
            if !entry.file_type().is_dir() {
                continue;
            }
            let Ok(metadata) = entry.metadata() else {
                continue; // gone meanwhile
            };
            let (path, identity) = (entry.into_path(), (metadata.dev(), metadata.ino()));
            self.forget_other_name(identity, &path);
            match self.inner.watch(&path, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    if let Some(before) = self.watched.insert(path.clone(), identity) {
                        if before != identity {
                            self.names.remove(&before);
                        }
                    }
                    self.names.insert(identity, path);
                }
                Err(error) => match WatchError::from_notify(&path, error) {
                    limit @ WatchError::WatchLimit { .. } => return Err(limit),
                    WatchError::Notify { path, source } => match source.kind {
                        notify::ErrorKind::Io(error) if error.kind() != std::io::ErrorKind::NotFound => {
                            self.unwatchable.push((path, error.to_string()));
                        }
                        // Gone between the walk and the watch: its removal raised events.
                        _ => log::debug!(target: LOG_TARGET, "not watching {}: {source}", path.display()),
                    },
                },
            }
        }
        Ok(())
    }

    /// True when the directory `identity` at `dir` is watched under that
    /// name (always true when polling, which covers the whole tree).
    pub fn is_watched(&self, dir: &Path, identity: Identity) -> bool {
        matches!(self.mode, WatchMode::Poll(_)) || self.watched.get(dir) == Some(&identity)
    }

    /// Before `dir` is watched as the directory `identity`: if that
    /// directory is still watched under another name (it was renamed and
    /// the event lost), that watch goes first. The kernel keeps one watch
    /// per directory, so watching the new name would reuse it, and dropping
    /// the old name later would then drop the new one's watch with it.
    fn forget_other_name(&mut self, identity: Identity, dir: &Path) {
        let Some(other) = self
            .names
            .get(&identity)
            .filter(|other| other.as_path() != dir)
            .cloned()
        else {
            return;
        };
        log::debug!(
            target: LOG_TARGET,
            "{} is now {}: watching it under its new name",
            other.display(),
            dir.display()
        );
        self.unwatch(&other);
    }

    /// Stops watching the name `dir` (notify may have dropped it already,
    /// after a "moved from" or a removal).
    fn unwatch(&mut self, dir: &Path) {
        if let Some(identity) = self.watched.remove(dir) {
            if self.names.get(&identity).is_some_and(|name| name == dir) {
                self.names.remove(&identity);
            }
        }
        if let Err(error) = self.inner.unwatch(dir) {
            log::debug!(target: LOG_TARGET, "unwatching {}: {error}", dir.display());
        }
    }

    /// After a full rescan: drops the watches of names that are no longer
    /// the directory they were watched for (removed, renamed away, replaced).
    /// Returns how many were dropped and how many remain.
    pub fn prune(&mut self) -> (usize, usize) {
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(dir, identity)| {
                let now = std::fs::symlink_metadata(dir)
                    .ok()
                    .filter(std::fs::Metadata::is_dir)
                    .map(|metadata| (metadata.dev(), metadata.ino()));
                now != Some(**identity)
            })
            .map(|(dir, _)| dir.clone())
            .collect();
        for dir in &stale {
            self.unwatch(dir);
        }
        (stale.len(), self.watched.len())
    }

    /// The directories that could not be watched since the last call (see
    /// `watch_tree`), for the settle stage to set aside.
    pub fn take_unwatchable(&mut self) -> Vec<(PathBuf, String)> {
        std::mem::take(&mut self.unwatchable)
    }
}

/// Polling interval used when the inotify watch limit leaves no other way.
pub const WATCH_LIMIT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Starts watching in `mode`; when inotify runs out of watches, says so with
/// the sysctl to raise and polls the tree instead, so nothing is silently
/// left unwatched. Returns the mode actually in use.
pub fn start_with_fallback(
    root: &Path,
    mode: WatchMode,
    filter: &Filter,
    callback: impl Fn(bool) -> Callback,
) -> Result<(Watcher, WatchMode), WatchError> {
    let poll = matches!(mode, WatchMode::Poll(_));
    match Watcher::start(root, mode, filter, callback(poll)) {
        Ok(watcher) => Ok((watcher, mode)),
        Err(error @ WatchError::WatchLimit { .. }) => {
            log::error!(
                target: LOG_TARGET,
                "{error}; polling every {} s instead until the limit is raised and the process restarted",
                WATCH_LIMIT_POLL_INTERVAL.as_secs()
            );
            let fallback = WatchMode::Poll(WATCH_LIMIT_POLL_INTERVAL);
            Ok((Watcher::start(root, fallback, filter, callback(true))?, fallback))
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;
    use notify::event::{CreateKind, DataChange};
    use std::time::Instant;

    fn create(path: &str) -> notify::Result<Event> {
        Ok(Event::new(EventKind::Create(CreateKind::File)).add_path(path.into()))
    }

    #[test]
    fn full_channel_drops_raises_the_flag_and_never_blocks() {
        let (sender, receiver) = bounded(2);
        let counters = Arc::new(WatchCounters::default());
        let callback = Callback::new(sender, counters.clone(), false);
        let started = Instant::now();
        for i in 0..1000 {
            callback.handle(create(&format!("/m/{i}.flac")));
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the callback must not wait"
        );
        assert_eq!(receiver.len(), 2, "the first events are kept");
        assert_eq!(counters.dropped_events.load(Ordering::Relaxed), 998);
        assert!(counters.overflowed.load(Ordering::Acquire));
    }

    #[test]
    fn disconnected_channel_is_silent() {
        let (sender, receiver) = bounded(1);
        drop(receiver);
        let counters = Arc::new(WatchCounters::default());
        Callback::new(sender, counters.clone(), false).handle(create("/m/a.flac"));
        assert!(!counters.overflowed.load(Ordering::Acquire));
    }

    #[test]
    fn access_and_attribute_events_never_take_a_slot() {
        let (sender, receiver) = bounded(16);
        let callback = Callback::new(sender, Arc::new(WatchCounters::default()), false);
        let event = |kind| Ok(Event::new(kind).add_path("/m/a.flac".into()));
        callback.handle(event(EventKind::Access(AccessKind::Open(AccessMode::Any))));
        callback.handle(event(EventKind::Access(AccessKind::Close(AccessMode::Read))));
        callback.handle(event(EventKind::Modify(ModifyKind::Metadata(
            notify::event::MetadataKind::Any,
        ))));
        assert_eq!(receiver.len(), 0);
        callback.handle(event(EventKind::Modify(ModifyKind::Data(DataChange::Any))));
        callback.handle(event(EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert_eq!(receiver.len(), 2);
    }

    #[test]
    fn watch_limit_advice_is_one_sysctl() {
        let error = WatchError::WatchLimit {
            path: "/data/music/a".into(),
        };
        assert_eq!(
            error.to_string(),
            "cannot watch /data/music/a: the inotify watch limit is reached; raise it with \
             `sysctl fs.inotify.max_user_watches=524288` (and persist it in /etc/sysctl.d), \
             or set POLL_INTERVAL_MS to poll instead"
        );
        let operations = include_str!("../../OPERATIONS.md");
        assert!(
            operations.contains(&format!("`{WATCH_LIMIT_SYSCTL}`")),
            "OPERATIONS.md gives other advice than {WATCH_LIMIT_SYSCTL:?}"
        );
    }

    #[test]
    fn attribute_events_take_a_slot_while_something_is_set_aside() {
        let (sender, receiver) = bounded(16);
        let counters = Arc::new(WatchCounters::default());
        let callback = Callback::new(sender, counters.clone(), false);
        let chmod = || {
            Ok(Event::new(EventKind::Modify(ModifyKind::Metadata(
                notify::event::MetadataKind::Any,
            )))
            .add_path("/m/a.flac".into()))
        };
        callback.handle(chmod());
        assert_eq!(receiver.len(), 0);
        counters.set_aside.fetch_add(1, Ordering::SeqCst);
        callback.handle(chmod());
        assert_eq!(receiver.len(), 1);
    }

    #[test]
    fn poll_mode_counts_metadata_changes() {
        let (sender, receiver) = bounded(16);
        let callback = Callback::new(sender, Arc::new(WatchCounters::default()), true);
        callback.handle(Ok(Event::new(EventKind::Modify(ModifyKind::Metadata(
            notify::event::MetadataKind::WriteTime,
        )))
        .add_path("/m/a.flac".into())));
        assert_eq!(receiver.len(), 1);
    }

    #[test]
    fn watches_follow_directories_renamed_or_removed_while_nobody_looked() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for name in ["album", "album/disc", "gone"] {
            std::fs::create_dir(root.join(name)).unwrap();
        }
        let identity = |path: &Path| {
            let metadata = std::fs::metadata(path).unwrap();
            (metadata.dev(), metadata.ino())
        };
        let (sender, _receiver) = bounded(1024);
        let filter = Filter::new("flac", "").unwrap();
        let callback = Callback::new(sender, Arc::new(WatchCounters::default()), false);
        let mut watcher = Watcher::start(&root, WatchMode::Inotify, &filter, callback).unwrap();
        assert_eq!(watcher.watched.len(), 4);
        // Renamed and removed, with no event handled: the old names are stale.
        std::fs::rename(root.join("album"), root.join("renamed")).unwrap();
        std::fs::remove_dir(root.join("gone")).unwrap();
        let renamed = root.join("renamed");
        assert!(!watcher.is_watched(&renamed, identity(&renamed)));
        watcher.watch_tree(&renamed).unwrap();
        assert!(watcher.is_watched(&renamed, identity(&renamed)));
        assert!(watcher.is_watched(&renamed.join("disc"), identity(&renamed.join("disc"))));
        assert!(
            !watcher.watched.contains_key(&root.join("album")),
            "the old name was dropped before the new one was watched"
        );
        assert_eq!(watcher.prune(), (1, 3), "the removed directory's watch goes");
        let mut names: Vec<_> = watcher.watched.keys().cloned().collect();
        names.sort();
        assert_eq!(names, [root.clone(), renamed.clone(), renamed.join("disc")]);
    }
}
