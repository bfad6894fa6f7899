//! file-watcher: one process watches one directory tree and turns every settled
//! file change into a registry row and a confirmed message.
//!
//! # Map
//!
//! Modules are declared in the order data flows; each stage's output type
//! lives in one place, so "where does X go next" is "who imports X":
//!
//! - [`config`] parses environment and flags once into a [`config::Config`];
//!   [`filter`] decides which names matter; [`path_text`] turns paths (bytes)
//!   into the text every stage, the registry and the messages carry, and
//!   back; [`redact`] keeps passwords out of what we print; [`tls`] reads
//!   the certificate files once, at start, into the rustls settings both
//!   connections use; [`logging`]
//!   stamps every line with `[instance:dir]` and escapes control characters.
//! - [`watch`] owns notify and hands [`watch::RawEvent`]s to the settle
//!   stage. Its callback never blocks: a full channel drops the event and
//!   raises a flag that makes the settle stage rescan. [`watch::scan`] walks
//!   directories on its own thread; [`watch::guard`] tells whether the root
//!   is still the tree we watch.
//! - [`settle`] is the single owner of per-path state: it coalesces raw
//!   events, follows renames, waits for files to be finished, sets aside
//!   what cannot be read until its permissions change, and hands
//!   [`job::Dispatch`]es to the workers, which answer with [`job::Done`].
//! - [`work`] threads stat and [`work::hash`] files and ask the [`registry`]
//!   what the observation means ([`registry::plan`] decides). Files over
//!   `HUGE_FILE_BYTES` are handed to one extra worker, the huge-file lane.
//!   The registry records the row and queues the [`message`]s in its
//!   outbox, in one step.
//! - [`publish`] drains the outbox into the sink (stdout, or RabbitMQ through
//!   [`publish::broker`]) and marks messages published once confirmed.
//! - [`shutdown`] turns signals into a stop request; [`pipeline`] wires it all
//!   and stops it in pipeline order. [`backoff`] is the one retry policy.
//! - [`observe`] exports the stages' counters (`/metrics`), answers the
//!   probes (`/healthz`, `/readyz`) and keeps the `instances` row fresh;
//!   [`ops`] holds the operator commands (`healthcheck`, `instances`,
//!   `status`, `replay`) that run instead of the daemon.
//!
//! Log targets are the stage names operators filter on (`file_watcher::settle`,
//! `file_watcher::worker`, `file_watcher::broker`, ...): they stayed as they
//! were when the files moved into folders, so child modules log under their
//! stage's target.
//!
//! # Invariants
//!
//! - Invariant: at most one job per path (or overlapping subtree) is in
//!   flight; jobs for one path leave in the order they became ready.
//! - Invariant: nothing blocks notify's thread.
//! - Invariant: a message is recorded before it is published, and marked
//!   published only after the sink confirmed it; it keeps its `message_id`
//!   across every retry. One that can never be published (unreadable, or
//!   refused by the broker) is set aside, visibly, instead of blocking the rest.
//! - Invariant: a registry row is written only after a fresh `stat` agrees
//!   with the observation; a deletion only when that `stat` says gone.
pub mod config;
pub mod redact;
pub mod tls;
pub mod filter;
pub mod path_text;
pub mod logging;
pub mod backoff;
pub mod watch;
pub mod settle;
pub mod job;
pub mod work;
pub mod message;
pub mod registry;
pub mod publish;
pub mod shutdown;
pub mod pipeline;
pub mod observe;
pub mod ops;
