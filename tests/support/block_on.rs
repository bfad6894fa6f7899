//! The one place a test blocks on a future: lapin is async, the tests are
//! not, and a broker that stops answering must fail a test, not hang it. So
//! every future is raced against a timer (`futures-lite` and an `async-io`
//! timer, no runtime of our own; the daemon parks its thread with a
//! deadline instead, see `src/publish/broker/mod.rs`).

use std::future::Future;
use std::time::Instant;

use async_io::Timer;
use futures_lite::future;

use super::DEADLINE;

/// Runs `work` to completion, or gives up with `None` at `deadline`.
pub fn until<T>(deadline: Instant, work: impl Future<Output = T>) -> Option<T> {
    future::block_on(future::or(async { Some(work.await) }, async {
        Timer::at(deadline).await;
        None
    }))
}

/// Runs `work` to completion, failing the test, naming `what`, if that takes
/// longer than [`DEADLINE`].
#[track_caller]
pub fn within<T>(what: &str, work: impl Future<Output = T>) -> T {
    until(Instant::now() + DEADLINE, work)
        .unwrap_or_else(|| panic!("{what} did not finish within {DEADLINE:?}"))
}
