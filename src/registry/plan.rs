//! The registry's decisions, free of I/O: what an observation means given the
//! rows recorded so far (a [`Plan`]), and the messages it produces.
//!
//! Both registries run these same rules, so running with or without a
//! database announces the same events; being pure, they are unit-tested here.

use uuid::Uuid;

use super::{Observed, Row};
use crate::message::{EventType, Message, Origin};

/// What a `Present` change means, given what the registry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Older than what is recorded: ignore.
    Stale,
    /// Same content and state: record the fresh `stat`, publish nothing.
    Refresh,
    Create,
    Modify,
    /// Move the row from `from` (a present row) to the observed path. When
    /// `replaces` is set, a present row at the target is replaced, and its
    /// `deleted` goes out first.
    Rename {
        from: String,
        replaces: bool,
    },
}

/// Decides what a `Present` observation means. `source` is the present row at
/// `renamed_from` (if any), `target` the present row at the observed path.
pub fn plan_present(
    source: Option<&Row>,
    target: Option<&Row>,
    observed: &Observed,
    renamed_from: Option<&str>,
) -> Plan {
    if let (Some(from), Some(_)) = (renamed_from, source) {
        if from != observed.path {
            return Plan::Rename {
                from: from.to_owned(),
                replaces: target.is_some(),
            };
        }
    }
    match target {
        None => Plan::Create,
        Some(row) if observed.stat.freshness() < row.stat.freshness() => Plan::Stale,
        Some(row) if row.same_content(observed) => Plan::Refresh,
        Some(_) => Plan::Modify,
    }
}

/// The messages a plan produces, in publish order.
pub fn messages_for(plan: &Plan, observed: &Observed, origin: &Origin, correlation_id: Uuid) -> Vec<Message> {
    let content = Some(observed.content());
    match plan {
        Plan::Stale | Plan::Refresh => Vec::new(),
        Plan::Create => {
            vec![origin.message(EventType::Created, &observed.path, None, correlation_id, content)]
        }
        Plan::Modify => {
            vec![origin.message(EventType::Modified, &observed.path, None, correlation_id, content)]
        }
        Plan::Rename { from, replaces } => {
            let mut messages = Vec::with_capacity(2);
            if *replaces {
                messages.push(origin.message(EventType::Deleted, &observed.path, None, correlation_id, None));
            }
            messages.push(origin.message(
                EventType::for_rename(from, &observed.path),
                &observed.path,
                Some(from),
                correlation_id,
                content,
            ));
            messages
        }
    }
}

/// The `renamed`/`moved` message for a row carried along by a directory rename.
pub fn message_for_carried_row(row: &Row, new_path: &str, origin: &Origin, correlation_id: Uuid) -> Message {
    let observed = Observed {
        path: new_path.to_owned(),
        stat: row.stat,
        sha256: row.sha256.clone(),
        xxh128: row.xxh128.clone(),
    };
    let content = (!row.sha256.is_empty()).then(|| observed.content());
    origin.message(
        EventType::for_rename(&row.path, new_path),
        new_path,
        Some(&row.path),
        correlation_id,
        content,
    )
}

/// `path` with the directory prefix `from` replaced by `to` (both without a
/// trailing slash); `None` when `path` is not strictly below `from`.
pub fn rebase(path: &str, from: &str, to: &str) -> Option<String> {
    let rest = path.strip_prefix(from)?.strip_prefix('/')?;
    Some(format!("{to}/{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Stat;

    fn stat(ctime_ns: i64, size: u64) -> Stat {
        Stat {
            size,
            mtime_ns: 1,
            ctime_ns,
            identity: None,
        }
    }

    fn observed(path: &str, ctime_ns: i64, hash: &str) -> Observed {
        Observed {
            path: path.into(),
            stat: stat(ctime_ns, 3),
            sha256: hash.into(),
            xxh128: hash.into(),
        }
    }

    fn row(path: &str, ctime_ns: i64, hash: &str) -> Row {
        Row::from_observed(&observed(path, ctime_ns, hash))
    }

    #[test]
    fn unknown_path_is_created() {
        assert_eq!(
            plan_present(None, None, &observed("/m/a", 5, "h"), None),
            Plan::Create
        );
    }

    #[test]
    fn same_content_is_refresh_not_a_message() {
        let target = row("/m/a", 5, "h");
        assert_eq!(
            plan_present(None, Some(&target), &observed("/m/a", 6, "h"), None),
            Plan::Refresh
        );
    }

    #[test]
    fn older_observation_never_wins() {
        let target = row("/m/a", 9, "new");
        assert_eq!(
            plan_present(None, Some(&target), &observed("/m/a", 5, "old"), None),
            Plan::Stale
        );
    }

    #[test]
    fn newer_content_is_modified() {
        let target = row("/m/a", 5, "old");
        assert_eq!(
            plan_present(None, Some(&target), &observed("/m/a", 9, "new"), None),
            Plan::Modify
        );
    }

    #[test]
    fn unhashed_row_counts_as_modified() {
        let mut target = row("/m/a", 5, "h");
        target.sha256.clear();
        assert_eq!(
            plan_present(None, Some(&target), &observed("/m/a", 9, "h"), None),
            Plan::Modify
        );
    }

    #[test]
    fn rename_of_a_known_file_is_a_rename() {
        let source = row("/m/a", 5, "h");
        let plan = plan_present(Some(&source), None, &observed("/m/b", 6, "h"), Some("/m/a"));
        assert_eq!(
            plan,
            Plan::Rename {
                from: "/m/a".into(),
                replaces: false
            }
        );
    }

    #[test]
    fn rename_over_a_known_file_deletes_the_target_first() {
        let source = row("/m/a", 5, "h");
        let target = row("/m/b", 5, "other");
        let observation = observed("/m/b", 6, "h");
        let plan = plan_present(Some(&source), Some(&target), &observation, Some("/m/a"));
        let origin = Origin {
            instance_id: "i".into(),
            watched_directory: "/m".into(),
        };
        let correlation = Uuid::new_v4();
        let messages = messages_for(&plan, &observation, &origin, correlation);
        let kinds: Vec<_> = messages.iter().map(|m| m.event_type).collect();
        assert_eq!(kinds, [EventType::Deleted, EventType::Renamed]);
        assert!(messages.iter().all(|m| m.correlation_id == correlation));
        assert_eq!(messages[1].old_path.as_deref(), Some("/m/a"));
    }

    #[test]
    fn rename_of_an_unannounced_file_is_created_or_modified() {
        assert_eq!(
            plan_present(None, None, &observed("/m/b", 6, "h"), Some("/m/a.part")),
            Plan::Create
        );
        let target = row("/m/b", 5, "old");
        assert_eq!(
            plan_present(None, Some(&target), &observed("/m/b", 6, "h"), Some("/m/a.part")),
            Plan::Modify
        );
    }

    #[test]
    fn rebase_needs_a_whole_component() {
        assert_eq!(rebase("/m/a/x", "/m/a", "/m/b").as_deref(), Some("/m/b/x"));
        assert_eq!(rebase("/m/ab/x", "/m/a", "/m/b"), None);
        assert_eq!(rebase("/m/a", "/m/a", "/m/b"), None);
    }
}
