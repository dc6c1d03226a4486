//! The event log in sled: every published event under its sequence number (big-endian
//! key, encoded envelope as value), trimmed to the retention limit, plus the two
//! numbers that keep sequence numbers strictly increasing across restarts.
//!
//! Nothing here flushes on its own. The exchange flushes before it delivers an event
//! whose topic is durable; other events reach the disk within sled's flush interval.
//!
//! Sequence numbers are handed out in blocks: before any number above `reserved` is
//! used, a larger `reserved` is written and flushed. After a crash, numbering resumes
//! above the last reservation, so a number is never given to two events even if the
//! events that used it were not yet on disk.

use crate::{Error, Result};

/// How many sequence numbers one reservation covers.
pub const RESERVE_BLOCK: u64 = 1 << 16;

const RESERVED: &[u8] = b"reserved";
const TRIMMED: &[u8] = b"trimmed";

/// What the log held when it was opened.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The retained events, oldest first: (sequence, encoded envelope).
    pub events: Vec<(u64, Vec<u8>)>,
    /// The first sequence number to hand out.
    pub next_seq: u64,
    /// Highest sequence number dropped by retention (0: none).
    pub trimmed_upto: u64,
    /// Sequence numbers up to this one are covered by a flushed reservation.
    pub reserved: u64,
}

/// The persistent half of keel's event exchange.
#[derive(Debug, Clone)]
pub struct EventLog {
    db: sled::Db,
    events: sled::Tree,
    marks: sled::Tree,
}

fn read_u64(v: Option<sled::IVec>) -> Result<u64> {
    match v {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| Error::Corrupt("event log mark is not 8 bytes".into())),
    }
}

impl EventLog {
    /// Opens the log, keeps the newest `retain` events and drops older ones, and
    /// reserves a first block of sequence numbers (flushed before returning).
    pub fn open(db: sled::Db, retain: usize) -> Result<(Self, Loaded)> {
        let log = Self {
            events: db.open_tree("events")?,
            marks: db.open_tree("event_marks")?,
            db,
        };
        let mut trimmed_upto = read_u64(log.marks.get(TRIMMED)?)?;
        let mut newest: Vec<(u64, Vec<u8>)> = Vec::with_capacity(retain.min(1 << 20));
        for item in log.events.iter().rev() {
            let (k, v) = item?;
            let seq = read_u64(Some(k))?;
            if newest.len() < retain {
                newest.push((seq, v.to_vec()));
            } else {
                log.events.remove(seq.to_be_bytes())?;
                trimmed_upto = trimmed_upto.max(seq);
            }
        }
        newest.reverse();
        log.marks.insert(TRIMMED, &trimmed_upto.to_be_bytes())?;
        let last = newest.last().map_or(0, |(s, _)| *s);
        let next_seq = last
            .max(read_u64(log.marks.get(RESERVED)?)?)
            .max(trimmed_upto)
            + 1;
        let reserved = next_seq - 1 + RESERVE_BLOCK;
        log.reserve(reserved)?;
        log.flush()?;
        Ok((
            log,
            Loaded {
                events: newest,
                next_seq,
                trimmed_upto,
                reserved,
            },
        ))
    }

    /// Records a new reservation mark (durable at the next flush).
    pub fn reserve(&self, upto: u64) -> Result<()> {
        self.marks.insert(RESERVED, &upto.to_be_bytes())?;
        Ok(())
    }

    /// Appends one encoded event.
    pub fn append(&self, seq: u64, envelope: &[u8]) -> Result<()> {
        self.events.insert(seq.to_be_bytes(), envelope)?;
        Ok(())
    }

    /// Drops events that retention no longer keeps (one batch), the newest last.
    pub fn trim(&self, seqs: &[u64]) -> Result<()> {
        let Some(newest) = seqs.last() else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        for s in seqs {
            batch.remove(&s.to_be_bytes());
        }
        self.events.apply_batch(batch)?;
        self.marks.insert(TRIMMED, &newest.to_be_bytes())?;
        Ok(())
    }

    /// Forgets an event that was appended but never delivered.
    pub fn discard(&self, seq: u64) -> Result<()> {
        self.events.remove(seq.to_be_bytes())?;
        Ok(())
    }

    /// Writes everything so far to disk (fsync).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_resumes_above_the_reservation_and_retention_trims() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, l) = EventLog::open(crate::open_db(dir.path()).unwrap(), 3).unwrap();
            assert_eq!(l.next_seq, 1);
            assert_eq!(l.reserved, RESERVE_BLOCK);
            for s in 1..=5 {
                log.append(s, format!("e{s}").as_bytes()).unwrap();
            }
            log.flush().unwrap();
        }
        let (_, l) = EventLog::open(crate::open_db(dir.path()).unwrap(), 3).unwrap();
        let seqs: Vec<u64> = l.events.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![3, 4, 5], "only the newest three are kept");
        assert_eq!(l.events[0].1, b"e3");
        assert_eq!(l.trimmed_upto, 2);
        assert_eq!(
            l.next_seq,
            RESERVE_BLOCK + 1,
            "numbers handed out before the crash may have been used: skip them"
        );
        assert_eq!(l.reserved, 2 * RESERVE_BLOCK);
    }
}
