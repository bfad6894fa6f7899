//! End-to-end event rules: real files in a real directory, the real binary,
//! one JSON message per settled change on stdout.
//!
//! Every test has its own directory (see `support`). A file that must produce
//! *no* message is checked with `Daemon::barrier`: a marker file written after
//! the action settles after it, so once the marker is announced anything the
//! action produced is already visible.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::support::{
    assert_content, event_type, file_path, inotify_watches, old_path, sha256_hex, summary, triples,
    write_file, xxh128_hex, Daemon, SETTLE_MS,
};

fn triple(kind: &str, path: &str, old: Option<&str>) -> (String, String, Option<String>) {
    (kind.to_owned(), path.to_owned(), old.map(str::to_owned))
}

/// Writes `relative` and waits until it has been announced as `created`.
fn create_announced(daemon: &Daemon, relative: &str, content: &[u8]) -> String {
    let path = daemon.path_str(relative);
    write_file(&daemon.path(relative), content);
    daemon.wait_for_event("created", &path);
    path
}

fn parse_time(text: &Value) -> SystemTime {
    let text = text.as_str().unwrap_or_else(|| panic!("not a string: {text}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|error| panic!("{text:?} is not RFC 3339 UTC: {error}"))
}

fn seconds_apart(left: SystemTime, right: SystemTime) -> f64 {
    match left.duration_since(right) {
        Ok(difference) => difference.as_secs_f64(),
        Err(error) => error.duration().as_secs_f64(),
    }
}

fn is_lower_hex(text: &str, length: usize) -> bool {
    text.len() == length && text.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

#[test]
fn message_fields_follow_the_contract() {
    let daemon = Daemon::builder().arg("--instance-id").arg("test1234").start();
    let content = b"field check";
    let path = daemon.path_str("a.flac");
    write_file(&daemon.path("a.flac"), content);
    let created = daemon.wait_for_event("created", &path);
    let object = created.as_object().expect("a message is a JSON object");

    assert_eq!(created["schema_version"].as_u64(), Some(1));
    let message_id =
        uuid::Uuid::parse_str(created["message_id"].as_str().unwrap()).expect("message_id is a UUID");
    uuid::Uuid::parse_str(created["correlation_id"].as_str().unwrap()).expect("correlation_id is a UUID");
    let timestamp = parse_time(&created["timestamp"]);
    assert!(
        seconds_apart(timestamp, SystemTime::now()) < 60.0,
        "timestamp {timestamp:?} is not now"
    );
    assert_eq!(event_type(&created), "created");
    assert!(file_path(&created).starts_with('/'), "file_path is absolute");
    assert!(
        !object.contains_key("old_path"),
        "created has no old_path: {created}"
    );
    assert_eq!(created["instance_id"], "test1234");
    assert_eq!(created["watched_directory"], daemon.dir_str());
    assert!(
        is_lower_hex(created["sha256_hash"].as_str().unwrap(), 64),
        "{created}"
    );
    assert!(
        is_lower_hex(created["xxh128_hash"].as_str().unwrap(), 32),
        "{created}"
    );
    assert!(
        created["size_bytes"].is_u64(),
        "size_bytes is an integer: {created}"
    );
    assert_content(&created, content);
    let mtime = fs::metadata(daemon.path("a.flac")).unwrap().modified().unwrap();
    assert!(
        seconds_apart(parse_time(&created["modified_time"]), mtime) < 1.0,
        "modified_time {} is not the file's mtime",
        created["modified_time"]
    );
    assert_eq!(created["file_type"], "flac");

    let new_path = daemon.path_str("b.flac");
    fs::rename(daemon.path("a.flac"), daemon.path("b.flac")).unwrap();
    let renamed = daemon.wait_for_event("renamed", &new_path);
    assert_eq!(old_path(&renamed), Some(path.as_str()));
    assert_content(&renamed, content);

    fs::remove_file(daemon.path("b.flac")).unwrap();
    let deleted = daemon.wait_for_event("deleted", &new_path);
    let object = deleted.as_object().unwrap();
    for absent in [
        "old_path",
        "sha256_hash",
        "xxh128_hash",
        "size_bytes",
        "modified_time",
        "file_type",
    ] {
        assert!(
            !object.contains_key(absent),
            "deleted must not carry {absent}: {deleted}"
        );
    }
    assert_eq!(deleted["instance_id"], "test1234");
    assert_eq!(deleted["watched_directory"], daemon.dir_str());

    let ids: Vec<_> = [&created, &renamed, &deleted]
        .iter()
        .map(|message| message["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids[0], message_id.to_string());
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "message ids repeat: {ids:?}"
    );
}

#[test]
fn hash_vectors_through_real_files() {
    let mebibyte: Vec<u8> = (0..4096).flat_map(|_| 0..=255u8).collect();
    let vectors: [(&str, &[u8], &str, &str); 3] = [
        (
            "empty.flac",
            b"",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "99aa06d3014798d86001c324468d497f",
        ),
        (
            "abc.flac",
            b"abc",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "06b05ab6733a618578af5f94892f3950",
        ),
        (
            "mebibyte.flac",
            &mebibyte,
            "fbbab289f7f94b25736c58be46a994c441fd02552cc6022352e3d86d2fab7c83",
            "1b208d2839093774d36c0e13a3df139e",
        ),
    ];
    // The helpers other tests use must agree with the published vectors.
    for (_, content, sha256, xxh128) in &vectors {
        assert_eq!(sha256_hex(content), *sha256);
        assert_eq!(xxh128_hex(content), *xxh128);
    }

    let daemon = Daemon::start();
    for (name, content, _, _) in &vectors {
        write_file(&daemon.path(name), content);
    }
    for (name, content, sha256, xxh128) in &vectors {
        let message = daemon.wait_for_event("created", &daemon.path_str(name));
        assert_eq!(message["sha256_hash"], *sha256, "{name}");
        assert_eq!(message["xxh128_hash"], *xxh128, "{name}");
        assert_eq!(
            message["size_bytes"].as_u64(),
            Some(content.len() as u64),
            "{name}"
        );
    }
}

#[test]
fn slow_writer_gives_one_created_hashed_over_final_content() {
    let daemon = Daemon::start();
    let path = daemon.path_str("slow.flac");
    let mut file = File::create(daemon.path("slow.flac")).unwrap();
    let mut written = Vec::new();
    for piece in 0..4u8 {
        if piece > 0 {
            // Part of the scenario, not synchronisation: a writer that keeps the
            // file open and writes a piece every second, far longer than SETTLE_MS.
            std::thread::sleep(Duration::from_secs(1));
        }
        let chunk = vec![piece; 64 * 1024];
        file.write_all(&chunk).unwrap();
        file.flush().unwrap();
        written.extend_from_slice(&chunk);
    }
    assert!(
        daemon.messages_for(&path).is_empty(),
        "announced while still open for writing: {:?}",
        summary(&daemon.messages_for(&path))
    );
    drop(file);

    let created = daemon.wait_for_event("created", &path);
    assert_content(&created, &written);
    daemon.barrier();
    assert_eq!(
        summary(&daemon.messages_for(&path)),
        vec![("created".to_owned(), path.clone())]
    );
}

#[test]
fn slow_rewrite_of_announced_file_gives_one_modified() {
    let daemon = Daemon::start();
    let path = create_announced(&daemon, "slow.flac", b"before");
    let mut file = File::create(daemon.path("slow.flac")).unwrap();
    let mut written = Vec::new();
    for piece in 0..3u8 {
        if piece > 0 {
            // Part of the scenario: a writer pausing longer than SETTLE_MS.
            std::thread::sleep(Duration::from_secs(1));
        }
        let chunk = vec![piece + 10; 32 * 1024];
        file.write_all(&chunk).unwrap();
        written.extend_from_slice(&chunk);
    }
    drop(file);
    let modified = daemon.wait_for_event("modified", &path);
    assert_content(&modified, &written);
    daemon.barrier();
    assert_eq!(
        summary(&daemon.messages_for(&path)),
        vec![
            ("created".to_owned(), path.clone()),
            ("modified".to_owned(), path.clone())
        ]
    );
}

#[test]
fn create_then_delete_before_settling_gives_nothing() {
    let daemon = Daemon::start();
    let path = daemon.path_str("fleeting.flac");
    write_file(&daemon.path("fleeting.flac"), b"here and gone");
    fs::remove_file(daemon.path("fleeting.flac")).unwrap();
    daemon.barrier();
    assert_eq!(summary(&daemon.messages_for(&path)), vec![]);
}

#[test]
fn repeated_writes_to_announced_file_give_one_modified() {
    let daemon = Daemon::start();
    let path = create_announced(&daemon, "song.flac", b"first");
    // Back to back: all three land well inside one SETTLE_MS window.
    write_file(&daemon.path("song.flac"), b"second");
    write_file(&daemon.path("song.flac"), b"third");
    write_file(&daemon.path("song.flac"), b"fourth and final");
    let modified = daemon.wait_for_event("modified", &path);
    assert_content(&modified, b"fourth and final");
    daemon.barrier();
    assert_eq!(
        summary(&daemon.messages_for(&path)),
        vec![
            ("created".to_owned(), path.clone()),
            ("modified".to_owned(), path.clone())
        ]
    );
}

#[test]
fn touch_of_announced_file_gives_nothing() {
    let daemon = Daemon::start();
    let path = create_announced(&daemon, "song.flac", b"unchanged");
    // What touch(1) does: open for writing without truncating, set the times, close.
    let file = OpenOptions::new()
        .write(true)
        .open(daemon.path("song.flac"))
        .unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(file);
    daemon.barrier();
    assert_eq!(
        summary(&daemon.messages_for(&path)),
        vec![("created".to_owned(), path.clone())]
    );
}

#[test]
fn rewrite_with_identical_content_gives_nothing() {
    let daemon = Daemon::start();
    let path = create_announced(&daemon, "song.flac", b"same bytes");
    write_file(&daemon.path("song.flac"), b"same bytes");
    daemon.barrier();
    assert_eq!(
        summary(&daemon.messages_for(&path)),
        vec![("created".to_owned(), path.clone())]
    );
}

#[test]
fn deleting_announced_file_gives_deleted() {
    let daemon = Daemon::start();
    let path = create_announced(&daemon, "song.flac", b"doomed");
    fs::remove_file(daemon.path("song.flac")).unwrap();
    daemon.wait_for_event("deleted", &path);
    daemon.barrier();
    assert_eq!(
        summary(&daemon.messages_for(&path)),
        vec![
            ("created".to_owned(), path.clone()),
            ("deleted".to_owned(), path.clone())
        ]
    );
}

#[test]
fn rename_in_same_directory_gives_renamed() {
    let daemon = Daemon::start();
    let old = create_announced(&daemon, "old name.flac", b"renamed content");
    let new = daemon.path_str("new name.flac");
    fs::rename(daemon.path("old name.flac"), daemon.path("new name.flac")).unwrap();
    let renamed = daemon.wait_for_event("renamed", &new);
    assert_eq!(old_path(&renamed), Some(old.as_str()));
    assert_content(&renamed, b"renamed content");
    let after_create = daemon.barrier().split_off(1);
    assert_eq!(triples(&after_create), vec![triple("renamed", &new, Some(&old))]);
}

#[test]
fn move_to_other_directory_gives_moved() {
    let daemon = Daemon::start();
    fs::create_dir(daemon.path("elsewhere")).unwrap();
    let old = create_announced(&daemon, "song.flac", b"moving");
    let new = daemon.path_str("elsewhere/song.flac");
    fs::rename(daemon.path("song.flac"), daemon.path("elsewhere/song.flac")).unwrap();
    let moved = daemon.wait_for_event("moved", &new);
    assert_eq!(old_path(&moved), Some(old.as_str()));
    assert_content(&moved, b"moving");
    let after_create = daemon.barrier().split_off(1);
    assert_eq!(triples(&after_create), vec![triple("moved", &new, Some(&old))]);
}

#[test]
fn file_moved_in_from_outside_gives_created() {
    let daemon = Daemon::start();
    let path = daemon.path_str("arrived.flac");
    write_file(&daemon.outside().join("arrived.flac"), b"from outside");
    fs::rename(daemon.outside().join("arrived.flac"), daemon.path("arrived.flac")).unwrap();
    let created = daemon.wait_for_event("created", &path);
    assert_content(&created, b"from outside");
    assert_eq!(triples(&daemon.barrier()), vec![triple("created", &path, None)]);
}

#[test]
fn file_moved_out_gives_deleted() {
    let daemon = Daemon::start();
    let path = create_announced(&daemon, "leaving.flac", b"leaving");
    fs::rename(daemon.path("leaving.flac"), daemon.outside().join("leaving.flac")).unwrap();
    daemon.wait_for_event("deleted", &path);
    let after_create = daemon.barrier().split_off(1);
    assert_eq!(triples(&after_create), vec![triple("deleted", &path, None)]);
}

#[test]
fn part_file_renamed_to_final_name_gives_one_created() {
    let daemon = Daemon::start();
    let path = daemon.path_str("download.flac");
    write_file(&daemon.path("download.flac.part"), b"downloaded");
    fs::rename(daemon.path("download.flac.part"), daemon.path("download.flac")).unwrap();
    let created = daemon.wait_for_event("created", &path);
    assert_content(&created, b"downloaded");
    let messages = daemon.barrier();
    assert_eq!(triples(&messages), vec![triple("created", &path, None)]);
}

#[test]
fn part_file_renamed_over_announced_file_gives_modified() {
    let daemon = Daemon::start();
    let path = create_announced(&daemon, "download.flac", b"version one");
    write_file(&daemon.path("download.flac.part"), b"version two");
    fs::rename(daemon.path("download.flac.part"), daemon.path("download.flac")).unwrap();
    let modified = daemon.wait_for_event("modified", &path);
    assert_content(&modified, b"version two");
    let after_create = daemon.barrier().split_off(1);
    assert_eq!(triples(&after_create), vec![triple("modified", &path, None)]);
}

#[test]
fn part_file_renamed_over_identical_file_gives_nothing() {
    let daemon = Daemon::start();
    let path = create_announced(&daemon, "download.flac", b"same version");
    write_file(&daemon.path("download.flac.part"), b"same version");
    fs::rename(daemon.path("download.flac.part"), daemon.path("download.flac")).unwrap();
    let after_create = daemon.barrier().split_off(1);
    assert_eq!(summary(&after_create), vec![], "for {path}");
}

#[test]
fn rename_over_announced_file_gives_deleted_then_renamed() {
    let daemon = Daemon::start();
    let source = create_announced(&daemon, "a.flac", b"source");
    let target = create_announced(&daemon, "b.flac", b"target");
    fs::rename(daemon.path("a.flac"), daemon.path("b.flac")).unwrap();
    daemon.wait_for_event("renamed", &target);
    let after_creates = daemon.barrier().split_off(2);
    assert_eq!(
        triples(&after_creates),
        vec![
            triple("deleted", &target, None),
            triple("renamed", &target, Some(&source))
        ]
    );
    assert_content(&after_creates[1], b"source");
}

#[test]
fn rename_to_filtered_name_gives_deleted() {
    let daemon = Daemon::start();
    let partial = create_announced(&daemon, "a.flac", b"becomes partial");
    let text = create_announced(&daemon, "b.flac", b"becomes text");
    fs::rename(daemon.path("a.flac"), daemon.path("a.flac.part")).unwrap();
    fs::rename(daemon.path("b.flac"), daemon.path("b.txt")).unwrap();
    daemon.wait_for_event("deleted", &partial);
    daemon.wait_for_event("deleted", &text);
    let mut after_creates = triples(&daemon.barrier().split_off(2));
    after_creates.sort();
    assert_eq!(
        after_creates,
        vec![triple("deleted", &partial, None), triple("deleted", &text, None)]
    );
}

#[test]
fn renamed_directory_gives_moved_for_every_file_below() {
    let daemon = Daemon::start();
    fs::create_dir_all(daemon.path("album/disc 2")).unwrap();
    let files = ["album/one.flac", "album/disc 2/two.flac", "album/three.mp3"];
    for relative in files {
        create_announced(&daemon, relative, relative.as_bytes());
    }
    write_file(&daemon.path("album/cover.jpg"), b"not audio");
    let announced = daemon.barrier().len();

    fs::rename(daemon.path("album"), daemon.path("album renamed")).unwrap();
    for relative in files {
        let new = daemon.path_str(&relative.replacen("album", "album renamed", 1));
        let moved = daemon.wait_for_event("moved", &new);
        assert_eq!(
            old_path(&moved),
            Some(daemon.path_str(relative).as_str()),
            "{moved}"
        );
        assert_content(&moved, relative.as_bytes());
    }
    let after = daemon.barrier().split_off(announced);
    assert_eq!(
        after.len(),
        files.len(),
        "exactly one moved per file: {:?}",
        triples(&after)
    );
}

#[test]
fn directory_moved_in_gives_created_for_matching_files() {
    let daemon = Daemon::start();
    let incoming = daemon.outside().join("incoming");
    fs::create_dir_all(incoming.join("cd1")).unwrap();
    let files = ["incoming/a.flac", "incoming/cd1/b.mp3"];
    for relative in files {
        write_file(&daemon.outside().join(relative), relative.as_bytes());
    }
    write_file(&incoming.join("cover.jpg"), b"not audio");
    write_file(&incoming.join("c.flac.part"), b"excluded");

    fs::rename(&incoming, daemon.path("incoming")).unwrap();
    for relative in files {
        let created = daemon.wait_for_event("created", &daemon.path_str(relative));
        assert_content(&created, relative.as_bytes());
    }
    let mut messages = summary(&daemon.barrier());
    messages.sort();
    let mut expected: Vec<_> = files
        .iter()
        .map(|relative| ("created".to_owned(), daemon.path_str(relative)))
        .collect();
    expected.sort();
    assert_eq!(messages, expected);
}

#[test]
fn directory_moved_out_gives_deleted_for_announced_files() {
    let daemon = Daemon::start();
    fs::create_dir_all(daemon.path("leaving/cd1")).unwrap();
    let files = ["leaving/a.flac", "leaving/cd1/b.mp3"];
    for relative in files {
        create_announced(&daemon, relative, relative.as_bytes());
    }
    let announced = daemon.barrier().len();

    fs::rename(daemon.path("leaving"), daemon.outside().join("leaving")).unwrap();
    for relative in files {
        daemon.wait_for_event("deleted", &daemon.path_str(relative));
    }
    let after = daemon.barrier().split_off(announced);
    assert_eq!(
        after.len(),
        files.len(),
        "exactly one deleted per file: {:?}",
        triples(&after)
    );
}

#[test]
fn new_subdirectory_is_watched_including_immediate_writes() {
    let daemon = Daemon::start();
    fs::create_dir_all(daemon.path("new/deep")).unwrap();
    let files = ["new/deep/a.flac", "new/deep/b.flac", "new/c.mp3"];
    for relative in files {
        write_file(&daemon.path(relative), relative.as_bytes());
    }
    for relative in files {
        let created = daemon.wait_for_event("created", &daemon.path_str(relative));
        assert_content(&created, relative.as_bytes());
    }
    // The new directory stays watched after the first burst.
    let later = create_announced(&daemon, "new/deep/later.flac", b"later");
    let messages = daemon.barrier();
    assert_eq!(
        messages.len(),
        files.len() + 1,
        "one created each: {:?}",
        triples(&messages)
    );
    assert!(messages.iter().any(|message| file_path(message) == later));
}

#[test]
fn extension_filter_takes_only_listed_extensions_in_any_case() {
    let daemon = Daemon::builder().arg("--extensions").arg("FLAC").start();
    write_file(&daemon.path("lower.flac"), b"lower");
    write_file(&daemon.path("upper.FLAC"), b"upper");
    write_file(&daemon.path("ignored.mp3"), b"ignored");
    daemon.wait_for_event("created", &daemon.path_str("lower.flac"));
    daemon.wait_for_event("created", &daemon.path_str("upper.FLAC"));
    let mut messages = summary(&daemon.barrier());
    messages.sort();
    assert_eq!(
        messages,
        vec![
            ("created".to_owned(), daemon.path_str("lower.flac")),
            ("created".to_owned(), daemon.path_str("upper.FLAC")),
        ]
    );
}

#[test]
fn default_extensions_match_case_insensitively() {
    let daemon = Daemon::start();
    let upper = daemon.path_str("A.FLAC");
    write_file(&daemon.path("A.FLAC"), b"shouting");
    write_file(&daemon.path("notes.txt"), b"not audio");
    let created = daemon.wait_for_event("created", &upper);
    assert_eq!(created["file_type"], "flac");
    assert_eq!(summary(&daemon.barrier()), vec![("created".to_owned(), upper)]);
}

#[test]
fn star_extension_takes_all_files() {
    let daemon = Daemon::builder().arg("--extensions").arg("*").start();
    let names = ["notes.txt", "cover.jpg", "no-extension"];
    for name in names {
        write_file(&daemon.path(name), name.as_bytes());
    }
    for name in names {
        daemon.wait_for_event("created", &daemon.path_str(name));
    }
    assert_eq!(daemon.barrier().len(), names.len());
}

#[test]
fn default_excludes_are_never_announced() {
    let daemon = Daemon::start();
    for directory in ["@eaDir", "#recycle", ".Trash-1000", ".hidden"] {
        fs::create_dir(daemon.path(directory)).unwrap();
    }
    let excluded = [
        ".song.flac.AbC123", // rsync temporary
        "song.flac.part",
        "song.flac.tmp",
        ".~lock.song.flac",
        "@eaDir/song.flac",
        "#recycle/song.flac",
        ".Trash-1000/song.flac",
        ".hidden/song.flac",
    ];
    for relative in excluded {
        write_file(&daemon.path(relative), relative.as_bytes());
    }
    // Inside an excluded directory, a directory made later is not watched either.
    fs::create_dir(daemon.path("@eaDir/thumbs")).unwrap();
    write_file(&daemon.path("@eaDir/thumbs/song.flac"), b"thumbnail");
    assert_eq!(summary(&daemon.barrier()), vec![]);
}

#[test]
fn rsync_temporary_renamed_to_final_name_gives_one_created() {
    let daemon = Daemon::start();
    let path = daemon.path_str("song.flac");
    write_file(&daemon.path(".song.flac.AbC123"), b"synced");
    fs::rename(daemon.path(".song.flac.AbC123"), daemon.path("song.flac")).unwrap();
    let created = daemon.wait_for_event("created", &path);
    assert_content(&created, b"synced");
    assert_eq!(triples(&daemon.barrier()), vec![triple("created", &path, None)]);
}

#[test]
fn custom_exclude_is_honoured() {
    let daemon = Daemon::builder().arg("--exclude").arg("skip*,private").start();
    fs::create_dir(daemon.path("private")).unwrap();
    let kept = daemon.path_str("keep.flac");
    write_file(&daemon.path("skip-me.flac"), b"skipped");
    write_file(&daemon.path("private/secret.flac"), b"skipped");
    write_file(&daemon.path("keep.flac"), b"kept");
    daemon.wait_for_event("created", &kept);
    assert_eq!(summary(&daemon.barrier()), vec![("created".to_owned(), kept)]);
}

#[test]
fn files_present_at_start_are_not_announced_by_default() {
    let daemon = Daemon::builder()
        .file("old.flac", "was here first")
        .file("sub/older.mp3", "was here too")
        .start();
    assert_eq!(summary(&daemon.barrier()), vec![]);
}

#[test]
fn scan_existing_announces_each_present_file_once() {
    let daemon = Daemon::builder()
        .arg("--scan-existing")
        .file("old.flac", "was here first")
        .file("sub/older.mp3", "was here too")
        .file("sub/notes.txt", "not audio")
        .file(".hidden.flac", "excluded")
        .file("@eaDir/thumb.flac", "excluded")
        .start();
    let old = daemon.wait_for_event("created", &daemon.path_str("old.flac"));
    assert_content(&old, b"was here first");
    daemon.wait_for_event("created", &daemon.path_str("sub/older.mp3"));
    let mut messages = summary(&daemon.barrier());
    messages.sort();
    assert_eq!(
        messages,
        vec![
            ("created".to_owned(), daemon.path_str("old.flac")),
            ("created".to_owned(), daemon.path_str("sub/older.mp3")),
        ]
    );
}

#[test]
fn polling_mode_announces_created_file_once() {
    let daemon = Daemon::builder().arg("--poll-interval-ms").arg("200").start();
    let path = daemon.path_str("polled.flac");
    write_file(&daemon.path("polled.flac"), b"polled");
    let created = daemon.wait_for_event("created", &path);
    assert_content(&created, b"polled");
    assert_eq!(triples(&daemon.barrier()), vec![triple("created", &path, None)]);
}

#[test]
fn symlinked_directories_are_not_followed() {
    let target_dir = tempfile::tempdir().unwrap();
    let target = target_dir.path().canonicalize().unwrap();
    write_file(&target.join("present.flac"), b"behind a link");
    let daemon = Daemon::builder().arg("--scan-existing").start();
    std::os::unix::fs::symlink(&target, daemon.path("linked")).unwrap();
    write_file(&target.join("written-later.flac"), b"behind a link");
    write_file(&daemon.path("linked/through-link.flac"), b"through the link");
    let messages = daemon.barrier();
    assert!(
        messages
            .iter()
            .all(|message| !file_path(message).contains("/linked/")
                && !file_path(message).starts_with(target.to_str().unwrap())),
        "followed a symlink: {:?}",
        triples(&messages)
    );
}

#[test]
fn symlinked_directory_present_at_start_is_not_scanned_or_watched() {
    let target_dir = tempfile::tempdir().unwrap();
    let target = target_dir.path().canonicalize().unwrap();
    write_file(&target.join("present.flac"), b"behind a link");
    let daemon = Daemon::builder()
        .arg("--scan-existing")
        .file("real.flac", "real")
        .symlink("linked", &target)
        .start();
    daemon.wait_for_event("created", &daemon.path_str("real.flac"));
    write_file(&target.join("after.flac"), b"after");
    assert_eq!(
        summary(&daemon.barrier()),
        vec![("created".to_owned(), daemon.path_str("real.flac"))],
        "followed a symlink"
    );
}

#[test]
fn events_for_one_path_arrive_in_the_order_they_happened() {
    let daemon = Daemon::start();
    let first = daemon.path_str("track.flac");
    let second = daemon.path_str("track renamed.flac");
    // A few MiB, so hashing takes a moment and a reordering worker would show.
    let original = vec![1u8; 4 << 20];
    let edited = vec![2u8; 4 << 20];
    let created = Instant::now();
    create_announced(&daemon, "track.flac", &original);
    let announced_in = created.elapsed();

    // Part of the scenario, not synchronisation: a person edits, then later
    // renames, then later deletes; each step is spaced well beyond SETTLE_MS
    // plus the time this debug build takes to hash the file here and now
    // (twice what announcing the creation took), so it is a change of its
    // own. Closer steps are legitimately coalesced: a rename that lands
    // while the edit is being read folds the edit into it, and a deletion
    // that lands before the rename is recorded leaves only the deletion.
    // Nothing here waits for the daemon.
    let spacing = Duration::from_millis(SETTLE_MS * 3) + Duration::from_secs(1) + announced_in * 2;
    write_file(&daemon.path("track.flac"), &edited);
    std::thread::sleep(spacing);
    fs::rename(daemon.path("track.flac"), daemon.path("track renamed.flac")).unwrap();
    std::thread::sleep(spacing);
    fs::remove_file(daemon.path("track renamed.flac")).unwrap();

    daemon.wait_for_event("deleted", &second);
    let messages = daemon.barrier();
    assert_eq!(
        triples(&messages),
        vec![
            triple("created", &first, None),
            triple("modified", &first, None),
            triple("renamed", &second, Some(&first)),
            triple("deleted", &second, None),
        ]
    );
    assert_content(&messages[1], &edited);
}

#[test]
fn directory_renamed_twice_quickly_gives_moved_to_the_final_name() {
    let daemon = Daemon::start();
    fs::create_dir(daemon.path("a")).unwrap();
    write_file(&daemon.path("a/one.flac"), b"one");
    let first = daemon.path_str("a/one.flac");
    daemon.wait_for_event("created", &first);
    fs::rename(daemon.path("a"), daemon.path("b")).unwrap();
    fs::rename(daemon.path("b"), daemon.path("c")).unwrap();
    let last = daemon.path_str("c/one.flac");
    let moved = daemon.wait_for(
        |message| event_type(message) == "moved" && file_path(message) == last,
        Duration::from_secs(15),
    );
    assert!(old_path(&moved).is_some());
    let messages = daemon.barrier();
    let created_at_final: Vec<_> = messages
        .iter()
        .filter(|message| event_type(message) == "created" && file_path(message) == last)
        .collect();
    assert!(
        created_at_final.is_empty(),
        "the file moved; it was not created: {:?}",
        summary(&messages)
    );
}

#[test]
fn excluded_directories_are_never_watched() {
    let daemon = Daemon::builder()
        .file("a/one.flac", "1")
        .file("b/two.flac", "2")
        .file("@eaDir/SYNOFILE_THUMB.flac", "x")
        .file("a/@eaDir/SYNOFILE_THUMB.flac", "x")
        .file(".sync/x.flac", "x")
        .start();
    // The root, a and b; not @eaDir, a/@eaDir or .sync.
    assert_eq!(inotify_watches(daemon.pid()), 3);

    fs::create_dir_all(daemon.path("c/@eaDir")).unwrap();
    write_file(&daemon.path("c/@eaDir/thumb.flac"), b"thumbnail");
    write_file(&daemon.path("c/new.flac"), b"3");
    daemon.wait_for_event("created", &daemon.path_str("c/new.flac"));
    // c is watched now; c/@eaDir is not.
    assert_eq!(inotify_watches(daemon.pid()), 4);
    let messages = daemon.barrier();
    assert!(
        messages
            .iter()
            .all(|message| !file_path(message).contains("@eaDir")),
        "{:?}",
        summary(&messages)
    );
}
