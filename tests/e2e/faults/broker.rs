//! The broker goes away: refused from the start, cut mid-stream, frozen
//! (caught by the heartbeat), its confirms lost (the batch is published again
//! under the same message ids); and, one at a time, the real broker's
//! connections closed, its application stopped, its process killed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{text, Scenario, ServicesGuard, CONVERGE};
use crate::support::{run, wait_until, Delivered, DEADLINE};

#[test]
fn broker_down_at_start_is_caught_up() {
    let scenario = Scenario::with().broker_proxy().build();
    let proxy = scenario.broker_proxy();
    proxy.refuse(true);
    let existing = scenario.create("before", 5);
    let daemon = scenario.daemon().start();
    scenario.wait_held(&existing);
    let mut during = scenario.create("during", 5);
    scenario.remove(&existing[0]);
    scenario.write(&existing[1], "v2");
    during.extend_from_slice(&existing[..2]);
    scenario.wait_held(&during);

    proxy.refuse(false);
    scenario.create("after", 3);
    scenario.assert_converged();
    assert_eq!(
        daemon.stderr_lines_with(&["cannot publish now"]).len(),
        1,
        "one warning for the outage:\n{}",
        daemon.stderr_text()
    );
    daemon.wait_for_stderr("connected to RabbitMQ", DEADLINE);
}

#[test]
fn broker_lost_mid_stream_is_caught_up() {
    let scenario = Scenario::with().broker_proxy().build();
    let proxy = scenario.broker_proxy();
    let existing = scenario.create("before", 5);
    let daemon = scenario.daemon().start();
    scenario.assert_converged();

    proxy.refuse(true);
    proxy.cut();
    let mut during = scenario.create("during", 5);
    scenario.write(&existing[0], "v2");
    scenario.remove(&existing[1]);
    during.extend_from_slice(&existing[..2]);
    scenario.wait_held(&during);
    // Held in the outbox is not yet tried: the broker comes back only once
    // the daemon has found it gone, or its first reconnect may simply work.
    daemon.wait_for_stderr("cannot publish now", DEADLINE);

    proxy.refuse(false);
    scenario.create("after", 3);
    scenario.assert_converged();
    daemon.wait_for_stderr("connected to RabbitMQ again", DEADLINE);
}

#[test]
fn frozen_broker_is_caught_by_the_heartbeat() {
    let scenario = Scenario::with().broker_proxy().heartbeat(2).build();
    let proxy = scenario.broker_proxy();
    let existing = scenario.create("before", 3);
    let daemon = scenario.daemon().start();
    scenario.assert_converged();

    proxy.freeze(true);
    let frozen_at = Instant::now();
    let mut during = scenario.create("during", 5);
    scenario.write(&existing[0], "v2");
    during.push(existing[0].clone());
    scenario.wait_held(&during);
    // Two heartbeats (4 s) without a byte from the broker retire the
    // connection, before the confirm timeout (5 s) would.
    // The heartbeat notices the frozen broker.
    daemon.wait_for_stderr_with(
        &["WARN", "file_watcher::", "no heartbeat"],
        Duration::from_secs(30),
    );
    assert!(
        frozen_at.elapsed() < Duration::from_secs(10),
        "noticed after {:?}",
        frozen_at.elapsed()
    );

    proxy.freeze(false);
    scenario.create("after", 3);
    scenario.assert_converged();
}

#[test]
fn lost_confirms_are_republished_with_the_same_message_id() {
    let scenario = Scenario::with().broker_proxy().build();
    let proxy = scenario.broker_proxy();
    scenario.create("before", 2);
    let daemon = scenario.daemon().start();
    scenario.assert_converged();
    let warnings_before = daemon.stderr_lines_with(&["cannot publish now"]).len();

    // The broker takes the messages, its confirms never come back: the
    // confirm timeout gives the batch up, and it stays in the outbox.
    proxy.freeze_responses(true);
    let during: Vec<String> = scenario
        .create("during", 3)
        .iter()
        .map(|relative| scenario.path_str(relative))
        .collect();
    wait_until("the publisher gives a batch up", CONVERGE, || {
        daemon.stderr_lines_with(&["cannot publish now"]).len() > warnings_before
    });
    let delivered = scenario.broker.deliveries();
    let delivered_unconfirmed: Vec<&String> = during
        .iter()
        .filter(|path| {
            delivered
                .iter()
                .any(|received| text(&received.body, "file_path") == **path)
        })
        .collect();
    assert!(
        !delivered_unconfirmed.is_empty(),
        "the batch given up had reached the broker"
    );
    assert!(scenario.outbox_len() >= delivered_unconfirmed.len() as i64);

    proxy.freeze_responses(false);
    let all = scenario.assert_converged();
    for path in delivered_unconfirmed {
        let ids: Vec<&str> = all
            .iter()
            .filter(|received| text(&received.body, "file_path") == *path)
            .map(Delivered::message_id)
            .collect();
        assert!(
            ids.len() >= 2 && ids.iter().all(|id| *id == ids[0]),
            "{path}: delivered again, under the same message_id: {ids:?}"
        );
    }
}

#[test]
fn serial_broker_close_all_connections() {
    let _services = ServicesGuard;
    let scenario = Scenario::new();
    let existing = scenario.create("before", 5);
    let daemon = scenario.daemon().start();
    scenario.assert_converged();

    run(
        "rabbitmqctl",
        &["-q", "close_all_connections", "file-watcher fault test"],
    );
    let mut during = scenario.create("during", 5);
    scenario.write(&existing[0], "v2");
    scenario.remove(&existing[1]);
    during.extend_from_slice(&existing[..2]);
    scenario.create("after", 3);
    scenario.assert_converged();
    daemon.wait_for_stderr("lost the RabbitMQ connection", DEADLINE);
}

#[test]
fn serial_broker_stop_app_start_app() {
    let _services = ServicesGuard;
    let scenario = Scenario::new();
    let existing = scenario.create("before", 5);
    let daemon = scenario.daemon().start();
    scenario.assert_converged();

    run("rabbitmqctl", &["-q", "stop_app"]);
    let mut during = scenario.create("during", 5);
    scenario.write(&existing[0], "v2");
    scenario.remove(&existing[1]);
    during.extend_from_slice(&existing[..2]);
    scenario.wait_held(&during);
    daemon.wait_for_stderr("cannot publish now", DEADLINE);

    run("rabbitmqctl", &["-q", "start_app"]);
    wait_until("RabbitMQ is back", Duration::from_secs(60), broker_is_up);
    scenario.create("after", 3);
    scenario.assert_converged();
    daemon.wait_for_stderr("connected to RabbitMQ again", DEADLINE);
}

#[test]
fn serial_broker_kill_9() {
    let _services = ServicesGuard;
    let scenario = Scenario::new();
    let existing = scenario.create("before", 5);
    let daemon = scenario.daemon().start();
    scenario.assert_converged();

    let pid = run("rabbitmqctl", &["-q", "eval", "os:getpid()."]);
    let pid = pid.trim().trim_matches('"').to_owned();
    assert!(pid.parse::<u32>().is_ok(), "the broker's pid: {pid:?}");
    run("kill", &["-9", &pid]);
    wait_until("the broker is down", Duration::from_secs(30), || !broker_is_up());
    let mut during = scenario.create("during", 5);
    scenario.write(&existing[0], "v2");
    scenario.remove(&existing[1]);
    during.extend_from_slice(&existing[..2]);
    scenario.wait_held(&during);

    run("rabbitmq-server", &["-detached"]);
    wait_until("RabbitMQ is back", Duration::from_secs(120), broker_is_up);
    scenario.create("after", 3);
    scenario.assert_converged();
    daemon.wait_for_stderr("connected to RabbitMQ again", DEADLINE);
}

fn broker_is_up() -> bool {
    Command::new("rabbitmq-diagnostics")
        .args(["-q", "check_port_connectivity"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
