//! The root guard: an unmounted share must not read as "every file was deleted".
//!
//! A NAS that goes away leaves an empty mount point (or no directory at all);
//! a poll watcher then reports every file as removed, and a sweep finds none
//! of them. Before any deletion is recorded, the worker asks the guard whether
//! the tree is the one we were watching:
//! - the root must exist, with the (device, inode) identity last accepted (an
//!   unmounted share shows the mount point's own directory, on another device);
//! - the sentinel file, when one is configured, must exist.
//!
//! While that fails, deletions wait (they are retried, not dropped). The
//! settle stage's watchdog logs one error, and when the root is back (or
//! remounted under a new identity) it accepts the new identity, restarts the
//! watcher and rescans to catch up. Bulk sweeps additionally refuse to run
//! when a full scan found no file at all while the registry holds some.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// (device, inode) of a directory.
pub type Identity = (u64, u64);

#[derive(Debug, Clone)]
pub struct RootGuard {
    root: PathBuf,
    /// A file that exists only when the share is mounted (e.g.
    /// `.file-watcher-sentinel` on the NAS volume).
    sentinel: Option<PathBuf>,
    /// The identity the watcher was set up for; shared by every clone.
    expected: Arc<Mutex<Option<Identity>>>,
}

impl RootGuard {
    /// Accepts the root as it is now.
    pub fn new(root: PathBuf, sentinel: Option<PathBuf>) -> RootGuard {
        let expected = Arc::new(Mutex::new(identity(&root)));
        RootGuard {
            root,
            sentinel,
            expected,
        }
    }

    /// `Err(reason)` when the tree is not the one being watched.
    pub fn check(&self) -> Result<(), String> {
        let current = identity(&self.root);
        if current.is_none() {
            return Err(format!("{} is gone", self.root.display()));
        }
        if current != self.expected() {
            return Err(format!(
                "{} is not the directory being watched any more (unmounted or replaced)",
                self.root.display()
            ));
        }
        if let Some(sentinel) = &self.sentinel {
            if std::fs::symlink_metadata(sentinel).is_err() {
                return Err(format!("sentinel file {} is missing", sentinel.display()));
            }
        }
        Ok(())
    }

    /// The root as it is now, for the watchdog.
    pub fn current(&self) -> Option<Identity> {
        identity(&self.root)
    }

    /// True when the accepted root was a mount point (on another device than
    /// its parent) and what is there now is not (on the parent's device): the
    /// share was unmounted and we see the empty mount point. That is never
    /// accepted as a new root; a deliberate switch to a local directory needs
    /// a restart.
    pub fn looks_unmounted(&self) -> bool {
        let parent_device = self
            .root
            .parent()
            .and_then(|parent| std::fs::metadata(parent).ok())
            .map(|metadata| metadata.dev());
        let (Some(parent_device), Some((expected_device, _)), Some((current_device, _))) =
            (parent_device, self.expected(), self.current())
        else {
            return false;
        };
        expected_device != parent_device && current_device == parent_device
    }

    pub fn expected(&self) -> Option<Identity> {
        *self
            .expected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The watcher was restarted on the root as it is now.
    pub fn accept(&self, identity: Option<Identity>) {
        *self
            .expected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = identity;
    }
}

fn identity(root: &Path) -> Option<Identity> {
    std::fs::metadata(root)
        .ok()
        .filter(|metadata| metadata.is_dir())
        .map(|metadata| (metadata.dev(), metadata.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaced_or_missing_root_is_unavailable_until_accepted() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("music");
        std::fs::create_dir(&root).unwrap();
        let guard = RootGuard::new(root.clone(), None);
        assert!(
            guard.check().is_ok(),
            "an empty tree is fine: deleting the last file is legitimate"
        );
        std::fs::rename(&root, parent.path().join("elsewhere")).unwrap();
        assert!(guard.check().unwrap_err().contains("gone"));
        std::fs::create_dir(&root).unwrap();
        assert!(guard.check().unwrap_err().contains("not the directory"));
        guard.clone().accept(guard.current());
        assert!(guard.check().is_ok(), "clones share the accepted identity");
    }

    #[test]
    fn sentinel_must_exist_when_set() {
        let dir = tempfile::tempdir().unwrap();
        let sentinel = dir.path().join(".mounted");
        let guard = RootGuard::new(dir.path().to_owned(), Some(sentinel.clone()));
        assert!(guard.check().unwrap_err().contains("sentinel"));
        std::fs::write(&sentinel, "").unwrap();
        assert!(guard.check().is_ok());
    }
}
