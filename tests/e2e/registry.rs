//! The PostgreSQL registry against a real server: rows and outbox after each
//! kind of change, concurrent instances, migrations racing at start-up, a busy
//! pool, the outbox scoped to a watched tree, and the instance lock.
//!
//! Every test gets its own schema (`t_<uuid>`, a [`TestDatabase`]) and
//! directory of real files through [`Fixture`], so tests run in parallel and
//! rerun without cleanup; the schema is dropped when a test passes and kept
//! for inspection when it fails. The server is
//! `postgres://postgres@127.0.0.1:5432/test` unless `DATABASE_TEST_URL` says otherwise.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, SystemTime};

use file_watcher::message::{EventType, Message, Origin};
use file_watcher::registry::postgres::{
    InstanceLock, LockError, PostgresRegistry, PostgresSettings, MIGRATIONS, ORPHAN_GRACE,
};
use file_watcher::registry::{Applied, Change, Observed, Registry, RegistryError, Stat};
use postgres::Client;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::support::database::{self, database_url};
use crate::support::{wait_until, FaultProxy, FileRow, TestDatabase};

/// How long a lock or a reconnect may take to show before the test fails:
/// longer than `support::DEADLINE`, as the server notices a dropped session
/// only after a while.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// `url` with one more query parameter.
fn with_parameter(url: &str, parameter: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{parameter}")
}

/// One test's schema and directory of real files.
struct Fixture {
    database: TestDatabase,
    files: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            database: TestDatabase::new(),
            files: tempfile::tempdir().expect("create a temporary directory"),
        }
    }

    fn root(&self) -> PathBuf {
        self.files.path().to_owned()
    }

    fn schema(&self) -> &str {
        self.database.schema()
    }

    fn settings(&self, pool_size: u32) -> PostgresSettings {
        self.database.settings(pool_size)
    }

    fn registry(&self, watched: &Path, instance_id: &str) -> PostgresRegistry {
        connect(&self.settings(2), watched, instance_id)
    }

    /// A session of its own, for transactions and locks beside the registry's.
    fn sql(&self) -> Client {
        self.database.client()
    }

    /// The `application_name` of this test's sessions made with `label`.
    fn application_name(&self, label: &str) -> String {
        format!("{label}-{}", self.schema())
    }

    /// Settings whose sessions carry an `application_name` of their own, so
    /// that [`Fixture::terminate`] can end them from outside.
    fn named_settings(&self, pool_size: u32, label: &str) -> PostgresSettings {
        let mut settings = self.settings(pool_size);
        let application = self.application_name(label);
        settings.url =
            with_parameter(settings.url.expose(), &format!("application_name={application}")).into();
        settings
    }

    /// Ends the server sessions of [`Fixture::named_settings`]`(_, label)`,
    /// waiting (up to 10 s) until each backend is gone, and its locks with
    /// it; returns how many there were.
    fn terminate(&self, admin: &mut Client, label: &str) -> u64 {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
                 WHERE application_name = $1",
                &[&self.application_name(label)],
            )
            .expect("terminate the sessions")
    }

    /// The `files` row of `path`, if there is one.
    fn row(&self, path: &Path) -> Option<FileRow> {
        self.database.row(&text(path))
    }

    /// Outbox rows in recording order: (message id, file path, body).
    fn outbox(&self) -> Vec<(Uuid, String, String)> {
        self.database
            .query(
                "SELECT message_id::text, file_path, body FROM outbox ORDER BY id",
                &[],
            )
            .iter()
            .map(|record| {
                (
                    record.get::<_, &str>(0).parse().expect("a uuid"),
                    record.get(1),
                    record.get(2),
                )
            })
            .collect()
    }

    fn count(&self, query: &str) -> i64 {
        self.database.query(query, &[])[0].get(0)
    }
}

fn connect(settings: &PostgresSettings, watched: &Path, instance_id: &str) -> PostgresRegistry {
    PostgresRegistry::connect(settings, origin(watched, instance_id)).expect("connect the registry")
}

fn origin(watched: &Path, instance_id: &str) -> Origin {
    Origin {
        instance_id: instance_id.to_owned(),
        watched_directory: text(watched),
    }
}

fn text(path: &Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}

fn write(path: &Path, content: &str) {
    fs::create_dir_all(path.parent().expect("files have a parent")).expect("create parent");
    fs::write(path, content).expect("write test file");
}

/// What a worker would hand the registry after reading `path`.
fn observe(path: &Path) -> Observed {
    let bytes = fs::read(path).expect("read test file");
    Observed {
        path: text(path),
        stat: Stat::of(path).expect("stat").expect("a regular file"),
        sha256: format!("{:x}", Sha256::digest(&bytes)),
        xxh128: format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes)),
    }
}

fn present(path: &Path, renamed_from: Option<&Path>) -> Change {
    Change::Present {
        observed: observe(path),
        renamed_from: renamed_from.map(text),
    }
}

fn gone(path: &Path) -> Change {
    Change::Gone { path: text(path) }
}

fn recorded(applied: Applied) -> Vec<Message> {
    match applied {
        Applied::Recorded(messages) => messages,
        Applied::Changed => panic!("expected the change to be recorded, got Changed"),
    }
}

fn apply(registry: &PostgresRegistry, change: &Change) -> Vec<Message> {
    recorded(registry.apply(change, Uuid::new_v4()).expect("apply"))
}

/// The messages waiting in `registry`'s outbox (up to 10).
fn outgoing(registry: &PostgresRegistry) -> Vec<Message> {
    let waiting = registry.outgoing(10).expect("read the outbox");
    waiting.iter().map(|encoded| encoded.message().clone()).collect()
}

fn kinds(messages: &[Message]) -> Vec<EventType> {
    messages.iter().map(|message| message.event_type).collect()
}

#[test]
fn create_unchanged_refresh_modify_and_delete() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let file = root.join("a.flac");
    write(&file, "abc");

    let observed = observe(&file);
    let created = apply(&registry, &present(&file, None));
    assert_eq!(kinds(&created), [EventType::Created]);
    let row = fixture.row(&file).expect("a row");
    assert_eq!(row.state, "present");
    assert_eq!(row.sha256, observed.sha256);
    assert_eq!(row.size_bytes, 3);
    assert_eq!(row.last_event, "created");
    assert_eq!(row.instance_id, "one");
    assert_eq!(row.message_id, created[0].message_id);
    assert!(row.published_at.is_none());
    let queued = fixture.outbox();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].0, created[0].message_id);
    assert_eq!(queued[0].2, created[0].to_json(), "the body is the exact JSON");
    assert_eq!(
        registry.lookup(&text(&file)).unwrap().expect("present").sha256,
        observed.sha256
    );

    assert!(
        apply(&registry, &present(&file, None)).is_empty(),
        "unchanged: no message"
    );
    assert_eq!(fixture.outbox().len(), 1);

    // Same content with a fresher stat: only the stat columns change.
    registry.mark_published(&[created[0].message_id]).unwrap();
    fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    let touched = observe(&file);
    assert!(apply(&registry, &present(&file, None)).is_empty());
    let row = fixture.row(&file).unwrap();
    assert_eq!(
        (row.mtime_ns, row.ctime_ns),
        (touched.stat.mtime_ns, touched.stat.ctime_ns)
    );
    assert_eq!(row.message_id, created[0].message_id);
    assert!(
        row.published_at.is_some(),
        "a refresh leaves the publish state alone"
    );
    assert!(fixture.outbox().is_empty());

    write(&file, "abcd");
    let modified = apply(&registry, &present(&file, None));
    assert_eq!(kinds(&modified), [EventType::Modified]);
    let row = fixture.row(&file).unwrap();
    assert_eq!(row.sha256, observe(&file).sha256);
    assert_eq!(row.last_event, "modified");
    assert_eq!(row.message_id, modified[0].message_id);
    assert!(row.published_at.is_none());

    assert_eq!(
        registry.apply(&gone(&file), Uuid::new_v4()).unwrap(),
        Applied::Changed,
        "a deletion needs a stat that says gone"
    );
    assert_eq!(fixture.row(&file).unwrap().state, "present");

    fs::remove_file(&file).unwrap();
    let deleted = apply(&registry, &gone(&file));
    assert_eq!(kinds(&deleted), [EventType::Deleted]);
    assert!(deleted[0].content.is_none());
    let row = fixture.row(&file).unwrap();
    assert_eq!(
        (row.state.as_str(), row.last_event.as_str()),
        ("deleted", "deleted")
    );
    assert_eq!(row.message_id, deleted[0].message_id);
    assert!(row.published_at.is_none());
    assert_eq!(registry.lookup(&text(&file)).unwrap(), None);
    assert!(apply(&registry, &gone(&file)).is_empty(), "already deleted");

    let ids: Vec<Uuid> = fixture.outbox().iter().map(|entry| entry.0).collect();
    assert_eq!(ids, [modified[0].message_id, deleted[0].message_id]);
}

#[test]
fn rename_and_move_carry_the_row() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let first = root.join("a.flac");
    let renamed = root.join("b.flac");
    let moved = root.join("sub").join("b.flac");
    write(&first, "song");
    let hash = observe(&first).sha256;
    apply(&registry, &present(&first, None));

    fs::rename(&first, &renamed).unwrap();
    let messages = apply(&registry, &present(&renamed, Some(&first)));
    assert_eq!(kinds(&messages), [EventType::Renamed]);
    assert_eq!(messages[0].old_path.as_deref(), Some(text(&first).as_str()));
    assert_eq!(messages[0].content.as_ref().unwrap().sha256_hash, hash);
    let source = fixture.row(&first).unwrap();
    assert_eq!(
        (source.state.as_str(), source.last_event.as_str()),
        ("deleted", "renamed")
    );
    assert_eq!(source.message_id, messages[0].message_id);
    let target = fixture.row(&renamed).unwrap();
    assert_eq!(target.state, "present");
    assert_eq!(target.sha256, hash);
    assert_eq!(target.old_path.as_deref(), Some(text(&first).as_str()));
    assert_eq!(target.message_id, messages[0].message_id);

    fs::create_dir(moved.parent().unwrap()).unwrap();
    fs::rename(&renamed, &moved).unwrap();
    let messages = apply(&registry, &present(&moved, Some(&renamed)));
    assert_eq!(kinds(&messages), [EventType::Moved]);
    assert_eq!(fixture.row(&renamed).unwrap().state, "deleted");
    assert_eq!(fixture.row(&moved).unwrap().last_event, "moved");
    assert_eq!(registry.lookup(&text(&renamed)).unwrap(), None);
    assert_eq!(registry.lookup(&text(&moved)).unwrap().unwrap().sha256, hash);
    assert_eq!(fixture.outbox().len(), 3);
}

#[test]
fn rename_over_an_existing_file_deletes_it_first() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let source = root.join("a.flac");
    let target = root.join("b.flac");
    write(&source, "one");
    write(&target, "two");
    let source_hash = observe(&source).sha256;
    apply(&registry, &present(&source, None));
    apply(&registry, &present(&target, None));

    fs::rename(&source, &target).unwrap();
    let correlation = Uuid::new_v4();
    let messages = recorded(
        registry
            .apply(&present(&target, Some(&source)), correlation)
            .unwrap(),
    );
    assert_eq!(kinds(&messages), [EventType::Deleted, EventType::Renamed]);
    assert!(messages
        .iter()
        .all(|message| message.correlation_id == correlation));
    assert_eq!(messages[0].file_path, text(&target));
    assert_eq!(messages[1].old_path.as_deref(), Some(text(&source).as_str()));
    assert_eq!(fixture.row(&source).unwrap().state, "deleted");
    let row = fixture.row(&target).unwrap();
    assert_eq!(
        (row.state.as_str(), row.sha256.as_str()),
        ("present", source_hash.as_str())
    );
    assert_eq!(row.message_id, messages[1].message_id);
    let tail: Vec<Uuid> = fixture.outbox()[2..].iter().map(|entry| entry.0).collect();
    assert_eq!(
        tail,
        [messages[0].message_id, messages[1].message_id],
        "publish order"
    );
}

#[test]
fn observation_overtaken_by_a_newer_write_is_not_recorded() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let file = root.join("a.flac");
    write(&file, "first");
    let old = present(&file, None);
    write(&file, "second, longer");
    assert_eq!(registry.apply(&old, Uuid::new_v4()).unwrap(), Applied::Changed);
    assert!(fixture.row(&file).is_none());
    assert!(fixture.outbox().is_empty());
}

/// A batch is one transaction, but each change keeps its own answer: the one
/// whose file changed after it was observed writes nothing and answers
/// `Changed`, and every other kind of change in the batch commits.
#[test]
fn a_batch_commits_every_change_but_the_one_whose_file_changed() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let (created, overtaken, gone, from, to, same) = (
        root.join("created.flac"),
        root.join("overtaken.flac"),
        root.join("gone.flac"),
        root.join("from.flac"),
        root.join("to.flac"),
        root.join("same.flac"),
    );
    for (file, content) in [(&gone, "gone"), (&from, "moving"), (&same, "same")] {
        write(file, content);
        apply(&registry, &present(file, None));
    }
    fs::remove_file(&gone).unwrap();
    fs::rename(&from, &to).unwrap();
    // Same content written again: a fresher stat, nothing to announce.
    thread::sleep(Duration::from_millis(10));
    write(&same, "same");
    write(&created, "new");
    write(&overtaken, "first");
    let changes = [
        present(&created, None),
        present(&overtaken, None),
        Change::Gone { path: text(&gone) },
        present(&to, Some(&from)),
        present(&same, None),
    ];
    write(&overtaken, "second, longer");
    fixture.sql().execute("DELETE FROM outbox", &[]).unwrap();

    let batch: Vec<(Change, Uuid)> = changes
        .iter()
        .map(|change| (change.clone(), Uuid::new_v4()))
        .collect();
    let answers: Vec<Applied> = registry
        .apply_all(&batch)
        .into_iter()
        .map(|answer| answer.expect("apply"))
        .collect();
    let kinds_of = |answer: &Applied| match answer {
        Applied::Recorded(messages) => Some(kinds(messages)),
        Applied::Changed => None,
    };
    assert_eq!(
        answers.iter().map(kinds_of).collect::<Vec<_>>(),
        [
            Some(vec![EventType::Created]),
            None,
            Some(vec![EventType::Deleted]),
            Some(vec![EventType::Renamed]),
            Some(vec![]),
        ]
    );
    assert_eq!(fixture.row(&created).unwrap().state, "present");
    assert!(
        fixture.row(&overtaken).is_none(),
        "the overtaken observation wrote nothing"
    );
    assert_eq!(fixture.row(&gone).unwrap().state, "deleted");
    assert_eq!(fixture.row(&from).unwrap().state, "deleted");
    assert_eq!(
        fixture.row(&to).unwrap().old_path.as_deref(),
        Some(text(&from).as_str())
    );
    let fresh = Stat::of(&same).unwrap().unwrap();
    let row = fixture.row(&same).unwrap();
    assert_eq!(
        (row.mtime_ns, row.ctime_ns),
        (fresh.mtime_ns, fresh.ctime_ns),
        "stat refreshed"
    );
    // The outbox holds the batch's messages in its order.
    let queued: Vec<String> = fixture.outbox().into_iter().map(|(_, path, _)| path).collect();
    assert_eq!(queued, [text(&created), text(&gone), text(&to)]);
}

/// Marking a batch published writes each row's new version on the row's own
/// page and no index entry (a HOT update), for rows recorded together and
/// marked together, as the workers and the publisher do: a page keeps room
/// for a second version of every row on it, and no index holds
/// `published_at` (migration 6). Read from the table's statistics, which a
/// session reports when it ends.
#[test]
fn marking_a_recorded_batch_published_is_a_hot_update() {
    const FILES: usize = 256;
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let paths: Vec<PathBuf> = (0..FILES)
        .map(|i| root.join(format!("album{}/track{i:03}.flac", i / 16)))
        .collect();
    for path in &paths {
        write(path, &format!("{}", path.display()));
    }
    let batch: Vec<(Change, Uuid)> = paths
        .iter()
        .map(|path| (present(path, None), Uuid::new_v4()))
        .collect();
    let ids: Vec<Uuid> = registry
        .apply_all(&batch)
        .into_iter()
        .flat_map(|answer| recorded(answer.expect("apply")))
        .map(|message| message.message_id)
        .collect();
    assert_eq!(ids.len(), FILES);
    registry.mark_published(&ids).expect("mark the batch published");
    drop(registry);

    let schema = fixture.schema().to_owned();
    let (updated, hot) = fixture.database.wait_until(
        "the registry's sessions to report their updates",
        LOCK_WAIT,
        |database| {
            let record = &database.query(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
                 WHERE schemaname = $1 AND relname = 'files'",
                &[&schema],
            )[0];
            let counts: (i64, i64) = (record.get(0), record.get(1));
            (counts.0 >= FILES as i64).then_some(counts)
        },
    );
    assert_eq!((updated, hot), (FILES as i64, FILES as i64));
    assert!(paths
        .iter()
        .all(|path| fixture.row(path).unwrap().published_at.is_some()));
}

/// The mark takes the outbox rows before the file rows, as earlier builds
/// did in two statements (`MARK_PUBLISHED`): publishers of two builds
/// confirming one message cannot wait on each other in a cycle. With the
/// outbox row held elsewhere, the mark waits for it without the file row.
#[test]
fn marking_published_locks_the_outbox_rows_before_the_file_rows() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let path = root.join("a.flac");
    write(&path, "a");
    let id = apply(&registry, &present(&path, None))[0].message_id;

    let mut holder = fixture.sql();
    let mut holding = holder.transaction().unwrap();
    let holder_pid: i32 = holding.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    holding
        .execute(
            "SELECT 1 FROM outbox WHERE message_id = $1::text::uuid FOR UPDATE",
            &[&id.to_string()],
        )
        .unwrap();
    thread::scope(|scope| {
        let marking = scope.spawn(|| registry.mark_published(&[id]));
        let mut observer = fixture.sql();
        wait_until("the mark waits for the outbox row", LOCK_WAIT, || {
            observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    &[&holder_pid],
                )
                .unwrap()
                .get::<_, i64>(0)
                > 0
        });
        let file_row = observer.query(
            "SELECT 1 FROM files WHERE file_path = $1 FOR UPDATE NOWAIT",
            &[&text(&path)],
        );
        assert!(
            file_row.is_ok(),
            "the mark holds the file row while it waits for the outbox row: {file_row:?}"
        );
        holding.commit().unwrap();
        marking.join().unwrap().expect("the mark goes through");
    });
    assert!(fixture.row(&path).unwrap().published_at.is_some());
    assert!(fixture.outbox().is_empty());
}

#[test]
fn stale_observation_never_overwrites_a_newer_one() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let mut sql = fixture.sql();
    let file = root.join("a.flac");
    write(&file, "abc");
    let change = present(&file, None);
    apply(&registry, &change);
    // Another instance recorded a newer state of the file (later ctime, other
    // content) before this instance's older observation arrives.
    sql.execute(
        "UPDATE files SET ctime_ns = ctime_ns + 60000000000, sha256 = 'newer' WHERE file_path = $1",
        &[&text(&file)],
    )
    .unwrap();
    let before = fixture.row(&file).unwrap();

    assert!(apply(&registry, &change).is_empty());
    let after = fixture.row(&file).unwrap();
    assert_eq!(
        (after.sha256.as_str(), after.ctime_ns),
        ("newer", before.ctime_ns)
    );
    assert_eq!(after.message_id, before.message_id);
    assert_eq!(fixture.outbox().len(), 1);
}

#[test]
fn directory_rename_moves_every_row_below_it() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let old_dir = root.join("a");
    let new_dir = root.join("z");
    for path in [
        old_dir.join("1.flac"),
        old_dir.join("2.flac"),
        old_dir.join("deep/3.flac"),
        root.join("ab/4.flac"),
        new_dir.join("1.flac"),
    ] {
        write(&path, &text(&path));
        apply(&registry, &present(&path, None));
    }
    // `z` went away without the registry hearing of it; then `a` became `z`.
    fs::remove_dir_all(&new_dir).unwrap();
    fs::rename(&old_dir, &new_dir).unwrap();
    let queued_before = fixture.outbox().len();

    let change = Change::DirectoryRenamed {
        from: text(&old_dir),
        to: text(&new_dir),
    };
    let correlation = Uuid::new_v4();
    let messages = recorded(registry.apply(&change, correlation).unwrap());
    assert_eq!(
        kinds(&messages),
        [
            EventType::Deleted,
            EventType::Moved,
            EventType::Moved,
            EventType::Moved
        ]
    );
    assert!(messages
        .iter()
        .all(|message| message.correlation_id == correlation));
    assert_eq!(messages[0].file_path, text(&new_dir.join("1.flac")));
    let carried: Vec<(&str, Option<&str>)> = messages[1..]
        .iter()
        .map(|message| (message.file_path.as_str(), message.old_path.as_deref()))
        .collect();
    let expected: Vec<(String, String)> = ["1.flac", "2.flac", "deep/3.flac"]
        .iter()
        .map(|name| (text(&new_dir.join(name)), text(&old_dir.join(name))))
        .collect();
    let expected: Vec<(&str, Option<&str>)> = expected
        .iter()
        .map(|(new, old)| (new.as_str(), Some(old.as_str())))
        .collect();
    assert_eq!(carried, expected);
    assert!(messages[1..].iter().all(|message| message.content.is_some()));

    let under_new = registry.present_under(&text(&new_dir), None, 10).unwrap();
    assert_eq!(
        under_new,
        expected.iter().map(|(new, _)| *new).collect::<Vec<_>>()
    );
    assert!(registry
        .present_under(&text(&old_dir), None, 10)
        .unwrap()
        .is_empty());
    assert_eq!(
        registry.present_under(&text(&root.join("ab")), None, 10).unwrap(),
        [text(&root.join("ab/4.flac"))]
    );
    assert_eq!(
        registry.present_under(&text(&new_dir), None, 2).unwrap(),
        under_new[..2]
    );
    assert_eq!(
        registry
            .present_under(&text(&new_dir), Some(&under_new[1]), 2)
            .unwrap(),
        under_new[2..]
    );

    let moved = fixture.row(&new_dir.join("deep/3.flac")).unwrap();
    assert_eq!(moved.last_event, "moved");
    assert_eq!(moved.sha256, observe(&new_dir.join("deep/3.flac")).sha256);
    assert_eq!(fixture.row(&old_dir.join("2.flac")).unwrap().state, "deleted");
    let tail: Vec<Uuid> = fixture.outbox()[queued_before..]
        .iter()
        .map(|entry| entry.0)
        .collect();
    let ids: Vec<Uuid> = messages.iter().map(|message| message.message_id).collect();
    assert_eq!(tail, ids, "outbox holds the messages in publish order");

    assert!(apply(&registry, &change).is_empty(), "nothing left to carry");
}

#[test]
fn two_instances_record_one_change_once() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let files: Vec<PathBuf> = (0..20).map(|n| root.join(format!("{n:02}.flac"))).collect();
    for file in &files {
        write(file, &text(file));
    }
    let registries = [fixture.registry(&root, "one"), fixture.registry(&root, "two")];
    let race = |changes: &[Change]| -> usize {
        let barrier = Barrier::new(registries.len());
        thread::scope(|scope| {
            let workers: Vec<_> = registries
                .iter()
                .map(|registry| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        changes
                            .iter()
                            .map(|change| apply(registry, change).len())
                            .sum::<usize>()
                    })
                })
                .collect();
            workers.into_iter().map(|worker| worker.join().unwrap()).sum()
        })
    };

    let creations: Vec<Change> = files.iter().map(|file| present(file, None)).collect();
    assert_eq!(race(&creations), files.len(), "one created message per file");
    for file in &files {
        fs::remove_file(file).unwrap();
    }
    let deletions: Vec<Change> = files.iter().map(|file| gone(file)).collect();
    assert_eq!(race(&deletions), files.len(), "one deleted message per file");

    assert_eq!(fixture.outbox().len(), 2 * files.len());
    assert_eq!(
        fixture.count("SELECT count(*) FROM files WHERE state = 'deleted'"),
        20
    );
}

#[test]
fn same_content_in_three_directories() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let registry = fixture.registry(&root, "one");
    let copies = [
        root.join("x/song.flac"),
        root.join("y/song.flac"),
        root.join("z/copy.flac"),
    ];
    for copy in &copies {
        write(copy, "the same bytes");
        apply(&registry, &present(copy, None));
    }
    let other = root.join("x/other.flac");
    write(&other, "different bytes");
    apply(&registry, &present(&other, None));

    let hash = observe(&copies[0]).sha256;
    let mut sql = fixture.sql();
    let with_hash: i64 = sql
        .query_one("SELECT count(*) FROM files WHERE sha256 = $1", &[&hash])
        .unwrap()
        .get(0);
    assert_eq!(with_hash, 3);
    assert_eq!(
        registry.same_content(&hash).unwrap(),
        copies.each_ref().map(|copy| text(copy))
    );

    fs::remove_file(&copies[1]).unwrap();
    apply(&registry, &gone(&copies[1]));
    assert_eq!(
        registry.same_content(&hash).unwrap(),
        [text(&copies[0]), text(&copies[2])],
        "only present copies count"
    );
}

#[test]
fn five_processes_migrate_a_fresh_schema_at_once() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let settings = fixture.settings(1);
    let barrier = Barrier::new(5);
    let results: Vec<Result<PostgresRegistry, RegistryError>> = thread::scope(|scope| {
        let starters: Vec<_> = (0..5)
            .map(|n| {
                let (barrier, settings, root) = (&barrier, &settings, &root);
                scope.spawn(move || {
                    barrier.wait();
                    PostgresRegistry::connect(settings, origin(root, &format!("instance-{n}")))
                })
            })
            .collect();
        starters
            .into_iter()
            .map(|starter| starter.join().unwrap())
            .collect()
    });
    let registries: Vec<PostgresRegistry> = results
        .into_iter()
        .map(|result| result.expect("every process starts"))
        .collect();

    let mut sql = fixture.sql();
    let versions: Vec<i32> = sql
        .query("SELECT version FROM schema_migrations ORDER BY version", &[])
        .unwrap()
        .iter()
        .map(|record| record.get(0))
        .collect();
    let known: Vec<i32> = MIGRATIONS.iter().map(|migration| migration.version).collect();
    assert_eq!(versions, known, "each migration applied exactly once");

    let file = root.join("a.flac");
    write(&file, "abc");
    assert_eq!(
        kinds(&apply(&registries[4], &present(&file, None))),
        [EventType::Created]
    );
}

#[test]
fn one_connection_serves_four_threads_and_a_thousand_files() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let mut settings = fixture.settings(1);
    settings.connect_timeout = Duration::from_secs(1);
    let registry = connect(&settings, &root, "one");
    let changes: Vec<Change> = (0..1000)
        .map(|n| {
            let file = root.join(format!("{:02}/{n:04}.flac", n % 10));
            write(&file, &n.to_string());
            present(&file, None)
        })
        .collect();

    let recorded_messages: usize = thread::scope(|scope| {
        let workers: Vec<_> = changes
            .chunks(250)
            .map(|share| {
                let registry = &registry;
                scope.spawn(move || {
                    share
                        .iter()
                        .map(|change| apply(registry, change).len())
                        .sum::<usize>()
                })
            })
            .collect();
        workers.into_iter().map(|worker| worker.join().unwrap()).sum()
    });
    assert_eq!(recorded_messages, 1000);
    assert_eq!(
        fixture.count("SELECT count(*) FROM files WHERE state = 'present'"),
        1000
    );
    assert_eq!(fixture.count("SELECT count(*) FROM outbox"), 1000);
    assert_eq!(registry.outgoing(2000).unwrap().len(), 1000);
}

#[test]
fn busy_pool_waits_instead_of_failing() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let application = format!("busy-{}", fixture.schema());
    let mut settings = fixture.settings(1);
    settings.url = with_parameter(settings.url.expose(), &format!("application_name={application}")).into();
    settings.connect_timeout = Duration::from_millis(300);
    let registry = connect(&settings, &root, "one");
    let held = root.join("held.flac");
    let waiting = root.join("waiting.flac");
    write(&held, "one");
    apply(&registry, &present(&held, None));
    write(&held, "two");
    write(&waiting, "three");
    let (held_change, waiting_change) = (present(&held, None), present(&waiting, None));

    // Hold the row, so that applying `held` keeps the pool's only connection.
    let mut blocker = fixture.sql();
    let mut transaction = blocker.transaction().unwrap();
    transaction
        .execute(
            "SELECT 1 FROM files WHERE file_path = $1 FOR UPDATE",
            &[&text(&held)],
        )
        .unwrap();
    thread::scope(|scope| {
        let first = scope.spawn(|| apply(&registry, &held_change));
        let mut observer = fixture.sql();
        wait_until("the first apply waits for the row lock", LOCK_WAIT, || {
            observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    &[&application],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 1
        });
        let second = scope.spawn(|| apply(&registry, &waiting_change));
        // The condition under test is "waited longer than the pool timeout".
        thread::sleep(settings.connect_timeout * 4);
        assert!(!second.is_finished(), "the second apply waits for the connection");
        transaction.commit().unwrap();
        assert_eq!(kinds(&first.join().unwrap()), [EventType::Modified]);
        assert_eq!(kinds(&second.join().unwrap()), [EventType::Created]);
    });
}

#[test]
fn outgoing_is_limited_to_the_watched_tree() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let music = root.join("music");
    let music2 = root.join("music2");
    let in_music = music.join("a.flac");
    let in_music2 = music2.join("b.flac");
    write(&in_music, "a");
    write(&in_music2, "b");
    let music_registry = fixture.registry(&music, "music");
    let music2_registry = fixture.registry(&music2, "music2");
    let parent_registry = fixture.registry(&root, "parent");
    let from_music = apply(&music_registry, &present(&in_music, None));
    let from_music2 = apply(&music2_registry, &present(&in_music2, None));

    assert_eq!(outgoing(&music_registry), from_music);
    assert_eq!(outgoing(&music2_registry), from_music2);
    // Another instance's fresh messages are its own to publish ...
    assert!(parent_registry.outgoing(10).unwrap().is_empty());
    // ... until they have waited out the grace period (their recorder is gone).
    let mut sql = fixture.sql();
    sql.execute(
        &format!(
            "UPDATE {}.outbox SET created_at = now() - interval '{} seconds'",
            fixture.schema(),
            ORPHAN_GRACE.as_secs() + 1
        ),
        &[],
    )
    .unwrap();
    assert_eq!(parent_registry.outgoing(10).unwrap().len(), 2);
    let body = &fixture.outbox()[0].2;
    assert_eq!(body, &from_music[0].to_json(), "the body as recorded");
    assert_eq!(music_registry.outgoing(10).unwrap()[0].json(), body);

    music_registry
        .mark_published(&[from_music[0].message_id])
        .unwrap();
    assert!(music_registry.outgoing(10).unwrap().is_empty());
    assert_eq!(outgoing(&music2_registry), from_music2);
    assert!(fixture.row(&in_music).unwrap().published_at.is_some());
    assert!(fixture.row(&in_music2).unwrap().published_at.is_none());
    music_registry.mark_published(&[]).unwrap();
}

#[test]
fn instance_lock_admits_one_holder() {
    let fixture = Fixture::new();
    let settings = fixture.settings(1);
    let mut lock = InstanceLock::acquire(&settings, "worker-1").expect("first holder");
    match InstanceLock::acquire(&settings, "worker-1") {
        Err(LockError::HeldElsewhere { instance_id }) => assert_eq!(instance_id, "worker-1"),
        other => panic!("expected HeldElsewhere, got {other:?}"),
    }
    let error = InstanceLock::acquire(&settings, "worker-1").unwrap_err();
    assert!(error.to_string().contains("\"worker-1\""), "{error}");
    let _other_id = InstanceLock::acquire(&settings, "worker-2").expect("another id");
    let other_schema = PostgresSettings {
        schema: Some(format!("{}_other", fixture.schema())),
        ..settings.clone()
    };
    let _other_schema = InstanceLock::acquire(&other_schema, "worker-1").expect("another schema");
    lock.verify().expect("still held");

    drop(lock);
    InstanceLock::acquire(&settings, "worker-1").expect("free once the holder is gone");
}

#[test]
fn instance_lock_is_taken_again_after_the_connection_is_lost() {
    let fixture = Fixture::new();
    let settings = fixture.named_settings(1, "lock");
    let mut lock = InstanceLock::acquire(&settings, "worker-1").unwrap();
    let mut admin = fixture.sql();

    assert_eq!(fixture.terminate(&mut admin, "lock"), 1);
    lock.verify().expect("reconnected and locked again");
    assert!(matches!(
        InstanceLock::acquire(&fixture.settings(1), "worker-1"),
        Err(LockError::HeldElsewhere { .. })
    ));

    assert_eq!(fixture.terminate(&mut admin, "lock"), 1);
    let _successor = InstanceLock::acquire(&fixture.settings(1), "worker-1").expect("free");
    match lock.verify() {
        Err(LockError::HeldElsewhere { instance_id }) => assert_eq!(instance_id, "worker-1"),
        other => panic!("expected HeldElsewhere, got {other:?}"),
    }
}

/// A pooled connection the server cut while it sat idle is tested when it
/// is handed out again, and replaced: the next statement works. (One that
/// came back to the pool within the last second is handed out untested,
/// `KNOWN_GOOD_FOR` in `statements.rs`; this one waited longer.)
#[test]
fn a_pooled_connection_the_server_cut_while_idle_is_replaced_before_use() {
    let fixture = Fixture::new();
    let settings = fixture.named_settings(1, "idle");
    let root = fixture.root();
    let registry = connect(&settings, &root, "one");
    let path = text(&root.join("a.flac"));
    assert_eq!(registry.lookup(&path).expect("look up"), None);

    let terminated = fixture.terminate(&mut fixture.sql(), "idle");
    assert!(terminated >= 1, "the pool holds a connection");
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        registry.lookup(&path).expect("look up on a fresh connection"),
        None
    );
}

#[test]
fn unreachable_database_is_unavailable_and_the_password_stays_hidden() {
    let fixture = Fixture::new();
    for url in [
        "postgres://postgres:s3cr3t-pw@127.0.0.1:1/test",
        "host=127.0.0.1 port=1 user=postgres password=s3cr3t-pw dbname=test",
    ] {
        let settings = PostgresSettings {
            url: url.to_owned().into(),
            ..fixture.settings(1)
        };
        let error = PostgresRegistry::connect(&settings, origin(&fixture.root(), "one")).unwrap_err();
        assert!(error.is_unavailable(), "{error}");
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        let error = InstanceLock::acquire(&settings, "one").unwrap_err();
        assert!(matches!(error, LockError::Unavailable { .. }), "{error}");
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        assert!(!format!("{settings:?}").contains("s3cr3t"));
    }
}

#[test]
fn missing_database_is_a_query_error() {
    let fixture = Fixture::new();
    let url = database_url();
    let without_parameters = url.split('?').next().unwrap_or(&url);
    let (server, _) = without_parameters
        .rsplit_once('/')
        .expect("a URL with a database");
    let settings = PostgresSettings {
        url: format!("{server}/no_such_database_{}", Uuid::new_v4().simple()).into(),
        ..fixture.settings(1)
    };
    match PostgresRegistry::connect(&settings, origin(&fixture.root(), "one")) {
        Err(RegistryError::Query { what, detail }) => {
            assert_eq!(what, "connect");
            assert!(detail.contains("3D000"), "{detail}");
        }
        other => panic!("expected a Query error, got {other:?}"),
    }
}

#[test]
fn database_outage_is_unavailable_and_the_registry_recovers() {
    let fixture = Fixture::new();
    let root = fixture.root();
    // An outage of this test's own, without stopping the server other tests share.
    let proxy = FaultProxy::start(database::address());
    let settings = PostgresSettings {
        url: database::url_through(&proxy).into(),
        connect_timeout: Duration::from_millis(500),
        ..fixture.settings(2)
    };
    let registry = connect(&settings, &root, "one");
    let mut lock = InstanceLock::acquire(&settings, "one").expect("lock");
    let before = root.join("before.flac");
    let during = root.join("during.flac");
    write(&before, "before");
    apply(&registry, &present(&before, None));

    proxy.refuse(true);
    proxy.cut();
    write(&during, "during");
    let change = present(&during, None);
    let error = registry.apply(&change, Uuid::new_v4()).unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    let error = registry.outgoing(10).unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    match lock.verify() {
        Err(LockError::Unavailable { .. }) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }

    proxy.refuse(false);
    let mut messages = Vec::new();
    wait_until(
        "the registry reaches the database again",
        LOCK_WAIT,
        || match registry.apply(&change, Uuid::new_v4()) {
            Ok(applied) => {
                messages = recorded(applied);
                true
            }
            Err(error) => {
                assert!(error.is_unavailable(), "{error}");
                false
            }
        },
    );
    assert_eq!(kinds(&messages), [EventType::Created]);
    // The server drops the old session (and its lock) a moment after the
    // proxy cut it; until then the lock reads as held by that session.
    wait_until("the instance lock is held again", LOCK_WAIT, || {
        match lock.verify() {
            Ok(()) => true,
            Err(LockError::Unavailable { .. } | LockError::HeldElsewhere { .. }) => false,
            Err(error) => panic!("{error}"),
        }
    });
    assert!(matches!(
        InstanceLock::acquire(&fixture.settings(1), "one"),
        Err(LockError::HeldElsewhere { .. })
    ));
}

#[test]
fn deadlock_victim_is_retried_without_an_error() {
    let fixture = Fixture::new();
    let root = fixture.root();
    let application = format!("deadlock-{}", fixture.schema());
    let mut settings = fixture.settings(1);
    settings.url = with_parameter(settings.url.expose(), &format!("application_name={application}")).into();
    let registry = connect(&settings, &root, "one");
    let source = root.join("a.flac");
    let target = root.join("b.flac");
    write(&source, "one");
    write(&target, "two");
    apply(&registry, &present(&source, None));
    apply(&registry, &present(&target, None));
    fs::rename(&source, &target).unwrap();
    let rename = present(&target, Some(&source));

    // Another session holds the target row and then asks for the source row,
    // which the registry locks first: a deadlock. The other session checks
    // for deadlocks much later than the server's default, so the registry's
    // transaction is the one PostgreSQL aborts (SQLSTATE 40P01).
    let mut other = fixture.sql();
    let mut transaction = other.transaction().unwrap();
    transaction
        .batch_execute("SET LOCAL deadlock_timeout = '60s'")
        .unwrap();
    transaction
        .execute(
            "SELECT 1 FROM files WHERE file_path = $1 FOR UPDATE",
            &[&text(&target)],
        )
        .unwrap();
    thread::scope(|scope| {
        let renaming = scope.spawn(|| registry.apply(&rename, Uuid::new_v4()));
        let mut observer = fixture.sql();
        wait_until("the registry waits for the target row", LOCK_WAIT, || {
            observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    &[&application],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 1
        });
        transaction
            .execute(
                "SELECT 1 FROM files WHERE file_path = $1 FOR UPDATE",
                &[&text(&source)],
            )
            .expect("the registry, not this session, is the deadlock victim");
        transaction.commit().unwrap();
        let messages = recorded(renaming.join().unwrap().expect("retried, not failed"));
        assert_eq!(kinds(&messages), [EventType::Deleted, EventType::Renamed]);
    });
    assert_eq!(fixture.outbox().len(), 4);
}
