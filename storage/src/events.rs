//! The event log: append-only segment files under `<root>/events/`, one
//! length-prefixed encoded envelope per event, plus two marks in sled that keep
//! sequence numbers strictly increasing across restarts.
//!
//! A segment holds [`SEGMENT_EVENTS`] events and is named after its first sequence
//! number; retention removes whole segments once every event in them is dropped.
//! Nothing here syncs on its own: [`EventLog::flush`] writes buffered events out,
//! fdatasyncs the current segment and flushes sled (where the record changes that
//! events describe live), and the exchange calls it before it delivers an event
//! whose topic is durable.
//!
//! Sequence numbers are handed out in blocks: before any number above `reserved` is
//! used, a larger `reserved` is written and flushed. After a crash numbering
//! resumes above the last reservation, so a number is never given to two events even
//! if the events that used it never reached the disk.
//!
//! A crash can leave a torn record at the end of the newest segment; it is cut off
//! at open. Events are recognised by their sequence numbers, which must increase.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::durable::{self, sync_dir};
use crate::{Error, Result};

/// How many sequence numbers one reservation covers.
pub const RESERVE_BLOCK: u64 = 1 << 16;
/// Events per segment file…
pub const SEGMENT_EVENTS: u64 = 4096;
/// …or bytes, whichever is reached first (so that retention by bytes can remove
/// whole segments of large events).
pub const SEGMENT_BYTES: u64 = 16 << 20;
/// Largest encoded event accepted back from disk.
const MAX_EVENT: usize = 16 << 20;

const RESERVED: &[u8] = b"reserved";
const TRIMMED: &[u8] = b"trimmed";
/// Written by a clean close: the last sequence number handed out, all of them on
/// disk. Removed at open, so that only a crash finds it missing.
const CLEAN: &[u8] = b"clean";

/// What the log held when it was opened.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The retained events, oldest first: (sequence, encoded envelope).
    pub events: VecDeque<(u64, Vec<u8>)>,
    /// The first sequence number to hand out.
    pub next_seq: u64,
    /// Highest sequence number dropped by retention (0: none).
    pub trimmed_upto: u64,
    /// Sequence numbers up to this one are covered by a flushed reservation.
    pub reserved: u64,
    /// When the log was not closed cleanly: events numbered above the first and
    /// below the second may have been published and lost (not every number in the
    /// range was used).
    pub lost: Option<(u64, u64)>,
}

struct Segment {
    first: u64,
    path: PathBuf,
}

struct Writer {
    /// Oldest first; the last one is being written.
    segments: VecDeque<Segment>,
    out: Option<BufWriter<File>>,
    in_current: u64,
    /// Bytes in the segment being written.
    current_bytes: u64,
    /// Appended since the last flush.
    dirty: bool,
}

/// The persistent half of keel's event exchange.
pub struct EventLog {
    dir: PathBuf,
    db: crate::durable::Db,
    marks: sled::Tree,
    writer: Mutex<Writer>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn read_u64(v: Option<sled::IVec>) -> Result<u64> {
    match v {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| Error::Corrupt("event log mark is not 8 bytes".into())),
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

/// What a segment held, read back record by record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRead {
    /// Length of the valid prefix.
    pub valid: u64,
    /// Whether anything follows the valid prefix.
    pub torn: bool,
    /// The last sequence number read (`after` when none).
    pub last: u64,
    /// Records read.
    pub records: u64,
}

/// Reads a segment's records in order, handing each to `keep`, and stops at the
/// first one that is torn or out of order. Reads through a buffer: a segment is
/// never held in memory whole. `sequence_of` extracts an encoded envelope's
/// sequence number.
fn read_segment(
    path: &Path,
    after: u64,
    sequence_of: &dyn Fn(&[u8]) -> Option<u64>,
    keep: &mut dyn FnMut(u64, Vec<u8>),
) -> Result<SegmentRead> {
    let file = File::open(path).map_err(io("read", path))?;
    let total = file.metadata().map_err(io("stat", path))?.len();
    let r = std::io::BufReader::with_capacity(256 << 10, file);
    read_records(r, total, after, sequence_of, keep).map_err(io("read", path))
}

/// Reads the records of a segment of `total` bytes from `r`: `(length, bytes)`
/// pairs whose bytes carry increasing sequence numbers above `after`. Stops at the
/// first record that is torn (shorter than its length, or longer than any event),
/// empty or out of order; what follows it is reported as torn. Never allocates
/// more than one record's length, and that only once the length is known to fit
/// in what is left of the segment.
pub fn read_records(
    mut r: impl Read,
    total: u64,
    after: u64,
    sequence_of: &dyn Fn(&[u8]) -> Option<u64>,
    keep: &mut dyn FnMut(u64, Vec<u8>),
) -> std::io::Result<SegmentRead> {
    let (mut pos, mut last, mut records) = (0u64, after, 0u64);
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_EVENT || pos + 4 + len as u64 > total {
            break;
        }
        let mut bytes = vec![0u8; len];
        match r.read_exact(&mut bytes) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        match sequence_of(&bytes) {
            Some(seq) if seq > last => {
                keep(seq, bytes);
                last = seq;
                records += 1;
                pos += 4 + len as u64;
            }
            _ => break,
        }
    }
    Ok(SegmentRead {
        valid: pos,
        torn: pos < total,
        last,
        records,
    })
}

/// The size of an event's record: the encoded event and its length.
fn record_size(encoded: usize) -> u64 {
    encoded as u64 + 4
}

impl EventLog {
    /// Opens the log in `dir`, keeps the newest `retain` events that fit in
    /// `retain_bytes` (their records' sizes), cuts off a torn tail, and reserves a
    /// first block of sequence numbers (flushed before returning). Reads only the
    /// newest segments that can hold what is kept: older ones hold nothing within
    /// the byte budget, and are removed unread. `sequence_of` reads an encoded
    /// event's sequence number.
    pub fn open(
        dir: &Path,
        db: crate::durable::Db,
        retain: usize,
        retain_bytes: u64,
        sequence_of: &dyn Fn(&[u8]) -> Option<u64>,
    ) -> Result<(Self, Loaded)> {
        durable::create_dir(dir)?;
        let marks = db.open_tree("event_marks")?;
        let mut trimmed_upto = read_u64(marks.get(TRIMMED)?)?;
        let mut segments: Vec<Segment> = std::fs::read_dir(dir)
            .map_err(io("read", dir))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let first = name.strip_suffix(".log")?.parse().ok()?;
                Some(Segment {
                    first,
                    path: e.path(),
                })
            })
            .collect();
        segments.sort_by_key(|s| s.first);

        // The newest segments whose sizes reach the budget: every event older than
        // them is beyond it.
        let mut from = segments.len();
        let mut newest_bytes = 0u64;
        while from > 0 && newest_bytes < retain_bytes {
            from -= 1;
            newest_bytes += std::fs::metadata(&segments[from].path)
                .map_err(io("stat", &segments[from].path))?
                .len();
        }
        if from > 0 {
            trimmed_upto = trimmed_upto.max(segments[from].first - 1);
        }

        let mut events: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
        let mut kept_bytes = 0u64;
        let (mut last, mut in_current, mut current_bytes) = (0, 0, 0);
        let count = segments.len();
        for (i, seg) in segments.iter().enumerate().skip(from) {
            let mut keep = |seq: u64, bytes: Vec<u8>| {
                // Dropped by retention before, in a segment that also holds newer ones.
                if seq <= trimmed_upto {
                    return;
                }
                kept_bytes += record_size(bytes.len());
                events.push_back((seq, bytes));
                while events.len() > retain || (kept_bytes > retain_bytes && events.len() > 1) {
                    let (s, b) = events.pop_front().expect("not empty");
                    kept_bytes -= record_size(b.len());
                    trimmed_upto = trimmed_upto.max(s);
                }
            };
            let read = read_segment(&seg.path, last, sequence_of, &mut keep)?;
            if read.torn {
                tracing::warn!(segment = %seg.path.display(), valid_bytes = read.valid, "event log: cut off a torn or invalid tail");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&seg.path)
                    .map_err(io("open", &seg.path))?;
                f.set_len(read.valid).map_err(io("truncate", &seg.path))?;
                f.sync_all().map_err(io("fsync", &seg.path))?;
                if i + 1 < count {
                    tracing::error!(segment = %seg.path.display(), "event log: a segment other than the newest was damaged");
                }
            }
            last = read.last;
            in_current = read.records;
            current_bytes = read.valid;
        }
        // Whole segments older than what is kept go.
        let first_kept = events.front().map_or(last + 1, |(s, _)| *s);
        let mut segments: VecDeque<Segment> = segments.into();
        while segments.len() > 1 && segments[1].first <= first_kept {
            let old = segments.pop_front().expect("len > 1");
            std::fs::remove_file(&old.path).map_err(io("remove", &old.path))?;
        }
        let out = match segments.back() {
            Some(seg) => Some(BufWriter::new(
                OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .map_err(io("open", &seg.path))?,
            )),
            None => None,
        };
        marks.insert(TRIMMED, &trimmed_upto.to_be_bytes())?;
        let next_seq = last.max(read_u64(marks.get(RESERVED)?)?).max(trimmed_upto) + 1;
        let reserved = next_seq - 1 + RESERVE_BLOCK;
        let clean = marks.remove(CLEAN)?.is_some();
        let logged = last.max(trimmed_upto);
        let lost = (!clean && next_seq > logged + 1).then_some((logged, next_seq));
        let log = Self {
            dir: dir.to_path_buf(),
            db,
            marks,
            writer: Mutex::new(Writer {
                segments,
                out,
                in_current,
                current_bytes,
                dirty: false,
            }),
        };
        log.reserve(reserved)?;
        log.db.flush()?;
        sync_dir(dir)?;
        Ok((
            log,
            Loaded {
                events,
                next_seq,
                trimmed_upto,
                reserved,
                lost,
            },
        ))
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new reservation mark (durable at the next flush).
    pub fn reserve(&self, upto: u64) -> Result<()> {
        self.marks.insert(RESERVED, &upto.to_be_bytes())?;
        Ok(())
    }

    /// Appends one encoded event (buffered; on disk after the next flush).
    pub fn append(&self, seq: u64, envelope: &[u8]) -> Result<()> {
        let mut w = self.writer();
        if w.out.is_none() || w.in_current >= SEGMENT_EVENTS || w.current_bytes >= SEGMENT_BYTES {
            // The finished segment is made durable before the new one is started.
            if let Some(mut out) = w.out.take() {
                out.flush().map_err(io("write", &self.dir))?;
                out.get_ref().sync_data().map_err(io("fsync", &self.dir))?;
            }
            let path = self.dir.join(format!("{seq:020}.log"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io("create", &path))?;
            sync_dir(&self.dir)?;
            w.segments.push_back(Segment { first: seq, path });
            w.out = Some(BufWriter::with_capacity(64 << 10, file));
            w.in_current = 0;
            w.current_bytes = 0;
        }
        let len = u32::try_from(envelope.len())
            .map_err(|_| Error::InvalidArgument("event larger than 4 GiB".into()))?;
        let out = w.out.as_mut().expect("a segment is open");
        out.write_all(&len.to_le_bytes())
            .and_then(|()| out.write_all(envelope))
            .map_err(io("write", &self.dir))?;
        w.in_current += 1;
        w.current_bytes += record_size(envelope.len());
        w.dirty = true;
        Ok(())
    }

    /// Retention dropped every event up to `upto`: removes the segments that hold
    /// nothing newer, and records the mark.
    pub fn trim(&self, upto: u64) -> Result<()> {
        let mut w = self.writer();
        while w.segments.len() > 1 && w.segments[1].first <= upto + 1 {
            let old = w.segments.pop_front().expect("len > 1");
            std::fs::remove_file(&old.path).map_err(io("remove", &old.path))?;
        }
        drop(w);
        self.marks.insert(TRIMMED, &upto.to_be_bytes())?;
        Ok(())
    }

    /// Closes the log cleanly: everything appended is written out and marked so,
    /// so that the next open reports nothing lost. Nothing may be appended after.
    pub fn close(&self) -> Result<()> {
        self.flush()?;
        self.marks.insert(CLEAN, &[1u8][..])?;
        self.db.flush()?;
        Ok(())
    }

    /// Writes everything appended so far to disk and fdatasyncs it, then flushes
    /// sled (the marks, and record changes made before the events that describe
    /// them).
    pub fn flush(&self) -> Result<()> {
        if crate::faults::check("log:flush").is_some() {
            return Err(Error::Io {
                op: "flush (fault injected)",
                path: self.dir.clone(),
                source: std::io::Error::other("fault injected"),
            });
        }
        let file = {
            let mut w = self.writer();
            let dirty = std::mem::take(&mut w.dirty);
            match w.out.as_mut() {
                Some(out) if dirty => {
                    out.flush().map_err(io("write", &self.dir))?;
                    Some(out.get_ref().try_clone().map_err(io("dup", &self.dir))?)
                }
                _ => None,
            }
        };
        // Outside the lock: appends go on while the disk syncs.
        if let Some(f) = file {
            f.sync_data().map_err(io("fsync", &self.dir))?;
        }
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test events: 8-byte big-endian sequence number, then anything.
    fn seq_of(b: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?)).filter(|s| *s > 0)
    }

    fn event(seq: u64) -> Vec<u8> {
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(format!("event {seq}").as_bytes());
        v
    }

    fn open(dir: &Path, retain: usize) -> (EventLog, Loaded) {
        let db = crate::open_db(&dir.join("root")).unwrap();
        EventLog::open(&dir.join("events"), db, retain, u64::MAX, &seq_of).unwrap()
    }

    #[test]
    fn numbering_resumes_above_the_reservation_and_retention_trims() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, l) = open(dir.path(), 3);
            assert_eq!(l.next_seq, 1);
            assert_eq!(l.reserved, RESERVE_BLOCK);
            for s in 1..=5 {
                log.append(s, &event(s)).unwrap();
            }
            log.flush().unwrap();
        }
        let (_, l) = open(dir.path(), 3);
        let seqs: Vec<u64> = l.events.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![3, 4, 5], "only the newest three are kept");
        assert_eq!(l.events[0].1, event(3));
        assert_eq!(l.trimmed_upto, 2);
        assert_eq!(
            l.next_seq,
            RESERVE_BLOCK + 1,
            "numbers handed out before the crash may have been used: skip them"
        );
        assert_eq!(
            l.lost,
            Some((5, RESERVE_BLOCK + 1)),
            "not closed cleanly: what came after the last logged event may be lost"
        );
        assert_eq!(l.reserved, 2 * RESERVE_BLOCK);
    }

    #[test]
    fn a_clean_close_reports_nothing_lost() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, l) = open(dir.path(), 10);
            assert_eq!(l.lost, None, "a new log lost nothing");
            log.append(1, &event(1)).unwrap();
            log.close().unwrap();
        }
        let (log, l) = open(dir.path(), 10);
        assert_eq!(l.lost, None);
        drop(log);
        let (_, l) = open(dir.path(), 10);
        assert!(
            l.lost.is_some(),
            "the mark is spent: a crash after it is noticed"
        );
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appending_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = open(dir.path(), 100);
            for s in 1..=3 {
                log.append(s, &event(s)).unwrap();
            }
            log.flush().unwrap();
        }
        let seg = dir.path().join("events").join(format!("{:020}.log", 1));
        // Half a record, then zeroes, as a crash in the middle of a write leaves.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&20u32.to_le_bytes()).unwrap();
        f.write_all(&[0u8; 7]).unwrap();
        drop(f);
        let (log, l) = open(dir.path(), 100);
        assert_eq!(l.events.len(), 3);
        let next = l.next_seq;
        log.append(next, &event(next)).unwrap();
        log.flush().unwrap();
        drop(log);
        let (_, l) = open(dir.path(), 100);
        let seqs: Vec<u64> = l.events.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![1, 2, 3, next]);
    }

    #[test]
    fn retention_by_bytes_reads_only_the_newest_segments() {
        let dir = tempfile::tempdir().unwrap();
        let db = || crate::open_db(&dir.path().join("root")).unwrap();
        let big = |seq: u64| {
            let mut v = seq.to_be_bytes().to_vec();
            v.resize(1 << 20, b'x');
            v
        };
        let total = 40u64;
        {
            let (log, _) =
                EventLog::open(&dir.path().join("events"), db(), 1000, u64::MAX, &seq_of).unwrap();
            for s in 1..=total {
                log.append(s, &big(s)).unwrap();
            }
            log.flush().unwrap();
        }
        let files = || {
            std::fs::read_dir(dir.path().join("events"))
                .unwrap()
                .count()
        };
        assert_eq!(files(), 3, "a segment rolls at {SEGMENT_BYTES} bytes");
        // A budget of 5 events' records and a bit.
        let budget = 5 * record_size(1 << 20) + 100;
        let read = std::cell::Cell::new(0u64);
        let counting = |b: &[u8]| {
            read.set(read.get() + 1);
            seq_of(b)
        };
        let (_log, l) =
            EventLog::open(&dir.path().join("events"), db(), 1000, budget, &counting).unwrap();
        let seqs: Vec<u64> = l.events.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (total - 4..=total).collect::<Vec<_>>());
        assert_eq!(l.trimmed_upto, total - 5);
        assert!(
            read.get() <= 16,
            "read {} records: only the newest segment, not all {total}",
            read.get()
        );
        assert_eq!(files(), 1, "segments holding nothing kept are removed");
    }

    #[test]
    fn whole_segments_go_once_retention_passes_them() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 10);
        let total = SEGMENT_EVENTS * 2 + 5;
        for s in 1..=total {
            log.append(s, &event(s)).unwrap();
        }
        log.flush().unwrap();
        let files = || {
            std::fs::read_dir(dir.path().join("events"))
                .unwrap()
                .count()
        };
        assert_eq!(files(), 3);
        log.trim(SEGMENT_EVENTS).unwrap();
        assert_eq!(files(), 2, "the first segment held nothing newer");
        log.trim(SEGMENT_EVENTS * 2 - 1).unwrap();
        assert_eq!(files(), 2, "the second still holds one kept event");
        drop(log);
        let (_, l) = open(dir.path(), 10);
        let seqs: Vec<u64> = l.events.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (SEGMENT_EVENTS * 2..=total).collect::<Vec<_>>(),
            "what retention dropped (the mark) stays dropped"
        );
        assert_eq!(
            files(),
            2,
            "reopening drops the segment older than what is kept"
        );
    }
}
