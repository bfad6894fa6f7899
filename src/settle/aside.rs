//! Files and directories set aside as unreadable, until their permissions change.
//!
//! A file the workers cannot read, or a directory that can be neither watched
//! nor listed (permission denied, an I/O error), is set aside: one WARN naming
//! it, however many events it raises meanwhile. It is looked at again when its
//! attributes change (`chmod`, `chown`: an inotify attribute event), when a
//! full scan comes by (the scan finds set-aside files like any other; this
//! retries the directories), and, for a file, whenever it is written again.
//!
//! Attribute events are many (every `touch`, a `chmod -R`) and almost never
//! news: the notify callback drops them unless something is set aside
//! ([`WatchCounters::set_aside`] counts the entries here plus workers'
//! reports on their way), and here only those for a path set aside, or for a
//! file a worker is looking at right now, lead anywhere.
//!
//! No event is lost between a failure and the moment it is set aside: a
//! worker counts its report before it looks at the file a last time (a
//! change before that look makes it look again; one after it gets through
//! the callback), and a directory that could not be watched is tried once
//! more right after it was counted.
//!
//! [`WatchCounters::set_aside`]: crate::watch::WatchCounters::set_aside

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Settle, LOG_TARGET};
use crate::config::WatchMode;
use crate::job::{Job, Key, Outcome};
use crate::path_text;
use crate::registry::rebase;

/// What a set-aside path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Aside {
    File,
    Directory,
}

impl Settle {
    /// A worker could not read `path`; it counted its report already.
    pub(super) fn set_aside_file(&mut self, path: String, reason: &str) {
        if self.set_aside.insert(path.clone(), Aside::File).is_some() {
            self.counters.set_aside.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        log::warn!(
            target: LOG_TARGET,
            "cannot read {path}: {reason}; set aside until its permissions change (or the next full scan)"
        );
    }

    /// `dir` could not be watched or listed. True if it was not set aside yet.
    fn set_aside_directory(&mut self, dir: &Path, reason: &str) -> bool {
        let key = path_text::encode(dir.as_os_str());
        if self.set_aside.contains_key(&key) {
            return false;
        }
        self.counters.set_aside.fetch_add(1, Ordering::SeqCst);
        log::warn!(
            target: LOG_TARGET,
            "cannot watch or list the directory {key}: {reason}; nothing in it is announced \
             until its permissions change (or the next full scan)"
        );
        self.set_aside.insert(key, Aside::Directory);
        true
    }

    /// `path` is no longer set aside (readable again, or gone); what it was.
    fn forget_aside(&mut self, path: &str) -> Option<Aside> {
        let aside = self.set_aside.remove(path)?;
        self.counters.set_aside.fetch_sub(1, Ordering::SeqCst);
        Some(aside)
    }

    /// A set-aside directory was watched or walked whole.
    fn readable_again(&mut self, dir: &str) {
        if self.forget_aside(dir).is_some() {
            log::info!(target: LOG_TARGET, "the directory {dir} can be read again");
        }
    }

    /// Set-aside paths at or below `tree` that `select` picks.
    fn aside_below(&self, tree: &str, mut select: impl FnMut(&str, Aside) -> bool) -> Vec<String> {
        self.set_aside
            .iter()
            .filter(|(path, aside)| {
                (*path == tree || rebase(path, tree, "").is_some()) && select(path, **aside)
            })
            .map(|(path, _)| path.clone())
            .collect()
    }

    /// An attribute change (inotify mode): a set-aside path is looked at
    /// again, and so is a file a worker is looking at right now (it may have
    /// failed just before the change). Anything else is not news.
    pub(super) fn on_attributes_changed(&mut self, path: String, now: Instant) {
        match self.set_aside.get(&path) {
            Some(Aside::Directory) => self.schedule_scan(path_text::decode(&path).into_owned(), now),
            // A pending entry has events of its own that decide when it is ready.
            _ if self.pending.contains_key(&*path) => {}
            Some(Aside::File) => self.on_closed(path, now),
            None => {
                let key = Key::File(path.clone());
                if self.in_flight.values().flatten().any(|held| *held == key) {
                    self.on_closed(path, now);
                }
            }
        }
    }

    /// A walk (the scanner thread) could not read `path`.
    pub(super) fn on_unreadable_directory(&mut self, path: &Path, reason: &str, now: Instant) {
        // Readable again by now (a chmod before we counted it): walk it again.
        if self.set_aside_directory(path, reason) && std::fs::read_dir(path).is_ok() {
            self.schedule_scan(path.to_owned(), now);
        }
    }

    /// After the watcher watched `dir` and what is below it: directories it
    /// could not watch are set aside, those it watched are forgotten. A new
    /// one is tried once more, now that attribute changes get through.
    pub(super) fn note_watch_failures(&mut self, dir: &Path, now: Instant) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let failures = watcher.take_unwatchable();
        if self.options.mode == WatchMode::Inotify {
            let failed: Vec<String> = failures
                .iter()
                .map(|(path, _)| path_text::encode(path.as_os_str()))
                .collect();
            let watched = self.aside_below(&path_text::encode(dir.as_os_str()), |path, aside| {
                aside == Aside::Directory && !failed.iter().any(|failed| failed == path)
            });
            for dir in watched {
                self.readable_again(&dir);
            }
        }
        let mut new = Vec::new();
        for (path, reason) in failures {
            if self.set_aside_directory(&path, &reason) {
                new.push(path);
            }
        }
        for path in new {
            let Some(watcher) = self.watcher.as_mut() else {
                return;
            };
            if let Err(error) = watcher.watch_tree(&path) {
                return self.fall_back_to_polling(&error);
            }
            let failed_again = watcher.take_unwatchable();
            if !failed_again.iter().any(|(failed, _)| *failed == path) {
                self.readable_again(&path_text::encode(path.as_os_str()));
                self.delayed_scans.push((now, path));
            }
        }
    }

    /// Whatever a finished job says about set-aside paths: a file read or
    /// gone is no longer set aside, and neither is what was below a tree
    /// that went. An unreadable file is set aside.
    pub(super) fn note_done(&mut self, job: &Job, outcome: &Outcome) {
        match (job, outcome) {
            (Job::Check { path, .. }, Outcome::Unreadable(reason)) => {
                self.set_aside_file(path.clone(), reason);
            }
            (Job::Check { path, .. }, Outcome::Finished | Outcome::Vanished)
            | (Job::Gone { path }, Outcome::Finished) => {
                self.forget_aside(path);
            }
            (Job::GoneTree { path }, Outcome::Finished) => {
                for path in self.aside_below(path, |_, _| true) {
                    self.forget_aside(&path);
                }
            }
            _ => {}
        }
    }

    /// After a directory walk: a directory read whole is no longer set aside.
    pub(super) fn note_walked(&mut self, dir: &Path, failed: bool) {
        if !failed {
            self.readable_again(&path_text::encode(dir.as_os_str()));
        }
    }

    /// After a full scan: paths that are gone are forgotten, and directories
    /// that can be read again are watched and walked again. (Set-aside files
    /// the scan found are looked at like every other file it found.)
    pub(super) fn retry_set_aside(&mut self, now: Instant) {
        let gone: Vec<String> = self
            .set_aside
            .keys()
            .filter(|path| std::fs::symlink_metadata(path).is_err())
            .cloned()
            .collect();
        for path in gone {
            self.forget_aside(&path);
        }
        let readable: Vec<PathBuf> = self
            .set_aside
            .iter()
            .filter(|(path, aside)| {
                **aside == Aside::Directory && std::fs::read_dir(path_text::decode(path)).is_ok()
            })
            .map(|(path, _)| path_text::decode(path).into_owned())
            .collect();
        for dir in readable {
            self.schedule_scan(dir, now);
        }
    }
}
