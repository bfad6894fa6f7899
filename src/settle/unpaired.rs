//! A "moved from" that found no "moved to": held for the walks of new
//! directories, then matched by the file's (device, inode).
//!
//! `mkdir d; mv f d/` (what beets, Picard and Lidarr do) reports no "moved
//! to": the kernel had no watch on `d` yet. Without more, the "moved from"
//! expires into a removal and the walk of `d` then finds `d/f` as new:
//! `deleted` + `created`, two unrelated messages for one move.
//!
//! So when a "moved from" expires while first walks of directories that
//! appeared are due or running, it is held until those walks are done. What
//! they find meanwhile is kept from the workers. Then one job
//! ([`Job::MatchMoves`]) asks the registry which file each held move last
//! recorded, and answers which found file is that file: same (device, inode),
//! size and mtime ([`Outcome::Matched`](crate::job::Outcome::Matched)). A
//! match goes out as an ordinary check that follows the rename (`moved` or
//! `renamed`); an unmatched move is gone; unmatched finds are checked as
//! usual. A move held longer than [`HOLD_LIMIT`] (a walk stuck behind a full
//! scan of a huge tree) is matched against what was found so far.
//!
//! The same matching covers a "moved to" that comes later than
//! `RENAME_PAIRING` into a directory being walked. Only names we announce
//! are held: a directory that left is gone at once, as before.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::dispatch::ReadyItem;
use super::pending::{Entry, State};
use super::{PathKey, Settle, LOG_TARGET};
use crate::job::{Job, Moved};
use crate::watch::scan::{Discovery, ScanKind};

/// The longest a move is held for walks to finish.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

/// Files held back for matching at most; past it, finds are checked as usual.
const FOUND_LIMIT: usize = 10_000;

/// Files remembered as sent to the workers (`Unpaired::dispatched`), at most.
const DISPATCHED_LIMIT: usize = 10_000;

/// Held moves and what the walks found meanwhile.
#[derive(Debug, Default)]
pub(super) struct Unpaired {
    /// First walks of directories that appeared, due or running, in the
    /// order they were scheduled.
    walks: Vec<NewWalk>,
    /// New directories whose walks are not all done, the second one
    /// included (`SECOND_WALK` after the first), so that the questions
    /// about a path ([`Unpaired::appeared_above`]) look its ancestors up
    /// rather than compare it with every walk: they are asked for every file
    /// a scan finds, and a burst of new albums keeps a hundred walks on.
    new_dirs: HashMap<PathBuf, NewDir>,
    /// Files below a directory of `new_dirs`, sent to the workers, and
    /// when. A file sent no earlier than the newest such directory above it
    /// appeared is nothing new to a walk that finds it again: the
    /// directory's subtree is watched before its walks are scheduled (on
    /// this thread), so the worker read the file after that and any later
    /// change is reported; and when events are lost a full scan is asked
    /// for, which empties this. Without it, a burst of albums had up to a
    /// third of its files checked twice by the first walk, and every file
    /// of every new directory was checked again by the second walk, also at
    /// a trickle. Emptied when no walk is left; at most
    /// [`DISPATCHED_LIMIT`] entries (past it, files sent are not
    /// remembered, and their finds are checked as before).
    dispatched: HashMap<PathKey, Instant>,
    /// Numbers the walks.
    next_walk: u64,
    /// Moves that wait for walks.
    held: Vec<Held>,
    /// Files found by the walks of new directories while moves waited: not
    /// handed to the workers before they have been matched.
    found: HashSet<String>,
    /// The held moves a match job in flight settles (one job at a time).
    matching: Option<Vec<Held>>,
}

/// A directory of [`Unpaired::new_dirs`].
#[derive(Debug)]
struct NewDir {
    /// The latest time its event came, by this machine's clock (a
    /// directory can appear again, moved away and back, before its walks
    /// are done).
    appeared: Instant,
    /// Its first walks in `walks`.
    first_walks: usize,
    /// Its walks not done, first and second, at most: any walk of the
    /// directory that finishes counts, also one `aside` asked for.
    walks_left: usize,
}

#[derive(Debug)]
struct NewWalk {
    number: u64,
    dir: PathBuf,
    due: Instant,
}

#[derive(Debug, Clone)]
struct Held {
    /// Where the "moved from" was.
    path: String,
    /// Where its file was last recorded: `path`, or where a rename not yet
    /// recorded had brought it from.
    origin: String,
    since: Instant,
    /// It waits for the walks numbered below this.
    walks_before: u64,
}

impl Unpaired {
    /// Whether a found file at `path` is held back from the workers.
    pub(super) fn holds(&self, path: &str) -> bool {
        self.found.contains(path)
    }

    fn ready(&self, held: &Held, now: Instant) -> bool {
        now.duration_since(held.since) >= HOLD_LIMIT
            || self.walks.iter().all(|walk| walk.number >= held.walks_before)
    }

    fn below_a_new_walk(&self, path: &str) -> bool {
        self.appeared_above(path).is_some()
    }

    /// When the newest directory above `path` whose first walk is due or
    /// running appeared; `None` when no such walk is on.
    pub(super) fn appeared_above(&self, path: &str) -> Option<Instant> {
        // Asked for every file a catch-up scan finds: at once while no first walk is on.
        if self.walks.is_empty() {
            return None;
        }
        self.newest_above(path, |dir| dir.first_walks > 0)
    }

    /// When the newest directory above `path` with a walk left (the second
    /// included) appeared.
    fn rewalk_appeared_above(&self, path: &str) -> Option<Instant> {
        self.newest_above(path, |dir| dir.walks_left > 0)
    }

    /// When the newest directory of `new_dirs` at or above `path` that
    /// `counts` appeared.
    fn newest_above(&self, path: &str, counts: impl Fn(&NewDir) -> bool) -> Option<Instant> {
        // Asked for every file a scan finds: no decoding while no walk is on.
        if self.new_dirs.is_empty() {
            return None;
        }
        let path = crate::path_text::decode(path);
        path.ancestors()
            .filter_map(|dir| self.new_dirs.get(dir))
            .filter(|dir| counts(dir))
            .map(|dir| dir.appeared)
            .max()
    }

    /// `dir` has one walk fewer of those `walks` counts; forgotten once it
    /// has none of either kind left.
    fn one_walk_less(&mut self, dir: &Path, walks: impl Fn(&mut NewDir) -> &mut usize) {
        if let Some(new_dir) = self.new_dirs.get_mut(dir) {
            let left = walks(new_dir);
            *left = left.saturating_sub(1);
            if new_dir.first_walks == 0 && new_dir.walks_left == 0 {
                self.new_dirs.remove(dir);
            }
        }
    }

    /// Whether the file at `path` was sent to the workers no earlier than
    /// the newest new directory above it appeared: finding it is nothing new.
    pub(super) fn dispatched_since_it_appeared(&self, path: &str) -> bool {
        self.dispatched.get(path).is_some_and(|dispatched| {
            self.rewalk_appeared_above(path)
                .is_some_and(|appeared| *dispatched >= appeared)
        })
    }

    /// Events may have been lost (a full scan is asked for): what was sent
    /// before is checked again when found; what is sent from now on is
    /// remembered afresh.
    pub(super) fn forget_dispatched(&mut self) {
        self.dispatched.clear();
    }

    /// The file at `path` leaves for the workers.
    pub(super) fn dispatched(&mut self, path: &PathKey, now: Instant) {
        if self.dispatched.len() < DISPATCHED_LIMIT && self.rewalk_appeared_above(path).is_some() {
            self.dispatched.insert(PathKey::clone(path), now);
        }
    }

    /// One of `dir`'s walks is over (the first ones are counted there too).
    /// Dispatches older than every directory with walks left can no longer
    /// matter.
    fn rewalk_done(&mut self, dir: &Path) {
        self.one_walk_less(dir, |new_dir| &mut new_dir.walks_left);
        let with_walks_left = self.new_dirs.values().filter(|dir| dir.walks_left > 0);
        match with_walks_left.map(|dir| dir.appeared).min() {
            Some(oldest) => self.dispatched.retain(|_, dispatched| *dispatched >= oldest),
            None => self.dispatched.clear(),
        }
    }

    /// A first walk is over.
    fn walk_done(&mut self, index: usize) {
        let walk = self.walks.remove(index);
        self.one_walk_less(&walk.dir, |new_dir| &mut new_dir.first_walks);
    }
}

impl Settle {
    /// The first walk of a directory that appeared at `appeared` is due at `due`.
    pub(super) fn walk_scheduled(&mut self, dir: &Path, appeared: Instant, due: Instant) {
        let number = self.unpaired.next_walk;
        self.unpaired.next_walk += 1;
        self.unpaired.walks.push(NewWalk {
            number,
            dir: dir.to_owned(),
            due,
        });
        let new_dir = self.unpaired.new_dirs.entry(dir.to_owned()).or_insert(NewDir {
            appeared,
            first_walks: 0,
            walks_left: 0,
        });
        new_dir.appeared = new_dir.appeared.max(appeared);
        new_dir.first_walks += 1;
        // The first walk and the second (`schedule_scan`).
        new_dir.walks_left += 2;
    }

    /// A "moved from" got no "moved to" in time. If a new directory is
    /// about to be walked, its file may be in there: hold it (see the module
    /// docs). Returns false when it is not held.
    pub(super) fn hold_for_walks(&mut self, path: &str, now: Instant) -> bool {
        if self.unpaired.walks.is_empty() || !self.announces(path) {
            return false;
        }
        let origin = self
            .pending
            .remove(path)
            .and_then(Entry::into_renamed_from)
            .unwrap_or_else(|| path.to_owned());
        log::debug!(
            target: LOG_TARGET,
            "{path} moved away with no \"moved to\": holding it for the walks of new directories"
        );
        self.unpaired.held.push(Held {
            path: path.to_owned(),
            origin,
            since: now,
            walks_before: self.unpaired.next_walk,
        });
        true
    }

    /// What the scanner reports, with the finds of new directories held
    /// back while moves wait for them.
    pub(super) fn on_walked(&mut self, discovery: Discovery) {
        match &discovery {
            Discovery::File { path, .. } if self.holds_back(path) => {
                self.unpaired.found.insert(path.clone());
            }
            Discovery::Finished { request, .. } if request.kind == ScanKind::Directory => {
                let now = Instant::now();
                if let Some(index) = self
                    .unpaired
                    .walks
                    .iter()
                    .position(|walk| walk.dir == request.dir && walk.due <= now)
                {
                    self.unpaired.walk_done(index);
                }
                self.unpaired.rewalk_done(&request.dir);
            }
            _ => {}
        }
        self.on_discovery(discovery);
    }

    /// A file just found is held back when a move may be waiting for it: it
    /// is below a new directory being walked, nobody dispatched or renamed
    /// it yet, and a move is held or still waits for its pair.
    fn holds_back(&self, path: &str) -> bool {
        let waiting = !self.unpaired.held.is_empty() || !self.pairing.is_empty();
        waiting
            && self.unpaired.found.len() < FOUND_LIMIT
            && self.unpaired.below_a_new_walk(path)
            && self
                .pending
                .get(path)
                .is_none_or(|entry| !entry.ready && entry.renamed_from().is_none())
    }

    /// Once a held move's walks are done, sends one job that matches every
    /// held move against everything found; with nothing found, the ready
    /// moves are simply gone. Finds nobody can claim any more are released.
    pub(super) fn match_held(&mut self, now: Instant) {
        if self.unpaired.matching.is_some() {
            return;
        }
        if !self
            .unpaired
            .held
            .iter()
            .any(|held| self.unpaired.ready(held, now))
        {
            if self.unpaired.held.is_empty() && self.pairing.is_empty() && !self.unpaired.found.is_empty() {
                let found: Vec<String> = self.unpaired.found.drain().collect();
                self.release_found(found);
            }
            return;
        }
        let (ready, waiting): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.unpaired.held)
            .into_iter()
            .partition(|held| self.unpaired.ready(held, now));
        self.unpaired.held = waiting;
        if self.unpaired.found.is_empty() {
            for held in ready {
                self.held_gone(held, now);
            }
            return;
        }
        let mut origins: Vec<String> = ready
            .iter()
            .chain(&self.unpaired.held)
            .map(|held| held.origin.clone())
            .collect();
        origins.sort_unstable();
        origins.dedup();
        let mut found: Vec<String> = self.unpaired.found.iter().cloned().collect();
        found.sort_unstable();
        self.unpaired.matching = Some(ready);
        self.ready.push_back(ReadyItem::Tree {
            job: Job::MatchMoves { origins, found },
            correlation_id: Uuid::new_v4(),
            attempt: 0,
            not_before: None,
        });
    }

    /// The workers matched `moves` among `found` (what the job was sent
    /// with); an empty list when nothing matched or the job was given up.
    pub(super) fn on_matched(&mut self, found: Vec<String>, moves: Vec<Moved>, now: Instant) {
        let mut ready = self.unpaired.matching.take().unwrap_or_default();
        for Moved { from, to } in moves {
            // Whoever held it; none if it was settled meanwhile.
            let held = if let Some(index) = ready.iter().position(|held| held.origin == from) {
                ready.swap_remove(index)
            } else if let Some(index) = self.unpaired.held.iter().position(|held| held.origin == from) {
                self.unpaired.held.swap_remove(index)
            } else {
                continue;
            };
            log::debug!(target: LOG_TARGET, "{} was moved to {to} (matched by device and inode)", held.path);
            // The name it left may have held another recorded file that the
            // rename onto it replaced.
            if held.path != held.origin && !self.pending.contains_key(&*held.path) {
                self.on_tree_gone(held.path, now);
            }
            self.unpaired.found.remove(&to);
            let known = self.pending.contains_key(&*to);
            let entry = self.touch(to, now);
            if !known {
                entry.state = State::Changed;
                entry.closed = true;
            }
            if entry.renamed_from().is_none() {
                entry.set_renamed_from(Some(from));
            }
        }
        for held in ready {
            self.held_gone(held, now);
        }
        for path in &found {
            self.unpaired.found.remove(path);
        }
        self.release_found(found);
    }

    /// A held move that matched nothing: it left the tree.
    fn held_gone(&mut self, held: Held, now: Instant) {
        if held.origin != held.path {
            self.mark_removed(held.origin, now);
        }
        // A file made at the name since is news of its own, not this move's.
        if !self.pending.contains_key(&*held.path) {
            self.on_tree_gone(held.path, now);
        }
    }

    /// Finds no longer held back become ordinary pending entries again.
    fn release_found(&mut self, found: Vec<String>) {
        for path in found {
            let Some((key, _)) = self.pending.get_key_value(path.as_str()) else {
                continue;
            };
            let key = PathKey::clone(key);
            // `promote_due` dropped its timer while it was held.
            self.pending.get_mut(&*key).expect("looked up above").scheduled = Instant::now() + HOLD_LIMIT;
            self.touched.push(key);
        }
    }

    /// `promote_due` found a held-back entry due: look again later (a match
    /// releases it sooner).
    pub(super) fn hold_back_entry(&mut self, path: PathKey, now: Instant) {
        if let Some(entry) = self.pending.get_mut(&*path) {
            entry.scheduled = now + HOLD_LIMIT;
            self.timers.push(Reverse((entry.scheduled, path)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use notify::event::{ModifyKind, RenameMode};
    use notify::{Event, EventKind};

    use super::super::renames::RENAME_PAIRING;
    use super::super::tests::Harness;
    use super::HOLD_LIMIT;
    use crate::job::{Dispatch, Done, Job, Moved, Outcome};
    use crate::watch::scan::{Discovery, ScanKind, ScanRequest};
    use crate::watch::RawEvent;

    /// A stage where `album` is a new directory about to be walked, and
    /// `a.flac` left with no "moved to" (its pairing time is over).
    fn held_move() -> (Harness, String, String) {
        let mut harness = Harness::new();
        let (a, album) = (harness.path("a.flac"), harness.path("album"));
        harness
            .settle
            .walk_scheduled(&PathBuf::from(&album), Instant::now(), Instant::now());
        moved_from(&mut harness, &a);
        (harness, a, album)
    }

    fn moved_from(harness: &mut Harness, path: &str) {
        let event = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::From)))
            .add_path(path.into())
            .set_tracker(7);
        harness.settle.on_raw(RawEvent::Fs(event));
        harness.settle.expire_unpaired(Instant::now() + RENAME_PAIRING);
    }

    fn walked(harness: &mut Harness, dir: &str, files: &[&str]) {
        for file in files {
            harness.settle.on_walked(Discovery::File {
                path: (*file).to_owned(),
                modified: None,
                changed: None,
            });
        }
        harness.settle.on_walked(Discovery::Finished {
            request: ScanRequest {
                dir: dir.into(),
                kind: ScanKind::Directory,
            },
            files: files.len() as u64,
            failed: false,
        });
    }

    /// What goes out to the workers now, in a stable order.
    fn dispatched(harness: &mut Harness) -> Vec<Dispatch> {
        harness.settle.match_held(Instant::now());
        let mut dispatched = harness.pass();
        dispatched.sort_by_key(|dispatch| format!("{:?}", dispatch.job));
        dispatched
    }

    fn jobs(harness: &mut Harness) -> Vec<Job> {
        dispatched(harness)
            .into_iter()
            .map(|dispatch| dispatch.job)
            .collect()
    }

    fn check(path: &str, renamed_from: Option<&str>) -> Job {
        Job::Check {
            path: path.into(),
            renamed_from: renamed_from.map(str::to_owned),
        }
    }

    /// A stage where `album` just appeared and its walk is due, and `files`
    /// in it (relative paths) were written, reported, dispatched and done.
    fn sent_in_a_new_album(files: &[&str]) -> (Harness, String, Vec<String>) {
        let mut harness = Harness::new();
        let album = harness.path("album");
        let appeared = Instant::now();
        harness
            .settle
            .walk_scheduled(&PathBuf::from(&album), appeared, appeared);
        let files: Vec<String> = files.iter().map(|file| format!("{album}/{file}")).collect();
        for path in &files {
            harness.settle.on_closed(path.clone(), Instant::now());
        }
        let sent = harness.pass();
        assert_eq!(sent.len(), files.len());
        sent.into_iter().for_each(|dispatch| harness.finish(dispatch));
        (harness, album, files)
    }

    #[test]
    fn neither_walk_checks_again_what_was_sent() {
        let (mut harness, album, reported) = sent_in_a_new_album(&["1.flac", "CD2/1.flac"]);
        let silent = format!("{album}/2.flac");
        let all = [reported[0].as_str(), reported[1].as_str(), silent.as_str()];
        // The first walk finds all three; only the file nobody reported is news.
        walked(&mut harness, &album, &all);
        let sent = dispatched(&mut harness);
        assert_eq!(
            sent.iter()
                .map(|dispatch| dispatch.job.clone())
                .collect::<Vec<_>>(),
            [check(&silent, None)]
        );
        sent.into_iter().for_each(|dispatch| harness.finish(dispatch));
        // The second walk finds them again: all sent since the album appeared.
        walked(&mut harness, &album, &all);
        assert!(jobs(&mut harness).is_empty());
        // Both walks over, nothing is remembered.
        assert!(harness.settle.unpaired.dispatched.is_empty());
        assert!(harness.settle.unpaired.new_dirs.is_empty());
    }

    #[test]
    fn a_walk_of_a_directory_that_appeared_again_checks_what_was_sent_before() {
        let mut harness = Harness::new();
        let album = harness.path("album");
        let dir = PathBuf::from(&album);
        let millisecond = Duration::from_millis(1);
        let first = Instant::now();
        harness.settle.walk_scheduled(&dir, first, first);
        let (before, after) = (format!("{album}/1.flac"), format!("{album}/2.flac"));
        harness.settle.on_closed(before.clone(), first);
        let sent_before = first + millisecond;
        harness
            .pass_at(sent_before)
            .into_iter()
            .for_each(|dispatch| harness.finish(dispatch));
        // Moved away and back after that: the file at `before` may be another.
        let again = sent_before + millisecond;
        harness.settle.walk_scheduled(&dir, again, Instant::now());
        harness.settle.on_closed(after.clone(), again);
        harness
            .pass_at(again + millisecond)
            .into_iter()
            .for_each(|dispatch| harness.finish(dispatch));
        // The first walk ends; the second, of the same directory, is still
        // on when both files are found.
        walked(&mut harness, &album, &[]);
        walked(&mut harness, &album, &[&before, &after]);
        assert_eq!(jobs(&mut harness), [check(&before, None)]);
        // The two second walks; then every walk is over, and nothing is remembered.
        walked(&mut harness, &album, &[]);
        walked(&mut harness, &album, &[]);
        assert!(harness.settle.unpaired.dispatched.is_empty());
        assert!(harness.settle.unpaired.new_dirs.is_empty());
    }

    #[test]
    fn only_files_below_a_walked_directory_are_remembered() {
        let (mut harness, _, _) = sent_in_a_new_album(&["1.flac"]);
        let elsewhere = harness.path("single.flac");
        harness.settle.on_closed(elsewhere.clone(), Instant::now());
        harness
            .pass()
            .into_iter()
            .for_each(|dispatch| harness.finish(dispatch));
        let remembered = &harness.settle.unpaired.dispatched;
        assert_eq!(remembered.len(), 1);
        assert!(!remembered.contains_key(elsewhere.as_str()));
    }

    #[test]
    fn after_events_were_lost_a_walk_checks_all_it_finds() {
        let (mut harness, album, files) = sent_in_a_new_album(&["1.flac"]);
        // A later change to it may be among the events lost.
        harness.settle.request_full_scan("test: events lost");
        walked(&mut harness, &album, &[&files[0]]);
        assert_eq!(jobs(&mut harness), [check(&files[0], None)]);
    }

    #[test]
    fn a_move_into_a_new_directory_waits_for_its_walk_and_follows_the_match() {
        let (mut harness, a, album) = held_move();
        assert!(jobs(&mut harness).is_empty(), "held, not gone");
        let found = format!("{album}/a.flac");
        harness.settle.on_walked(Discovery::File {
            path: found.clone(),
            modified: None,
            changed: None,
        });
        assert!(
            jobs(&mut harness).is_empty(),
            "neither gone nor created before the walk is done"
        );
        walked(&mut harness, &album, &[]);
        let mut dispatched = dispatched(&mut harness);
        assert_eq!(dispatched.len(), 1);
        assert_eq!(
            dispatched[0].job,
            Job::MatchMoves {
                origins: vec![a.clone()],
                found: vec![found.clone()]
            }
        );
        harness.settle.on_done(Done {
            dispatch: dispatched.remove(0),
            outcome: Outcome::Matched(vec![Moved {
                from: a.clone(),
                to: found.clone(),
            }]),
        });
        assert_eq!(jobs(&mut harness), [check(&found, Some(&a))]);
    }

    #[test]
    fn an_unmatched_move_is_gone_and_what_the_walk_found_is_new() {
        let (mut harness, a, album) = held_move();
        let found = format!("{album}/other.flac");
        walked(&mut harness, &album, &[&found]);
        let mut matching = dispatched(&mut harness);
        assert!(matches!(
            &matching[..],
            [Dispatch {
                job: Job::MatchMoves { .. },
                ..
            }]
        ));
        harness.settle.on_done(Done {
            dispatch: matching.remove(0),
            outcome: Outcome::Matched(Vec::new()),
        });
        assert_eq!(
            jobs(&mut harness),
            [check(&found, None), Job::GoneTree { path: a }]
        );
    }

    #[test]
    fn a_walk_that_finds_nothing_releases_the_move_as_gone() {
        let (mut harness, a, album) = held_move();
        walked(&mut harness, &album, &[]);
        assert_eq!(jobs(&mut harness), [Job::GoneTree { path: a }]);
    }

    #[test]
    fn a_move_is_held_no_longer_than_the_limit() {
        let (mut harness, a, _album) = held_move();
        harness
            .settle
            .match_held(Instant::now() + RENAME_PAIRING + HOLD_LIMIT);
        let jobs: Vec<Job> = harness.pass_jobs();
        assert_eq!(jobs, [Job::GoneTree { path: a }], "the walk never finished");
    }

    #[test]
    fn a_move_away_with_no_new_directory_about_is_gone_at_once() {
        let mut harness = Harness::new();
        let a = harness.path("a.flac");
        moved_from(&mut harness, &a);
        assert_eq!(jobs(&mut harness), [Job::GoneTree { path: a }]);
    }

    #[test]
    fn what_a_walk_finds_while_no_move_waits_is_checked_as_usual() {
        let mut harness = Harness::new();
        let album = harness.path("album");
        harness
            .settle
            .walk_scheduled(&PathBuf::from(&album), Instant::now(), Instant::now());
        let found = format!("{album}/a.flac");
        harness.settle.on_walked(Discovery::File {
            path: found.clone(),
            modified: None,
            changed: None,
        });
        assert_eq!(jobs(&mut harness), [check(&found, None)]);
    }

    #[test]
    fn a_held_move_follows_the_file_from_where_it_was_recorded() {
        // `mv x a; mkdir album; mv a album/` within the settle time: the
        // file was last recorded at x, and whatever was recorded at `a` was
        // replaced by it.
        let mut harness = Harness::new();
        let (x, a, album) = (
            harness.path("x.flac"),
            harness.path("a.flac"),
            harness.path("album"),
        );
        harness.settle.on_rename(x.clone(), a.clone(), Instant::now());
        harness
            .settle
            .walk_scheduled(&PathBuf::from(&album), Instant::now(), Instant::now());
        moved_from(&mut harness, &a);
        let found = format!("{album}/a.flac");
        walked(&mut harness, &album, &[&found]);
        let mut matching = dispatched(&mut harness);
        assert_eq!(matching.len(), 1);
        assert_eq!(
            matching[0].job,
            Job::MatchMoves {
                origins: vec![x.clone()],
                found: vec![found.clone()]
            }
        );
        harness.settle.on_done(Done {
            dispatch: matching.remove(0),
            outcome: Outcome::Matched(vec![Moved {
                from: x.clone(),
                to: found.clone(),
            }]),
        });
        assert_eq!(
            jobs(&mut harness),
            [check(&found, Some(&x)), Job::GoneTree { path: a }]
        );
    }
}
