//! What a scenario with both sinks stands on: an exchange and a queue of its
//! own, read into [`Arrivals`] from the start, and a registry schema of its
//! own; all removed once its daemons have stopped.

use std::sync::Arc;

use crate::amqp::{QueueReader, RunBroker};
use crate::arrivals::{Arrivals, Watched};
use crate::daemon::Sinks;
use crate::schema::Schema;
use crate::Common;

/// Declare it before the daemons, so that on an early return they drop (and
/// die) before their schema is dropped.
pub struct RunSinks {
    /// What the daemons are given.
    pub sinks: Sinks,
    /// Every message on the run's queue.
    pub arrivals: Arc<Watched<Arrivals>>,
    reader: QueueReader,
    broker: RunBroker,
    schema: Schema,
}

impl RunSinks {
    /// Declares the exchange and queue named by `tag`, starts reading the
    /// queue, and names the schema `bench_<tag>` (the daemons create it).
    pub fn open(common: &Common, tag: &str) -> Result<RunSinks, String> {
        let broker = RunBroker::declare(&common.rabbitmq_url, tag)?;
        let arrivals = Arc::new(Watched::new(Arrivals::default()));
        let reader = broker.read_into(Arc::clone(&arrivals))?;
        let schema = Schema::new(&common.database_url, &format!("bench_{tag}"));
        let sinks = Sinks {
            database_url: common.database_url.clone(),
            schema: schema.name.clone(),
            rabbitmq_url: common.rabbitmq_url.clone(),
            exchange: broker.exchange.clone(),
        };
        Ok(RunSinks {
            sinks,
            arrivals,
            reader,
            broker,
            schema,
        })
    }

    /// Stops reading, deletes the exchange and queue, drops the schema.
    pub fn close(self) -> Result<(), String> {
        self.reader.stop()?;
        self.broker.remove()?;
        self.schema.drop_now()
    }
}
