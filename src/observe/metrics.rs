//! The Prometheus metrics, built once from the stages' counters.
//!
//! One [`Registry`] (prometheus-client) with the const label `instance_id`
//! on every series and one collector that reads the counters when scraped.
//! Counters live as long as the process (the pipeline makes them once, and
//! reconnects or watcher restarts never replace them), so they only grow.
//!
//! Series (all prefixed `file_watcher_`):
//! `events_seen_total{kind}`, `events_dropped_total`,
//! `messages_recorded_total{event_type}`, `messages_published_total`,
//! `messages_confirmed_total`, `messages_nacked_total`,
//! `messages_returned_total` (unroutable), `registry_writes_total`,
//! `observations_unchanged_total`, `errors_total{kind}` (file, registry,
//! publish, set_aside), `reconnects_total{service}` (broker, database),
//! `rescans_total`, `overflows_total`, `files_hashed_total`,
//! `bytes_hashed_total`, `outbox_depth`, `outbox_oldest_age_seconds`,
//! `pending_paths`, `watched_directories`, `polling`,
//! `end_to_end_latency_seconds` (histogram), `build_info{version}`,
//! `alive` and `ready` (the probes, as 0/1).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{health, Sources};
use crate::message::EventType;
use crate::watch::EVENT_KINDS;

/// Upper bounds (seconds) of the latency buckets: a file written and
/// published at once lands in the first ones; catch-up after downtime
/// announces files written long ago, which land in the last.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0,
];

/// A histogram of atomics (prometheus-client's own takes a lock per
/// observation): one relaxed add per bucket hit, count and sum.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    /// Sum of the observations, in microseconds.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts): the encoder makes them
    /// cumulative, as the text format wants.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .chain([f64::INFINITY].iter())
            .zip(&self.buckets)
            .map(|(bound, count)| (*bound, count.load(Ordering::Relaxed)))
            .collect();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        // The count is the buckets' total, read once, so the two agree.
        let count = buckets.iter().map(|(_, count)| count).sum();
        (sum, count, buckets)
    }
}

/// The registry `/metrics` encodes: built once, at start.
pub fn registry(sources: &Sources) -> Registry {
    let labels = [("instance_id".into(), sources.instance_id.clone().into())];
    let mut registry = Registry::with_prefix_and_labels("file_watcher", labels.into_iter());
    registry.register_collector(Box::new(Counts(sources.clone())));
    registry
}

/// The Prometheus text format (0.0.4) of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

/// Reads every counter at scrape time.
#[derive(Debug)]
struct Counts(Sources);

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A counter with one label, one series per `(label value, count)`.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&str, u64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Collector for Counts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Sources {
            watch,
            worker,
            publish,
            health: database,
            outbox,
            ..
        } = &self.0;
        let encoder = &mut encoder;
        let seen: Vec<(&str, u64)> = EVENT_KINDS
            .iter()
            .zip(&watch.events_seen)
            .map(|(kind, count)| (*kind, load(count)))
            .collect();
        counters(
            encoder,
            "events_seen",
            "Filesystem events notify reported, by kind.",
            "kind",
            &seen,
        )?;
        counter(
            encoder,
            "events_dropped",
            "Events dropped on a full channel (each overflow rescans).",
            load(&watch.dropped_events),
        )?;
        let recorded: Vec<(&str, u64)> = EventType::ALL
            .iter()
            .zip(&worker.recorded_by_type)
            .map(|(kind, count)| (kind.as_str(), load(count)))
            .collect();
        counters(
            encoder,
            "messages_recorded",
            "Messages recorded in the outbox, by event type.",
            "event_type",
            &recorded,
        )?;
        counter(
            encoder,
            "messages_published",
            "Messages handed to the sink (retries count again).",
            load(&publish.published),
        )?;
        counter(
            encoder,
            "messages_confirmed",
            "Messages the sink confirmed.",
            load(&publish.confirmed),
        )?;
        counter(
            encoder,
            "messages_nacked",
            "Messages RabbitMQ nacked (retried).",
            load(&publish.nacked),
        )?;
        counter(
            encoder,
            "messages_returned",
            "Messages RabbitMQ returned as unroutable.",
            load(&publish.returned),
        )?;
        counter(
            encoder,
            "registry_writes",
            "Changes recorded in the registry.",
            load(&worker.registry_writes),
        )?;
        counter(
            encoder,
            "observations_unchanged",
            "Observations the registry already knew (nothing announced).",
            load(&worker.unchanged),
        )?;
        let errors = [
            ("file", load(&worker.file_errors)),
            ("registry", load(&worker.registry_errors)),
            ("publish", load(&publish.failures)),
            ("set_aside", load(&publish.set_aside)),
        ];
        counters(encoder, "errors", "Errors, by kind.", "kind", &errors)?;
        let reconnects = [
            ("broker", load(&publish.broker_reconnects)),
            ("database", load(&database.reconnects)),
        ];
        counters(
            encoder,
            "reconnects",
            "Connections made again after a loss.",
            "service",
            &reconnects,
        )?;
        counter(
            encoder,
            "rescans",
            "Full rescans of the tree.",
            load(&watch.rescans),
        )?;
        counter(
            encoder,
            "overflows",
            "Times the event channel overflowed.",
            load(&watch.overflows),
        )?;
        counter(
            encoder,
            "files_hashed",
            "Files read and hashed.",
            load(&worker.files_hashed),
        )?;
        counter(
            encoder,
            "bytes_hashed",
            "Bytes read while hashing.",
            load(&worker.bytes_hashed),
        )?;

        let (depth, oldest) = if self.0.database {
            (
                load(&outbox.depth) as f64,
                f64::from_bits(load(&outbox.oldest_age_bits)),
            )
        } else {
            // In memory the outbox holds what this process recorded and did
            // not get confirmed; it drains within milliseconds on stdout.
            let recorded: u64 = worker.recorded_by_type.iter().map(load).sum();
            let gone = load(&publish.confirmed) + load(&publish.set_aside);
            (recorded.saturating_sub(gone) as f64, 0.0)
        };
        gauge(
            encoder,
            "outbox_depth",
            "Messages recorded and not yet confirmed.",
            depth,
        )?;
        gauge(
            encoder,
            "outbox_oldest_age_seconds",
            "Age of the oldest unpublished message (0 when none; with a database, as of the last heartbeat).",
            oldest,
        )?;
        gauge(
            encoder,
            "pending_paths",
            "Paths the settle stage holds.",
            load(&watch.pending_paths) as f64,
        )?;
        gauge(
            encoder,
            "watched_directories",
            "Directories with an inotify watch (0 when polling).",
            inotify_watches() as f64,
        )?;
        let polling = watch.polling.load(Ordering::Relaxed);
        gauge(
            encoder,
            "polling",
            "1 when the tree is polled instead of watched.",
            f64::from(u8::from(polling)),
        )?;

        let (sum, count, buckets) = publish.latency.snapshot();
        let mut histogram = encoder.encode_descriptor(
            "end_to_end_latency_seconds",
            "From a file's last write to the confirm of its message.",
            None,
            MetricType::Histogram,
        )?;
        histogram.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;

        let mut info =
            encoder.encode_descriptor("build_info", "The running build.", None, MetricType::Gauge)?;
        let labels = [("version", env!("CARGO_PKG_VERSION"))];
        ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
        let up = |result: Result<String, String>| f64::from(u8::from(result.is_ok()));
        gauge(
            encoder,
            "alive",
            "1 while /healthz passes.",
            up(health::liveness(&self.0)),
        )?;
        gauge(
            encoder,
            "ready",
            "1 while /readyz passes.",
            up(health::readiness(&self.0)),
        )?;
        Ok(())
    }
}

/// inotify watches this process holds, from `/proc/self/fdinfo` (read at
/// scrape time, so watching costs nothing extra); 0 where that is unreadable.
fn inotify_watches() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .map(|info| {
            info.lines()
                .filter(|line| line.starts_with("inotify wd:"))
                .count()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_each_bucket_once() {
        let histogram = Histogram::default();
        for seconds in [0.05, 0.3, 0.3, 7.0, 100_000.0] {
            histogram.observe(seconds);
        }
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 5);
        assert!((sum - 100_007.65).abs() < 0.001, "{sum}");
        assert_eq!(buckets[0], (0.1, 1));
        assert_eq!(buckets[2], (0.5, 2));
        assert_eq!(buckets[6], (10.0, 1));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
    }
}
