//! Directory walks: new directories, moved-in trees, rescans and start-up.
//!
//! The scanner runs on its own thread so a slow walk (a NAS with a million
//! files) never holds up the settle stage. It streams what it finds through a
//! bounded channel: when the settle stage has enough pending work it stops
//! reading, and the walk waits (back-pressure, not memory growth). Symlinks
//! are not followed; excluded directories are not entered.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crossbeam_channel::{Receiver, Sender};
use walkdir::WalkDir;

use crate::filter::Filter;
use crate::path_text;
use crate::watch::guard::Identity;

/// The log target these lines had before the layout move, kept so that log
/// lines (and anyone's filters on them) stay the same.
const LOG_TARGET: &str = "file_watcher::scan";

/// Why a walk was asked for; comes back in [`Discovery::Finished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanKind {
    /// A directory appeared (created, moved in, renamed): its files are news.
    Directory,
    /// The whole tree, to recover from lost events or downtime; the settle
    /// stage follows it with a sweep for files that disappeared.
    Full,
}

#[derive(Debug, Clone)]
pub struct ScanRequest {
    pub dir: PathBuf,
    pub kind: ScanKind,
}

#[derive(Debug)]
pub enum Discovery {
    /// An announced-kind file exists at this absolute path.
    File {
        path: String,
        /// Its mtime when the walk saw it (`None` if it could not be read):
        /// a file written moments ago waits like any other changed file.
        modified: Option<SystemTime>,
        /// Its ctime when the walk saw it: when it last changed, content or
        /// attributes (unlike the mtime, not something a copy can set), so
        /// how long it has been quiet already.
        changed: Option<SystemTime>,
    },
    /// A directory the walk entered, and which one it is: the settle stage
    /// makes sure it is watched under this name (a full rescan rebuilds the
    /// watches of the whole tree).
    Directory { path: PathBuf, identity: Identity },
    /// This directory (or entry) could not be read, for a reason other than
    /// having vanished. The settle stage sets it aside and warns, once.
    Unreadable { path: PathBuf, reason: String },
    Finished {
        request: ScanRequest,
        /// Files found; a full scan that finds none in a tree the registry
        /// knows to be populated is suspicious (an unmounted share).
        files: u64,
        /// The directory could not be read at all.
        failed: bool,
    },
}

/// Scanner thread body: serves requests until the request channel closes or
/// the settle stage stops listening.
pub fn run(root: PathBuf, filter: Filter, requests: Receiver<ScanRequest>, found: Sender<Discovery>) {
    for request in requests {
        let started = std::time::Instant::now();
        match walk(&root, &filter, &request.dir, &found) {
            Ok(outcome) => {
                log::debug!(
                    target: LOG_TARGET,
                    "scanned {} ({:?}): {} files in {:?}",
                    request.dir.display(),
                    request.kind,
                    outcome.files,
                    started.elapsed()
                );
                let finished = Discovery::Finished {
                    request,
                    files: outcome.files,
                    failed: outcome.failed,
                };
                if found.send(finished).is_err() {
                    return;
                }
            }
            Err(Disconnected) => return,
        }
    }
}

struct WalkOutcome {
    files: u64,
    failed: bool,
}

struct Disconnected;

fn walk(
    root: &Path,
    filter: &Filter,
    dir: &Path,
    found: &Sender<Discovery>,
) -> Result<WalkOutcome, Disconnected> {
    let mut outcome = WalkOutcome {
        files: 0,
        failed: false,
    };
    for entry in tree_walk(root, filter, dir) {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                if error.depth() == 0 {
                    outcome.failed = true;
                }
                // Vanished while walking is normal; too long is warned about once
                // (`admit`); unreadable is worth a warning, which the settle
                // stage gives once per directory (not once per walk).
                let too_long = error.path().is_some_and(|path| path_text::admit(path).is_none());
                if !too_long && error.io_error().map(|e| e.kind()) != Some(std::io::ErrorKind::NotFound) {
                    let unreadable = Discovery::Unreadable {
                        path: error.path().unwrap_or(dir).to_owned(),
                        reason: error
                            .io_error()
                            .map_or_else(|| error.to_string(), ToString::to_string),
                    };
                    found.send(unreadable).map_err(|_| Disconnected)?;
                }
                continue;
            }
        };
        if entry.file_type().is_dir() {
            if let Ok(metadata) = entry.metadata() {
                let directory = Discovery::Directory {
                    path: entry.path().to_owned(),
                    identity: (metadata.dev(), metadata.ino()),
                };
                found.send(directory).map_err(|_| Disconnected)?;
            }
            continue;
        }
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path();
        let relative = path.strip_prefix(root).unwrap_or(path);
        if !filter.announces(relative) {
            continue;
        }
        let Some(text) = path_text::admit(path) else {
            continue;
        };
        outcome.files += 1;
        let metadata = entry.metadata().ok();
        let modified = metadata.as_ref().and_then(|metadata| metadata.modified().ok());
        let changed = metadata.as_ref().and_then(changed_time);
        found
            .send(Discovery::File {
                path: text,
                modified,
                changed,
            })
            .map_err(|_| Disconnected)?;
    }
    Ok(outcome)
}

/// The ctime, as a time (`None` before the epoch, where no file on a
/// working system is).
fn changed_time(metadata: &std::fs::Metadata) -> Option<SystemTime> {
    let seconds = u64::try_from(metadata.ctime()).ok()?;
    let nanos = u32::try_from(metadata.ctime_nsec()).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::new(seconds, nanos))
}

/// Everything below `dir` (inside the watched `root`), without following
/// symlinks and without entering excluded directories.
pub(crate) fn tree_walk<'a>(
    root: &'a Path,
    filter: &'a Filter,
    dir: &Path,
) -> impl Iterator<Item = walkdir::Result<walkdir::DirEntry>> + 'a {
    WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .filter_entry(move |entry| {
            let relative = entry.path().strip_prefix(root).unwrap_or(entry.path());
            relative.as_os_str().is_empty() || !filter.excludes(relative)
        })
}

/// Walks the tree once and calls `visit` for every announced file, on the
/// caller's thread. Used at start without a database to learn what exists.
pub fn for_each_file(root: &Path, filter: &Filter, mut visit: impl FnMut(&Path)) {
    for entry in tree_walk(root, filter, root).flatten() {
        if entry.file_type().is_file()
            && filter.announces(entry.path().strip_prefix(root).unwrap_or(entry.path()))
        {
            visit(entry.path());
        }
    }
}
