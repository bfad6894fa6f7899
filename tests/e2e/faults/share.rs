//! The share under the tree goes away: an unmounted tmpfs (inotify or poll
//! mode, over an empty or a non-empty mount point) or a missing sentinel
//! file holds the deletions until the share is back, so no file is published
//! as deleted that was only out of reach.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{describe, text, Scenario, CONVERGE};
use crate::support::{run, wait_until, DEADLINE};

/// A tmpfs mounted on a directory; unmounted (lazily) on drop if still there.
struct Mount {
    target: PathBuf,
}

impl Mount {
    fn tmpfs(target: &Path) -> Mount {
        run("mount", &["-t", "tmpfs", "tmpfs", target.to_str().unwrap()]);
        Mount {
            target: target.to_owned(),
        }
    }

    /// A tmpfs filled at `staging` and moved onto `target` at once, as a
    /// share that comes back with its content.
    fn tmpfs_moved(staging: &Path, target: &Path, fill: impl FnOnce(&Path)) -> Mount {
        let staged = Mount::tmpfs(staging);
        fill(staging);
        run(
            "mount",
            &["--move", staging.to_str().unwrap(), target.to_str().unwrap()],
        );
        std::mem::forget(staged);
        Mount {
            target: target.to_owned(),
        }
    }

    fn is_mounted(path: &Path) -> bool {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let path = path.to_str().unwrap_or_default();
        mounts.lines().any(|line| line.split(' ').nth(4) == Some(path))
    }

    fn unmount(&self) {
        run("umount", &["-l", self.target.to_str().unwrap()]);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        while Mount::is_mounted(&self.target) {
            if !Command::new("umount")
                .args(["-l", self.target.to_str().unwrap()])
                .status()
                .is_ok_and(|status| status.success())
            {
                break;
            }
        }
    }
}

/// Mounts a share on the tree, fills it, starts the daemon, unmounts the
/// share, and brings it back with one file changed and one missing. With
/// `stray`, the mount point itself holds a file, which shows once the share
/// is gone (something wrote into the mount point while it was unmounted).
fn share_disappears(poll: bool, stray: bool) {
    let scenario = Scenario::new();
    if stray {
        scenario.write("stray.flac", "under the mount");
    }
    let mount = Mount::tmpfs(&scenario.tree);
    let files = scenario.create("album", 8);
    let mut builder = scenario.daemon().env("LOG_LEVEL", "debug");
    if poll {
        builder = builder.env("POLL_INTERVAL_MS", "200");
    }
    let daemon = builder.start();
    let first = scenario.assert_converged();
    assert_eq!(first.len(), 8);

    let contents: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|relative| (relative.clone(), fs::read(scenario.path(relative)).unwrap()))
        .collect();
    mount.unmount();
    let tree = scenario.tree.display().to_string();
    // Logged once the daemon has decided what the unmount means (and, if it
    // took the mount point for the tree, after the sweep that followed).
    wait_until("an error says the tree is unavailable", DEADLINE, || {
        daemon.stderr_lines().iter().any(|line| {
            line.contains("ERROR")
                && line.contains(&tree)
                && (line.contains("unavailable") || line.contains("unmounted"))
        })
    });
    let first_file = scenario.path_str(&files[0]);
    if poll {
        // A poll watcher sees every file vanish; those deletions wait and are
        // tried again every few seconds. Wait for a second try (or for the
        // deletion going through, which the checks below reject).
        let holding = format!("holding the deletion of {first_file}:");
        wait_until("a held deletion is tried again", CONVERGE, || {
            daemon.stderr_lines_with(&[&holding]).len() >= 2
                || scenario
                    .database
                    .row(&first_file)
                    .is_some_and(|row| row.state == "deleted")
        });
    }
    let staging = scenario.outside.join("staging");
    fs::create_dir(&staging).unwrap();
    let _back = Mount::tmpfs_moved(&staging, &scenario.tree, |dir| {
        for (relative, content) in &contents[1..] {
            let path = dir.join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, content).unwrap();
        }
        fs::write(dir.join(&files[2]), "changed while away").unwrap();
    });

    let all = scenario.assert_converged();
    let mut later: Vec<(String, String)> = all[first.len()..]
        .iter()
        .map(|received| {
            (
                received.event_type().to_owned(),
                text(&received.body, "file_path"),
            )
        })
        .collect();
    later.sort();
    let mut expected = vec![
        ("deleted".to_owned(), scenario.path_str(&files[0])),
        ("modified".to_owned(), scenario.path_str(&files[2])),
    ];
    expected.sort();
    assert_eq!(later, expected, "{}", describe(&all));
}

#[test]
fn unmounted_share_publishes_no_deletions() {
    share_disappears(false, false);
}

#[test]
fn unmounted_share_in_poll_mode_publishes_no_deletions() {
    share_disappears(true, false);
}

#[test]
fn unmounted_share_over_a_non_empty_mount_point_publishes_no_deletions() {
    share_disappears(false, true);
}

#[test]
fn missing_sentinel_holds_deletions() {
    let scenario = Scenario::new();
    let files = scenario.create("album", 6);
    fs::write(scenario.path(".mounted"), "").unwrap();
    let daemon = scenario
        .daemon()
        .env("SENTINEL_FILE", ".mounted")
        .env("LOG_LEVEL", "debug")
        .start();
    let first = scenario.assert_converged();

    fs::remove_file(scenario.path(".mounted")).unwrap();
    daemon.wait_for_stderr("sentinel file", DEADLINE);
    scenario.remove(&files[0]);
    scenario.remove(&files[1]);
    daemon.wait_for_stderr("holding the deletion", DEADLINE);
    assert_eq!(
        scenario
            .rows()
            .iter()
            .filter(|row| row.state == "deleted")
            .count(),
        0
    );

    fs::write(scenario.path(".mounted"), "").unwrap();
    let all = scenario.assert_converged();
    let later: BTreeSet<(String, String)> = all[first.len()..]
        .iter()
        .map(|received| {
            (
                received.event_type().to_owned(),
                text(&received.body, "file_path"),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = files[..2]
        .iter()
        .map(|relative| ("deleted".to_owned(), scenario.path_str(relative)))
        .collect();
    assert_eq!(later, expected);
}
