//! file-watcher: one process watches one directory tree and turns every settled
//! file change into a registry row and a confirmed message.
//!
//! # Map
//!
//! Modules are declared in the order data flows:
//!
//! - [`config`] parses environment and flags once into a [`config::Config`];
//!   [`filter`] decides which names matter; [`logging`] stamps every line with
//!   `[instance:dir]`.
//! - [`watch`] owns notify. Its callback never blocks: a full channel drops
//!   the event and raises a flag that makes the settle stage rescan.
//! - [`settle`] is the single owner of per-path state: it coalesces raw
//!   events, follows renames, waits for files to be finished and hands jobs to
//!   the workers. [`watch::scan`] walks directories for it on its own thread.
//! - [`worker`] threads stat and [`hash`] files and ask the [`registry`] what
//!   the observation means. The registry records the row and queues the
//!   [`message`]s in its outbox, in one step.
//! - [`publish`] drains the outbox into the sink (stdout, or RabbitMQ through
//!   [`publish::broker`]) and marks messages published once confirmed.
//! - [`shutdown`] turns signals into a stop request; [`pipeline`] wires it all
//!   and stops it in pipeline order.
//!
//! # Invariants
//!
//! - Invariant: at most one job per path (or overlapping subtree) is in
//!   flight; jobs for one path leave in the order they became ready.
//! - Invariant: nothing blocks notify's thread.
//! - Invariant: a message is recorded before it is published, and marked
//!   published only after the sink confirmed it; it keeps its `message_id`
//!   across every retry.
//! - Invariant: a registry row is written only after a fresh `stat` agrees
//!   with the observation; a deletion only when that `stat` says gone.
pub mod config;
pub mod redact;
pub mod filter;
pub mod logging;
pub mod watch;
pub mod settle;
pub mod hash;
pub mod worker;
pub mod message;
pub mod registry;
pub mod publish;
pub mod shutdown;
pub mod pipeline;

// TODO(layout): remove after merge. The old flat paths, for the branches
// that still use them (settle.rs, worker.rs, tests/).
pub use publish::broker;
pub use watch as watcher;
pub use watch::{guard, scan};
