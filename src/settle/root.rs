//! The watched root and the scans that catch up with it.
//!
//! The watchdog notices a root that is gone, unmounted or replaced, and
//! restarts the watcher when it is back; inotify running out of watches
//! switches the tree to polling. Whenever events may have been missed (a new
//! directory, a restart, an overflow), a scan walks the tree on the scanner
//! thread, and its discoveries come back here as pending entries and sweeps.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::aside::Aside;
use super::dispatch::ReadyItem;
use super::{Settle, LOG_TARGET};
use crate::config::WatchMode;
use crate::job::Job;
use crate::path_text;
use crate::watch::scan::{Discovery, ScanKind, ScanRequest};
use crate::watch::{start_with_fallback, Callback, WATCH_LIMIT_POLL_INTERVAL, WATCH_LIMIT_SYSCTL};

/// How often the root's presence and identity are checked.
pub(super) const WATCHDOG_INTERVAL: Duration = Duration::from_secs(2);

/// When a new directory is walked the second time (see `schedule_scan`).
const SECOND_WALK: Duration = Duration::from_secs(5);

impl Settle {
    /// Looks at the root: gone (an unmounted share, a removed directory), or
    /// back under a new identity (remounted): then the old watches are dead,
    /// so the watcher is restarted and the tree rescanned to catch up.
    pub(super) fn watchdog(&mut self, now: Instant) {
        self.next_watchdog = now + WATCHDOG_INTERVAL;
        let current = self.guard.current();
        match self.guard.check() {
            Ok(()) => {
                if std::mem::take(&mut self.root_unavailable) {
                    log::info!(
                        target: LOG_TARGET,
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
                    target: LOG_TARGET,
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
                        target: LOG_TARGET,
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
            return self.fall_back_to_polling(&error);
        }
        self.note_watch_failures(dir, Instant::now());
    }

    /// inotify ran out of watches: poll the whole tree rather than leave
    /// part of it unwatched, and rescan to catch what was missed.
    pub(super) fn fall_back_to_polling(&mut self, reason: &dyn std::fmt::Display) {
        log::error!(
            target: LOG_TARGET,
            "{reason}; raise it with `{WATCH_LIMIT_SYSCTL}` (persist it in /etc/sysctl.d); \
             polling the tree every {} s until then (restart after raising it)",
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
                let root = self.options.root.clone();
                self.note_watch_failures(&root, Instant::now());
                self.request_full_scan(reason);
            }
            Err(error) => {
                log::error!(target: LOG_TARGET, "{error}; trying again in {} s", WATCHDOG_INTERVAL.as_secs());
                self.root_unavailable = true;
            }
        }
    }

    /// A new directory's subtree is watched at once (`watch_tree` returns
    /// once the watches exist), and the directory is walked one settle time
    /// later: anything written after the watch raises events, and anything
    /// written before it is found by the walk.
    ///
    /// A second walk follows `SECOND_WALK` later. It dates from when notify
    /// added new directories' watches itself, late under a stream of events;
    /// it is kept as a safety net. Both walks pass over files sent to the
    /// workers since the directory appeared (`Unpaired::dispatched`).
    pub(super) fn schedule_scan(&mut self, dir: PathBuf, now: Instant) {
        self.watch_tree(&dir);
        self.walk_scheduled(&dir, now, now + self.settle_time());
        self.delayed_scans.push((now + self.settle_time(), dir.clone()));
        self.delayed_scans
            .push((now + self.settle_time() + SECOND_WALK, dir));
    }

    pub(super) fn start_due_scans(&mut self, now: Instant) {
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

    pub(super) fn request_full_scan(&mut self, reason: &str) {
        let now = Instant::now();
        // Asked for when events may have been lost: a file sent before now
        // is checked again when this scan or a walk finds it.
        self.unpaired.forget_dispatched();
        // Any full scan does what the periodic one would: it waits a whole interval again.
        self.next_rescan = self.options.rescan_interval.map(|interval| now + interval);
        self.retry_refused(now, true);
        if self.full_scan_running {
            self.full_scan_again = true;
            return;
        }
        log::info!(target: LOG_TARGET, "full scan of {} ({reason})", self.root_text);
        self.counters
            .rescans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.full_scan_running = true;
        let request = ScanRequest {
            dir: self.options.root.clone(),
            kind: ScanKind::Full,
        };
        let _ = self.channels.scan_requests.send(request);
    }

    pub(super) fn on_discovery(&mut self, discovery: Discovery) {
        let now = Instant::now();
        match discovery {
            // Known pending entries keep their own state; new ones are checked.
            Discovery::File {
                path,
                modified,
                changed,
            } => self.on_found(path, modified, changed, now),
            // Not watched under this name (new, or renamed while events were
            // lost): watched now, and walked again once the watch surely exists.
            // Not a directory set aside because it cannot be watched or listed:
            // every walk of it reports it unwatched again, and each would
            // schedule two more (thousands a second, found as a non-root
            // daemon with a root-only directory in its tree); its attribute
            // changes and each full scan retry it (`retry_set_aside`).
            Discovery::Directory { path, identity } => {
                let set_aside =
                    self.set_aside.get(&path_text::encode(path.as_os_str())) == Some(&Aside::Directory);
                if !set_aside
                    && self
                        .watcher
                        .as_ref()
                        .is_some_and(|watcher| !watcher.is_watched(&path, identity))
                {
                    log::debug!(target: LOG_TARGET, "{} was not watched: watching it", path.display());
                    self.schedule_scan(path, now);
                }
            }
            Discovery::Unreadable { path, reason } => self.on_unreadable_directory(&path, &reason, now),
            Discovery::Finished {
                request,
                files,
                failed,
            } => {
                if request.kind != ScanKind::Full {
                    self.note_walked(&request.dir, failed);
                    return;
                }
                self.full_scan_running = false;
                self.after_full_scan(now);
                self.retry_set_aside(now);
                if !failed {
                    if let Some(watcher) = self.watcher.as_mut() {
                        let (dropped, watched) = watcher.prune();
                        log::debug!(
                            target: LOG_TARGET,
                            "full scan: {dropped} watches of directories that are gone dropped, {watched} watched"
                        );
                    }
                }
                log::info!(target: LOG_TARGET, "full scan of {} found {files} files", self.root_text);
                if failed {
                    log::error!(
                        target: LOG_TARGET,
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
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};

    use super::super::aside::Aside;
    use super::super::tests::Harness;
    use crate::path_text;
    use crate::watch::scan::Discovery;

    fn found_directory(harness: &mut Harness, dir: &Path) {
        let metadata = std::fs::metadata(dir).unwrap();
        harness.settle.on_discovery(Discovery::Directory {
            path: dir.to_owned(),
            identity: (metadata.dev(), metadata.ino()),
        });
    }

    #[test]
    fn a_directory_set_aside_is_not_walked_again_each_time_a_walk_reports_it() {
        let mut harness = Harness::new();
        let (locked, other) = (
            PathBuf::from(harness.path("locked")),
            PathBuf::from(harness.path("other")),
        );
        for dir in [&locked, &other] {
            std::fs::create_dir(dir).unwrap();
        }
        // As after a walk could not list it (the tests run as root, who can).
        harness
            .settle
            .set_aside
            .insert(path_text::encode(locked.as_os_str()), Aside::Directory);
        let before = harness.settle.delayed_scans.len();
        found_directory(&mut harness, &locked);
        assert_eq!(
            harness.settle.delayed_scans.len(),
            before,
            "set aside: not walked again"
        );
        found_directory(&mut harness, &other);
        assert_eq!(
            harness.settle.delayed_scans.len(),
            before + 2,
            "not watched yet: watched, and walked twice"
        );
    }
}
