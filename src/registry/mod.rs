//! The file registry: the one place that decides whether a change is news.
//!
//! A worker hands the registry what it saw on disk (`Change`); the registry
//! compares it with what it recorded before, records the new state and, in the
//! same step, queues the messages the change produces in its outbox. The
//! publisher drains the outbox and marks messages published once the sink has
//! confirmed them. So the order is always record → publish → mark published,
//! and a message that was recorded but not confirmed stays visibly pending.
//!
//! Two implementations share the decision logic in [`plan`]:
//! - [`memory::MemoryRegistry`] for running without a database (stdout mode);
//! - [`postgres::PostgresRegistry`] shared by every instance, which makes
//!   concurrent instances converge: the newest observation wins, and a change
//!   already recorded by someone else produces no second message.
//!
//! Invariant: a registry writes a row only after a fresh `stat`, taken while it
//! holds the path, agrees with the observation (`Applied::Changed` otherwise),
//! and applies a deletion only when that `stat` says the file is gone.

pub mod plan;
pub mod memory;
pub mod postgres;

/// Re-exported for the settle stage, which follows directory renames with the
/// same rule the registries apply.
pub use plan::rebase;

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use uuid::Uuid;

use crate::message::{self, Content, Encoded, Message};

/// The parts of a fresh `stat` that tell whether a file changed, and which of
/// two observations is newer. ctime cannot be set by users (unlike mtime), so
/// it leads the ordering; size and mtime break ties on coarse filesystems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Which file this is, whatever its name: how a file whose rename was
    /// not reported as one is recognised at its new path. `None` for rows
    /// recorded before the registry kept it; such rows never match.
    pub identity: Option<FileId>,
}

/// A file's (device, inode): the same across renames within one filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub device: u64,
    pub inode: u64,
}

impl Stat {
    /// `Ok(None)` when nothing, or something other than a regular file, is at `path`.
    /// Symlinks are not followed.
    pub fn of(path: &Path) -> io::Result<Option<Stat>> {
        Ok(regular_file_metadata(path)?.map(|metadata| Stat::from_metadata(&metadata)))
    }

    pub fn from_metadata(metadata: &fs::Metadata) -> Stat {
        Stat {
            size: metadata.len(),
            mtime_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
            ctime_ns: metadata.ctime() * 1_000_000_000 + metadata.ctime_nsec(),
            identity: Some(FileId {
                device: metadata.dev(),
                inode: metadata.ino(),
            }),
        }
    }

    /// Total order used to reject stale observations.
    pub fn freshness(&self) -> (i64, u64, i64) {
        (self.ctime_ns, self.size, self.mtime_ns)
    }
}

/// The `lstat` of the regular file at `path`; `Ok(None)` when nothing, or
/// something other than a regular file, is there. Symlinks are not followed.
pub fn regular_file_metadata(path: &Path) -> io::Result<Option<fs::Metadata>> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_file() => Ok(Some(metadata)),
        Ok(_) => Ok(None),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) if error.raw_os_error() == Some(20) => Ok(None), // ENOTDIR: a parent became a file
        Err(error) => Err(error),
    }
}

/// A file that exists, as a worker just read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub path: String,
    pub stat: Stat,
    pub sha256: String,
    pub xxh128: String,
}

impl Observed {
    pub fn content(&self) -> Content {
        Content {
            sha256_hash: self.sha256.clone(),
            xxh128_hash: self.xxh128.clone(),
            size_bytes: self.stat.size,
            modified_time: message::rfc3339_from_nanos(self.stat.mtime_ns),
            file_type: message::file_type(&self.path),
        }
    }
}

/// A present file as the registry last recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub path: String,
    pub stat: Stat,
    /// Empty when the file is known to exist but was never hashed (stdout mode
    /// learns the files present at start without reading them).
    pub sha256: String,
    pub xxh128: String,
}

impl Row {
    pub fn from_observed(observed: &Observed) -> Row {
        Row {
            path: observed.path.clone(),
            stat: observed.stat,
            sha256: observed.sha256.clone(),
            xxh128: observed.xxh128.clone(),
        }
    }

    fn same_content(&self, observed: &Observed) -> bool {
        !self.sha256.is_empty()
            && self.sha256 == observed.sha256
            && self.xxh128 == observed.xxh128
            && self.stat.size == observed.stat.size
    }
}

/// What a worker asks the registry to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `observed.path` exists with this content; `renamed_from` is where the
    /// same file was before, when the settle stage followed it through a rename.
    Present {
        observed: Observed,
        renamed_from: Option<String>,
    },
    /// A fresh `stat` says nothing is at `path` any more.
    Gone { path: String },
    /// Directory `from` is now `to`: every present row below `from/` moves below `to/`.
    DirectoryRenamed { from: String, to: String },
}

impl Change {
    /// The path the change is about, for logs.
    pub fn path(&self) -> &str {
        match self {
            Change::Present { observed, .. } => &observed.path,
            Change::Gone { path } => path,
            Change::DirectoryRenamed { to, .. } => to,
        }
    }
}

/// What applying a change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Recorded; these messages were queued in the outbox, in publish order
    /// (possibly none: nothing consumers care about changed).
    Recorded(Vec<Message>),
    /// The file changed again between the observation and the fresh `stat`
    /// under the registry's lock: nothing was written, look again later.
    Changed,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The database cannot be reached; the change is kept and retried later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A statement failed for a reason that retrying soon will not fix.
    #[error("registry query failed ({what}): {detail}")]
    Query { what: &'static str, detail: String },
    #[error("cannot stat {path}: {source}")]
    Stat { path: String, source: io::Error },
}

impl RegistryError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, RegistryError::Unavailable(_))
    }

    /// The same error again, for every change of a batch it stopped (an
    /// `io::Error` is not `Clone`: a failed `stat` keeps its text only).
    pub fn same(&self) -> RegistryError {
        match self {
            RegistryError::Unavailable(detail) => RegistryError::Unavailable(detail.clone()),
            RegistryError::Query { what, detail } => RegistryError::Query {
                what,
                detail: detail.clone(),
            },
            RegistryError::Stat { path, source } => RegistryError::Stat {
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
        }
    }
}

/// Shared by the memory and PostgreSQL registries; see the module docs.
pub trait Registry: Send + Sync {
    /// The present row at `path`, if any.
    fn lookup(&self, path: &str) -> Result<Option<Row>, RegistryError>;

    /// Records `change` and queues the messages it produces.
    fn apply(&self, change: &Change, correlation_id: Uuid) -> Result<Applied, RegistryError>;

    /// The present rows at `paths` (those that have one), in no order.
    /// One query where the registry is a database.
    fn lookup_all(&self, paths: &[&str]) -> Result<Vec<Row>, RegistryError> {
        let mut rows = Vec::new();
        for path in paths {
            rows.extend(self.lookup(path)?);
        }
        Ok(rows)
    }

    /// Applies each change as [`Registry::apply`] would, answering for each
    /// in order. The PostgreSQL registry records the file changes together,
    /// in one transaction: a change whose file changed again (or whose fresh
    /// `stat` failed) gets its own answer and the rest commits. No two of
    /// `changes` may touch the same path (settle keeps one job per path in
    /// flight).
    fn apply_all(&self, changes: &[(Change, Uuid)]) -> Vec<Result<Applied, RegistryError>> {
        changes
            .iter()
            .map(|(change, correlation_id)| self.apply(change, *correlation_id))
            .collect()
    }

    /// Paths of present rows strictly below directory `dir`, in byte order,
    /// starting after `after`; at most `limit` of them. Used to page through
    /// large trees without loading them whole.
    fn present_under(
        &self,
        dir: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, RegistryError>;

    /// The oldest messages not yet confirmed, in the order they were
    /// recorded, leaving out those set aside. A stored message that cannot be
    /// read back is set aside here (see [`Registry::set_aside`]).
    fn outgoing(&self, limit: usize) -> Result<Vec<Encoded>, RegistryError> {
        let page = self.outgoing_after(None, limit)?;
        Ok(page.into_iter().map(|queued| queued.message).collect())
    }

    /// [`Registry::outgoing`] from a place in the outbox on: only messages
    /// recorded after `after` (a [`Queued::position`] of an earlier page),
    /// each with its own position, so that a publisher with messages still
    /// unconfirmed can read on past them.
    fn outgoing_after(&self, after: Option<u64>, limit: usize) -> Result<Vec<Queued>, RegistryError>;

    /// The sink confirmed these messages: drop them from the outbox.
    fn mark_published(&self, message_ids: &[Uuid]) -> Result<(), RegistryError>;

    /// This message can never be published (`reason` says why): keep it out
    /// of [`Registry::outgoing`] so the messages behind it flow, and log it
    /// once, naming it. The PostgreSQL registry keeps it in its outbox table,
    /// marked, for an operator to look at or requeue.
    fn set_aside(&self, message_id: Uuid, reason: &str) -> Result<(), RegistryError>;
}

/// A message waiting in the outbox, and its place there.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// Grows in the order messages were queued (the outbox row's id). Rows
    /// of concurrent transactions may become visible out of that order, so
    /// a reader past a position can still find an older one later.
    pub position: u64,
    pub message: Encoded,
}

/// Whether the database answers, shared by everyone who talks to it, so an
/// outage is logged once when it starts and once when it ends, not once per
/// file or per component.
#[derive(Debug, Default)]
pub struct Health {
    down: std::sync::atomic::AtomicBool,
    /// Times the database was reached again after an outage (a metric).
    pub reconnects: std::sync::atomic::AtomicU64,
}

impl Health {
    /// Something could not reach the database.
    pub fn down(&self, detail: &dyn std::fmt::Display) {
        if !self.down.swap(true, std::sync::atomic::Ordering::AcqRel) {
            log::error!("database unavailable ({detail}); still watching, changes are held until it is back");
        }
    }

    /// Whether the last attempt reached the database (for `/readyz`).
    pub fn is_up(&self) -> bool {
        !self.down.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Something reached the database.
    pub fn up(&self) {
        if self.down.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            log::info!("database reachable again; catching up on held changes");
        }
    }
}

/// A registry that is not there yet: the database was down at start. Every
/// call answers `Unavailable` (so workers hold their changes and the
/// publisher waits) until [`Deferred::set`] installs the real one.
#[derive(Default)]
pub struct Deferred {
    inner: std::sync::OnceLock<Box<dyn Registry>>,
}

impl Deferred {
    /// Installs the registry; later calls are ignored.
    pub fn set(&self, registry: Box<dyn Registry>) {
        let _ = self.inner.set(registry);
    }

    pub fn is_set(&self) -> bool {
        self.inner.get().is_some()
    }

    fn get(&self) -> Result<&dyn Registry, RegistryError> {
        self.inner
            .get()
            .map(|registry| registry.as_ref())
            .ok_or_else(|| RegistryError::Unavailable("not connected to the database yet".into()))
    }
}

impl Registry for Deferred {
    fn lookup(&self, path: &str) -> Result<Option<Row>, RegistryError> {
        self.get()?.lookup(path)
    }

    fn apply(&self, change: &Change, correlation_id: Uuid) -> Result<Applied, RegistryError> {
        self.get()?.apply(change, correlation_id)
    }

    fn lookup_all(&self, paths: &[&str]) -> Result<Vec<Row>, RegistryError> {
        self.get()?.lookup_all(paths)
    }

    fn apply_all(&self, changes: &[(Change, Uuid)]) -> Vec<Result<Applied, RegistryError>> {
        match self.get() {
            Ok(registry) => registry.apply_all(changes),
            Err(error) => changes.iter().map(|_| Err(error.same())).collect(),
        }
    }

    fn present_under(
        &self,
        dir: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, RegistryError> {
        self.get()?.present_under(dir, after, limit)
    }

    fn outgoing_after(&self, after: Option<u64>, limit: usize) -> Result<Vec<Queued>, RegistryError> {
        self.get()?.outgoing_after(after, limit)
    }

    fn mark_published(&self, message_ids: &[Uuid]) -> Result<(), RegistryError> {
        self.get()?.mark_published(message_ids)
    }

    fn set_aside(&self, message_id: Uuid, reason: &str) -> Result<(), RegistryError> {
        self.get()?.set_aside(message_id, reason)
    }
}

/// A fresh `stat` for a registry about to write: `Stat::of` with the error named.
pub fn fresh_stat(path: &str) -> Result<Option<Stat>, RegistryError> {
    Stat::of(&crate::path_text::decode(path)).map_err(|source| RegistryError::Stat {
        path: path.to_owned(),
        source,
    })
}
