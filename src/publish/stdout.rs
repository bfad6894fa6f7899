//! The stdout sink: one JSON object per line, for `file-watcher dir | jq` and
//! for running without a broker.
//!
//! A line counts as delivered once it was written and flushed. A closed pipe
//! is final ([`SinkError::Closed`]): nobody is left to read, so the daemon stops.

use std::io::{self, Write};

use super::{Delivery, Sink, SinkError};
use crate::message::Encoded;

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
                .write_all(message.json().as_bytes())
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
