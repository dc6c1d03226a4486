//! Directory entries that survive power loss.
//!
//! A new file, a rename or an unlink is durable only once its directory is
//! fsynced, and a new directory only once its parent is: a blob renamed into
//! `blobs/sha256` and its directory fsynced is still lost if `blobs/sha256`
//! itself never reached the disk. keel's directories are therefore made
//! durable, down from the filesystem's root, every time they are opened (a
//! start that follows a crash cannot tell whether the one before got that far).

use std::fs::{self, File};
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use crate::{Error, Result};

/// keel's sled database, whose [`flush`](Db::flush) is durable.
///
/// sled's own `flush` waits for `sync_file_range` of what it wrote: the pages
/// reach the disk, but neither the file's new size nor the disk's write cache
/// is made durable (sled fsyncs only from a background thread, every half
/// second), so a power cut can take an acknowledged write with it. This
/// flush is sled's followed by an `fdatasync` of sled's file. Everything else
/// is sled's, through `Deref`.
#[derive(Debug, Clone)]
pub struct Db {
    db: sled::Db,
    file: Arc<File>,
}

impl Db {
    /// Wraps `db`, whose file is `file` (sled's `db` in its directory).
    pub fn new(db: sled::Db, file: &Path) -> Result<Self> {
        let f = File::open(file).map_err(Error::io("open", file))?;
        Ok(Self {
            db,
            file: Arc::new(f),
        })
    }

    /// sled's flush, then an fdatasync of its file: what was written before the
    /// call survives power loss once this returns. Returns the bytes sled flushed.
    pub fn flush(&self) -> Result<usize> {
        let n = self.db.flush()?;
        self.file.sync_data().map_err(|source| Error::Io {
            op: "fsync",
            path: "sled db".into(),
            source,
        })?;
        Ok(n)
    }
}

impl Deref for Db {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        &self.db
    }
}

/// fsync a directory, so a create, rename or unlink in it survives power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(Error::io("fsync directory", dir))
}

/// Creates `dir` and any missing parents, then fsyncs it and every directory
/// above it, so that its entry and theirs are durable.
pub fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    for d in dir.ancestors().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(d)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_missing_parents_and_accepts_an_existing_directory() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/c");
        create_dir(&d).unwrap();
        assert!(d.is_dir());
        create_dir(&d).unwrap();
        let f = t.path().join("file");
        fs::write(&f, "x").unwrap();
        assert!(create_dir(&f.join("below")).is_err());
    }
}
