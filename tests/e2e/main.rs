//! The end-to-end tests: one binary, one module per subject, all of them
//! through the one support layer in `tests/support/`.
//!
//! One binary rather than one per subject, so the support layer is compiled
//! once and the compiler reports any helper that no test uses.
//!
//! Modules, in the order a change travels:
//!
//! - [`events`]: the event rules, real files to JSON messages on stdout;
//! - [`cli`]: flags, environment, log formats, signals, a closed stdout;
//! - [`registry`]: the PostgreSQL registry as a library, against the real server;
//! - [`broker`]: the RabbitMQ connection as a library, and the daemon under a
//!   broker that blocks publishers;
//! - [`sinks`]: the daemon publishing to RabbitMQ and recording in PostgreSQL;
//! - [`faults`]: outages, kills, overflows and vanishing shares, and that
//!   nothing is lost through them;
//! - [`hostile_names`]: names that are not UTF-8 or hold control characters,
//!   and paths near and over `PATH_MAX`.
//! - [`hostile_outbox`]: outbox rows that can never go out are set aside,
//!   honest publisher logs, no password printed.
//! - [`bench`]: `scripts/bench.sh --short` still runs and reports every figure.
//! - [`hostile_files`]: permissions that change, special files swapped in,
//!   files rewritten while hashed, huge files, huge and deep directories.
//! - [`hostile_rescan`]: full rescans rebuild the watches, the periodic one
//!   hashes nothing unchanged, refused changes are kept, files still being
//!   written wait.
//! - [`tls`]: amqps:// and PostgreSQL's sslmode against TLS listeners of the
//!   test's own, and TLS settings that stop the start.
//! - [`secrets`]: a known password, run through every mode, never printed.
//! - [`observe`]: `/metrics`, `/healthz`, `/readyz` and `healthcheck` of a
//!   running daemon; [`ops`]: `instances`, `status` and `replay`.
//! - [`deploy`]: the compose stacks, `scripts/stress.sh` with five instances,
//!   the NAS service unit.
//!
//! Tests named `serial_…` stop or restart the shared servers; `scripts/test.sh`
//! runs them one at a time after all the others.

// Beside this folder rather than in it: `tests/e2e/` holds the tests,
// `tests/support/` what they stand on (Cargo makes no test target of a
// `mod.rs`), and a second test binary, should one be needed, can share it.
#[path = "../support/mod.rs"]
mod support;

mod events;
mod cli;
mod registry;
mod broker;
mod sinks;
mod faults;
mod hostile_names;
mod hostile_renames;
mod hostile_outbox;
mod bench;
mod hostile_files;
mod hostile_rescan;
mod tls;
mod secrets;
mod observe;
mod ops;
mod deploy;
