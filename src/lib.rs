//! file-watcher: one process watches one directory tree and turns every settled
//! file change into a registry row and a confirmed message.
//!
//! Modules are declared in the order data flows; see `OPERATIONS.md` for the
//! operator's view.
pub mod message;
pub mod registry;
