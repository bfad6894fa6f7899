//! Raw events into pending entries.
//!
//! notify reports what the kernel saw; this decides what each event means for
//! the files we announce: data written, a writer that closed, a removal, a
//! new directory to walk, or one half of a rename (paired in `renames`).
//! Paths outside the tree, or too long to use, stop here; the rest become
//! path text ([`crate::path_text`]).

use std::path::Path;
use std::time::Instant;

use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};
use notify::{Event, EventKind};

use super::{Settle, LOG_TARGET};
use crate::config::WatchMode;
use crate::path_text;
use crate::watch::RawEvent;

impl Settle {
    pub(super) fn on_raw(&mut self, raw: RawEvent) {
        match raw {
            RawEvent::Fs(event) => self.on_event(event),
            RawEvent::Error(error) => match error.kind {
                notify::ErrorKind::MaxFilesWatch => self.fall_back_to_polling(&format!(
                    "inotify watch limit reached while adding {:?}",
                    error.paths
                )),
                notify::ErrorKind::WatchNotFound | notify::ErrorKind::PathNotFound => {
                    log::debug!(target: LOG_TARGET, "watch already gone: {error}")
                }
                // The poller meets a path too long to use at every poll: `admit` warns once.
                notify::ErrorKind::Io(_)
                    if error.paths.iter().any(|path| path_text::admit(path).is_none()) => {}
                _ => log::warn!(target: LOG_TARGET, "watcher error: {error}"),
            },
        }
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        if event.need_rescan() {
            log::warn!(target: LOG_TARGET, "the kernel event queue overflowed: rescanning the tree");
            self.on_events_lost(now);
            self.request_full_scan("kernel event queue overflow");
            return;
        }
        let poll = matches!(self.options.mode, WatchMode::Poll(_));
        let paths: Vec<String> = event.paths.iter().filter_map(|path| self.inside(path)).collect();
        let tracker = event.attrs.tracker();
        // Renames pair by tracker (see `renames::Pairing`); anything else
        // that happens at the name a "moved from" left means it is not
        // coming back there.
        if !matches!(event.kind, EventKind::Modify(ModifyKind::Name(_))) {
            for path in &paths {
                self.expire_from_at(path, now);
            }
        }
        let mut paths = paths.into_iter();
        match event.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                let (Some(from), Some(to)) = (paths.next(), paths.next()) else {
                    return;
                };
                self.on_moved_both(tracker, from, to, now);
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                if let (Some(path), Some(tracker)) = (paths.next(), tracker) {
                    self.on_moved_from(tracker, path, now);
                } else if let Some(path) = paths.next() {
                    // MOVE_SELF of a watched directory: its parent reports the rename.
                    log::debug!(target: LOG_TARGET, "{path} moved (no tracker)");
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                if let Some(path) = paths.next() {
                    self.on_moved_to(tracker, path, now);
                }
            }
            EventKind::Create(CreateKind::Folder) => {
                if let Some(path) = paths.next().filter(|path| !self.excluded(path)) {
                    self.schedule_scan(path_text::decode(&path).into_owned(), now);
                }
            }
            EventKind::Modify(ModifyKind::Metadata(_)) if !poll => {
                for path in paths {
                    self.on_attributes_changed(path, now);
                }
            }
            EventKind::Create(_) | EventKind::Modify(_) => {
                for path in paths {
                    if poll && path_text::decode(&path).is_dir() {
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
                    } else if self.announces(&path) || self.pending.contains_key(&*path) {
                        self.mark_removed(path, now);
                    }
                }
            }
            EventKind::Any | EventKind::Other => {}
        }
    }

    /// The path's text, if it is inside the watched tree (exclusion is
    /// decided later: a rename from an excluded name is still news).
    fn inside(&self, path: &Path) -> Option<String> {
        path.strip_prefix(&self.options.root).ok()?;
        path_text::admit(path)
    }

    /// True for the root itself, and for paths with an excluded component.
    pub(super) fn excluded(&self, path: &str) -> bool {
        path_text::decode(path)
            .strip_prefix(&self.options.root)
            .map_or(true, |relative| {
                relative.as_os_str().is_empty() || self.options.filter.excludes(relative)
            })
    }

    pub(super) fn announces(&self, path: &str) -> bool {
        path_text::decode(path)
            .strip_prefix(&self.options.root)
            .is_ok_and(|relative| !relative.as_os_str().is_empty() && self.options.filter.announces(relative))
    }
}
