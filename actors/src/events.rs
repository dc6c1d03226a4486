//! keel's event exchange: sequence numbers, durability, retention and replay.
//!
//! Publishing stages an event: it takes the next sequence number and is appended to
//! the event log, all under one lock, so sequence order is publication order.
//! An event is *delivered* (appended to the retained ring that subscribers read, and
//! announced on a watch channel) strictly in sequence order, and an event whose topic
//! is durable (`/tasks/*`, `/containers/*`) only after a flush has put it on disk. One
//! flusher thread does the flushing for everyone, so events staged together share one
//! fsync; record changes written to the same database just before an event are made
//! durable by that event's flush.
//!
//! Subscribers read the shared ring by sequence number; nothing is copied per
//! subscriber, so a stalled subscriber costs no memory. The ring keeps the newest
//! `retain` events that fit in `retain_bytes`, as does the log on disk; an event's
//! size is its record in the log (the encoded envelope and its 4-byte length).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use keel_protocol::api::events::Envelope;
use keel_storage::events::{EventLog, RESERVE_BLOCK};
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::timestamp::Timestamp;
use protobuf::{Message, MessageField};
use tokio::sync::watch;

use crate::supervision::Death;
use crate::{Error, Result};

/// Events dropped from the ring between trims of the log on disk…
const TRIM_BATCH: usize = 1024;
/// …or bytes of them, whichever comes first.
const TRIM_BATCH_BYTES: u64 = keel_storage::events::SEGMENT_BYTES;

/// Topic of the notice that starts a replay whose start is no longer retained.
pub const GAP_TOPIC: &str = "/keel/events/gap";

/// Retention and subscriber limits.
#[derive(Debug, Clone, Copy)]
pub struct EventOptions {
    /// Events kept for replay, in memory and on disk.
    pub retain: usize,
    /// Bytes of events kept for replay (what the ring may hold in memory, and what a
    /// start reads back from disk).
    pub retain_bytes: u64,
    /// Events a live subscriber may fall behind before it is disconnected.
    pub subscriber_buffer: usize,
    /// Bytes of events a live subscriber may fall behind before it is disconnected.
    pub subscriber_buffer_bytes: u64,
}

impl Default for EventOptions {
    fn default() -> Self {
        Self {
            retain: 100_000,
            retain_bytes: 128 << 20,
            subscriber_buffer: 16_384,
            subscriber_buffer_bytes: 32 << 20,
        }
    }
}

/// A delivered event as the ring holds it.
struct Retained {
    env: Arc<Envelope>,
    /// Its size (its record in the log).
    size: u64,
    /// Bytes delivered since the exchange opened, up to and including this event:
    /// the difference of two is the size of the events between them.
    upto: u64,
}

/// Whether events of a topic must be on disk before anyone sees them.
pub fn is_durable(topic: &str) -> bool {
    topic.starts_with("/tasks/") || topic.starts_with("/containers/") || topic == GAP_TOPIC
}

struct Staged {
    env: Arc<Envelope>,
    size: u64,
    /// Deliverable without waiting for a flush.
    ready: bool,
}

struct State {
    next: u64,
    reserved: u64,
    /// Delivered events, oldest first, at most `retain` and `retain_bytes`.
    ring: VecDeque<Retained>,
    /// Sum of the ring's sizes.
    ring_bytes: u64,
    /// Bytes delivered since the exchange opened.
    delivered_bytes: u64,
    /// Highest sequence number retention has dropped.
    trimmed_upto: u64,
    /// Staged, not yet delivered, in sequence order.
    staged: VecDeque<Staged>,
    /// Highest staged sequence number that needs a flush.
    flush_wanted: u64,
    /// Events of topics that are not durable were appended since the last flush.
    unflushed: bool,
    /// Dropped from the ring since the log was last trimmed (events, bytes).
    untrimmed: usize,
    untrimmed_bytes: u64,
}

struct Inner {
    log: EventLog,
    opts: EventOptions,
    state: Mutex<State>,
    /// Newest delivered sequence number.
    delivered: watch::Sender<u64>,
    /// Wakes the flusher thread; holds at most one wake-up.
    flush: std::sync::mpsc::SyncSender<()>,
    /// The flusher's end of `flush`, kept here so that a flusher started after one
    /// failed takes it over.
    wake: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    /// Where a failed flusher is reported (the root supervisor), once supervised.
    deaths: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Death<&'static str>>>>,
    /// Subscribers disconnected for lagging or stalling.
    lagged: AtomicU64,
}

/// Resolves with an event's sequence number once the event is delivered.
pub type Delivered = std::pin::Pin<Box<dyn std::future::Future<Output = u64> + Send>>;

/// Cheap to clone; clones share one exchange.
#[derive(Clone)]
pub struct EventSink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

/// A subscriber asked for events that retention already dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind {
    /// The oldest sequence number still retained (or the next one to come).
    pub first_retained: u64,
}

impl EventSink {
    /// Opens the exchange over the event log in `dir` (its marks in `db`, which its
    /// flushes also flush), reloading retained events, and starts its flusher thread.
    pub fn open(
        dir: &std::path::Path,
        db: keel_storage::durable::Db,
        opts: EventOptions,
    ) -> Result<Self> {
        let (log, mut loaded) =
            EventLog::open(dir, db, opts.retain, opts.retain_bytes, &sequence_of)?;
        let mut ring = VecDeque::with_capacity(loaded.events.len());
        let mut ring_bytes = 0;
        // One record at a time, so the raw and the decoded copies never both hold
        // the whole retained log.
        while let Some((seq, bytes)) = loaded.events.pop_front() {
            let size = record_size(bytes.len());
            match Envelope::parse_from_bytes(&bytes) {
                Ok(env) => {
                    ring_bytes += size;
                    ring.push_back(Retained {
                        env: Arc::new(env),
                        size,
                        upto: ring_bytes,
                    });
                }
                Err(e) => tracing::error!(seq, error = %e, "unreadable event in the log; skipped"),
            }
        }
        let last = ring.back().map_or(0, |e| e.env.sequence);
        tracing::info!(
            retained = ring.len(),
            retained_bytes = ring_bytes,
            next_seq = loaded.next_seq,
            "event log loaded"
        );
        let (delivered, _) = watch::channel(last);
        let (flush, wake) = std::sync::mpsc::sync_channel(1);
        let sink = Self {
            inner: Arc::new(Inner {
                log,
                opts,
                state: Mutex::new(State {
                    next: loaded.next_seq,
                    reserved: loaded.reserved,
                    ring,
                    ring_bytes,
                    delivered_bytes: ring_bytes,
                    trimmed_upto: loaded.trimmed_upto,
                    staged: VecDeque::new(),
                    flush_wanted: 0,
                    unflushed: false,
                    untrimmed: 0,
                    untrimmed_bytes: 0,
                }),
                delivered,
                flush,
                wake: Arc::new(Mutex::new(wake)),
                deaths: Mutex::default(),
                lagged: AtomicU64::new(0),
            }),
        };
        sink.restart_flusher()?;
        if let Some((after, before)) = loaded.lost {
            // Never silence: a subscriber replaying past what a crash lost is told.
            tracing::warn!(
                lost_after = after,
                lost_before = before,
                "keeld stopped without writing out every event: telling subscribers"
            );
            let gap = keel_protocol::api::events::Gap {
                lost_after: after,
                lost_before: before,
                ..Default::default()
            };
            let any = keel_protocol::types::pack(&gap)?;
            drop(sink.publish("", GAP_TOPIC, any, None)?);
        }
        Ok(sink)
    }

    /// Closes the exchange cleanly at shutdown: every event published is written
    /// out, and the next start knows nothing was lost.
    pub fn close(&self) -> Result<()> {
        let _st = self.state();
        Ok(self.inner.log.close()?)
    }

    /// Reports a failure of the flusher thread (a panic in it) on `deaths`, as
    /// `"exchange"`, from now on.
    pub fn supervise(&self, deaths: tokio::sync::mpsc::UnboundedSender<Death<&'static str>>) {
        *self.inner.deaths.lock().unwrap_or_else(|p| p.into_inner()) = Some(deaths);
    }

    /// Starts the flusher thread (again, after one failed): it takes over the
    /// wake-ups, and the events staged meanwhile are flushed and delivered by it.
    pub fn restart_flusher(&self) -> Result<()> {
        let weak = Arc::downgrade(&self.inner);
        let wake = self.inner.wake.clone();
        std::thread::Builder::new()
            .name("keel-event-flush".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let wake = wake.lock().unwrap_or_else(|p| p.into_inner());
                    flusher(&weak, &wake);
                }));
                if let (Err(payload), Some(inner)) = (ran, weak.upgrade()) {
                    let cause = crate::supervision::panic_cause(&*payload);
                    let deaths = inner.deaths.lock().unwrap_or_else(|p| p.into_inner());
                    match deaths.as_ref() {
                        Some(d) => {
                            let _ = d.send(Death {
                                child: "exchange",
                                cause,
                            });
                        }
                        None => tracing::error!(cause = %cause, "the event flusher failed"),
                    }
                }
            })
            .map_err(|e| Error::Io(format!("start the event flusher: {e}")))?;
        // What waits for a flush now (staged by publishers while none ran).
        let _ = self.inner.flush.try_send(());
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock aborts the process (panic = "abort").
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn options(&self) -> EventOptions {
        self.inner.opts
    }

    /// Publishes an event: gives it the next sequence number and logs it. The returned
    /// future resolves with that number once the event is delivered (for a durable
    /// topic, once it is on disk); dropping it does not cancel the publication.
    pub fn publish(
        &self,
        namespace: &str,
        topic: &str,
        event: Any,
        timestamp: Option<Timestamp>,
    ) -> Result<Delivered> {
        self.publish_if(namespace, topic, event, timestamp, |_| Ok(true))
            .map(|published| published.expect("published unconditionally"))
    }

    /// Like [`EventSink::publish`], but first calls `first` with the sequence number
    /// the event would get, under the exchange's lock (so nothing is published in
    /// between), and publishes only if it answers true. `first` is how a record that
    /// names its event is written before the event exists.
    pub fn publish_if(
        &self,
        namespace: &str,
        topic: &str,
        event: Any,
        timestamp: Option<Timestamp>,
        first: impl FnOnce(u64) -> Result<bool>,
    ) -> Result<Option<Delivered>> {
        let mut st = self.state();
        let sequence = st.next;
        if !first(sequence)? {
            return Ok(None);
        }
        let mut durable = is_durable(topic);
        if sequence > st.reserved {
            let upto = st.reserved + RESERVE_BLOCK;
            self.inner.log.reserve(upto)?;
            st.reserved = upto;
            durable = true;
        }
        let env = Envelope {
            timestamp: MessageField::some(timestamp.unwrap_or_else(keel_protocol::types::now)),
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            event: MessageField::some(event),
            sequence,
            ..Default::default()
        };
        let bytes = env
            .write_to_bytes()
            .map_err(|e| Error::Io(format!("encode event: {e}")))?;
        self.inner.log.append(sequence, &bytes)?;
        st.next += 1;
        st.staged.push_back(Staged {
            env: Arc::new(env),
            size: record_size(bytes.len()),
            ready: !durable,
        });
        if durable {
            st.flush_wanted = sequence;
            // Full means a wake-up is already pending; it will see this event too.
            let _ = self.inner.flush.try_send(());
        } else {
            st.unflushed = true;
            self.deliver(&mut st);
        }
        drop(st);
        tracing::debug!(namespace, topic, sequence, durable, "event");
        let mut rx = self.inner.delivered.subscribe();
        Ok(Some(Box::pin(async move {
            let _ = rx.wait_for(|d| *d >= sequence).await;
            sequence
        })))
    }

    /// Moves deliverable staged events, in order, to the ring.
    fn deliver(&self, st: &mut State) {
        let mut newest = None;
        while st.staged.front().is_some_and(|s| s.ready) {
            let s = st.staged.pop_front().expect("front exists");
            newest = Some(s.env.sequence);
            st.ring_bytes += s.size;
            st.delivered_bytes += s.size;
            let upto = st.delivered_bytes;
            st.ring.push_back(Retained {
                env: s.env,
                size: s.size,
                upto,
            });
        }
        let opts = self.inner.opts;
        // The newest event always stays, whatever its size.
        while st.ring.len() > opts.retain
            || (st.ring_bytes > opts.retain_bytes && st.ring.len() > 1)
        {
            let old = st.ring.pop_front().expect("ring is not empty");
            st.trimmed_upto = old.env.sequence;
            st.ring_bytes -= old.size;
            st.untrimmed += 1;
            st.untrimmed_bytes += old.size;
        }
        // The log on disk follows now and then (reopening it trims it exactly).
        if st.untrimmed >= TRIM_BATCH || st.untrimmed_bytes >= TRIM_BATCH_BYTES {
            st.untrimmed = 0;
            st.untrimmed_bytes = 0;
            if let Err(e) = self.inner.log.trim(st.trimmed_upto) {
                tracing::error!(error = %e, "trimming the event log");
            }
        }
        if let Some(seq) = newest {
            self.inner.delivered.send_replace(seq);
        }
    }

    /// The newest delivered sequence number.
    pub fn head(&self) -> u64 {
        *self.inner.delivered.borrow()
    }

    /// Wakes when a newer event is delivered.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.inner.delivered.subscribe()
    }

    /// Up to `max` delivered events after sequence `after`, oldest first; `Behind` if
    /// retention dropped some of them.
    pub fn read_after(&self, after: u64, max: usize) -> Result<Vec<Arc<Envelope>>, Behind> {
        let st = self.state();
        if after < st.trimmed_upto {
            return Err(Behind {
                first_retained: st.ring.front().map_or(st.next, |e| e.env.sequence),
            });
        }
        let from = st.ring.partition_point(|e| e.env.sequence <= after);
        Ok(st
            .ring
            .range(from..)
            .take(max)
            .map(|r| r.env.clone())
            .collect())
    }

    /// Every retained event, oldest first, and the highest sequence number retention
    /// dropped: an event numbered above it is retained unless it never reached the log.
    pub fn retained(&self) -> (u64, Vec<Arc<Envelope>>) {
        let st = self.state();
        (
            st.trimmed_upto,
            st.ring.iter().map(|r| r.env.clone()).collect(),
        )
    }

    /// How many delivered events come after sequence `after`, and their bytes.
    pub fn backlog_after(&self, after: u64) -> (usize, u64) {
        let st = self.state();
        let from = st.ring.partition_point(|e| e.env.sequence <= after);
        let bytes = match (st.ring.get(from), st.ring.back()) {
            (Some(first), Some(last)) => last.upto - first.upto + first.size,
            _ => 0,
        };
        (st.ring.len() - from, bytes)
    }

    /// Events and bytes the ring holds.
    pub fn retained_size(&self) -> (usize, u64) {
        let st = self.state();
        (st.ring.len(), st.ring_bytes)
    }

    /// Counts a subscriber disconnected for falling behind; returns the total.
    pub fn count_lagged(&self) -> u64 {
        self.inner.lagged.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The sequence number of an encoded envelope (field 5), read without decoding (or
/// copying) the rest of it; `None` when the bytes are not an envelope with one.
pub fn sequence_of(bytes: &[u8]) -> Option<u64> {
    use protobuf::rt::WireType;
    let mut is = protobuf::CodedInputStream::from_bytes(bytes);
    let mut sequence = None;
    while let Some(tag) = is.read_raw_tag_or_eof().ok()? {
        let (field, wire) = (tag >> 3, WireType::new(tag & 7)?);
        if field == 5 && wire == WireType::Varint {
            sequence = Some(is.read_uint64().ok()?);
        } else {
            is.skip_field(wire).ok()?;
        }
    }
    sequence.filter(|s| *s > 0)
}

/// An event's size as retention counts it: its record in the log.
fn record_size(encoded: usize) -> u64 {
    encoded as u64 + 4
}

/// How long an event of a topic that is not durable may stay in memory, delivered
/// but not written out, when no durable event's flush takes it along: what a crash
/// can lose of such events.
pub const LAZY_FLUSH: Duration = Duration::from_secs(1);

/// The flusher thread: flushes the log whenever durable events wait, then delivers
/// them. A panic in it is caught at the thread's top and reported to the root
/// supervisor, which starts another: staged events wait meanwhile, none is lost. Events staged while a flush runs share the next one. One thread does every
/// flush, so no other thread ever blocks on the disk for an event. Events that are
/// not durable are flushed along, or after [`LAZY_FLUSH`] without a durable event.
/// Ends when the exchange is dropped.
fn flusher(inner: &Weak<Inner>, wake: &std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let woken = match wake.recv_timeout(LAZY_FLUSH) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let sink = EventSink { inner };
        // Fault injection (tests only): the flusher panics here.
        keel_storage::faults::check("exchange:flusher");
        let target = {
            let mut st = sink.state();
            // Without a wake-up, flush only what waits: events of lazy topics, or
            // durable ones whose wake-up went to a flusher that failed.
            if !woken && !st.unflushed && st.staged.is_empty() {
                continue;
            }
            // What is appended from here on is taken by the next flush.
            st.unflushed = false;
            st.flush_wanted
        };
        while let Err(e) = sink.inner.log.flush() {
            tracing::error!(error = %e, "flushing the event log; retrying");
            std::thread::sleep(Duration::from_secs(1));
        }
        let mut st = sink.state();
        for s in st.staged.iter_mut() {
            if s.env.sequence > target {
                break;
            }
            s.ready = true;
        }
        sink.deliver(&mut st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_protocol::types::json_any;

    fn any() -> Any {
        json_any("example.Test", vec![1])
    }

    fn open(dir: &std::path::Path, retain: usize) -> EventSink {
        // A dropped sink's flusher thread may still hold the database for a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let db = loop {
            match keel_storage::open_db(dir) {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("lock"), "{e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        open_with(
            dir,
            db,
            EventOptions {
                retain,
                subscriber_buffer: 8,
                ..EventOptions::default()
            },
        )
    }

    fn open_with(
        dir: &std::path::Path,
        db: keel_storage::durable::Db,
        opts: EventOptions,
    ) -> EventSink {
        EventSink::open(&dir.join("events"), db, opts).unwrap()
    }

    fn seqs(events: &[Arc<Envelope>]) -> Vec<u64> {
        events.iter().map(|e| e.sequence).collect()
    }

    #[tokio::test]
    async fn delivery_is_in_sequence_order_and_durable_events_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first;
        {
            let sink = open(dir.path(), 100);
            let a = sink.publish("ns", "/tasks/create", any(), None).unwrap();
            let b = sink.publish("ns", "/other/thing", any(), None).unwrap();
            let c = sink.publish("ns", "/tasks/start", any(), None).unwrap();
            let (a, b, c) = (a.await, b.await, c.await);
            assert!(a < b && b < c);
            first = a;
            let got = sink.read_after(0, 10).unwrap();
            assert_eq!(seqs(&got), vec![a, b, c]);
            assert_eq!(sink.head(), c);
            assert_eq!(sink.backlog_after(a).0, 2);
        }
        let sink = open(dir.path(), 100);
        let got = sink.read_after(0, 10).unwrap();
        assert!(got.len() >= 2, "the durable events are back");
        assert_eq!(got[0].sequence, first);
        assert_eq!(got[0].topic, "/tasks/create");
        let next = sink
            .publish("ns", "/tasks/exit", any(), None)
            .unwrap()
            .await;
        assert!(
            next > got.last().unwrap().sequence,
            "numbers keep increasing"
        );
    }

    #[tokio::test]
    async fn retention_drops_the_oldest_and_reports_behind() {
        let dir = tempfile::tempdir().unwrap();
        let sink = open(dir.path(), 3);
        let mut last = 0;
        // Enough for one batch to leave the log on disk too.
        let total = 3 + TRIM_BATCH as u64 + 1;
        for _ in 0..total {
            last = sink.publish("ns", "/x", any(), None).unwrap().await;
        }
        let kept = sink.read_after(last - 3, 10).unwrap();
        assert_eq!(seqs(&kept), vec![last - 2, last - 1, last]);
        assert_eq!(
            sink.read_after(last - 4, 10),
            Err(Behind {
                first_retained: last - 2
            })
        );
        assert_eq!(sink.read_after(last, 10).unwrap().len(), 0);
        drop(sink);
        // Reopened: exactly the retained ones.
        let sink = open(dir.path(), 3);
        assert_eq!(
            seqs(&sink.read_after(last - 3, 10).unwrap()),
            vec![last - 2, last - 1, last]
        );
        assert!(sink.read_after(last - 4, 10).is_err());
    }

    #[tokio::test]
    async fn retention_counts_bytes_too_and_so_does_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let big = || json_any("example.Big", vec![7; 100_000]);
        let opts = EventOptions {
            retain: 1000,
            retain_bytes: 350_000,
            subscriber_buffer: 8,
            subscriber_buffer_bytes: 1,
        };
        let db = keel_storage::open_db(dir.path()).unwrap();
        let sink = open_with(dir.path(), db, opts);
        let mut last = 0;
        for _ in 0..10 {
            last = sink.publish("ns", "/x", big(), None).unwrap().await;
        }
        let (events, bytes) = sink.retained_size();
        assert_eq!(events, 3, "three events of ~100 kB fit in 350 kB");
        assert!(bytes <= 350_000 && bytes > 300_000, "{bytes}");
        let (n, b) = sink.backlog_after(last - 2);
        assert_eq!(n, 2);
        assert!(b > 200_000 && b < 201_000, "two events' records: {b}");
        assert_eq!(sink.backlog_after(last), (0, 0));
        assert!(matches!(sink.read_after(last - 4, 10), Err(Behind { .. })));
        // One event over the whole budget still stays, alone.
        let huge = sink
            .publish("ns", "/x", json_any("example.Big", vec![0; 400_000]), None)
            .unwrap()
            .await;
        assert_eq!(seqs(&sink.read_after(huge - 1, 10).unwrap()), vec![huge]);
        assert_eq!(sink.retained_size().0, 1);
        let small = sink.publish("ns", "/x", any(), None).unwrap().await;
        drop(sink);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let db = loop {
            match keel_storage::open_db(dir.path()) {
                Ok(db) => break db,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        };
        let sink = open_with(dir.path(), db, opts);
        assert_eq!(
            seqs(&sink.read_after(huge - 1, 10).unwrap_or_default()),
            Vec::<u64>::new(),
            "the huge one no longer fits beside the newer one"
        );
        assert_eq!(seqs(&sink.read_after(huge, 10).unwrap()), vec![small]);
    }

    #[test]
    fn sequence_numbers_are_read_without_decoding_the_rest() {
        let env = Envelope {
            namespace: "ns".into(),
            topic: "/x".into(),
            event: MessageField::some(json_any("t", vec![1; 1000])),
            sequence: 77,
            ..Default::default()
        };
        let bytes = env.write_to_bytes().unwrap();
        assert_eq!(sequence_of(&bytes), Some(77));
        assert_eq!(sequence_of(&bytes[..bytes.len() - 3]), None, "torn");
        assert_eq!(sequence_of(b""), None);
        assert_eq!(sequence_of(&[0xff; 12]), None);
    }

    #[tokio::test]
    async fn a_non_durable_event_waits_behind_a_durable_one() {
        let dir = tempfile::tempdir().unwrap();
        let sink = open(dir.path(), 10);
        let mut watch = sink.watch();
        let d = sink
            .publish("ns", "/containers/create", any(), None)
            .unwrap();
        let n = sink.publish("ns", "/x", any(), None).unwrap();
        // Whatever has been delivered so far is a prefix in sequence order.
        let seen = seqs(&sink.read_after(0, 10).unwrap());
        assert!(seen.is_empty() || seen.len() == 2, "{seen:?}");
        let (d, n) = (d.await, n.await);
        watch.wait_for(|h| *h >= n).await.unwrap();
        assert_eq!(seqs(&sink.read_after(0, 10).unwrap()), vec![d, n]);
    }
}
