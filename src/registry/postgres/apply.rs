//! The transactions that record a change together with its outbox messages.
//!
//! # Concurrency
//!
//! Several processes (one per watched tree, trees may overlap) write the same
//! rows. `apply` runs one READ COMMITTED transaction per change:
//! - a file change takes `pg_advisory_xact_lock` on a 64-bit hash of each path
//!   it touches, in byte order of the paths (so two changes never wait on each
//!   other in a cycle), then locks the rows at those paths `FOR UPDATE` (a
//!   deleted file's tombstone too: the change is about to write it), and only then
//!   takes the fresh `stat` the decision rests on. Whoever comes second sees
//!   the first one's row, so one change observed by two instances produces one
//!   message;
//! - a directory rename locks the rows under the old name (tombstones
//!   included; it carries the present ones) and the rows at their new paths,
//!   with `SELECT … ORDER BY file_path FOR UPDATE` (row locks: a tree of ten
//!   thousand files would not fit in the advisory lock table). The
//!   tombstones make a rename of a directory with a long history of deleted
//!   files slower; the daemon never prunes them (see the registry's module
//!   docs for the operator's query that does).
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

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::faults::{fault, Fault};
use super::statements::Transaction;
use super::{present_rows, to_bigint, to_bigint_bits, tree_bounds, PostgresRegistry};
use crate::message::{EventType, Message};
use crate::registry::plan::{message_for_carried_row, messages_for, plan_present, rebase, Plan};
use crate::registry::{fresh_stat, Applied, Change, Observed, RegistryError, Row};

impl PostgresRegistry {
    /// Applies `changes`: the file changes that share no path in one
    /// transaction (see [`PostgresRegistry::apply_files`]), anything else
    /// (directory renames, a path twice) one by one. A batch that fails for
    /// another reason than an unreachable database (a race lost five times, a
    /// statement that fails) is applied again one change at a time, so that
    /// the failure stays with the change it is about.
    pub(super) fn apply_changes(&self, changes: &[(Change, Uuid)]) -> Vec<Result<Applied, RegistryError>> {
        let mut answers: Vec<Option<Result<Applied, RegistryError>>> = changes.iter().map(|_| None).collect();
        let mut batch = Vec::with_capacity(changes.len());
        let mut taken = HashSet::new();
        for (index, (change, correlation_id)) in changes.iter().enumerate() {
            let Some(paths) = file_paths(change) else {
                continue;
            };
            if paths.iter().all(|path| !taken.contains(path)) {
                taken.extend(paths);
                batch.push((index, (change, *correlation_id)));
            }
        }
        if batch.len() > 1 {
            let entries: Vec<(&Change, Uuid)> = batch.iter().map(|(_, entry)| *entry).collect();
            let subject = format!("record {} changes", entries.len());
            match self.transact(&subject, |transaction| self.apply_files(transaction, &entries)) {
                Ok(results) => {
                    for ((index, _), result) in batch.iter().zip(results) {
                        answers[*index] = Some(result);
                    }
                }
                Err(error) if error.is_unavailable() => {
                    for (index, _) in &batch {
                        answers[*index] = Some(Err(error.same()));
                    }
                }
                Err(error) => log::debug!("{subject}: {error}; recording them one at a time"),
            }
        }
        answers
            .into_iter()
            .zip(changes)
            .map(|(answer, (change, correlation_id))| {
                answer.unwrap_or_else(|| self.apply_one(change, *correlation_id))
            })
            .collect()
    }

    /// Applies one change in a transaction of its own.
    pub(super) fn apply_one(&self, change: &Change, correlation_id: Uuid) -> Result<Applied, RegistryError> {
        if let Change::DirectoryRenamed { from, to } = change {
            return self.transact(to, |transaction| {
                self.apply_directory_rename(transaction, from, to, correlation_id)
            });
        }
        self.transact(change.path(), |transaction| {
            self.apply_files(transaction, &[(change, correlation_id)])
        })?
        .pop()
        .expect("one answer per change")
    }

    /// Records file changes (`Present`, `Gone`; no two on one path) in one
    /// transaction: their paths locked in byte order with one statement, the
    /// rows at them (tombstones too) with another; then, with the paths held, the fresh
    /// `stat` of each decides it; then every row, tombstone and outbox
    /// message is written with one statement ([`PostgresRegistry::write`]).
    /// So a batch is five round trips however many files it holds: BEGIN,
    /// the two locks, the write, COMMIT. A change
    /// whose file changed again (`Applied::Changed`) or could not be looked
    /// at (an error) writes nothing and has its own answer; the others commit.
    fn apply_files(
        &self,
        transaction: &mut Transaction<'_>,
        changes: &[(&Change, Uuid)],
    ) -> Result<Vec<Result<Applied, RegistryError>>, Fault> {
        let mut paths: Vec<&str> = changes
            .iter()
            .flat_map(|(change, _)| file_paths(change).unwrap_or_default())
            .collect();
        paths.sort_unstable();
        paths.dedup();
        self.lock_paths(transaction, &paths)?;
        let rows: HashMap<String, Row> = load_present(transaction, &paths)?
            .into_iter()
            .map(|row| (row.path.clone(), row))
            .collect();
        // Only now, with the paths held, does the disk have the last word.
        let decisions: Vec<Result<Decision<'_>, RegistryError>> = changes
            .iter()
            .map(|(change, correlation_id)| self.decide(change, *correlation_id, &rows))
            .collect();
        let written = || decisions.iter().filter_map(|decision| decision.as_ref().ok());
        let departures: Vec<Departure<'_>> = written()
            .filter_map(|decision| match decision {
                Decision::Write {
                    messages,
                    leaves: Some(path),
                    ..
                } => Some(Departure {
                    path,
                    message: messages.last()?,
                }),
                _ => None,
            })
            .collect();
        let arrivals: Vec<Arrival<'_>> = written()
            .filter_map(|decision| match decision {
                Decision::Write {
                    messages,
                    arrives: Some(observed),
                    ..
                } => Some(Arrival {
                    row: Row::from_observed(observed),
                    message: messages.last()?,
                }),
                _ => None,
            })
            .collect();
        let refreshed: Vec<&Observed> = written()
            .filter_map(|decision| match decision {
                Decision::Refresh(observed) => Some(*observed),
                _ => None,
            })
            .collect();
        self.write(
            transaction,
            &departures,
            &arrivals,
            &refreshed,
            written().flat_map(|decision| match decision {
                Decision::Write { messages, .. } => messages.as_slice(),
                _ => &[],
            }),
        )?;
        Ok(decisions
            .into_iter()
            .map(|decision| {
                decision.map(|decision| match decision {
                    Decision::Answer(applied) => applied,
                    Decision::Refresh(_) => Applied::Recorded(Vec::new()),
                    Decision::Write { messages, .. } => Applied::Recorded(messages),
                })
            })
            .collect())
    }

    /// What a file change comes to, given the present `rows` at its paths
    /// (locked) and a fresh `stat`.
    fn decide<'c>(
        &self,
        change: &'c Change,
        correlation_id: Uuid,
        rows: &HashMap<String, Row>,
    ) -> Result<Decision<'c>, RegistryError> {
        match change {
            Change::Present {
                observed,
                renamed_from,
            } => {
                if fresh_stat(&observed.path)? != Some(observed.stat) {
                    return Ok(Decision::Answer(Applied::Changed));
                }
                let renamed_from = renamed_from.as_deref();
                let source = renamed_from.and_then(|from| rows.get(from));
                let target = rows.get(&observed.path);
                let plan = plan_present(source, target, observed, renamed_from);
                match plan {
                    Plan::Stale => return Ok(Decision::Answer(Applied::Recorded(Vec::new()))),
                    Plan::Refresh => return Ok(Decision::Refresh(observed)),
                    Plan::Create | Plan::Modify | Plan::Rename { .. } => {}
                }
                let messages = messages_for(&plan, observed, &self.origin, correlation_id);
                let leaves = match plan {
                    // `from` is `renamed_from`, borrowed from the change.
                    Plan::Rename { .. } => renamed_from,
                    _ => None,
                };
                Ok(Decision::Write {
                    messages,
                    leaves,
                    arrives: Some(observed),
                })
            }
            Change::Gone { path } => {
                if fresh_stat(path)?.is_some() {
                    return Ok(Decision::Answer(Applied::Changed));
                }
                if !rows.contains_key(path) {
                    return Ok(Decision::Answer(Applied::Recorded(Vec::new())));
                }
                let message = self
                    .origin
                    .message(EventType::Deleted, path, None, correlation_id, None);
                Ok(Decision::Write {
                    messages: vec![message],
                    leaves: Some(path),
                    arrives: None,
                })
            }
            Change::DirectoryRenamed { .. } => unreachable!("directory renames are applied on their own"),
        }
    }

    pub(super) fn apply_directory_rename(
        &self,
        transaction: &mut Transaction<'_>,
        from: &str,
        to: &str,
        correlation_id: Uuid,
    ) -> Result<Applied, Fault> {
        let (lower, upper) = tree_bounds(from);
        let records = transaction
            .query(LOCK_UNDER, &[&lower, &upper])
            .map_err(fault("lock the rows under the renamed directory"))?;
        let sources: Vec<Row> = present_rows(&records);
        let carried: Vec<(Row, String)> = sources
            .into_iter()
            .filter_map(|row| rebase(&row.path, from, to).map(|new_path| (row, new_path)))
            .collect();
        if carried.is_empty() {
            return Ok(Applied::Recorded(Vec::new()));
        }
        let new_paths: Vec<&str> = carried.iter().map(|(_, path)| path.as_str()).collect();
        // Every row at the new paths is locked, a deleted file's too (it is
        // about to be overwritten); `state` is read rather than filtered on,
        // as in `present_rows`.
        let occupied: Vec<String> = transaction
            .query(LOCK_NEW_PATHS, &[&new_paths])
            .map_err(fault("lock the rows at the new paths"))?
            .iter()
            .filter(|record| record.get::<_, bool>(1))
            .map(|record| record.get(0))
            .collect();

        // Replay the moves one row at a time, as the memory registry does, to
        // learn which messages go out and where each row ends up; then write
        // the outcome in one statement.
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
        self.write(transaction, &departures, &arrivals, &[], &messages)?;
        Ok(Applied::Recorded(messages))
    }

    /// Holds each path until the transaction ends, with one statement.
    /// `paths` must be sorted: every transaction taking the locks in one
    /// order is what rules out deadlocks (`unnest` yields them in that order).
    fn lock_paths(&self, transaction: &mut Transaction<'_>, paths: &[&str]) -> Result<(), Fault> {
        debug_assert!(paths.is_sorted());
        if paths.is_empty() {
            return Ok(());
        }
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(path, $2)) FROM unnest($1::text[]) AS path",
                &[&paths, &self.path_lock_seed],
            )
            .map_err(fault("lock the paths"))?;
        Ok(())
    }

    /// Writes what a batch decided, with one statement: the present rows it
    /// leaves become tombstones that remember how the path was left; the
    /// rows it arrives at are written whole, replacing whatever row held the
    /// path; the rows of files seen again with the same content get their
    /// fresh `stat`; and `messages` go to the outbox, their ids in the order
    /// given. Any part may be empty.
    ///
    /// One statement, not four: at a trickle, where a batch is one file,
    /// each was a round trip (BENCHMARKS.md, "Round trips at a trickle").
    /// The parts of one statement all see the rows as they were before it,
    /// and must not write one row twice; they do not, as a batch never holds
    /// a path twice and the paths a batch leaves are not those it arrives at.
    fn write<'m>(
        &self,
        transaction: &mut Transaction<'_>,
        departures: &[Departure<'_>],
        arrivals: &[Arrival<'_>],
        refreshed: &[&Observed],
        messages: impl IntoIterator<Item = &'m Message>,
    ) -> Result<(), Fault> {
        let messages: Vec<&Message> = messages.into_iter().collect();
        if departures.is_empty() && arrivals.is_empty() && refreshed.is_empty() && messages.is_empty() {
            return Ok(());
        }
        // The parts of WRITE_BATCH all see the rows as they were before it:
        // two parts writing one path would conflict (see the doc above).
        debug_assert!(
            {
                let mut seen = std::collections::HashSet::new();
                departures
                    .iter()
                    .map(|d| d.path)
                    .chain(arrivals.iter().map(|a| a.row.path.as_str()))
                    .chain(refreshed.iter().map(|o| o.path.as_str()))
                    .all(|path| seen.insert(path))
            },
            "a batch writes each path once"
        );
        let identity = |stat: &crate::registry::Stat| {
            let identity = stat.identity;
            (
                identity.map(|id| to_bigint_bits(id.device)),
                identity.map(|id| to_bigint_bits(id.inode)),
            )
        };

        let left_paths: Vec<&str> = departures.iter().map(|d| d.path).collect();
        let left_events: Vec<&str> = departures.iter().map(|d| d.message.event_type.as_str()).collect();
        let left_messages: Vec<String> = departures
            .iter()
            .map(|d| d.message.message_id.to_string())
            .collect();

        let paths: Vec<&str> = arrivals.iter().map(|a| a.row.path.as_str()).collect();
        let sha256: Vec<&str> = arrivals.iter().map(|a| a.row.sha256.as_str()).collect();
        let xxh128: Vec<&str> = arrivals.iter().map(|a| a.row.xxh128.as_str()).collect();
        let sizes: Vec<i64> = arrivals.iter().map(|a| to_bigint(a.row.stat.size)).collect();
        let mtimes: Vec<i64> = arrivals.iter().map(|a| a.row.stat.mtime_ns).collect();
        let ctimes: Vec<i64> = arrivals.iter().map(|a| a.row.stat.ctime_ns).collect();
        let (devices, inodes): (Vec<Option<i64>>, Vec<Option<i64>>) =
            arrivals.iter().map(|a| identity(&a.row.stat)).unzip();
        let events: Vec<&str> = arrivals.iter().map(|a| a.message.event_type.as_str()).collect();
        let old_paths: Vec<Option<&str>> = arrivals.iter().map(|a| a.message.old_path.as_deref()).collect();
        let message_ids: Vec<String> = arrivals
            .iter()
            .map(|a| a.message.message_id.to_string())
            .collect();

        let fresh_paths: Vec<&str> = refreshed.iter().map(|o| o.path.as_str()).collect();
        let fresh_sizes: Vec<i64> = refreshed.iter().map(|o| to_bigint(o.stat.size)).collect();
        let fresh_mtimes: Vec<i64> = refreshed.iter().map(|o| o.stat.mtime_ns).collect();
        let fresh_ctimes: Vec<i64> = refreshed.iter().map(|o| o.stat.ctime_ns).collect();
        let (fresh_devices, fresh_inodes): (Vec<Option<i64>>, Vec<Option<i64>>) =
            refreshed.iter().map(|o| identity(&o.stat)).unzip();

        let queued_ids: Vec<String> = messages.iter().map(|m| m.message_id.to_string()).collect();
        let queued_paths: Vec<&str> = messages.iter().map(|m| m.file_path.as_str()).collect();
        let queued_instances: Vec<&str> = messages.iter().map(|m| m.instance_id.as_str()).collect();
        let bodies: Vec<String> = messages.iter().map(|m| m.to_json()).collect();

        transaction
            .execute(
                WRITE_BATCH,
                &[
                    &self.origin.instance_id,
                    &self.origin.watched_directory,
                    &left_paths,
                    &left_events,
                    &left_messages,
                    &paths,
                    &sha256,
                    &xxh128,
                    &sizes,
                    &mtimes,
                    &ctimes,
                    &events,
                    &old_paths,
                    &message_ids,
                    &devices,
                    &inodes,
                    &fresh_paths,
                    &fresh_sizes,
                    &fresh_mtimes,
                    &fresh_ctimes,
                    &fresh_devices,
                    &fresh_inodes,
                    &queued_ids,
                    &queued_paths,
                    &bodies,
                    &queued_instances,
                ],
            )
            .map_err(fault("write the file rows and queue their messages"))?;
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

/// What one file change of a batch comes to.
enum Decision<'c> {
    /// Nothing to write: this is the answer.
    Answer(Applied),
    /// Same content: only the `stat` columns of its row are refreshed.
    Refresh(&'c Observed),
    /// These messages go out; the present row at `leaves` becomes a
    /// tombstone, and a row for `arrives` is written.
    Write {
        messages: Vec<Message>,
        leaves: Option<&'c str>,
        arrives: Option<&'c Observed>,
    },
}

/// The paths a file change touches; `None` for a directory rename.
fn file_paths(change: &Change) -> Option<Vec<&str>> {
    match change {
        Change::Present {
            observed,
            renamed_from,
        } => Some(
            std::iter::once(observed.path.as_str())
                .chain(renamed_from.as_deref())
                .collect(),
        ),
        Change::Gone { path } => Some(vec![path.as_str()]),
        Change::DirectoryRenamed { .. } => None,
    }
}

/// Locks the rows under a renamed directory (between `$1` and `$2`) in path
/// order, for [`present_rows`]: the tombstones too, as `state = 'present'` in
/// the condition would have the planner read every present row through
/// `files_present_sha256`.
pub(super) const LOCK_UNDER: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM files WHERE file_path > $1 AND file_path < $2 ORDER BY file_path FOR UPDATE"
);

/// Locks the rows at a batch of paths in path order, for [`present_rows`].
pub(super) const LOCK_ROWS: &str = concat!(
    "SELECT ",
    row_columns!(),
    " FROM files WHERE file_path = ANY($1) ORDER BY file_path FOR UPDATE"
);

/// Locks the rows at the paths a directory rename moves rows to, in path
/// order, and says which describe present files.
pub(super) const LOCK_NEW_PATHS: &str =
    "SELECT file_path, state = 'present' FROM files WHERE file_path = ANY($1) ORDER BY file_path FOR UPDATE";

/// Locks the rows at `paths` in path order (a deleted file's too: the
/// batch is about to write them) and returns those of present files.
fn load_present(transaction: &mut Transaction<'_>, paths: &[&str]) -> Result<Vec<Row>, Fault> {
    let records = transaction
        .query(LOCK_ROWS, &[&paths])
        .map_err(fault("lock the file rows"))?;
    Ok(present_rows(&records))
}

/// [`PostgresRegistry::write`]'s statement. `$1`, `$2`: this instance and
/// its tree. The rows left (`$3`–`$5`) keep their content and stat columns,
/// which describe the file as it was before it left. No message goes out for
/// a refreshed row (`$17`–`$22`), so its `message_id` and `published_at` keep
/// describing the last one that did. The outbox rows (`$23`–`$26`) are
/// inserted in the order given, which is the order of their ids.
const WRITE_BATCH: &str = "WITH left_rows AS ( \
         UPDATE files SET state = 'deleted', last_event = departure.last_event, \
             old_path = NULL, instance_id = $1, watched_directory = $2, \
             message_id = departure.message_id::uuid, published_at = NULL, updated_at = now() \
         FROM unnest($3::text[], $4::text[], $5::text[]) \
             AS departure(file_path, last_event, message_id) \
         WHERE files.file_path = departure.file_path), \
     arrived_rows AS ( \
         INSERT INTO files (file_path, state, sha256, xxh128, size_bytes, mtime_ns, \
             ctime_ns, last_event, old_path, instance_id, watched_directory, message_id, \
             published_at, updated_at, device, inode) \
         SELECT arrival.file_path, 'present', arrival.sha256, arrival.xxh128, \
             arrival.size_bytes, arrival.mtime_ns, arrival.ctime_ns, arrival.last_event, \
             arrival.old_path, $1, $2, arrival.message_id::uuid, NULL, now(), \
             arrival.device, arrival.inode \
         FROM unnest($6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[], \
             $11::int8[], $12::text[], $13::text[], $14::text[], $15::int8[], $16::int8[]) \
             AS arrival(file_path, sha256, xxh128, size_bytes, mtime_ns, ctime_ns, \
                 last_event, old_path, message_id, device, inode) \
         ON CONFLICT (file_path) DO UPDATE SET state = 'present', \
             sha256 = EXCLUDED.sha256, xxh128 = EXCLUDED.xxh128, \
             size_bytes = EXCLUDED.size_bytes, mtime_ns = EXCLUDED.mtime_ns, \
             ctime_ns = EXCLUDED.ctime_ns, device = EXCLUDED.device, inode = EXCLUDED.inode, \
             last_event = EXCLUDED.last_event, \
             old_path = EXCLUDED.old_path, instance_id = EXCLUDED.instance_id, \
             watched_directory = EXCLUDED.watched_directory, \
             message_id = EXCLUDED.message_id, published_at = NULL, updated_at = now()), \
     refreshed_rows AS ( \
         UPDATE files SET size_bytes = fresh.size_bytes, mtime_ns = fresh.mtime_ns, \
             ctime_ns = fresh.ctime_ns, device = fresh.device, inode = fresh.inode, updated_at = now() \
         FROM unnest($17::text[], $18::int8[], $19::int8[], $20::int8[], $21::int8[], $22::int8[]) \
             AS fresh(file_path, size_bytes, mtime_ns, ctime_ns, device, inode) \
         WHERE files.file_path = fresh.file_path) \
     INSERT INTO outbox (message_id, file_path, body, instance_id) \
     SELECT queued.message_id::uuid, queued.file_path, queued.body, queued.instance_id \
     FROM unnest($23::text[], $24::text[], $25::text[], $26::text[]) WITH ORDINALITY \
         AS queued(message_id, file_path, body, instance_id, position) \
     ORDER BY queued.position";
