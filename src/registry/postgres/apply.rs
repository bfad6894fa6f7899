//! The transactions that record a change together with its outbox messages.
//!
//! # Concurrency
//!
//! Several processes (one per watched tree, trees may overlap) write the same
//! rows. `apply` runs one READ COMMITTED transaction per change:
//! - a file change takes `pg_advisory_xact_lock` on a 64-bit hash of each path
//!   it touches, in byte order of the paths (so two changes never wait on each
//!   other in a cycle), then locks the present rows `FOR UPDATE`, and only then
//!   takes the fresh `stat` the decision rests on. Whoever comes second sees
//!   the first one's row, so one change observed by two instances produces one
//!   message;
//! - a directory rename locks the rows it carries, and the present rows at
//!   their new paths, with `SELECT … ORDER BY file_path FOR UPDATE` (row locks:
//!   a tree of ten thousand files would not fit in the advisory lock table).
//!   A file *created* at a new path by another instance while the rename runs
//!   has no row to lock yet; the rename then overwrites it without a `deleted`
//!   first. Consumers see `created` then `moved` for the same path, which
//!   describes the same file.
//!
//! A directory rename and a file rename across it can still lock the same two
//! rows in opposite orders; PostgreSQL then aborts one of them (40P01). Such
//! lost races (SQLSTATE 40001 serialization failure, 40P01 deadlock, 23505
//! unique violation) are retried with jittered exponential backoff, a few
//! times, and logged at debug level only.

use std::collections::HashSet;

use uuid::Uuid;

use super::faults::{fault, Fault};
use super::statements::Transaction;
use super::{row_from_record, to_bigint, to_bigint_bits, tree_bounds, PostgresRegistry};
use crate::message::{EventType, Message};
use crate::registry::plan::{message_for_carried_row, messages_for, plan_present, rebase, Plan};
use crate::registry::{fresh_stat, Applied, Observed, Row};

impl PostgresRegistry {
    pub(super) fn apply_present(
        &self,
        transaction: &mut Transaction<'_>,
        observed: &Observed,
        renamed_from: Option<&str>,
        correlation_id: Uuid,
    ) -> Result<Applied, Fault> {
        let mut paths = vec![observed.path.as_str()];
        paths.extend(renamed_from);
        paths.sort_unstable();
        paths.dedup();
        self.lock_paths(transaction, &paths)?;
        let rows = load_present(transaction, &paths)?;
        // Only now, with the paths held, does the disk have the last word.
        if fresh_stat(&observed.path)? != Some(observed.stat) {
            return Ok(Applied::Changed);
        }
        let source = renamed_from.and_then(|from| rows.iter().find(|row| row.path == from));
        let target = rows.iter().find(|row| row.path == observed.path);
        let plan = plan_present(source, target, observed, renamed_from);
        match plan {
            Plan::Stale => return Ok(Applied::Recorded(Vec::new())),
            Plan::Refresh => {
                refresh_stat(transaction, observed)?;
                return Ok(Applied::Recorded(Vec::new()));
            }
            Plan::Create | Plan::Modify | Plan::Rename { .. } => {}
        }
        let messages = messages_for(&plan, observed, &self.origin, correlation_id);
        let Some(last) = messages.last() else {
            return Ok(Applied::Recorded(messages));
        };
        if let Plan::Rename { from, .. } = &plan {
            self.leave(
                transaction,
                &[Departure {
                    path: from,
                    message: last,
                }],
            )?;
        }
        self.arrive(
            transaction,
            &[Arrival {
                row: Row::from_observed(observed),
                message: last,
            }],
        )?;
        queue(transaction, &messages)?;
        Ok(Applied::Recorded(messages))
    }

    pub(super) fn apply_gone(
        &self,
        transaction: &mut Transaction<'_>,
        path: &str,
        correlation_id: Uuid,
    ) -> Result<Applied, Fault> {
        self.lock_paths(transaction, &[path])?;
        let rows = load_present(transaction, &[path])?;
        if fresh_stat(path)?.is_some() {
            return Ok(Applied::Changed);
        }
        if rows.is_empty() {
            return Ok(Applied::Recorded(Vec::new()));
        }
        let message = self
            .origin
            .message(EventType::Deleted, path, None, correlation_id, None);
        self.leave(
            transaction,
            &[Departure {
                path,
                message: &message,
            }],
        )?;
        queue(transaction, std::slice::from_ref(&message))?;
        Ok(Applied::Recorded(vec![message]))
    }

    pub(super) fn apply_directory_rename(
        &self,
        transaction: &mut Transaction<'_>,
        from: &str,
        to: &str,
        correlation_id: Uuid,
    ) -> Result<Applied, Fault> {
        let (lower, upper) = tree_bounds(from);
        let sources: Vec<Row> = transaction
            .query(
                "SELECT file_path, size_bytes, mtime_ns, ctime_ns, sha256, xxh128, device, inode FROM files \
                 WHERE state = 'present' AND file_path > $1 AND file_path < $2 \
                 ORDER BY file_path FOR UPDATE",
                &[&lower, &upper],
            )
            .map_err(fault("lock the rows under the renamed directory"))?
            .iter()
            .map(row_from_record)
            .collect();
        let carried: Vec<(Row, String)> = sources
            .into_iter()
            .filter_map(|row| rebase(&row.path, from, to).map(|new_path| (row, new_path)))
            .collect();
        if carried.is_empty() {
            return Ok(Applied::Recorded(Vec::new()));
        }
        let new_paths: Vec<&str> = carried.iter().map(|(_, path)| path.as_str()).collect();
        let occupied: Vec<String> = transaction
            .query(
                "SELECT file_path FROM files WHERE file_path = ANY($1) AND state = 'present' \
                 ORDER BY file_path FOR UPDATE",
                &[&new_paths],
            )
            .map_err(fault("lock the rows at the new paths"))?
            .iter()
            .map(|record| record.get(0))
            .collect();

        // Replay the moves one row at a time, as the memory registry does, to
        // learn which messages go out and where each row ends up; then write
        // the outcome in three statements.
        let mut present: HashSet<String> = occupied.into_iter().collect();
        present.extend(carried.iter().map(|(row, _)| row.path.clone()));
        let mut messages = Vec::with_capacity(carried.len());
        let mut arrivals = Vec::with_capacity(carried.len());
        for (row, new_path) in &carried {
            present.remove(&row.path);
            if present.contains(new_path) {
                messages.push(
                    self.origin
                        .message(EventType::Deleted, new_path, None, correlation_id, None),
                );
            }
            messages.push(message_for_carried_row(
                row,
                new_path,
                &self.origin,
                correlation_id,
            ));
            let moved = Row {
                path: new_path.clone(),
                ..row.clone()
            };
            arrivals.push((moved, messages.len() - 1));
            present.insert(new_path.clone());
        }
        let arrived: HashSet<&str> = arrivals.iter().map(|(row, _)| row.path.as_str()).collect();
        let departures: Vec<Departure<'_>> = carried
            .iter()
            .zip(&arrivals)
            .filter(|((row, _), _)| !arrived.contains(row.path.as_str()))
            .map(|((row, _), (_, index))| Departure {
                path: &row.path,
                message: &messages[*index],
            })
            .collect();
        let arrivals: Vec<Arrival<'_>> = arrivals
            .into_iter()
            .map(|(row, index)| Arrival {
                row,
                message: &messages[index],
            })
            .collect();
        self.leave(transaction, &departures)?;
        self.arrive(transaction, &arrivals)?;
        queue(transaction, &messages)?;
        Ok(Applied::Recorded(messages))
    }

    /// Holds each path until the transaction ends. `paths` must be sorted:
    /// every transaction taking the locks in one order is what rules out deadlocks.
    fn lock_paths(&self, transaction: &mut Transaction<'_>, paths: &[&str]) -> Result<(), Fault> {
        debug_assert!(paths.is_sorted());
        for path in paths {
            transaction
                .execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, $2))",
                    &[path, &self.path_lock_seed],
                )
                .map_err(fault("lock the path"))?;
        }
        Ok(())
    }

    /// Writes rows that end up present, replacing whatever row held the path.
    fn arrive(&self, transaction: &mut Transaction<'_>, arrivals: &[Arrival<'_>]) -> Result<(), Fault> {
        if arrivals.is_empty() {
            return Ok(());
        }
        let paths: Vec<&str> = arrivals.iter().map(|a| a.row.path.as_str()).collect();
        let sha256: Vec<&str> = arrivals.iter().map(|a| a.row.sha256.as_str()).collect();
        let xxh128: Vec<&str> = arrivals.iter().map(|a| a.row.xxh128.as_str()).collect();
        let sizes: Vec<i64> = arrivals.iter().map(|a| to_bigint(a.row.stat.size)).collect();
        let mtimes: Vec<i64> = arrivals.iter().map(|a| a.row.stat.mtime_ns).collect();
        let ctimes: Vec<i64> = arrivals.iter().map(|a| a.row.stat.ctime_ns).collect();
        let devices: Vec<Option<i64>> = arrivals
            .iter()
            .map(|a| a.row.stat.identity.map(|id| to_bigint_bits(id.device)))
            .collect();
        let inodes: Vec<Option<i64>> = arrivals
            .iter()
            .map(|a| a.row.stat.identity.map(|id| to_bigint_bits(id.inode)))
            .collect();
        let events: Vec<&str> = arrivals.iter().map(|a| a.message.event_type.as_str()).collect();
        let old_paths: Vec<Option<&str>> = arrivals.iter().map(|a| a.message.old_path.as_deref()).collect();
        let message_ids: Vec<String> = arrivals
            .iter()
            .map(|a| a.message.message_id.to_string())
            .collect();
        transaction
            .execute(
                "INSERT INTO files (file_path, state, sha256, xxh128, size_bytes, mtime_ns, \
                     ctime_ns, last_event, old_path, instance_id, watched_directory, message_id, \
                     published_at, updated_at, device, inode) \
                 SELECT arrival.file_path, 'present', arrival.sha256, arrival.xxh128, \
                     arrival.size_bytes, arrival.mtime_ns, arrival.ctime_ns, arrival.last_event, \
                     arrival.old_path, $10, $11, arrival.message_id::uuid, NULL, now(), \
                     arrival.device, arrival.inode \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], \
                     $6::int8[], $7::text[], $8::text[], $9::text[], $12::int8[], $13::int8[]) \
                     AS arrival(file_path, sha256, xxh128, size_bytes, mtime_ns, ctime_ns, \
                         last_event, old_path, message_id, device, inode) \
                 ON CONFLICT (file_path) DO UPDATE SET state = 'present', \
                     sha256 = EXCLUDED.sha256, xxh128 = EXCLUDED.xxh128, \
                     size_bytes = EXCLUDED.size_bytes, mtime_ns = EXCLUDED.mtime_ns, \
                     ctime_ns = EXCLUDED.ctime_ns, device = EXCLUDED.device, inode = EXCLUDED.inode, \
                     last_event = EXCLUDED.last_event, \
                     old_path = EXCLUDED.old_path, instance_id = EXCLUDED.instance_id, \
                     watched_directory = EXCLUDED.watched_directory, \
                     message_id = EXCLUDED.message_id, published_at = NULL, updated_at = now()",
                &[
                    &paths,
                    &sha256,
                    &xxh128,
                    &sizes,
                    &mtimes,
                    &ctimes,
                    &events,
                    &old_paths,
                    &message_ids,
                    &self.origin.instance_id,
                    &self.origin.watched_directory,
                    &devices,
                    &inodes,
                ],
            )
            .map_err(fault("upsert file rows"))?;
        Ok(())
    }

    /// Turns present rows into tombstones that remember how the path was left.
    fn leave(&self, transaction: &mut Transaction<'_>, departures: &[Departure<'_>]) -> Result<(), Fault> {
        if departures.is_empty() {
            return Ok(());
        }
        let paths: Vec<&str> = departures.iter().map(|d| d.path).collect();
        let events: Vec<&str> = departures.iter().map(|d| d.message.event_type.as_str()).collect();
        let message_ids: Vec<String> = departures
            .iter()
            .map(|d| d.message.message_id.to_string())
            .collect();
        transaction
            .execute(
                "UPDATE files SET state = 'deleted', last_event = departure.last_event, \
                     old_path = NULL, instance_id = $4, watched_directory = $5, \
                     message_id = departure.message_id::uuid, published_at = NULL, \
                     updated_at = now() \
                 FROM unnest($1::text[], $2::text[], $3::text[]) \
                     AS departure(file_path, last_event, message_id) \
                 WHERE files.file_path = departure.file_path",
                &[
                    &paths,
                    &events,
                    &message_ids,
                    &self.origin.instance_id,
                    &self.origin.watched_directory,
                ],
            )
            .map_err(fault("mark file rows deleted"))?;
        Ok(())
    }
}

/// A row that ends up present, and the last message its change produced.
struct Arrival<'a> {
    row: Row,
    message: &'a Message,
}

/// A path whose present row is left (deleted, or renamed away), and the
/// message that says so.
struct Departure<'a> {
    path: &'a str,
    message: &'a Message,
}

fn load_present(transaction: &mut Transaction<'_>, paths: &[&str]) -> Result<Vec<Row>, Fault> {
    Ok(transaction
        .query(
            "SELECT file_path, size_bytes, mtime_ns, ctime_ns, sha256, xxh128, device, inode FROM files \
             WHERE file_path = ANY($1) AND state = 'present' ORDER BY file_path FOR UPDATE",
            &[&paths],
        )
        .map_err(fault("lock the file rows"))?
        .iter()
        .map(row_from_record)
        .collect())
}

/// Same content, fresher `stat`: the stat columns only. No message went out,
/// so `message_id` and `published_at` keep describing the last one that did.
fn refresh_stat(transaction: &mut Transaction<'_>, observed: &Observed) -> Result<(), Fault> {
    transaction
        .execute(
            "UPDATE files SET size_bytes = $2, mtime_ns = $3, ctime_ns = $4, device = $5, inode = $6, \
                 updated_at = now() \
             WHERE file_path = $1",
            &[
                &observed.path,
                &to_bigint(observed.stat.size),
                &observed.stat.mtime_ns,
                &observed.stat.ctime_ns,
                &observed.stat.identity.map(|id| to_bigint_bits(id.device)),
                &observed.stat.identity.map(|id| to_bigint_bits(id.inode)),
            ],
        )
        .map_err(fault("refresh the file stat"))?;
    Ok(())
}

/// Appends `messages` to the outbox; their ids follow the slice order.
fn queue(transaction: &mut Transaction<'_>, messages: &[Message]) -> Result<(), Fault> {
    if messages.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = messages.iter().map(|m| m.message_id.to_string()).collect();
    let paths: Vec<&str> = messages.iter().map(|m| m.file_path.as_str()).collect();
    let instances: Vec<&str> = messages.iter().map(|m| m.instance_id.as_str()).collect();
    let bodies: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8(m.to_json()).expect("serde_json writes UTF-8"))
        .collect();
    transaction
        .execute(
            "INSERT INTO outbox (message_id, file_path, body, instance_id) \
             SELECT queued.message_id::uuid, queued.file_path, queued.body, queued.instance_id \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY \
                 AS queued(message_id, file_path, body, instance_id, position) \
             ORDER BY queued.position",
            &[&ids, &paths, &bodies, &instances],
        )
        .map_err(fault("queue messages in the outbox"))?;
    Ok(())
}
