//! A broker that blocks publishers (memory alarm, `connection.blocked`):
//! publishing pauses with one warning, changes keep being recorded, and
//! everything goes out once the broker unblocks.
//!
//! The alarm is broker-wide, so the test is `serial_` (scripts/test.sh runs
//! those alone, after the rest), and a guard always lowers it again.

mod common;

use std::process::Command;
use std::time::Duration;

use common::services::{wait_for_full_scan, warnings_and_errors, TestBroker, TestDatabase};
use common::{write_file, Daemon};

/// Raises RabbitMQ's memory alarm (a watermark no node can stay under) and
/// restores the watermark it found when dropped, whatever the test did.
struct MemoryAlarm {
    restore: String,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let status = rabbitmqctl(&["status"]);
        // "Memory high watermark setting: 0.4 of available memory, …"
        let restore = status
            .lines()
            .find_map(|line| line.split("Memory high watermark setting: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|value| value.parse::<f64>().is_ok())
            .unwrap_or("0.4")
            .to_owned();
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.00001"]);
        MemoryAlarm { restore }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.restore]);
    }
}

fn rabbitmqctl(arguments: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(arguments)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl {arguments:?} failed: {output:?}"
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn serial_memory_alarm_pauses_publishing_until_the_broker_unblocks() {
    let broker = TestBroker::new();
    let database = TestDatabase::new();
    let mut daemon = Daemon::builder().with_sinks(&broker, &database).start();
    wait_for_full_scan(&daemon, daemon.dir());
    let before = daemon.path_str("before.flac");
    write_file(&daemon.path("before.flac"), "published normally");
    broker.wait_for_event("created", &before);

    let alarm = MemoryAlarm::raise();
    let during = daemon.path_str("during.flac");
    write_file(&daemon.path("during.flac"), "recorded while blocked");
    // Recorded, not published: the row is pending.
    database.wait_until("the change is recorded", Duration::from_secs(15), |database| {
        database.row(&during).filter(|row| row.published_at.is_none())
    });
    daemon.wait_for_stderr("blocked connection", Duration::from_secs(30));
    assert!(
        broker
            .deliveries()
            .iter()
            .all(|delivery| delivery.file_path() != during),
        "nothing may be published while the broker blocks us"
    );

    drop(alarm);
    broker.wait_for_event("created", &during);
    database.wait_until(
        "the change is marked published",
        Duration::from_secs(15),
        |database| database.row(&during).filter(|row| row.published_at.is_some()),
    );
    let problems = warnings_and_errors(&daemon);
    let blocked: Vec<&String> = problems.iter().filter(|line| line.contains("blocked")).collect();
    assert_eq!(blocked.len(), 1, "one warning for the block: {problems:#?}");
    assert!(
        problems.iter().all(|line| !line.contains(" ERROR ")),
        "a block is not an error: {problems:#?}"
    );
    assert!(daemon.terminate().success());
}
