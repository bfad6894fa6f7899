//! Renames: pairing a "moved from" with its "moved to", and following them.
//!
//! A rename inside the tree rewrites pending entries, so a worker never hashes
//! a path that has merely moved; a directory rename moves everything pending
//! below it and goes to the registry as one job. Half a rename is a move into
//! or out of the tree: what moved out is gone, what moved in is new.

use std::cmp::Reverse;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use notify::event::{ModifyKind, RenameMode};
use notify::{Event, EventKind};
use uuid::Uuid;

use super::dispatch::ReadyItem;
use super::pending::State;
use super::Settle;
use crate::job::Job;
use crate::registry::rebase;

/// How long an unpaired "moved from" waits for its "moved to".
pub(super) const RENAME_PAIRING: Duration = Duration::from_millis(100);

impl Settle {
    /// A "moved from" stays unpaired unless the very next event is its "moved to".
    pub(super) fn pairs_with_unpaired_from(&self, event: &Event) -> bool {
        matches!(
            event.kind,
            EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        ) && self
            .unpaired_from
            .as_ref()
            .is_some_and(|(tracker, _, _)| event.attrs.tracker() == Some(*tracker))
    }

    /// A "moved from" whose "moved to" never came: the file or directory left the tree.
    pub(super) fn flush_unpaired_from(&mut self, now: Instant, force: bool) {
        let expired = self
            .unpaired_from
            .as_ref()
            .is_some_and(|(_, _, seen)| force || now.duration_since(*seen) >= RENAME_PAIRING);
        if expired {
            let (_, path, _) = self.unpaired_from.take().expect("checked above");
            self.on_tree_gone(path, now);
        }
    }

    pub(super) fn on_rename(&mut self, from: String, to: String, now: Instant) {
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
                self.replace_unrecorded_origin(&to, renamed_from.as_deref(), now);
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

    /// `to` is about to hold the file last recorded at `origin`. If a rename
    /// onto `to` that was never recorded is pending there (`mv c b; mv a b`
    /// within the settle time), the file it brought (`c`) was replaced
    /// before anyone recorded it at `to`: it is gone, as `mark_removed` has it
    /// for "renamed here, never recorded here". Otherwise the later origin
    /// would overwrite the earlier one and `c` would stay recorded forever.
    pub(super) fn replace_unrecorded_origin(&mut self, to: &str, origin: Option<&str>, now: Instant) {
        let earlier = self
            .pending
            .get(to)
            .and_then(|entry| entry.renamed_from.clone())
            .filter(|earlier| Some(earlier.as_str()) != origin && earlier != to);
        if let Some(earlier) = earlier {
            self.pending.get_mut(to).expect("looked up above").renamed_from = None;
            self.mark_removed(earlier, now);
        }
    }

    pub(super) fn on_directory_renamed(&mut self, from: String, to: String, now: Instant) {
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

    pub(super) fn on_moved_in(&mut self, path: String, now: Instant) {
        if std::fs::symlink_metadata(&path).is_ok_and(|metadata| metadata.is_dir()) {
            self.schedule_scan(PathBuf::from(path), now);
        } else if self.announces(&path) {
            self.on_closed(path, now);
        }
    }

    /// `path` (a file or a directory) is no longer in the tree.
    pub(super) fn on_tree_gone(&mut self, path: String, now: Instant) {
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
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::tests::Harness;
    use crate::job::{Done, Job, Outcome};

    fn sorted(mut jobs: Vec<Job>) -> Vec<Job> {
        jobs.sort_by_key(|job| format!("{job:?}"));
        jobs
    }

    #[test]
    fn two_renames_onto_one_name_remove_the_first_origin() {
        // `mv c b; mv a b` within one settle period: c's file was replaced at
        // b before anyone recorded it there.
        let mut harness = Harness::new();
        let (a, b, c) = (harness.path("a.flac"), harness.path("b.flac"), harness.path("c.flac"));
        harness.settle.on_rename(c.clone(), b.clone(), Instant::now());
        harness.settle.on_rename(a.clone(), b.clone(), Instant::now());
        let jobs = harness.pass().into_iter().map(|dispatch| dispatch.job).collect();
        assert_eq!(
            sorted(jobs),
            [
                Job::Check {
                    path: b,
                    renamed_from: Some(a)
                },
                Job::Gone { path: c },
            ]
        );
    }

    #[test]
    fn a_rename_onto_a_name_whose_rename_is_in_flight_removes_the_first_origin() {
        // `mv c b`, its check goes out, then `mv a b` before it is recorded.
        let mut harness = Harness::new();
        let (a, b, c) = (harness.path("a.flac"), harness.path("b.flac"), harness.path("c.flac"));
        harness.settle.on_rename(c.clone(), b.clone(), Instant::now());
        let in_flight = harness.pass().into_iter().next().unwrap();
        harness.settle.on_rename(a.clone(), b.clone(), Instant::now());
        harness.settle.on_done(Done {
            dispatch: in_flight,
            outcome: Outcome::Changing,
        });
        let jobs = harness.pass().into_iter().map(|dispatch| dispatch.job).collect();
        assert_eq!(
            sorted(jobs),
            [
                Job::Check {
                    path: b,
                    renamed_from: Some(a)
                },
                Job::Gone { path: c },
            ]
        );
    }

    #[test]
    fn renaming_the_same_origin_onto_a_name_twice_removes_nothing() {
        // `mv a b; mv b x; mv x b`: one origin all along.
        let mut harness = Harness::new();
        let (a, b, x) = (harness.path("a.flac"), harness.path("b.flac"), harness.path("x.flac"));
        harness.settle.on_rename(a.clone(), b.clone(), Instant::now());
        harness.settle.on_rename(b.clone(), x.clone(), Instant::now());
        harness.settle.on_rename(x, b.clone(), Instant::now());
        let jobs: Vec<Job> = harness.pass().into_iter().map(|dispatch| dispatch.job).collect();
        assert_eq!(
            jobs,
            [Job::Check {
                path: b,
                renamed_from: Some(a)
            }]
        );
    }
}
