//! The registry used without a database: rows and outbox live in this process.
//!
//! It knows what this process announced (and, unless `--scan-existing` is
//! given, which files were present at start, without their hashes), so the
//! event rules are the same as with PostgreSQL; it forgets everything on exit.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Mutex;

use uuid::Uuid;

use super::plan::{message_for_carried_row, messages_for, plan_present, rebase, Plan};
use super::{fresh_stat, Applied, Change, Queued, Registry, RegistryError, Row, Stat};
use crate::message::{Encoded, EventType, Message, Origin};

/// Messages kept for a sink that cannot take them (a broker that is down)
/// before the oldest are dropped. Without a database nothing survives a
/// restart anyway; this only keeps memory bounded.
pub const OUTBOX_LIMIT: usize = 100_000;

pub struct MemoryRegistry {
    origin: Origin,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Present files by absolute path.
    rows: BTreeMap<String, Row>,
    /// Recorded, not yet confirmed, oldest first, with their positions.
    outbox: VecDeque<Queued>,
    /// The position the next queued message gets.
    next_position: u64,
    /// Messages dropped because the outbox was full.
    dropped: u64,
}

impl MemoryRegistry {
    pub fn new(origin: Origin) -> MemoryRegistry {
        MemoryRegistry {
            origin,
            state: Mutex::new(State::default()),
        }
    }

    /// Remembers a file that existed at start without announcing it.
    pub fn seed(&self, path: String, stat: Stat) {
        let row = Row {
            path: path.clone(),
            stat,
            sha256: String::new(),
            xxh128: String::new(),
        };
        self.lock().rows.insert(path, row);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn queue(&mut self, messages: &[Message]) {
        for message in messages {
            if self.outbox.len() >= OUTBOX_LIMIT {
                self.outbox.pop_front();
                self.dropped += 1;
                if self.dropped == 1 || self.dropped.is_power_of_two() {
                    log::error!(
                        "outbox full ({OUTBOX_LIMIT} messages, no database configured): dropped {} messages so far",
                        self.dropped
                    );
                }
            }
            self.next_position += 1;
            self.outbox.push_back(Queued {
                position: self.next_position,
                message: Encoded::new(message.clone()),
            });
        }
    }
}

impl Registry for MemoryRegistry {
    fn lookup(&self, path: &str) -> Result<Option<Row>, RegistryError> {
        Ok(self.lock().rows.get(path).cloned())
    }

    fn apply(&self, change: &Change, correlation_id: Uuid) -> Result<Applied, RegistryError> {
        let mut state = self.lock();
        let messages = match change {
            Change::Present {
                observed,
                renamed_from,
            } => {
                if fresh_stat(&observed.path)? != Some(observed.stat) {
                    return Ok(Applied::Changed);
                }
                let source = renamed_from.as_deref().and_then(|from| state.rows.get(from));
                let target = state.rows.get(&observed.path);
                let plan = plan_present(source, target, observed, renamed_from.as_deref());
                if plan == Plan::Stale {
                    return Ok(Applied::Recorded(Vec::new()));
                }
                if let Plan::Rename { from, .. } = &plan {
                    state.rows.remove(from);
                }
                state
                    .rows
                    .insert(observed.path.clone(), Row::from_observed(observed));
                messages_for(&plan, observed, &self.origin, correlation_id)
            }
            Change::Gone { path } => {
                if fresh_stat(path)?.is_some() {
                    return Ok(Applied::Changed);
                }
                match state.rows.remove(path) {
                    Some(_) => {
                        vec![self
                            .origin
                            .message(EventType::Deleted, path, None, correlation_id, None)]
                    }
                    None => Vec::new(),
                }
            }
            Change::DirectoryRenamed { from, to } => {
                let carried: Vec<Row> = rows_under(&state.rows, from).cloned().collect();
                let mut messages = Vec::new();
                for row in carried {
                    let Some(new_path) = rebase(&row.path, from, to) else {
                        continue;
                    };
                    state.rows.remove(&row.path);
                    if state.rows.contains_key(&new_path) {
                        messages.push(self.origin.message(
                            EventType::Deleted,
                            &new_path,
                            None,
                            correlation_id,
                            None,
                        ));
                    }
                    messages.push(message_for_carried_row(
                        &row,
                        &new_path,
                        &self.origin,
                        correlation_id,
                    ));
                    let moved = Row {
                        path: new_path.clone(),
                        ..row
                    };
                    state.rows.insert(new_path, moved);
                }
                messages
            }
        };
        state.queue(&messages);
        Ok(Applied::Recorded(messages))
    }

    fn present_under(
        &self,
        dir: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, RegistryError> {
        let state = self.lock();
        let prefix = format!("{dir}/");
        let start = match after {
            Some(after) if after >= prefix.as_str() => Bound::Excluded(after.to_owned()),
            _ => Bound::Included(prefix.clone()),
        };
        Ok(state
            .rows
            .range((start, Bound::Unbounded))
            .map(|(path, _)| path)
            .take_while(|path| path.starts_with(&prefix))
            .take(limit)
            .cloned()
            .collect())
    }

    fn outgoing_after(&self, after: Option<u64>, limit: usize) -> Result<Vec<Queued>, RegistryError> {
        let state = self.lock();
        let after = after.unwrap_or(0);
        let start = state.outbox.partition_point(|queued| queued.position <= after);
        Ok(state.outbox.range(start..).take(limit).cloned().collect())
    }

    fn mark_published(&self, message_ids: &[Uuid]) -> Result<(), RegistryError> {
        let confirmed: std::collections::HashSet<&Uuid> = message_ids.iter().collect();
        let mut state = self.lock();
        state
            .outbox
            .retain(|queued| !confirmed.contains(&queued.message.message_id));
        Ok(())
    }

    /// Messages here never need reading back, so only a sink's refusal
    /// lands here. Without a database nothing survives a restart anyway:
    /// the message is logged and dropped.
    fn set_aside(&self, message_id: Uuid, reason: &str) -> Result<(), RegistryError> {
        let mut state = self.lock();
        let before = state.outbox.len();
        state
            .outbox
            .retain(|queued| queued.message.message_id != message_id);
        if state.outbox.len() < before {
            log::error!(
                "outbox message {message_id} set aside, not published (no database: dropped): {reason}"
            );
        }
        Ok(())
    }
}

/// Rows strictly below directory `dir`, in path order.
fn rows_under<'a>(rows: &'a BTreeMap<String, Row>, dir: &str) -> impl Iterator<Item = &'a Row> {
    let prefix = format!("{dir}/");
    rows.range(prefix.clone()..)
        .take_while(move |(path, _)| path.starts_with(&prefix))
        .map(|(_, row)| row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Observed;
    use std::fs;

    fn registry(dir: &str) -> MemoryRegistry {
        MemoryRegistry::new(Origin {
            instance_id: "test".into(),
            watched_directory: dir.into(),
        })
    }

    fn observe(path: &std::path::Path, hash: &str) -> Observed {
        Observed {
            path: path.to_str().unwrap().into(),
            stat: Stat::of(path).unwrap().unwrap(),
            sha256: hash.into(),
            xxh128: hash.into(),
        }
    }

    fn kinds(applied: Applied) -> Vec<EventType> {
        match applied {
            Applied::Recorded(messages) => messages.iter().map(|m| m.event_type).collect(),
            Applied::Changed => panic!("unexpected Changed"),
        }
    }

    #[test]
    fn create_then_unchanged_then_delete() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.flac");
        fs::write(&file, "abc").unwrap();
        let registry = registry(dir.path().to_str().unwrap());
        let present = Change::Present {
            observed: observe(&file, "h"),
            renamed_from: None,
        };
        assert_eq!(
            kinds(registry.apply(&present, Uuid::new_v4()).unwrap()),
            [EventType::Created]
        );
        assert!(kinds(registry.apply(&present, Uuid::new_v4()).unwrap()).is_empty());
        let gone = Change::Gone {
            path: file.to_str().unwrap().into(),
        };
        assert_eq!(
            registry.apply(&gone, Uuid::new_v4()).unwrap(),
            Applied::Changed,
            "a deletion needs a stat that says gone"
        );
        fs::remove_file(&file).unwrap();
        assert_eq!(
            kinds(registry.apply(&gone, Uuid::new_v4()).unwrap()),
            [EventType::Deleted]
        );
        assert!(kinds(registry.apply(&gone, Uuid::new_v4()).unwrap()).is_empty());
        assert_eq!(registry.outgoing(10).unwrap().len(), 2);
    }

    #[test]
    fn directory_rename_carries_rows_and_pages_by_prefix() {
        let registry = registry("/m");
        for path in ["/m/a/1.flac", "/m/a/2.flac", "/m/ab/3.flac"] {
            registry.seed(
                path.into(),
                Stat {
                    size: 1,
                    mtime_ns: 1,
                    ctime_ns: 1,
                    identity: None,
                },
            );
        }
        assert_eq!(
            registry.present_under("/m/a", None, 10).unwrap(),
            ["/m/a/1.flac", "/m/a/2.flac"]
        );
        assert_eq!(
            registry.present_under("/m/a", Some("/m/a/1.flac"), 10).unwrap(),
            ["/m/a/2.flac"]
        );
        let change = Change::DirectoryRenamed {
            from: "/m/a".into(),
            to: "/m/z".into(),
        };
        assert_eq!(
            kinds(registry.apply(&change, Uuid::new_v4()).unwrap()),
            [EventType::Moved, EventType::Moved]
        );
        assert_eq!(
            registry.present_under("/m/z", None, 10).unwrap(),
            ["/m/z/1.flac", "/m/z/2.flac"]
        );
        assert!(registry.present_under("/m/a", None, 10).unwrap().is_empty());
    }
}
