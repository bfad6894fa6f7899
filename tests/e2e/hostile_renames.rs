//! Renames on a busy, hostile tree (issue 8, items 2–4): pairing by the
//! kernel's cookie beside other traffic, moves into directories made a moment
//! earlier, and rename chains onto one name within the settle time.
//!
//! Each test runs the real binary in stdout mode (registry in memory) on a
//! directory of its own. Sleeps here are part of a scenario (a writer
//! running beside a rename); waiting for the daemon is always a wait for a
//! message, with a deadline.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    assert_content, event_type, file_path, old_path, sha256_hex, triples, wait_until, write_file, Daemon,
    TestDatabase, DEADLINE,
};

/// Writes `relative` and waits until it has been announced as `created`.
fn create_announced(daemon: &Daemon, relative: &str, content: &[u8]) -> String {
    let path = daemon.path_str(relative);
    write_file(&daemon.path(relative), content);
    daemon.wait_for_event("created", &path);
    path
}

/// Waits until every path in `wanted` has had a message about it (as
/// `file_path`), whatever its kind.
fn wait_for_all(daemon: &Daemon, wanted: &HashSet<&str>) {
    let mut seen = HashSet::new();
    daemon.wait_for(
        |message| {
            if wanted.contains(file_path(message)) {
                seen.insert(file_path(message).to_owned());
            }
            seen.len() == wanted.len()
        },
        DEADLINE,
    );
}

/// What a consumer that applies every message in order believes is present:
/// path → SHA-256 (empty for a row without content).
fn replay(messages: &[Value]) -> BTreeMap<String, String> {
    let mut present = BTreeMap::new();
    for message in messages {
        let path = file_path(message).to_owned();
        let hash = message["sha256_hash"].as_str().unwrap_or_default().to_owned();
        match event_type(message) {
            "created" | "modified" => {
                present.insert(path, hash);
            }
            "deleted" => {
                present.remove(&path);
            }
            "renamed" | "moved" => {
                if let Some(old) = old_path(message) {
                    present.remove(old);
                }
                present.insert(path, hash);
            }
            other => panic!("unknown event_type {other:?} in {message}"),
        }
    }
    present
}

/// Writes each busy writer is allowed per rename. Over 200 renames that is
/// at most 8,000 writes in all: under the daemon's raw-event channel
/// (16 Ki events) and the kernel's queue even if none were coalesced, so
/// the writers cannot cause an overflow, whose rescan would mislabel renames
/// for another reason (item 1).
const WRITES_PER_RENAME: usize = 20;

/// Two writers appending to files of their own, beside a renamer: downloads
/// in progress while a tagger renames. The writers spin on their threads and
/// write as fast as they can whenever the renamer has given them room
/// ([`BusyWriters::write_beside`]), so their writes run in parallel with the
/// renames. That is what the scenario needs: the kernel can only put a
/// write's event between a rename's `MOVED_FROM` and `MOVED_TO` when the
/// write runs at the same moment on another CPU, and on a loaded two-core
/// machine writers that merely take turns with the renamer never do.
struct BusyWriters {
    /// Writes made so far, one counter per writer.
    counts: Vec<Arc<AtomicUsize>>,
    /// Writes each writer may have made so far.
    allowed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyWriters {
    fn start(paths: [std::path::PathBuf; 2]) -> BusyWriters {
        let allowed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Vec<Arc<AtomicUsize>> = paths.iter().map(|_| Arc::default()).collect();
        let threads = paths
            .into_iter()
            .zip(&counts)
            .map(|(path, writes)| {
                let (writes, allowed, stop) = (writes.clone(), allowed.clone(), stop.clone());
                std::thread::Builder::new()
                    .name(format!("busy-{}", path.file_name().unwrap().to_string_lossy()))
                    .spawn(move || {
                        let mut file = OpenOptions::new().create(true).append(true).open(&path).unwrap();
                        while !stop.load(Ordering::Relaxed) {
                            if writes.load(Ordering::Relaxed) < allowed.load(Ordering::Acquire) {
                                file.write_all(&[7u8; 64]).unwrap();
                                writes.fetch_add(1, Ordering::Relaxed);
                            } else {
                                std::hint::spin_loop();
                            }
                        }
                    })
                    .expect("spawn a busy writer")
            })
            .collect();
        BusyWriters {
            counts,
            allowed,
            stop,
            threads,
        }
    }

    fn writes(&self) -> Vec<usize> {
        self.counts
            .iter()
            .map(|writes| writes.load(Ordering::Relaxed))
            .collect()
    }

    /// Gives the writers room for another burst and returns once one of them
    /// is seen writing, i.e. running on another CPU right now; false if none
    /// starts within `patience` (a machine with one free CPU), and the
    /// caller goes on anyway.
    fn write_beside(&self, patience: Duration) -> bool {
        let total = || self.writes().iter().sum::<usize>();
        let before = total();
        self.allowed.fetch_add(WRITES_PER_RENAME, Ordering::Release);
        let started = Instant::now();
        while started.elapsed() < patience {
            if total() > before {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    fn stop(self) -> Vec<usize> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("busy writer panicked");
        }
        self.counts
            .iter()
            .map(|writes| writes.load(Ordering::Relaxed))
            .collect()
    }
}

/// Item 2: another event between `MOVED_FROM` and `MOVED_TO` must not break
/// the pair; renames are paired by the kernel's cookie.
#[test]
fn two_hundred_renames_beside_two_busy_writers_are_two_hundred_renamed() {
    const RENAMES: usize = 200;
    let mut builder = Daemon::builder();
    for number in 0..RENAMES {
        builder = builder.file(format!("r{number:03}.flac"), format!("rename me {number}"));
    }
    let daemon = builder.start();
    let pairs: Vec<(String, String)> = (0..RENAMES)
        .map(|number| {
            (
                daemon.path_str(&format!("r{number:03}.flac")),
                daemon.path_str(&format!("r{number:03} renamed.flac")),
            )
        })
        .collect();

    let writers = BusyWriters::start([daemon.path("busy-1.flac"), daemon.path("busy-2.flac")]);
    // Each rename waits (briefly) until a writer is running beside it; this
    // is the scenario's concurrency, not a wait for the daemon.
    let mut beside = 0;
    for (old, new) in &pairs {
        if writers.write_beside(Duration::from_millis(20)) {
            beside += 1;
        }
        fs::rename(old, new).unwrap();
    }
    let writes = writers.stop();

    // Every new name has been announced somehow (renamed, or wrongly created).
    wait_for_all(&daemon, &pairs.iter().map(|(_, new)| new.as_str()).collect());
    let messages = daemon.barrier();

    let mut mislabelled = Vec::new();
    for (old, new) in &pairs {
        let about: Vec<Value> = messages
            .iter()
            .filter(|message| {
                file_path(message) == old || file_path(message) == new || old_path(message) == Some(old)
            })
            .cloned()
            .collect();
        let expected = vec![("renamed".to_owned(), new.clone(), Some(old.clone()))];
        if triples(&about) != expected {
            mislabelled.push(triples(&about));
        }
    }
    let overflowed = daemon
        .stderr_lines()
        .into_iter()
        .any(|line| line.contains("rescanning the tree"));
    assert!(
        mislabelled.is_empty(),
        "{} of {RENAMES} renames were not one `renamed` ({beside} of them made while a writer \
         was running; writes {writes:?}; overflow rescan: {overflowed}); the first ones: {:?}",
        mislabelled.len(),
        &mislabelled[..mislabelled.len().min(3)]
    );
}

/// Item 3: what beets, Picard and Lidarr do (`mkdir d; rename(f, d/f)`) is a
/// `moved`, although the new directory had no watch yet to report the
/// `MOVED_TO`.
#[test]
fn moves_into_directories_made_a_moment_earlier_are_moved() {
    let daemon = Daemon::start();
    moves_into_fresh_directories_are_moved(&daemon, |number| format!("album {number:02}"));
}

/// Item 3 as beets does it (`os.makedirs("Artist/Album")`: the file lands
/// two new directories down), recorded in PostgreSQL, whose rows must keep
/// the device and inode the match needs.
#[test]
fn moves_into_nested_directories_made_a_moment_earlier_are_moved_with_postgresql() {
    let database = TestDatabase::new();
    let daemon = Daemon::builder().with_database(&database).start();
    moves_into_fresh_directories_are_moved(&daemon, |number| format!("artist {number:02}/album"));
}

/// Rows recorded before the registry kept device and inode (migration 3)
/// cannot be matched; the full scan at the next start fills them in, with
/// no hashing and no message.
#[test]
fn rows_without_device_and_inode_get_them_at_the_next_start_without_a_message() {
    use std::os::unix::fs::MetadataExt;

    let database = TestDatabase::new();
    let mut first = Daemon::builder().with_database(&database).start();
    let path = create_announced(&first, "old.flac", b"recorded before migration 3");
    let created = first.messages_for(&path).remove(0);
    let before = database.wait_published(&path, created["message_id"].as_str().unwrap());
    assert!(first.terminate().success(), "{}", first.stderr_text());
    database.query("UPDATE files SET device = NULL, inode = NULL", &[]);

    let second = Daemon::builder()
        .with_database(&database)
        .watching(first.dir())
        .start();
    second.wait_for_full_scan(first.dir());
    let identity = database.wait_until("the row's device and inode", DEADLINE, |database| {
        let records = database.query("SELECT device, inode FROM files WHERE file_path = $1", &[&path]);
        let (device, inode): (Option<i64>, Option<i64>) = (records[0].get(0), records[0].get(1));
        device.zip(inode)
    });
    let metadata = fs::metadata(&path).unwrap();
    assert_eq!(identity, (metadata.dev() as i64, metadata.ino() as i64));
    let after = database.row(&path).expect("still recorded");
    assert_eq!(
        (after.message_id, after.published_at, after.state.as_str()),
        (before.message_id, before.published_at, "present"),
        "the refresh is no news"
    );
    assert_eq!(database.outbox_len(), 0, "nothing recorded to publish");
}

/// Twenty files announced, then each moved into a directory (`directory`
/// of its number) made just before: twenty `moved` from the old path, with
/// the content, and nothing else.
#[track_caller]
fn moves_into_fresh_directories_are_moved(daemon: &Daemon, directory: impl Fn(usize) -> String) {
    const MOVES: usize = 20;
    let moves: Vec<_> = (0..MOVES)
        .map(|number| {
            let name = format!("track {number:02}.flac");
            let content = format!("track {number} content");
            write_file(&daemon.path(&name), &content);
            let old = daemon.path_str(&name);
            let new = daemon.path_str(&format!("{}/{name}", directory(number)));
            (number, name, content, old, new)
        })
        .collect();
    // Announced first, as the consumer's catalogue knows them.
    for (.., old, _) in &moves {
        daemon.wait_for_event("created", old);
    }
    let announced = daemon.barrier().len();

    for (number, name, ..) in &moves {
        let album = daemon.path(&directory(*number));
        fs::create_dir_all(&album).unwrap();
        fs::rename(daemon.path(name), album.join(name)).unwrap();
    }
    // Every new path has been announced somehow (moved, or wrongly created).
    wait_for_all(daemon, &moves.iter().map(|(.., new)| new.as_str()).collect());
    let after = daemon.barrier().split_off(announced);

    let mut wrong = Vec::new();
    for (_, _, content, old, new) in &moves {
        let about: Vec<Value> = after
            .iter()
            .filter(|message| file_path(message) == old || file_path(message) == new)
            .cloned()
            .collect();
        let expected = vec![("moved".to_owned(), new.clone(), Some(old.clone()))];
        if triples(&about) == expected {
            assert_content(&about[0], content.as_bytes());
        } else {
            let correlations: Vec<&str> = about
                .iter()
                .map(|message| message["correlation_id"].as_str().unwrap_or_default())
                .collect();
            wrong.push(format!("{:?} correlation ids {correlations:?}", triples(&about)));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {MOVES} moves into a fresh directory were not one `moved` from the old path:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Item 4: `mv c b; mv a b` within the settle time: `c` is gone too.
#[test]
fn rename_chain_onto_one_name_within_the_settle_time_still_removes_the_first() {
    let daemon = Daemon::start();
    let a = create_announced(&daemon, "a.flac", b"content of a");
    let c = create_announced(&daemon, "c.flac", b"content of c");
    let b = daemon.path_str("b.flac");
    let announced = daemon.barrier().len();

    // Back to back: both land well inside one SETTLE_MS window.
    fs::rename(daemon.path("c.flac"), daemon.path("b.flac")).unwrap();
    fs::rename(daemon.path("a.flac"), daemon.path("b.flac")).unwrap();

    let renamed = daemon.wait_for(
        |message| {
            event_type(message) == "renamed"
                && file_path(message) == b
                && old_path(message) == Some(a.as_str())
        },
        DEADLINE,
    );
    assert_content(&renamed, b"content of a");
    let messages = daemon.barrier();
    // A consumer applying every message must end with b alone, holding a's
    // content: `c` is gone (a `deleted c`, or c renamed to b and then
    // replaced, both say so).
    let present = replay(&messages);
    let expected = BTreeMap::from([(b.clone(), sha256_hex(b"content of a"))]);
    assert_eq!(
        present,
        expected,
        "after `mv c b; mv a b` a consumer must hold b alone ({c} gone); messages after the creates: {:?}",
        triples(&messages[announced..])
    );
}

/// Found on the way (items 2–4): `mv a b; rm b`, the `rm` while the check of
/// `b` is reading it. The check comes back "changed"; the removal of `b`
/// then took the rename's origin along without acting on it, so `a` was
/// never removed and stayed recorded forever.
#[test]
fn a_renamed_file_removed_while_it_is_read_still_removes_its_old_name() {
    let daemon = Daemon::start();
    let a = create_announced(&daemon, "a.flac", b"announced at a");
    let b = daemon.path_str("b.flac");
    // New content (so `b` must be hashed, not follow a's hashes), big
    // enough that reading it takes a while, then the rename.
    write_file(&daemon.path("a.flac"), vec![9u8; 64 << 20]);
    fs::rename(daemon.path("a.flac"), daemon.path("b.flac")).unwrap();
    wait_until("the daemon reads b.flac", DEADLINE, || has_open(daemon.pid(), &b));
    fs::remove_file(daemon.path("b.flac")).unwrap();

    daemon.wait_for_event("deleted", &a);
    let messages = daemon.barrier();
    assert_eq!(
        replay(&messages),
        BTreeMap::new(),
        "after `mv a b; rm b` nothing is left; messages: {:?}",
        triples(&messages)
    );
}

/// Whether process `pid` has `path` open (its `/proc/<pid>/fd` links).
fn has_open(pid: u32, path: &str) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .flatten()
                .any(|entry| fs::read_link(entry.path()).is_ok_and(|target| target == Path::new(path)))
        })
        .unwrap_or(false)
}
