//! Renames: pairing a "moved from" with its "moved to", and following them.
//!
//! A rename inside the tree rewrites pending entries, so a worker never hashes
//! a path that has merely moved; a directory rename moves everything pending
//! below it and goes to the registry as one job. The halves pair by
//! tracker ([`Pairing`]). Half a rename is a move into or out of the tree:
//! what moved in is new, what moved out is gone, unless it went into a
//! directory too new to have a watch (`unpaired` finds it there).

use std::cmp::Reverse;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::dispatch::ReadyItem;
use super::pending::State;
use super::{PathKey, Settle, LOG_TARGET};
use crate::job::Job;
use crate::path_text;
use crate::registry::rebase;

/// How long an unpaired "moved from" waits for its "moved to".
pub(super) const RENAME_PAIRING: Duration = Duration::from_millis(100);

/// How long a tracker paired by its "moved to" is remembered, so that the
/// `Both` notify sends right after it is recognised as a repeat.
const PAIRED_MEMORY: Duration = Duration::from_secs(1);

/// Renames in progress: each "moved from" waits, under notify's tracker (the
/// kernel's rename cookie), for the "moved to" with the same tracker.
///
/// Pairing is by tracker, never by adjacency: other events (a download
/// being written, another rename) arrive between the two halves whenever
/// they happen at the same moment on another CPU. notify itself pairs only
/// adjacent halves into a `Both` event (it remembers one "moved from"), so
/// with two renames interleaved the `Both` never comes; the "moved to"
/// always does, and it is what pairs here. A "moved from" expires only by
/// time ([`RENAME_PAIRING`]), or when its path is used again (a new file
/// there is not the one that left; the kernel reports both halves of a
/// rename before anything else can happen at the old name).
#[derive(Debug, Default)]
pub(super) struct Pairing {
    /// Unpaired "moved from": tracker → (path, when it was seen).
    froms: HashMap<usize, (String, Instant)>,
    /// The same trackers by path.
    by_path: HashMap<String, usize>,
    /// Trackers paired (or given up) by their "moved to", and when.
    paired: HashMap<usize, Instant>,
}

impl Pairing {
    fn insert(&mut self, tracker: usize, path: String, now: Instant) {
        if let Some(earlier) = self.by_path.insert(path.clone(), tracker) {
            self.froms.remove(&earlier);
        }
        self.froms.insert(tracker, (path, now));
    }

    fn take(&mut self, tracker: usize) -> Option<String> {
        let (path, _) = self.froms.remove(&tracker)?;
        self.by_path.remove(&path);
        Some(path)
    }

    /// When the oldest unpaired "moved from" expires.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.froms.values().map(|(_, seen)| *seen + RENAME_PAIRING).min()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.froms.is_empty()
    }
}

impl Settle {
    /// notify saw `path` leave under `tracker`: wait for where it went.
    pub(super) fn on_moved_from(&mut self, tracker: usize, path: String, now: Instant) {
        self.expire_from_at(&path, now);
        self.pairing.insert(tracker, path, now);
    }

    /// notify saw `path` arrive under `tracker`: the other half of a rename
    /// seen before, or a move into the tree.
    pub(super) fn on_moved_to(&mut self, tracker: Option<usize>, path: String, now: Instant) {
        let Some(tracker) = tracker else {
            return self.on_moved_in(path, now);
        };
        self.pairing.paired.insert(tracker, now);
        let from = self.pairing.take(tracker);
        // A file that left this name earlier is not coming back to it.
        self.expire_from_at(&path, now);
        match from {
            Some(from) => self.on_rename(from, path, now),
            None => self.on_moved_in(path, now),
        }
    }

    /// Both names at once: a repeat of a pair the "moved to" already made,
    /// or (from a backend that reports renames only this way) news.
    pub(super) fn on_moved_both(&mut self, tracker: Option<usize>, from: String, to: String, now: Instant) {
        if let Some(tracker) = tracker {
            if self.pairing.paired.remove(&tracker).is_some() {
                return;
            }
            self.pairing.take(tracker);
        }
        self.expire_from_at(&to, now);
        self.on_rename(from, to, now);
    }

    /// Something happened at `path`, so a "moved from" still waiting there
    /// is not coming back there: it left the tree (or went where we see no
    /// "moved to").
    pub(super) fn expire_from_at(&mut self, path: &str, now: Instant) {
        if let Some(tracker) = self.pairing.by_path.get(path).copied() {
            let path = self.pairing.take(tracker).expect("indexed by path");
            self.on_unpaired_from(path, now);
        }
    }

    /// "Moved from" halves whose "moved to" did not come in time.
    pub(super) fn expire_unpaired(&mut self, now: Instant) {
        self.pairing
            .paired
            .retain(|_, paired| now.duration_since(*paired) < PAIRED_MEMORY);
        if self.pairing.next_expiry().is_none_or(|expiry| expiry > now) {
            return;
        }
        let mut expired: Vec<(Instant, usize)> = self
            .pairing
            .froms
            .iter()
            .filter(|(_, (_, seen))| now.duration_since(*seen) >= RENAME_PAIRING)
            .map(|(tracker, (_, seen))| (*seen, *tracker))
            .collect();
        expired.sort_unstable();
        for (_, tracker) in expired {
            let path = self.pairing.take(tracker).expect("listed above");
            self.on_unpaired_from(path, now);
        }
    }

    /// A "moved from" whose "moved to" never came: the file or directory left
    /// the tree, or went into a directory too new to have a watch (`unpaired`).
    fn on_unpaired_from(&mut self, path: String, now: Instant) {
        if self.hold_for_walks(&path, now) {
            return;
        }
        log::debug!(target: LOG_TARGET, "{path} moved away (no \"moved to\" in the tree)");
        self.on_tree_gone(path, now);
    }

    pub(super) fn on_rename(&mut self, from: String, to: String, now: Instant) {
        let to_is_directory = match std::fs::symlink_metadata(path_text::decode(&to)) {
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
                let carried = self.pending.remove(&*from);
                let renamed_from = carried
                    .as_ref()
                    .map_or(Some(from.clone()), |entry| {
                        entry.renamed_from().cloned().or(Some(from.clone()))
                    })
                    .filter(|original| *original != to);
                let correlation_id = carried.map(|entry| entry.correlation_id);
                self.replace_unrecorded_origin(&to, renamed_from.as_deref(), now);
                let entry = self.touch(to, now);
                entry.state = State::Changed;
                entry.closed = true;
                entry.set_renamed_from(renamed_from);
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
            .and_then(|entry| entry.renamed_from().cloned())
            .filter(|earlier| Some(earlier.as_str()) != origin && earlier != to);
        if let Some(earlier) = earlier {
            self.pending
                .get_mut(to)
                .expect("looked up above")
                .set_renamed_from(None);
            self.mark_removed(earlier, now);
        }
    }

    pub(super) fn on_directory_renamed(&mut self, from: String, to: String, now: Instant) {
        // A directory entering or leaving the excluded names behaves like a move in or out.
        match (!self.excluded(&from), !self.excluded(&to)) {
            (true, true) => {}
            (true, false) => return self.on_tree_gone(from, now),
            (false, true) => return self.schedule_scan(path_text::decode(&to).into_owned(), now),
            (false, false) => return,
        }
        // Pending entries below the old name follow it. The registry moves the
        // rows of recorded files itself (RenameDirectory), so only renames that
        // started below the old name are rebased, not created.
        let moved: Vec<PathKey> = self
            .pending
            .keys()
            .filter(|path| rebase(path, &from, "").is_some())
            .cloned()
            .collect();
        for old_path in moved {
            let mut entry = self.pending.remove(&*old_path).expect("key listed above");
            if let Some(rebased) = entry
                .renamed_from()
                .and_then(|renamed_from| rebase(renamed_from, &from, &to))
            {
                entry.set_renamed_from(Some(rebased));
            }
            let new_path = PathKey::from(rebase(&old_path, &from, &to).expect("filtered above"));
            entry.ready = false;
            entry.scheduled = now + self.settle_time();
            self.timers
                .push(Reverse((entry.scheduled, PathKey::clone(&new_path))));
            self.pending.insert(new_path, entry);
        }
        for item in self.ready.iter_mut() {
            if let ReadyItem::Path(path) = item {
                if let Some(rebased) = rebase(path, &from, &to) {
                    *path = rebased.into();
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
        self.schedule_scan(path_text::decode(&to).into_owned(), now);
    }

    pub(super) fn on_moved_in(&mut self, path: String, now: Instant) {
        if std::fs::symlink_metadata(path_text::decode(&path)).is_ok_and(|metadata| metadata.is_dir()) {
            self.schedule_scan(path_text::decode(&path).into_owned(), now);
        } else if self.announces(&path) {
            self.on_closed(path, now);
        }
    }

    /// `path` (a file or a directory) is no longer in the tree.
    pub(super) fn on_tree_gone(&mut self, path: String, now: Instant) {
        let below: Vec<PathKey> = self
            .pending
            .keys()
            .filter(|pending| pending[..] == path[..] || rebase(pending, &path, "").is_some())
            .cloned()
            .collect();
        for pending in below {
            let entry = self.pending.remove(&*pending).expect("key listed above");
            if let Some(original) = entry.into_renamed_from() {
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
    use std::time::{Duration, Instant};

    use notify::event::{CreateKind, DataChange, ModifyKind, RenameMode};
    use notify::{Event, EventKind};

    use super::super::tests::Harness;
    use super::RENAME_PAIRING;
    use crate::job::{Done, Job, Outcome};
    use crate::watch::RawEvent;

    fn rename(mode: RenameMode, paths: &[&str], tracker: Option<usize>) -> RawEvent {
        let mut event = Event::new(EventKind::Modify(ModifyKind::Name(mode)));
        for path in paths {
            event = event.add_path(path.into());
        }
        if let Some(tracker) = tracker {
            event = event.set_tracker(tracker);
        }
        RawEvent::Fs(event)
    }

    fn write(path: &str) -> RawEvent {
        RawEvent::Fs(Event::new(EventKind::Modify(ModifyKind::Data(DataChange::Any))).add_path(path.into()))
    }

    fn check(path: &str, renamed_from: Option<&str>) -> Job {
        Job::Check {
            path: path.into(),
            renamed_from: renamed_from.map(str::to_owned),
        }
    }

    #[test]
    fn interleaved_renames_pair_by_tracker_whatever_comes_between() {
        // What two busy writers and a renamer produce: notify's own pairing
        // (one remembered "moved from") sees neither pair; the trackers do.
        let mut harness = Harness::new();
        let [a, b, c, d, busy] =
            ["a", "b", "c", "d", "busy"].map(|name| harness.path(&format!("{name}.flac")));
        harness.settle.on_raw(rename(RenameMode::From, &[&a], Some(1)));
        harness.settle.on_raw(write(&busy));
        harness.settle.on_raw(rename(RenameMode::From, &[&c], Some(2)));
        harness.settle.on_raw(rename(RenameMode::To, &[&b], Some(1)));
        harness.settle.on_raw(write(&busy));
        harness.settle.on_raw(rename(RenameMode::To, &[&d], Some(2)));
        harness
            .settle
            .on_raw(rename(RenameMode::Both, &[&c, &d], Some(2)));
        let jobs = sorted(harness.pass_jobs());
        assert_eq!(jobs, [check(&b, Some(&a)), check(&d, Some(&c))]);
        // Nothing is left waiting to expire into a removal.
        harness
            .settle
            .expire_unpaired(Instant::now() + RENAME_PAIRING * 2);
        assert!(harness.pass().is_empty());
    }

    #[test]
    fn an_unpaired_moved_from_expires_by_time_only() {
        let mut harness = Harness::new();
        let (a, busy) = (harness.path("a.flac"), harness.path("busy.flac"));
        let seen = Instant::now();
        harness.settle.on_raw(rename(RenameMode::From, &[&a], Some(1)));
        harness.settle.on_raw(write(&busy));
        harness.settle.expire_unpaired(seen + RENAME_PAIRING / 2);
        assert!(harness.pass().is_empty(), "other events do not end the wait");
        harness.settle.expire_unpaired(Instant::now() + RENAME_PAIRING);
        let jobs: Vec<Job> = harness.pass_jobs();
        assert_eq!(jobs, [Job::GoneTree { path: a }], "moved out of the tree");
    }

    #[test]
    fn a_new_file_at_the_old_name_ends_the_wait_at_once() {
        // `mv a /elsewhere; touch a`: the new `a` is not the one that left,
        // which must be gone before the new one is looked at.
        let mut harness = Harness::new();
        let a = harness.path("a.flac");
        harness.settle.on_raw(rename(RenameMode::From, &[&a], Some(1)));
        harness.settle.on_raw(RawEvent::Fs(
            Event::new(EventKind::Create(CreateKind::File)).add_path(a.clone().into()),
        ));
        let first: Vec<Job> = harness.pass_jobs();
        assert_eq!(first, [Job::GoneTree { path: a }]);
    }

    #[test]
    fn a_moved_to_without_its_moved_from_is_a_move_in_and_its_both_is_not_repeated() {
        let mut harness = Harness::new();
        let (a, b) = (harness.path("a.flac"), harness.path("b.flac"));
        let seen = Instant::now();
        harness.settle.on_raw(rename(RenameMode::From, &[&a], Some(1)));
        harness
            .settle
            .expire_unpaired(seen + RENAME_PAIRING + Duration::from_millis(1));
        // Late: the wait had ended; notify still pairs the two into a `Both`.
        harness.settle.on_raw(rename(RenameMode::To, &[&b], Some(1)));
        harness
            .settle
            .on_raw(rename(RenameMode::Both, &[&a, &b], Some(1)));
        let jobs = sorted(harness.pass_jobs());
        assert_eq!(jobs, [check(&b, None), Job::GoneTree { path: a }]);
    }

    #[test]
    fn a_backend_that_reports_only_both_names_still_renames() {
        let mut harness = Harness::new();
        let (a, b) = (harness.path("a.flac"), harness.path("b.flac"));
        harness.settle.on_raw(rename(RenameMode::Both, &[&a, &b], None));
        let jobs: Vec<Job> = harness.pass_jobs();
        assert_eq!(jobs, [check(&b, Some(&a))]);
    }

    fn sorted(mut jobs: Vec<Job>) -> Vec<Job> {
        jobs.sort_by_key(|job| format!("{job:?}"));
        jobs
    }

    #[test]
    fn two_renames_onto_one_name_remove_the_first_origin() {
        // `mv c b; mv a b` within one settle period: c's file was replaced at
        // b before anyone recorded it there.
        let mut harness = Harness::new();
        let (a, b, c) = (
            harness.path("a.flac"),
            harness.path("b.flac"),
            harness.path("c.flac"),
        );
        harness.settle.on_rename(c.clone(), b.clone(), Instant::now());
        harness.settle.on_rename(a.clone(), b.clone(), Instant::now());
        let jobs = harness.pass_jobs();
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
        let (a, b, c) = (
            harness.path("a.flac"),
            harness.path("b.flac"),
            harness.path("c.flac"),
        );
        harness.settle.on_rename(c.clone(), b.clone(), Instant::now());
        let in_flight = harness.pass().into_iter().next().unwrap();
        harness.settle.on_rename(a.clone(), b.clone(), Instant::now());
        harness.settle.on_done(Done {
            dispatch: in_flight,
            outcome: Outcome::Changing,
        });
        let jobs = harness.pass_jobs();
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
    fn a_renamed_file_removed_while_its_check_is_in_flight_removes_its_origin() {
        // `mv a b; rm b`, the `rm` while the check of b is hashing: a's row
        // must go, or it stays present forever.
        let mut harness = Harness::new();
        let (a, b) = (harness.path("a.flac"), harness.path("b.flac"));
        harness.settle.on_rename(a.clone(), b.clone(), Instant::now());
        let in_flight = harness.pass().into_iter().next().unwrap();
        harness.settle.mark_removed(b.clone(), Instant::now());
        harness.settle.on_done(Done {
            dispatch: in_flight,
            outcome: Outcome::Changing,
        });
        let jobs = harness.pass_jobs();
        assert_eq!(sorted(jobs), [Job::Gone { path: a }, Job::Gone { path: b }]);
    }

    #[test]
    fn renaming_the_same_origin_onto_a_name_twice_removes_nothing() {
        // `mv a b; mv b x; mv x b`: one origin all along.
        let mut harness = Harness::new();
        let (a, b, x) = (
            harness.path("a.flac"),
            harness.path("b.flac"),
            harness.path("x.flac"),
        );
        harness.settle.on_rename(a.clone(), b.clone(), Instant::now());
        harness.settle.on_rename(b.clone(), x.clone(), Instant::now());
        harness.settle.on_rename(x, b.clone(), Instant::now());
        let jobs: Vec<Job> = harness.pass_jobs();
        assert_eq!(
            jobs,
            [Job::Check {
                path: b,
                renamed_from: Some(a)
            }]
        );
    }
}
