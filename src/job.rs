//! What the settle stage hands to the workers and what it gets back.
//!
//! These types are the contract between [`crate::settle`] and
//! [`crate::work`]: settle sends a [`Dispatch`], a worker answers with a
//! [`Done`]. They live here, apart from both, so that neither stage imports
//! the other, and "who reads a job" is answered by "who imports this module".
//! `Key` is what a job holds while it is in flight; settle uses its
//! conflict rule so that at most one job per path (or overlapping subtree)
//! is in flight.

use std::time::Duration;

use uuid::Uuid;

use crate::registry::rebase;

/// A unit of work for the workers. Each carries the correlation id shared by
/// the messages it produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Look at `path`: if it exists, record its content (following it from
    /// `renamed_from` when it got there by rename); if not, it is gone.
    Check {
        path: String,
        renamed_from: Option<String>,
    },
    /// Nothing should be at `path` any more.
    Gone { path: String },
    /// `path` left the tree (moved out, removed as a directory): it and every
    /// recorded file below it are gone.
    GoneTree { path: String },
    /// A directory was renamed inside the tree.
    RenameDirectory { from: String, to: String },
    /// After a full scan that found `files_found` files: every recorded file
    /// below `dir` that no longer exists is gone.
    Sweep { dir: String, files_found: u64 },
    /// Moves the kernel reported only half of: `origins` are where files
    /// were last recorded before a "moved from" that found no "moved to",
    /// `found` what the walks of new directories found meanwhile. Which
    /// found file is which recorded one? Answered with [`Outcome::Matched`];
    /// nothing is recorded.
    MatchMoves {
        origins: Vec<String>,
        found: Vec<String>,
    },
}

impl Job {
    /// The paths and subtrees this job holds while it is in flight.
    pub(crate) fn keys(&self) -> Vec<Key> {
        match self {
            Job::Check { path, renamed_from } => {
                let mut keys = vec![Key::File(path.clone())];
                keys.extend(renamed_from.iter().map(|from| Key::File(from.clone())));
                keys
            }
            Job::Gone { path } => vec![Key::File(path.clone())],
            Job::GoneTree { path } => vec![Key::Tree(path.clone())],
            Job::RenameDirectory { from, to } => {
                vec![Key::Tree(from.clone()), Key::Tree(to.clone())]
            }
            Job::Sweep { dir, .. } => vec![Key::Tree(dir.clone())],
            Job::MatchMoves { origins, found } => {
                origins.iter().chain(found).cloned().map(Key::File).collect()
            }
        }
    }
}

/// A job as sent to a worker.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub id: u64,
    pub job: Job,
    pub correlation_id: Uuid,
    /// Failed attempts so far (for backoff, and handing the job back as
    /// refused after hard errors).
    pub attempt: u32,
}

/// What a worker reports back for every dispatched job.
#[derive(Debug)]
pub struct Done {
    pub dispatch: Dispatch,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// A `Check` could not read the file (permission denied, an I/O error:
    /// the reason): set it aside until its permissions change. The worker
    /// counted it in `WatchCounters::set_aside`.
    Unreadable(String),
    /// The file changed while it was being read: settle it again.
    Changing,
    /// The registry could not be reached (or the job was cut short by
    /// shutdown): keep the job and try again after this long.
    Retry(Duration),
    /// A `Check` found nothing at its path: unless a rename already
    /// accounts for it, it becomes a removal, after a settle period (so a
    /// rename event still on its way can claim it first).
    Vanished,
    /// The registry cannot be reached: keep the job, and hold all dispatching
    /// for a while (one probe per backoff period, not one retry per path).
    Unavailable,
    /// The registry kept refusing the job for a reason other than a lost
    /// connection (read-only, disk full, a statement timeout: the error):
    /// the settle stage keeps it and retries it later.
    Refused(String),
    /// The answer to [`Job::MatchMoves`]: these found files are recorded
    /// files that moved.
    Matched(Vec<Moved>),
}

/// The file last recorded at `from` is now at `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub from: String,
    pub to: String,
}

/// What a job holds while it is in flight: a single path, or a whole subtree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Key {
    File(String),
    Tree(String),
}

impl Key {
    pub(crate) fn conflicts(&self, other: &Key) -> bool {
        let below = |path: &str, tree: &str| path == tree || rebase(path, tree, "").is_some();
        match (self, other) {
            (Key::File(a), Key::File(b)) => a == b,
            (Key::File(file), Key::Tree(tree)) | (Key::Tree(tree), Key::File(file)) => below(file, tree),
            (Key::Tree(a), Key::Tree(b)) => below(a, b) || below(b, a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_conflict_on_same_path_and_on_subtrees() {
        let file = |p: &str| Key::File(p.into());
        let tree = |p: &str| Key::Tree(p.into());
        assert!(file("/m/a").conflicts(&file("/m/a")));
        assert!(!file("/m/a").conflicts(&file("/m/b")));
        assert!(tree("/m/a").conflicts(&file("/m/a/x.flac")));
        assert!(tree("/m/a").conflicts(&file("/m/a")));
        assert!(!tree("/m/a").conflicts(&file("/m/ab/x.flac")));
        assert!(tree("/m").conflicts(&tree("/m/a")));
        assert!(!tree("/m/a").conflicts(&tree("/m/b")));
    }
}
