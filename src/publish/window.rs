//! The publisher's window: batches on the wire while earlier ones wait for
//! their confirms, so that the broker is never idle while the publisher
//! waits for it or for the registry.
//!
//! Without it, each batch is sent, then its confirms are awaited, then it is
//! marked published, then the next batch is read: four waits in a row, with
//! the channel idle during three of them. With it, up to [`WINDOW`] messages
//! are unconfirmed at once, the next batch is read from the outbox while the
//! broker works, and confirmed messages are marked published in bulk, one
//! transaction per [`MARK_EVERY`] messages or whenever the window empties.
//!
//! What does not change: a message is marked published only after it was
//! confirmed, and only as part of the *prefix* of everything sent that was
//! confirmed in order. Once a batch is not confirmed whole (a nack, a lost
//! connection, a timeout), everything sent after it is forgotten and sent
//! again later with the same `message_id`, exactly like the messages after
//! a nack within one batch; so the last message a consumer gets for a path
//! is always the newest one.
//!
//! Reading on past unconfirmed messages needs a place in the outbox
//! ([`Queued::position`]). Transactions commit out of the order their rows
//! were numbered in, so a message can appear behind that place after it was
//! passed; the publisher therefore reads from the start of the outbox again
//! when the window empties (unless, as below, that read cannot find
//! anything) and at least every [`REREAD_EVERY`] while it stays busy,
//! skipping what it already sent.
//!
//! Reads that can find nothing are skipped. The workers nudge the publisher
//! (`wake`) after every commit that queued a message, and a read takes the
//! nudge waiting when it starts: a read sees every commit before it. So
//! once the reads have caught up, the outbox is read on only if a nudge is
//! waiting, and read from its start when the window empties only if a
//! nudge came since the last read from the start. At a trickle (a file now
//! and then) a message costs one read and one mark, not three reads.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use uuid::Uuid;

use super::{Delivery, Publisher, SinkError, BATCH};
use crate::message::Encoded;
use crate::registry::Queued;

/// Messages sent and not yet confirmed, at most (as whole batches: the last
/// batch sent may take it past this by less than one batch).
pub const WINDOW: usize = 4 * BATCH;
/// Confirmed messages marked published in one transaction, at most.
pub const MARK_EVERY: usize = 4 * BATCH;
/// How long a message recorded behind the read position may wait, while
/// the window stays busy, before the outbox is read from its start again.
const REREAD_EVERY: Duration = Duration::from_millis(200);

/// The publisher's side of the window: what it sent and where it read.
#[derive(Default)]
struct Sent {
    /// Messages sent and not yet marked published, confirmed or not: read
    /// again from the outbox, they are skipped.
    outstanding: HashSet<Uuid>,
    /// Of `outstanding`: confirmed, in order, waiting to be marked.
    confirmed: Vec<Uuid>,
    /// Messages sent whose confirms are still awaited.
    in_flight: usize,
    /// Where the next read of the outbox starts; `None` at its start.
    position: Option<u64>,
    /// A read past the start took a nudge since the last read from the
    /// start: a message committed meanwhile may sit behind `position`.
    maybe_behind: bool,
}

/// How a windowed drain ended.
pub enum Drained {
    /// A read from the outbox's start found nothing that was not confirmed.
    Empty,
    /// The deadline passed.
    Deadline,
}

impl Publisher {
    /// Publishes through the sink's window until the outbox is empty or
    /// `deadline` passes, adding what was confirmed (and marked) to
    /// `published`. On `Err`, what was confirmed is marked first (if the
    /// registry lets it), and the rest is left in the outbox.
    /// `wake` is the workers' nudge (see the module docs).
    pub(super) fn drain_window(
        &mut self,
        wake: &Receiver<()>,
        deadline: Option<Instant>,
        published: &mut usize,
    ) -> Result<Drained, SinkError> {
        let mut sent = Sent::default();
        let outcome = self.fill_and_confirm(wake, deadline, &mut sent, published);
        if outcome.is_err() {
            if let Some(window) = self.sink.window() {
                window.forget();
            }
        }
        // Confirmed is confirmed, whatever failed after it.
        let marked = self.mark(&mut sent, published);
        let drained = outcome?;
        marked?;
        Ok(drained)
    }

    fn fill_and_confirm(
        &mut self,
        wake: &Receiver<()>,
        deadline: Option<Instant>,
        sent: &mut Sent,
        published: &mut usize,
    ) -> Result<Drained, SinkError> {
        let mut reread_at = Instant::now() + REREAD_EVERY;
        // Reading from the start, not yet past what was already sent: the
        // clock waits until this read is through.
        let mut rereading = false;
        // The last read found no more rows past `sent.position`.
        let mut caught_up = false;
        loop {
            let past_deadline = deadline.is_some_and(|deadline| Instant::now() >= deadline);
            while !caught_up && !past_deadline && sent.in_flight < WINDOW {
                if !rereading && Instant::now() >= reread_at {
                    sent.position = None;
                    rereading = true;
                }
                // This read sees whatever the nudge waiting now was for.
                let nudged = wake.try_recv().is_ok();
                if sent.position.is_none() {
                    sent.maybe_behind = false;
                } else if nudged {
                    sent.maybe_behind = true;
                }
                let page = self
                    .registry
                    .outgoing_after(sent.position, BATCH)
                    .map_err(|error| self.registry_error(error))?;
                caught_up = page.len() < BATCH;
                if let Some(last) = page.last() {
                    sent.position = Some(last.position);
                }
                let batch: Vec<Encoded> = page
                    .into_iter()
                    .map(|Queued { message, .. }| message)
                    .filter(|message| !sent.outstanding.contains(&message.message_id))
                    .collect();
                if caught_up || !batch.is_empty() {
                    // Past everything already sent (or at the end): the
                    // next reread is a while away.
                    if std::mem::take(&mut rereading) {
                        reread_at = Instant::now() + REREAD_EVERY;
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                self.counters
                    .published
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                sent.in_flight += batch.len();
                sent.outstanding
                    .extend(batch.iter().map(|message| message.message_id));
                self.window().send(batch)?;
            }
            let Some(outcome) = self.window().confirm_oldest() else {
                // Nothing in flight: mark what was confirmed; then done, or
                // read from the start if that can find anything.
                self.mark(sent, published)?;
                if past_deadline {
                    return Ok(Drained::Deadline);
                }
                // Caught up, and either the last read was from the start
                // and found nothing, or nothing was committed since the
                // last read from the start.
                if caught_up && (sent.position.is_none() || (!sent.maybe_behind && wake.is_empty())) {
                    return Ok(Drained::Empty);
                }
                sent.position = None;
                caught_up = false;
                rereading = false;
                reread_at = Instant::now() + REREAD_EVERY;
                continue;
            };
            let (batch, Delivery { confirmed, refused }) = outcome?;
            sent.in_flight -= batch.len();
            let unconfirmed = batch.len() - confirmed.len();
            self.count_confirmed(&batch[..confirmed.len()]);
            sent.confirmed.extend(confirmed);
            if sent.confirmed.len() >= MARK_EVERY {
                self.mark(sent, published)?;
            }
            if unconfirmed == 0 {
                // Room in the window: read on if something was recorded
                // meanwhile (or the last page was full).
                if !wake.is_empty() {
                    caught_up = false;
                }
                continue;
            }
            // Not confirmed whole: everything sent after it goes again later.
            self.window().forget();
            sent.in_flight = 0;
            self.mark(sent, published)?;
            sent.outstanding.clear();
            sent.position = None;
            caught_up = false;
            rereading = false;
            match refused {
                Some(refused) => self.set_aside(refused)?,
                None => {
                    return Err(SinkError::Unavailable(format!(
                        "{unconfirmed} of {} messages were not confirmed",
                        batch.len()
                    )));
                }
            }
        }
    }

    /// Marks the confirmed messages published, in one transaction.
    fn mark(&self, sent: &mut Sent, published: &mut usize) -> Result<(), SinkError> {
        if sent.confirmed.is_empty() {
            return Ok(());
        }
        self.registry
            .mark_published(&sent.confirmed)
            .map_err(|error| self.registry_error(error))?;
        *published += sent.confirmed.len();
        for message_id in sent.confirmed.drain(..) {
            sent.outstanding.remove(&message_id);
        }
        Ok(())
    }

    /// The sink's window; only called while the sink has one (a sink gives
    /// it up only by failing a call on it, which ends the drain).
    fn window(&mut self) -> &mut dyn super::Window {
        self.sink
            .window()
            .expect("the sink has a window while the drain uses it")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use crossbeam_channel::Sender;

    use super::*;
    use crate::message::{EventType, Origin};
    use crate::publish::{Sink, Window};
    use crate::registry::{Applied, Change, Health, Registry, RegistryError, Row};

    /// An outbox and nothing else; it records every marking and counts the
    /// reads, and can keep one message out of sight for a number of reads,
    /// as a transaction that commits late would (which then nudges the
    /// publisher, as a worker does after its commit).
    struct Outbox {
        queued: Mutex<Vec<Queued>>,
        marks: Mutex<Vec<usize>>,
        reads: Mutex<usize>,
        late: Mutex<Option<(u64, usize)>>,
        /// How long each read takes.
        read_time: Duration,
        nudge: Sender<()>,
        wake: Receiver<()>,
    }

    impl Default for Outbox {
        fn default() -> Outbox {
            let (nudge, wake) = crossbeam_channel::bounded(1);
            Outbox {
                queued: Mutex::default(),
                marks: Mutex::default(),
                reads: Mutex::default(),
                late: Mutex::default(),
                read_time: Duration::ZERO,
                nudge,
                wake,
            }
        }
    }

    impl Outbox {
        fn holding(count: usize) -> Arc<Outbox> {
            let outbox = Outbox::default();
            for _ in 0..count {
                outbox.record();
            }
            let _ = outbox.wake.try_recv();
            Arc::new(outbox)
        }

        /// Queues one more message and nudges the publisher, as a worker does.
        fn record(&self) {
            let mut queued = self.queued.lock().unwrap();
            let position = queued.last().map_or(1, |last| last.position + 1);
            let origin = Origin {
                instance_id: "window".into(),
                watched_directory: "/music".into(),
            };
            queued.push(Queued {
                position,
                message: Encoded::new(origin.message(
                    EventType::Deleted,
                    &format!("/music/{position:05}.flac"),
                    None,
                    Uuid::new_v4(),
                    None,
                )),
            });
            let _ = self.nudge.try_send(());
        }

        /// Drains `publisher` as its thread would after a nudge.
        fn drain(&self, publisher: &mut Publisher) -> Result<usize, SinkError> {
            let _ = self.wake.try_recv();
            publisher.drain(&self.wake, None, false)
        }

        fn ids(&self) -> Vec<Uuid> {
            let queued = self.queued.lock().unwrap();
            queued.iter().map(|queued| queued.message.message_id).collect()
        }
    }

    impl Registry for Outbox {
        fn lookup(&self, _: &str) -> Result<Option<Row>, RegistryError> {
            Ok(None)
        }

        fn apply(&self, _: &Change, _: Uuid) -> Result<Applied, RegistryError> {
            Err(RegistryError::Unavailable("an outbox only".into()))
        }

        fn present_under(&self, _: &str, _: Option<&str>, _: usize) -> Result<Vec<String>, RegistryError> {
            Ok(Vec::new())
        }

        fn outgoing_after(&self, after: Option<u64>, limit: usize) -> Result<Vec<Queued>, RegistryError> {
            std::thread::sleep(self.read_time);
            *self.reads.lock().unwrap() += 1;
            let mut late = self.late.lock().unwrap();
            let hidden = match late.as_mut() {
                Some((position, reads)) if *reads > 0 => {
                    *reads -= 1;
                    if *reads == 0 {
                        // Committed now; seen from the next read on.
                        let _ = self.nudge.try_send(());
                    }
                    Some(*position)
                }
                _ => None,
            };
            let queued = self.queued.lock().unwrap();
            Ok(queued
                .iter()
                .filter(|queued| queued.position > after.unwrap_or(0) && Some(queued.position) != hidden)
                .take(limit)
                .cloned()
                .collect())
        }

        fn mark_published(&self, message_ids: &[Uuid]) -> Result<(), RegistryError> {
            self.marks.lock().unwrap().push(message_ids.len());
            let mut queued = self.queued.lock().unwrap();
            queued.retain(|queued| !message_ids.contains(&queued.message.message_id));
            Ok(())
        }

        fn set_aside(&self, message_id: Uuid, _: &str) -> Result<(), RegistryError> {
            self.mark_published(&[message_id])
        }
    }

    /// A broker in a box: keeps what is sent, confirms the oldest batch when
    /// asked, nacks the messages in `nack` (once each); while it confirms
    /// the first `recording` batches, a worker records one more message in
    /// `outbox`.
    #[derive(Default)]
    struct Wire {
        in_flight: VecDeque<Vec<Encoded>>,
        /// Every message sent, in order, retries included.
        sent: Arc<Mutex<Vec<Uuid>>>,
        /// The most messages unconfirmed at once.
        most_in_flight: Arc<Mutex<usize>>,
        nack: HashSet<Uuid>,
        recording: usize,
        outbox: Option<Arc<Outbox>>,
    }

    impl Sink for Wire {
        fn deliver(&mut self, _: &[Encoded]) -> Result<Delivery, SinkError> {
            unreachable!("a sink with a window is drained through it")
        }

        fn window(&mut self) -> Option<&mut dyn Window> {
            Some(self)
        }
    }

    impl Window for Wire {
        fn send(&mut self, batch: Vec<Encoded>) -> Result<(), SinkError> {
            self.sent
                .lock()
                .unwrap()
                .extend(batch.iter().map(|message| message.message_id));
            self.in_flight.push_back(batch);
            let now: usize = self.in_flight.iter().map(Vec::len).sum();
            let mut most = self.most_in_flight.lock().unwrap();
            *most = (*most).max(now);
            Ok(())
        }

        fn confirm_oldest(&mut self) -> Option<Result<(Vec<Encoded>, Delivery), SinkError>> {
            let batch = self.in_flight.pop_front()?;
            if let (Some(outbox), 1..) = (&self.outbox, self.recording) {
                self.recording -= 1;
                outbox.record();
            }
            let confirmed = batch
                .iter()
                .map(|message| message.message_id)
                .take_while(|id| !self.nack.remove(id))
                .collect();
            Some(Ok((batch, Delivery::confirmed(confirmed))))
        }

        fn forget(&mut self) {
            self.in_flight.clear();
        }
    }

    fn publisher(outbox: &Arc<Outbox>, wire: Wire) -> Publisher {
        Publisher {
            registry: outbox.clone(),
            sink: Box::new(wire),
            health: Arc::new(Health::default()),
            counters: Arc::default(),
        }
    }

    #[test]
    fn batches_stay_unconfirmed_together_and_are_marked_in_bulk() {
        let count = 3 * WINDOW + 10;
        let outbox = Outbox::holding(count);
        let recorded = outbox.ids();
        let wire = Wire::default();
        let (sent, most) = (wire.sent.clone(), wire.most_in_flight.clone());
        let mut publisher = publisher(&outbox, wire);

        assert_eq!(outbox.drain(&mut publisher).unwrap(), count);
        assert_eq!(*sent.lock().unwrap(), recorded, "each once, in recorded order");
        assert!(outbox.ids().is_empty());
        // Several batches on the wire at once, not batch-then-wait.
        assert!(*most.lock().unwrap() >= 2 * BATCH, "{}", most.lock().unwrap());
        let marks = outbox.marks.lock().unwrap();
        assert!(marks.len() <= count.div_ceil(MARK_EVERY) + 1, "{marks:?}");
        assert!(
            marks.iter().all(|&marked| marked <= MARK_EVERY + BATCH),
            "{marks:?}"
        );
    }

    #[test]
    fn a_nack_marks_only_what_came_before_it_and_the_rest_goes_again() {
        let outbox = Outbox::holding(3 * BATCH);
        let recorded = outbox.ids();
        let nacked = BATCH + 7;
        let wire = Wire {
            nack: HashSet::from([recorded[nacked]]),
            ..Wire::default()
        };
        let sent = wire.sent.clone();
        let mut publisher = publisher(&outbox, wire);

        let error = outbox.drain(&mut publisher).unwrap_err();
        assert!(matches!(error, SinkError::Unavailable(_)), "{error:?}");
        // Everything from the nacked message on is still waiting, in order;
        // the batch after it was on the wire too, and is not marked.
        assert_eq!(outbox.ids(), recorded[nacked..]);
        assert!(sent.lock().unwrap().len() > nacked + BATCH);

        sent.lock().unwrap().clear();
        assert_eq!(outbox.drain(&mut publisher).unwrap(), 3 * BATCH - nacked);
        assert_eq!(*sent.lock().unwrap(), recorded[nacked..]);
        assert!(outbox.ids().is_empty());
    }

    #[test]
    fn a_message_that_shows_up_behind_the_read_position_is_not_left_behind() {
        let outbox = Outbox::holding(2 * BATCH);
        let recorded = outbox.ids();
        // The first message commits late: the first reads do not see it.
        *outbox.late.lock().unwrap() = Some((1, 2));
        let wire = Wire::default();
        let sent = wire.sent.clone();
        let mut publisher = publisher(&outbox, wire);

        assert_eq!(outbox.drain(&mut publisher).unwrap(), 2 * BATCH);
        assert!(outbox.ids().is_empty());
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 2 * BATCH, "each once");
        assert_eq!(sent.last(), Some(&recorded[0]));
    }

    /// Reading from the start through everything sent can take longer than
    /// the reread interval: the read still gets past it, instead of starting
    /// over for ever.
    #[test]
    fn a_slow_outbox_is_read_through_all_the_same() {
        let outbox = Outbox::holding(3 * WINDOW);
        let mut outbox = Arc::into_inner(outbox).unwrap();
        // Eight pages of what was sent take longer than one reread interval.
        outbox.read_time = REREAD_EVERY / 6;
        let outbox = Arc::new(outbox);
        let mut publisher = publisher(&outbox, Wire::default());
        let (done, drained) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || done.send(outbox.drain(&mut publisher).unwrap()));
        let drained = drained.recv_timeout(Duration::from_secs(60));
        assert_eq!(drained, Ok(3 * WINDOW));
    }

    /// A message recorded alone, while nothing else happens, costs one read
    /// of the outbox and one mark: the reads that could find nothing new
    /// (no nudge since) are skipped.
    #[test]
    fn a_message_recorded_alone_is_read_once_and_marked_once() {
        let outbox = Outbox::holding(0);
        let mut publisher = publisher(&outbox, Wire::default());
        outbox.record();
        assert_eq!(outbox.drain(&mut publisher).unwrap(), 1);
        assert!(outbox.ids().is_empty());
        assert_eq!(*outbox.reads.lock().unwrap(), 1);
        assert_eq!(*outbox.marks.lock().unwrap(), [1]);
    }

    /// Messages recorded while earlier ones wait for their confirms go out
    /// in the same drain, read on while the window is open: the nudge sends
    /// the publisher back to the outbox after each confirm, and all four
    /// are marked together once the window empties (not one by one, as
    /// rereads from the start after each emptying would).
    #[test]
    fn messages_recorded_during_a_confirm_go_out_in_the_same_drain() {
        let outbox = Outbox::holding(0);
        let wire = Wire {
            recording: 3,
            outbox: Some(outbox.clone()),
            ..Wire::default()
        };
        let sent = wire.sent.clone();
        let mut publisher = publisher(&outbox, wire);
        outbox.record();
        let recorded_first = outbox.ids();
        assert_eq!(outbox.drain(&mut publisher).unwrap(), 4);
        assert!(outbox.ids().is_empty());
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 4, "each once");
        assert_eq!(sent[0], recorded_first[0]);
        assert_eq!(*outbox.marks.lock().unwrap(), [4]);
    }
}
