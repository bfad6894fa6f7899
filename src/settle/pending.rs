//! Pending entries and their timers: when a changed file counts as finished.
//!
//! Every path with news has one entry. It becomes ready once the writer is
//! done and the settle time has passed quietly (and any retry backoff is
//! over); timers are queued lazily and checked against the entry when they
//! fire. Past `max_pending` entries everything is dropped in favour of a full
//! rescan.

use std::cmp::Reverse;
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

use super::dispatch::ReadyItem;
use super::{PathKey, Settle, LOG_TARGET};
use crate::path_text;

/// A writer that keeps a file open without writing for this long is taken as
/// finished anyway (some tools never close, or write through mmap); a later
/// write produces a `modified`.
const OPEN_WRITER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Changed,
    Removed,
}

/// One path's change, from the first event until it is dispatched.
///
/// Kept small (64 bytes): a burst or an import keeps one per file pending,
/// and the map's slots are most of the memory a pending path costs. What
/// few entries need (a rename's origin, a retry, a scan's mtime) lives in
/// [`Rare`], allocated only for them.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) state: State,
    /// The writer is done with it: closed after writing, renamed into place,
    /// removed, discovered by a scan, or (poll mode) always.
    pub(super) closed: bool,
    /// Already in the ready queue.
    pub(super) ready: bool,
    pub(super) last_activity: Instant,
    /// The earliest time a timer for this entry is queued for.
    pub(super) scheduled: Instant,
    pub(super) correlation_id: Uuid,
    rare: Option<Box<Rare>>,
}

/// The parts of an [`Entry`] that most entries never set.
#[derive(Debug, Default)]
struct Rare {
    /// Where the file was when it was last recorded, if it got here by rename.
    renamed_from: Option<String>,
    /// Not before this instant (a retry's backoff).
    not_before: Option<Instant>,
    attempt: u32,
    /// Found by a scan, not by an event, while its mtime was this recent:
    /// at the deadline the file is looked at again, and waits again while
    /// its mtime keeps moving (see [`Settle::on_found`]). Any event for the
    /// path clears it: from then on events say when the writer is done.
    found_mtime: Option<SystemTime>,
}

impl Entry {
    fn new(state: State, now: Instant) -> Entry {
        Entry {
            state,
            closed: false,
            ready: false,
            last_activity: now,
            scheduled: now,
            correlation_id: Uuid::new_v4(),
            rare: None,
        }
    }

    /// `Rare`, allocated now if `needed` (a value to store); `None` when
    /// it is not there and nothing needs storing.
    fn rare(&mut self, needed: bool) -> Option<&mut Rare> {
        if needed && self.rare.is_none() {
            self.rare = Some(Box::default());
        }
        self.rare.as_deref_mut()
    }

    /// Where the file was when it was last recorded, if it got here by rename.
    pub(super) fn renamed_from(&self) -> Option<&String> {
        self.rare.as_ref()?.renamed_from.as_ref()
    }

    pub(super) fn set_renamed_from(&mut self, renamed_from: Option<String>) {
        if let Some(rare) = self.rare(renamed_from.is_some()) {
            rare.renamed_from = renamed_from;
        }
    }

    pub(super) fn into_renamed_from(self) -> Option<String> {
        self.rare?.renamed_from
    }

    /// Not before this instant (a retry's backoff).
    pub(super) fn not_before(&self) -> Option<Instant> {
        self.rare.as_ref()?.not_before
    }

    pub(super) fn set_not_before(&mut self, not_before: Option<Instant>) {
        if let Some(rare) = self.rare(not_before.is_some()) {
            rare.not_before = not_before;
        }
    }

    /// Attempts made at it so far (retries of a job that failed).
    pub(super) fn attempt(&self) -> u32 {
        self.rare.as_ref().map_or(0, |rare| rare.attempt)
    }

    pub(super) fn set_attempt(&mut self, attempt: u32) {
        if let Some(rare) = self.rare(attempt != 0) {
            rare.attempt = attempt;
        }
    }

    /// Found by a scan while its mtime was this recent (see [`Rare`]).
    #[cfg(test)]
    pub(super) fn found_mtime(&self) -> Option<SystemTime> {
        self.rare.as_ref()?.found_mtime
    }

    pub(super) fn set_found_mtime(&mut self, found_mtime: Option<SystemTime>) {
        if let Some(rare) = self.rare(found_mtime.is_some()) {
            rare.found_mtime = found_mtime;
        }
    }

    fn take_found_mtime(&mut self) -> Option<SystemTime> {
        self.rare.as_mut()?.found_mtime.take()
    }
}

impl Settle {
    /// The entry for `path`, created if new, with its activity time set to
    /// `now`. Callers change it in place; `reschedule_touched` then makes sure
    /// a timer fires at its (possibly earlier) deadline.
    pub(super) fn touch(&mut self, path: String, now: Instant) -> &mut Entry {
        let key = match self.pending.get_key_value(path.as_str()) {
            Some((key, _)) => PathKey::clone(key),
            None => {
                if self.pending.len() >= self.options.max_pending {
                    self.shed_pending();
                }
                PathKey::from(path)
            }
        };
        self.touched.push(PathKey::clone(&key));
        let entry = self.pending.entry(key).or_insert_with(|| {
            let mut entry = Entry::new(State::Changed, now);
            entry.scheduled = now + OPEN_WRITER_TIMEOUT * 2; // no timer queued yet
            entry
        });
        entry.last_activity = now;
        entry.set_found_mtime(None);
        entry
    }

    /// A close or a cleared backoff moves a deadline earlier than the timer
    /// already queued: queue one for the new deadline.
    pub(super) fn reschedule_touched(&mut self) {
        let settle = self.settle_time();
        for path in std::mem::take(&mut self.touched) {
            let Some(entry) = self.pending.get_mut(&*path) else {
                continue;
            };
            let deadline = deadline(entry, settle);
            if !entry.ready && deadline < entry.scheduled {
                entry.scheduled = deadline;
                self.timers.push(Reverse((deadline, path)));
            }
        }
    }

    /// Data was written (or, polling, the file changed since the last poll).
    pub(super) fn on_write(&mut self, path: String, poll: bool, now: Instant) {
        if !self.announces(&path) {
            return;
        }
        let entry = self.touch(path, now);
        entry.state = State::Changed;
        // A write after a close means the file was opened again: wait for the next close.
        entry.closed = poll;
    }

    pub(super) fn on_closed(&mut self, path: String, now: Instant) {
        let entry = self.touch(path, now);
        entry.state = State::Changed;
        entry.closed = true;
    }

    pub(super) fn mark_removed(&mut self, path: String, now: Instant) {
        if let Some(from) = self
            .pending
            .get(path.as_str())
            .and_then(|entry| entry.renamed_from().cloned())
        {
            // It was renamed here and never recorded here: the old name goes,
            // and so does whatever was recorded here before the rename replaced it.
            self.pending.remove(&*path);
            self.mark_removed(from, now);
        }
        let entry = self.touch(path, now);
        entry.state = State::Removed;
        entry.closed = true;
    }

    /// Events were lost (a queue overflowed), and with them perhaps the
    /// close of a file whose writer had not closed it yet: otherwise it
    /// would wait `OPEN_WRITER_TIMEOUT` for a close that never comes. Each
    /// such entry is taken as closed now and settles the way a file a scan
    /// finds while recent does: one settle time from now, and for as long
    /// after that as its mtime keeps moving (`still_written`).
    ///
    /// Done again when the rescan that follows is through
    /// ([`Settle::after_full_scan`]): when our own channel overflows, the
    /// earlier events of a file whose close was dropped may still be queued
    /// behind the overflow's notice, and only open it after this.
    pub(super) fn on_events_lost(&mut self, now: Instant) {
        self.closes_lost = true;
        self.take_open_writers_as_closed(now);
    }

    /// A full scan is through: if events were lost since the last one,
    /// writers still open may be waiting for closes that were lost.
    pub(super) fn after_full_scan(&mut self, now: Instant) {
        if self.closes_lost {
            self.take_open_writers_as_closed(now);
            // Another scan follows (more was lost meanwhile): it looks again.
            self.closes_lost = self.full_scan_again;
        }
    }

    fn take_open_writers_as_closed(&mut self, now: Instant) {
        for (path, entry) in self.pending.iter_mut().filter(|(_, entry)| !entry.closed) {
            entry.closed = true;
            entry.last_activity = now;
            // Gone or unreadable: nothing to wait for, the worker finds out.
            entry.set_found_mtime(modified_time(path));
            self.touched.push(path.clone());
        }
    }

    /// A file was gone when a worker looked. If a pending rename starts at
    /// it, the rename accounts for it; otherwise it (and where it was renamed
    /// from) is removed, after the usual settle period.
    pub(super) fn on_vanished(&mut self, path: String, renamed_from: Option<String>, now: Instant) {
        let claimed = |candidate: &str| {
            self.pending
                .values()
                .any(|entry| entry.renamed_from().map(String::as_str) == Some(candidate))
        };
        if self.pending.contains_key(&*path) || claimed(&path) {
            return;
        }
        if let Some(from) = renamed_from {
            if !claimed(&from) {
                self.mark_removed(from, now);
            }
        }
        self.mark_removed(path, now);
    }

    /// A scan found a file that has no pending entry: treated like a
    /// modification by a writer that is done, so it is looked at one settle
    /// time later.
    ///
    /// Later than what depends on the walk. The walk of a new directory
    /// comes one settle time after the directory appeared, and finds the
    /// files written into it before its watch existed, which raised no
    /// events: such a file counts as changed at its last change, its ctime
    /// (`changed`; the last write or attribute change, which, unlike the
    /// mtime, a copy cannot set), so it need not wait a second settle time.
    /// But never as changed before the directory appeared by this machine's
    /// clock: a share's clock that runs behind, or timestamps stored coarse,
    /// cannot cut the wait shorter than that. A ctime ahead of now, or none,
    /// counts as now. Any other find (a catch-up or periodic scan) counts as
    /// changed when found.
    ///
    /// When its mtime was within the settle time of now (a writer
    /// interrupted by a restart, or one whose events an overflow lost, or
    /// whose directory was not watched yet, may still be at it), its mtime
    /// is looked at again at that deadline, and it waits again for as long
    /// as the mtime keeps moving: events may not be coming for it.
    ///
    /// A find below a new directory whose walks are not all done is skipped
    /// when the file was dispatched no earlier than that directory appeared
    /// (see `Unpaired::dispatched`): it would only be checked twice.
    ///
    /// Invariant: a discovery never touches an entry that exists (its own
    /// events decide when it is ready; a close already seen is never undone
    /// and its wait never lengthened), and never waits for a close, which
    /// may have come and gone before the walk passed by.
    pub(super) fn on_found(
        &mut self,
        path: String,
        modified: Option<SystemTime>,
        changed: Option<SystemTime>,
        now: Instant,
    ) {
        if self.pending.contains_key(&*path) {
            return;
        }
        if self.unpaired.dispatched_since_it_appeared(&path) {
            return;
        }
        let appeared_above = self.unpaired.appeared_above(&path);
        let settle = self.settle_time();
        let wall_clock = SystemTime::now();
        let age = |time: SystemTime| wall_clock.duration_since(time).ok();
        let changed_at = match appeared_above {
            Some(appeared) => {
                let quiet_for = changed.and_then(age).unwrap_or_default();
                let changed_at = now.checked_sub(quiet_for).unwrap_or(appeared);
                changed_at.max(appeared).min(now)
            }
            None => now,
        };
        let entry = self.touch(path, now);
        entry.closed = true;
        entry.last_activity = changed_at;
        let recent = modified.filter(|modified| age(*modified).is_none_or(|age| age < settle));
        entry.set_found_mtime(recent);
    }

    /// At the deadline of a file a scan found while it was recent: `true`
    /// (and a new deadline one settle time from now) if its mtime moved
    /// meanwhile.
    fn still_written(&mut self, path: &str, now: Instant) -> bool {
        let Some(entry) = self.pending.get_mut(path) else {
            return false;
        };
        let Some(seen) = entry.take_found_mtime() else {
            return false;
        };
        let Some(modified) = modified_time(path) else {
            return false; // gone or unreadable: the worker finds out
        };
        if modified == seen {
            return false;
        }
        log::debug!(
            target: LOG_TARGET,
            "{path} was found by a scan and is still being written: waiting for it to settle"
        );
        entry.last_activity = now;
        entry.set_found_mtime(Some(modified));
        true
    }

    /// Too much pending: drop it all and let a full scan and sweep recover.
    fn shed_pending(&mut self) {
        log::warn!(
            target: LOG_TARGET,
            "more than {} changes pending: dropping them and rescanning the tree instead",
            self.options.max_pending
        );
        self.pending.clear();
        self.timers.clear();
        self.ready.retain(|item| matches!(item, ReadyItem::Tree { .. }));
        self.refused.forget_retries();
        self.request_full_scan("too many pending changes");
    }

    pub(super) fn promote_due(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, path)) = self.timers.pop().expect("peeked");
            let Some(entry) = self.pending.get(&*path) else {
                continue; // dispatched or dropped since
            };
            if entry.ready {
                continue;
            }
            let deadline = deadline(entry, self.settle_time());
            if deadline > now {
                self.pending.get_mut(&*path).expect("looked up above").scheduled = deadline;
                self.timers.push(Reverse((deadline, path)));
                continue;
            }
            if self.still_written(&path, now) {
                let settle = self.settle_time();
                let entry = self.pending.get_mut(&*path).expect("looked up above");
                let again = self::deadline(entry, settle);
                entry.scheduled = again;
                self.timers.push(Reverse((again, path)));
                continue;
            }
            if self.unpaired.holds(&path) {
                self.hold_back_entry(path, now); // a move may be matched to it (see `unpaired`)
                continue;
            }
            self.pending.get_mut(&*path).expect("looked up above").ready = true;
            self.ready.push_back(ReadyItem::Path(path));
        }
    }
}

/// The mtime of the file at `path` (not following a symlink); `None` when it
/// is gone or cannot be read.
fn modified_time(path: &str) -> Option<SystemTime> {
    std::fs::symlink_metadata(path_text::decode(path))
        .and_then(|metadata| metadata.modified())
        .ok()
}

/// When an entry is ready: quiet for the settle time after the writer closed
/// it (or for `OPEN_WRITER_TIMEOUT` while it stays open), and not before a
/// retry's backoff.
fn deadline(entry: &Entry, settle: Duration) -> Instant {
    let quiet = if entry.closed { settle } else { OPEN_WRITER_TIMEOUT };
    let settled = entry.last_activity + quiet;
    entry
        .not_before()
        .map_or(settled, |not_before| not_before.max(settled))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tests::Harness;
    use super::*;
    use crate::job::{Dispatch, Job};

    /// What every pending path costs besides its text (BENCHMARKS.md).
    #[test]
    fn an_entry_takes_64_bytes_and_stores_the_rare_parts_only_when_set() {
        // `Instant` is 16 bytes on Linux (8 elsewhere).
        assert!(std::mem::size_of::<Entry>() <= 64);
        let now = Instant::now();
        let mut entry = Entry::new(State::Changed, now);
        entry.set_renamed_from(None);
        entry.set_not_before(None);
        entry.set_attempt(0);
        entry.set_found_mtime(None);
        assert!(entry.rare.is_none(), "nothing to store, nothing allocated");
        entry.set_attempt(2);
        entry.set_renamed_from(Some("/m/a.flac".into()));
        assert_eq!(
            (entry.attempt(), entry.renamed_from().map(String::as_str)),
            (2, Some("/m/a.flac"))
        );
        assert_eq!((entry.not_before(), entry.found_mtime()), (None, None));
        // With the box there, storing nothing clears what was stored.
        entry.set_attempt(0);
        entry.set_renamed_from(None);
        assert_eq!((entry.attempt(), entry.renamed_from()), (0, None));
        entry.set_renamed_from(Some("/m/b.flac".into()));
        assert_eq!(entry.into_renamed_from().as_deref(), Some("/m/b.flac"));
    }

    /// A harness whose settle time is 100 ms.
    fn settling_harness() -> Harness {
        let mut harness = Harness::new();
        harness.settle.options.settle = Duration::from_millis(100);
        harness
    }

    /// A file at `name` written now and still open, which waits for its
    /// close: its path, and when it was written.
    fn open_writer(harness: &mut Harness, name: &str) -> (String, Instant) {
        let path = harness.path(name);
        std::fs::write(path_text::decode(&path), b"partial").unwrap();
        let written = Instant::now();
        harness.settle.on_write(path.clone(), false, written);
        assert!(
            harness.pass_at(written + Duration::from_secs(1)).is_empty(),
            "an open writer waits for its close"
        );
        (path, written)
    }

    fn jobs(dispatches: Vec<Dispatch>) -> Vec<Job> {
        dispatches.into_iter().map(|dispatch| dispatch.job).collect()
    }

    #[test]
    fn a_writer_seen_after_a_loss_is_taken_as_closed_once_the_rescan_is_through() {
        let mut harness = settling_harness();
        harness.settle.on_events_lost(Instant::now());
        // Its write was queued before the notice of the overflow and taken
        // in after it; its close was among what was dropped.
        let (late, _) = open_writer(&mut harness, "late.flac");

        let scanned = Instant::now();
        harness.settle.after_full_scan(scanned);
        assert_eq!(
            jobs(harness.pass_at(scanned + harness.settle.options.settle)),
            vec![Job::Check {
                path: late,
                renamed_from: None
            }]
        );

        // Nothing was lost since: a writer still open waits for its close.
        let (_, written) = open_writer(&mut harness, "open.flac");
        harness.settle.after_full_scan(written);
        assert!(
            harness.pass_at(written + Duration::from_secs(1)).is_empty(),
            "nothing lost: it waits for its close"
        );
    }

    #[test]
    fn a_writer_whose_close_may_be_lost_settles_once_its_mtime_stops_moving() {
        let mut harness = settling_harness();
        let settle = harness.settle.options.settle;
        let (open, _) = open_writer(&mut harness, "open.flac");
        let lost = Instant::now();
        harness.settle.on_events_lost(lost);
        // Written again after the loss: its mtime moved, so it waits once more.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(path_text::decode(&open), b"partial, and more").unwrap();
        assert!(
            harness.pass_at(lost + settle).is_empty(),
            "its mtime moved since the loss"
        );
        assert_eq!(
            jobs(harness.pass_at(lost + settle * 2)),
            vec![Job::Check {
                path: open,
                renamed_from: None
            }],
            "settled once its mtime stayed put, not after OPEN_WRITER_TIMEOUT"
        );
    }

    fn check(path: &str) -> Job {
        Job::Check {
            path: path.to_owned(),
            renamed_from: None,
        }
    }

    #[test]
    fn a_discovery_never_reopens_an_entry_whose_close_was_seen() {
        let mut harness = Harness::new();
        harness.settle.options.settle = Duration::from_secs(1);
        let path = harness.path("a.flac");
        std::fs::write(&path, b"x").unwrap();
        let now = Instant::now();
        harness.settle.on_closed(path.clone(), now);
        harness.settle.on_found(
            path.clone(),
            Some(SystemTime::now()),
            Some(SystemTime::now()),
            now,
        );
        let entry = &harness.settle.pending[path.as_str()];
        assert!(entry.closed && entry.found_mtime().is_none() && entry.last_activity == now);
        let jobs = harness.pass();
        assert_eq!(jobs.len(), 1, "ready one settle time after the close");
        assert_eq!(jobs[0].job, check(&path));
    }

    #[test]
    fn a_file_found_by_a_scan_is_ready_one_settle_time_after_its_last_change() {
        let mut harness = Harness::new();
        let settle = Duration::from_secs(2);
        harness.settle.options.settle = settle;
        let now = Instant::now();
        let wall_clock = SystemTime::now();
        // `album` appeared a little over one settle time ago and is being
        // walked now; `late` appeared 0.3 s ago.
        let (album, late) = (harness.path("album"), harness.path("late"));
        harness
            .settle
            .walk_scheduled(Path::new(&album), now - settle - Duration::from_millis(10), now);
        harness
            .settle
            .walk_scheduled(Path::new(&late), now - Duration::from_millis(300), now);
        let found = [
            // Changed 0.5 s before it was found: 1.5 s to go.
            ("album/fresh.flac", wall_clock - Duration::from_millis(500)),
            // Written just after its directory appeared, before the watch
            // existed: ready when found.
            (
                "album/walked.flac",
                wall_clock - settle - Duration::from_millis(5),
            ),
            // Older than its directory by its clock (a share's clock behind,
            // or a coarse timestamp): changed when the directory appeared.
            ("album/behind.flac", wall_clock - Duration::from_secs(3600)),
            ("late/behind.flac", wall_clock - Duration::from_secs(3600)),
            // Ahead of this clock: changed now.
            ("album/ahead.flac", wall_clock + Duration::from_secs(3600)),
            // Not below a new directory (a catch-up or periodic scan): changed now.
            ("rescanned.flac", wall_clock - Duration::from_secs(3600)),
        ];
        for (name, changed) in found {
            let path = harness.path(name);
            std::fs::create_dir_all(Path::new(&path).parent().unwrap()).unwrap();
            std::fs::write(&path, b"x").unwrap();
            let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
            harness.settle.on_found(path, Some(modified), Some(changed), now);
        }
        let mut jobs_at = |at: Duration| -> Vec<Job> {
            let mut jobs: Vec<Job> = harness
                .pass_at(now + at)
                .into_iter()
                .map(|dispatch| dispatch.job)
                .collect();
            jobs.sort_by_key(|job| format!("{job:?}"));
            jobs
        };
        assert_eq!(
            jobs_at(Duration::ZERO),
            [
                check(&format!("{album}/behind.flac")),
                check(&format!("{album}/walked.flac"))
            ]
        );
        assert_eq!(jobs_at(Duration::from_millis(1200)), []);
        assert_eq!(
            jobs_at(Duration::from_millis(1600)),
            [check(&format!("{album}/fresh.flac"))]
        );
        assert_eq!(
            jobs_at(Duration::from_millis(1800)),
            [check(&format!("{late}/behind.flac"))]
        );
        assert_eq!(jobs_at(Duration::from_millis(1950)), []);
        let root = album.trim_end_matches("/album");
        assert_eq!(
            jobs_at(Duration::from_millis(2050)),
            [
                check(&format!("{album}/ahead.flac")),
                check(&format!("{root}/rescanned.flac"))
            ]
        );
    }

    #[test]
    fn a_recent_file_found_by_a_scan_waits_while_its_mtime_moves() {
        let mut harness = Harness::new();
        let settle = Duration::from_secs(1);
        harness.settle.options.settle = settle;
        let (recent, old) = (harness.path("recent.flac"), harness.path("old.flac"));
        std::fs::write(&recent, b"half").unwrap();
        std::fs::write(&old, b"whole").unwrap();
        let now = Instant::now();
        // What the scan saw of `recent` is not what is there now: it moved since.
        let seen = SystemTime::now() - Duration::from_millis(100);
        harness.settle.on_found(recent.clone(), Some(seen), None, now);
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        harness
            .settle
            .on_found(old.clone(), Some(long_ago), Some(long_ago), now);
        harness.settle.reschedule_touched();
        // At the deadline: `old` goes, `recent` was written meanwhile and waits again.
        harness.settle.promote_due(now + settle);
        harness.settle.dispatch(now + settle);
        let jobs: Vec<Job> = harness.jobs.try_iter().map(|dispatch| dispatch.job).collect();
        assert_eq!(jobs, [check(&old)]);
        // Unchanged one settle time later: it goes.
        let later = Instant::now() + settle * 2;
        harness.settle.promote_due(later);
        harness.settle.dispatch(later);
        let jobs: Vec<Job> = harness.jobs.try_iter().map(|dispatch| dispatch.job).collect();
        assert_eq!(jobs, [check(&recent)]);
    }
}
