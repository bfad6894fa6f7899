//! The stdout sink: one JSON object per line, for `file-watcher dir | jq` and
//! for running without a broker.
//!
//! A line counts as delivered once it was written and flushed. A closed pipe
//! is final ([`SinkError::Closed`]): nobody is left to read, so the daemon stops.

use std::io::{self, Write};

use super::{Delivery, Sink, SinkError};
use crate::message::Encoded;

/// `json` on one line. This build's bodies always are; one stored by hand
/// (a requeued row someone edited) or by another writer may not be, and is
/// written again without its line breaks, its fields as they were.
fn one_line(json: &str) -> std::borrow::Cow<'_, str> {
    if !json.contains(['\n', '\r']) {
        return json.into();
    }
    serde_json::from_str::<serde_json::Value>(json)
        .map_or_else(|_| json.replace(['\n', '\r'], " "), |value| value.to_string())
        .into()
}

/// One JSON object per line on stdout, flushed per line (`file-watcher dir | jq`).
pub struct StdoutSink {
    out: io::Stdout,
}

impl StdoutSink {
    pub fn new() -> StdoutSink {
        StdoutSink { out: io::stdout() }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        StdoutSink::new()
    }
}

impl Sink for StdoutSink {
    fn deliver(&mut self, messages: &[Encoded]) -> Result<Delivery, SinkError> {
        let mut out = self.out.lock();
        let mut delivered = Vec::with_capacity(messages.len());
        for message in messages {
            let written = out
                .write_all(one_line(message.json()).as_bytes())
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush());
            match written {
                Ok(()) => delivered.push(message.message_id),
                Err(error) if error.kind() == io::ErrorKind::BrokenPipe => return Err(SinkError::Closed),
                Err(error) => return Err(SinkError::Unavailable(format!("cannot write to stdout: {error}"))),
            }
        }
        Ok(Delivery::confirmed(delivered))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_with_line_breaks_is_written_on_one_line_with_its_fields() {
        let compact = r#"{"a":1,"b":"x\ny"}"#;
        assert_eq!(one_line(compact), compact);
        let spread = "{\n  \"a\": 1,\r\n  \"b\": \"x\\ny\"\n}";
        let line = one_line(spread);
        assert!(!line.contains(['\n', '\r']), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value, serde_json::json!({"a": 1, "b": "x\ny"}));
    }
}
