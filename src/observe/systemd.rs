//! Telling systemd how the daemon is doing (`Type=notify`, `WatchdogSec=`),
//! when it runs under a unit that asks for it (`NOTIFY_SOCKET` set).
//!
//! - `READY=1` once catch-up is complete: a unit that orders itself after
//!   this one starts when the tree is reconciled, not merely watched.
//! - `WATCHDOG=1` every half watchdog interval, but only while the daemon's
//!   own liveness check passes, so systemd restarts a wedged stage rather
//!   than a process that merely still exists.
//! - `STOPPING=1` as it winds down, once the stages have drained.
//!
//! Everything here runs on one named thread (`systemd`), owned and joined by
//! [`super::Observer`]. Readiness and liveness are the same answers as
//! `/readyz`'s catch-up and `/healthz` ([`super::health`]). A failed send is
//! logged at debug level and never stops the daemon: the service manager
//! going away is not ours to handle.

use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{select, tick, Receiver, Sender};
use sd_notify::NotifyState;

use super::{health, Sources};

/// How often readiness is looked at before it is reached.
const READY_POLL: Duration = Duration::from_millis(200);

/// Whether systemd asked for notifications.
pub fn wanted() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The notifier thread; dropping the sender side stops it.
pub struct Notifier {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Notifier {
    pub fn spawn(sources: Sources) -> std::io::Result<Notifier> {
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let thread = std::thread::Builder::new()
            .name("systemd".into())
            .spawn(move || run(&sources, &stopped))?;
        Ok(Notifier { stop, thread })
    }

    /// Says `STOPPING=1` and joins the thread.
    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// Runs until `stop` is dropped; then says `STOPPING=1`.
fn run(sources: &Sources, stop: &Receiver<()>) {
    let watchdog = sd_notify::watchdog_enabled();
    // systemd's advice: pet at half the interval.
    let pet_every = watchdog.map_or(Duration::from_secs(3600), |interval| interval / 2);
    let pets = tick(pet_every);
    let polls = tick(READY_POLL);
    let mut ready = false;
    loop {
        select! {
            recv(stop) -> _ => break,
            recv(polls) -> _ => {
                if !ready && sources.watch.caught_up.load(Ordering::Relaxed) {
                    ready = true;
                    send(&[NotifyState::Ready, NotifyState::Status("catch-up complete; watching")]);
                }
            }
            recv(pets) -> _ => {
                if watchdog.is_none() {
                    continue;
                }
                match health::liveness(sources) {
                    Ok(_) => send(&[NotifyState::Watchdog]),
                    Err(stuck) => log::warn!("not petting systemd's watchdog: {stuck}"),
                }
            }
        }
    }
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        log::debug!("cannot notify systemd: {error}");
    }
}
