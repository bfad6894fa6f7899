//! Stopping: SIGTERM and SIGINT turn into one message on the stop channel.
//!
//! The daemon runs as PID 1 in containers, where the kernel installs no
//! default handlers, so the signals are caught explicitly. The handler thread
//! is named and joined; a second signal while shutting down exits at once
//! (status 130), for an operator who does not want to wait.

use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

pub struct SignalThread {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl SignalThread {
    pub fn spawn(stop: Sender<()>) -> std::io::Result<SignalThread> {
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut received = 0;
                for signal in signals.forever() {
                    received += 1;
                    if received > 1 {
                        log::warn!("second signal ({signal}): exiting without waiting");
                        std::process::exit(130);
                    }
                    log::info!("signal {signal} received: stopping");
                    let _ = stop.try_send(());
                }
            })?;
        Ok(SignalThread { handle, thread })
    }

    pub fn join(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}
