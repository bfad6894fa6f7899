//! The message contract shared with the consumers (cataloging, analysis, tracklists).
//!
//! Field names, types and routing keys are a contract: consumers parse these
//! bodies. Change them only with a new `schema_version`.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of the body layout; consumers branch on it.
pub const SCHEMA_VERSION: u32 = 1;

/// What happened to a file, from a consumer's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Created,
    Modified,
    Deleted,
    /// The parent directory changed (`old_path` is set).
    Moved,
    /// Same parent directory, new name (`old_path` is set).
    Renamed,
}

impl EventType {
    pub const ALL: [EventType; 5] = [
        EventType::Created,
        EventType::Modified,
        EventType::Deleted,
        EventType::Moved,
        EventType::Renamed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "created",
            EventType::Modified => "modified",
            EventType::Deleted => "deleted",
            EventType::Moved => "moved",
            EventType::Renamed => "renamed",
        }
    }

    /// RabbitMQ routing key: `file.<event_type>`.
    pub fn routing_key(self) -> String {
        format!("file.{}", self.as_str())
    }

    pub fn parse(text: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|kind| kind.as_str() == text)
    }

    /// `moved` when the parent directory differs, `renamed` when only the name does.
    pub fn for_rename(old_path: &str, new_path: &str) -> EventType {
        let parent = |path: &str| path.rsplit_once('/').map(|(dir, _)| dir.to_owned());
        if parent(old_path) == parent(new_path) {
            EventType::Renamed
        } else {
            EventType::Moved
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// What a file held when it was observed; absent from `deleted` messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub sha256_hash: String,
    pub xxh128_hash: String,
    pub size_bytes: u64,
    /// RFC 3339 UTC.
    pub modified_time: String,
    /// Lower-case extension without the dot (empty when the name has none).
    pub file_type: String,
}

/// One change, as published. Built once per change; a retry or redelivery
/// sends the same bytes, so `message_id` is stable across attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub schema_version: u32,
    pub message_id: Uuid,
    /// Shared by every message that one filesystem operation produced (a
    /// directory rename, a rename over an existing file).
    pub correlation_id: Uuid,
    /// RFC 3339 UTC, when the change was recorded.
    pub timestamp: String,
    pub event_type: EventType,
    /// The absolute path as path text ([`crate::path_text`]): the name on
    /// disk for every valid UTF-8 name without `\x` or `\\` in it; bytes
    /// that are not UTF-8 written `\xNN`, and a backslash before `x` or `\`
    /// doubled, so the text always maps back to exactly one path.
    pub file_path: String,
    /// Where the file was before a `moved` or `renamed`; path text too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
    pub instance_id: String,
    /// `DATA_DIR`, as path text: a prefix of every `file_path`.
    pub watched_directory: String,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
}

impl Message {
    /// The body as recorded and sent; [`Encoded`] keeps it with the message.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a message always serializes")
    }

    pub fn routing_key(&self) -> String {
        self.event_type.routing_key()
    }
}

/// A message and the exact bytes of its body, which is what a sink sends.
///
/// Made once: from a new [`Message`] (serialized here), or read back from
/// where it was recorded (the outbox), keeping the stored bytes. So every
/// redelivery sends the bytes first recorded, with fields this build does
/// not know kept (a newer instance's message, picked up as an orphan by an
/// older one), and nothing is serialized twice. The two parts cannot drift
/// apart: neither can be changed once made.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    message: Message,
    json: Box<str>,
}

impl Encoded {
    pub fn new(message: Message) -> Encoded {
        Encoded {
            json: message.to_json().into_boxed_str(),
            message,
        }
    }

    /// Reads a stored body; the fields this build knows must be there and
    /// well-formed, others are kept in the bytes and ignored.
    pub fn read(json: &str) -> Result<Encoded, serde_json::Error> {
        Ok(Encoded {
            message: serde_json::from_str(json)?,
            json: json.into(),
        })
    }

    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The body, as sent: JSON in UTF-8.
    pub fn json(&self) -> &str {
        &self.json
    }
}

/// An encoded message reads as its message (`encoded.message_id`).
impl std::ops::Deref for Encoded {
    type Target = Message;

    fn deref(&self) -> &Message {
        &self.message
    }
}

/// Who is speaking: stamped into every message this process builds.
#[derive(Debug, Clone)]
pub struct Origin {
    pub instance_id: String,
    pub watched_directory: String,
}

impl Origin {
    pub fn message(
        &self,
        event_type: EventType,
        file_path: &str,
        old_path: Option<&str>,
        correlation_id: Uuid,
        content: Option<Content>,
    ) -> Message {
        Message {
            schema_version: SCHEMA_VERSION,
            message_id: Uuid::new_v4(),
            correlation_id,
            timestamp: rfc3339(SystemTime::now()),
            event_type,
            file_path: file_path.to_owned(),
            old_path: old_path.map(str::to_owned),
            instance_id: self.instance_id.clone(),
            watched_directory: self.watched_directory.clone(),
            content,
        }
    }
}

/// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-27T10:00:00.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// RFC 3339 for a time given as nanoseconds since the Unix epoch (negative: before it).
pub fn rfc3339_from_nanos(nanos: i64) -> String {
    let time = if nanos >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos as u64)
    } else {
        SystemTime::UNIX_EPOCH - std::time::Duration::from_nanos(nanos.unsigned_abs())
    };
    rfc3339(time)
}

/// Lower-case extension without the dot, as consumers expect in `file_type`.
pub fn file_type(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => extension.to_lowercase(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            instance_id: "abcd1234".into(),
            watched_directory: "/data/music".into(),
        }
    }

    #[test]
    fn deleted_message_has_no_content_fields() {
        let message = origin().message(
            EventType::Deleted,
            "/data/music/a.flac",
            None,
            Uuid::new_v4(),
            None,
        );
        let value: serde_json::Value = serde_json::from_str(&message.to_json()).unwrap();
        let object = value.as_object().unwrap();
        for absent in [
            "sha256_hash",
            "xxh128_hash",
            "size_bytes",
            "modified_time",
            "file_type",
            "old_path",
        ] {
            assert!(!object.contains_key(absent), "{absent} must be absent");
        }
        assert_eq!(object["schema_version"], 1);
        assert_eq!(object["event_type"], "deleted");
        assert_eq!(object["instance_id"], "abcd1234");
        assert_eq!(object["watched_directory"], "/data/music");
    }

    #[test]
    fn content_fields_are_flat_and_typed() {
        let content = Content {
            sha256_hash: "a".repeat(64),
            xxh128_hash: "b".repeat(32),
            size_bytes: 42,
            modified_time: rfc3339_from_nanos(1_700_000_000_123_000_000),
            file_type: "flac".into(),
        };
        let message = origin().message(
            EventType::Renamed,
            "/data/music/b.flac",
            Some("/data/music/a.flac"),
            Uuid::new_v4(),
            Some(content),
        );
        let value: serde_json::Value = serde_json::from_str(&message.to_json()).unwrap();
        assert_eq!(value["size_bytes"], 42);
        assert!(value["size_bytes"].is_u64());
        assert_eq!(value["modified_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(value["old_path"], "/data/music/a.flac");
        assert_eq!(value["file_type"], "flac");
        let back: Message = serde_json::from_value(value).unwrap();
        assert_eq!(back, message);
    }

    #[test]
    fn routing_keys_follow_the_contract() {
        assert_eq!(EventType::Created.routing_key(), "file.created");
        assert_eq!(EventType::Moved.routing_key(), "file.moved");
        assert_eq!(EventType::parse("renamed"), Some(EventType::Renamed));
        assert_eq!(EventType::parse("touched"), None);
    }

    #[test]
    fn rename_versus_move_depends_on_the_parent() {
        assert_eq!(
            EventType::for_rename("/m/a/x.flac", "/m/a/y.flac"),
            EventType::Renamed
        );
        assert_eq!(
            EventType::for_rename("/m/a/x.flac", "/m/b/x.flac"),
            EventType::Moved
        );
    }

    #[test]
    fn file_type_is_lowercase_extension() {
        assert_eq!(file_type("/m/Song.FLAC"), "flac");
        assert_eq!(file_type("/m/archive.tar.gz"), "gz");
        assert_eq!(file_type("/m/README"), "");
        assert_eq!(file_type("/m/.hidden"), "");
    }
}
