//! keel's persistent state: the content store (sha256 blobs under `<root>/content`) and
//! metadata in sled (`<root>/meta`).
//!
//! Everything here is blocking and synchronous. Callers keep it off the threads that
//! serve RPCs: mutations run on the storage actor's own thread, reads on tokio's
//! blocking pool.

pub mod content;
pub mod digest;
pub mod durable;
pub mod error;
pub mod events;
pub mod faults;
pub mod meta;

pub use content::{ContentOptions, ContentStore, Info, Status, Writer};
pub use digest::Digest;
pub use error::{Error, Result};
pub use events::EventLog;
pub use meta::Meta;

use std::path::Path;

/// Opens (creating if needed) keel's sled database under `root/meta`.
pub fn open_db(root: &Path) -> Result<durable::Db> {
    let path = root.join("meta");
    let db = sled::Config::new()
        .path(&path)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| Error::Db(format!("open {}: {e}", path.display())))?;
    // sled writes its configuration file without an fsync, and never fsyncs the
    // directories it creates its files in: after a power cut it would find its
    // configuration empty, or its files gone.
    let conf = path.join("conf");
    std::fs::File::open(&conf)
        .and_then(|f| f.sync_all())
        .map_err(Error::io("fsync", &conf))?;
    durable::create_dir(&path.join("blobs"))?;
    durable::Db::new(db, &path.join("db"))
}
