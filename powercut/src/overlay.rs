//! A file's bytes written but not yet made durable: what a page cache holds
//! between a `write` and the `fsync` that follows it.
//!
//! The backing file holds only durable bytes. An [`Overlay`] holds the rest: the
//! extents written since the last fsync, the file's size as its writers see it,
//! and a floor below which the backing file's bytes still count (a truncate
//! lowers it; bytes at or past it read as zeroes unless written again).
//! [`Overlay::flush`] makes all of it durable; dropping the overlay is the
//! power cut.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

#[derive(Debug, Clone)]
pub struct Overlay {
    /// The file's size as its readers and writers see it.
    size: u64,
    /// Backing bytes at or past this offset are stale.
    floor: u64,
    /// Written extents, by offset; they never overlap or touch.
    extents: BTreeMap<u64, Vec<u8>>,
}

impl Overlay {
    /// An overlay on a backing file of `len` durable bytes.
    pub fn new(len: u64) -> Self {
        Self {
            size: len,
            floor: len,
            extents: BTreeMap::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes held that a power cut would lose.
    pub fn held(&self) -> u64 {
        self.extents.values().map(|e| e.len() as u64).sum()
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        // Every extent that overlaps or touches [offset, end) merges into one.
        let touching: Vec<u64> = self
            .extents
            .range(..=end)
            .filter(|(start, bytes)| **start + bytes.len() as u64 >= offset)
            .map(|(start, _)| *start)
            .collect();
        let mut start = offset;
        let mut stop = end;
        for s in &touching {
            start = start.min(*s);
            stop = stop.max(s + self.extents[s].len() as u64);
        }
        let mut merged = vec![0u8; usize::try_from(stop - start).expect("extent fits memory")];
        for s in touching {
            let bytes = self.extents.remove(&s).expect("listed above");
            let at = usize::try_from(s - start).expect("extent fits memory");
            merged[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        let at = usize::try_from(offset - start).expect("extent fits memory");
        merged[at..at + data.len()].copy_from_slice(data);
        self.extents.insert(start, merged);
        self.size = self.size.max(end);
    }

    pub fn truncate(&mut self, len: u64) {
        if len < self.size {
            let cut: Vec<u64> = self.extents.range(..).map(|(s, _)| *s).collect();
            for s in cut {
                if s >= len {
                    self.extents.remove(&s);
                } else if let Some(bytes) = self.extents.get_mut(&s) {
                    let keep = usize::try_from(len - s).expect("extent fits memory");
                    bytes.truncate(keep.min(bytes.len()));
                }
            }
            self.floor = self.floor.min(len);
        }
        self.size = len;
    }

    /// `len` bytes at `offset` (fewer at the end of the file), the backing
    /// file's durable bytes with the overlay's on top.
    pub fn read(&self, backing: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; usize::try_from(end - offset).expect("read fits memory")];
        let durable_end = end.min(self.floor);
        if offset < durable_end {
            let want = usize::try_from(durable_end - offset).expect("read fits memory");
            read_at_most(backing, &mut buf[..want], offset)?;
        }
        for (s, bytes) in self.extents.range(..end) {
            let e = s + bytes.len() as u64;
            if e <= offset {
                continue;
            }
            let from = (*s).max(offset);
            let to = e.min(end);
            let src = usize::try_from(from - s).expect("fits");
            let dst = usize::try_from(from - offset).expect("fits");
            let n = usize::try_from(to - from).expect("fits");
            buf[dst..dst + n].copy_from_slice(&bytes[src..src + n]);
        }
        Ok(buf)
    }

    /// Writes everything held to the backing file: after this the backing file
    /// is what the overlay showed. The caller drops the overlay.
    pub fn flush(&self, backing: &File) -> io::Result<()> {
        let len = backing.metadata()?.len();
        if self.floor < len {
            backing.set_len(self.floor)?;
        }
        for (s, bytes) in &self.extents {
            backing.write_all_at(bytes, *s)?;
        }
        if backing.metadata()?.len() != self.size {
            backing.set_len(self.size)?;
        }
        Ok(())
    }
}

/// Fills `buf` from `offset` as far as the file goes; the rest stays zero.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn backing(content: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        let file = f.reopen().unwrap();
        (f, file)
    }

    fn all(o: &Overlay, f: &File) -> Vec<u8> {
        o.read(f, 0, u64::MAX).unwrap()
    }

    #[test]
    fn writes_show_on_top_of_the_durable_bytes_and_only_flush_makes_them_durable() {
        let (tmp, f) = backing(b"0123456789");
        let mut o = Overlay::new(10);
        o.write(2, b"ab");
        o.write(8, b"xyz");
        assert_eq!(all(&o, &f), b"01ab4567xyz");
        assert_eq!(std::fs::read(tmp.path()).unwrap(), b"0123456789");
        assert_eq!(o.held(), 5);
        o.flush(&f).unwrap();
        assert_eq!(std::fs::read(tmp.path()).unwrap(), b"01ab4567xyz");
    }

    #[test]
    fn overlapping_and_touching_writes_merge() {
        let (_tmp, f) = backing(b"");
        let mut o = Overlay::new(0);
        o.write(4, b"ef");
        o.write(0, b"abcd");
        o.write(3, b"XYZW");
        assert_eq!(o.extents.len(), 1);
        assert_eq!(all(&o, &f), b"abcXYZW");
        o.write(10, b"k");
        assert_eq!(all(&o, &f), b"abcXYZW\0\0\0k");
    }

    #[test]
    fn a_truncate_hides_the_durable_tail_even_when_the_file_grows_again() {
        let (tmp, f) = backing(b"0123456789");
        let mut o = Overlay::new(10);
        o.write(6, b"ab");
        o.truncate(4);
        assert_eq!(all(&o, &f), b"0123");
        o.truncate(6);
        assert_eq!(all(&o, &f), b"0123\0\0");
        o.write(7, b"z");
        assert_eq!(all(&o, &f), b"0123\0\0\0z");
        assert_eq!(o.read(&f, 3, 3).unwrap(), b"3\0\0");
        o.flush(&f).unwrap();
        assert_eq!(std::fs::read(tmp.path()).unwrap(), b"0123\0\0\0z");
    }

    #[test]
    fn reads_past_the_end_are_empty_and_reads_across_it_are_short() {
        let (_tmp, f) = backing(b"abc");
        let o = Overlay::new(3);
        assert_eq!(o.read(&f, 5, 10).unwrap(), b"");
        assert_eq!(o.read(&f, 1, 10).unwrap(), b"bc");
    }
}
