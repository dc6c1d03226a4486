//! The storage actor: the one place that mutates the content store.
//!
//! It runs on a `SyncArbiter` thread of its own, so hashing, writes, fsync and sled
//! flushes never run on the threads that serve RPCs or on other actors. Messages are
//! handled one at a time, which serialises every mutation. It also owns the ref locks:
//! one writer per ref, a second opener gets `Locked` ("ref R is locked since T").
//!
//! Callers hold a [`StorageHandle`]. actix mailboxes are only softly bounded, so the
//! handle bounds the messages in flight itself with a semaphore; a caller waits for a
//! permit instead of growing the queue.
//!
//! A failure of the storage actor (a panic on its thread) is escalated to the root
//! supervisor, which starts a new one on the same store ([`StorageHandle::restart`]).
//! Nothing committed is lost: a commit is on disk before it is answered. Open writers
//! and ref locks were the old actor's and go with it; their clients' streams fail,
//! and each ingest resumes, when its client opens the ref again, from the bytes on
//! disk.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use actix::prelude::*;
use keel_protocol::types::rfc3339;
use keel_storage::content::FsckReport;
use keel_storage::{ContentStore, Digest, Status};
use tokio::sync::Semaphore;

use tokio::sync::mpsc;

use crate::supervision::{Death, Lifeline, Revivable};
use crate::{Error, Result};

/// Messages in flight to the storage actor at most.
const MAILBOX_BOUND: usize = 64;
/// Bytes per write message when [`StorageHandle::put`] copies a blob in.
const PUT_CHUNK: usize = 1 << 20;

/// Identifies one open writer (a lease on a ref's lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriterId(u64);

struct Lock {
    since: SystemTime,
}

/// Owns the content store's writers and ref locks. Only ever touched by its own thread.
struct StorageActor {
    store: Arc<ContentStore>,
    writers: HashMap<WriterId, keel_storage::Writer>,
    locks: HashMap<(String, String), Lock>,
    next_id: Arc<AtomicU64>,
    /// Reports a failure to the root supervisor.
    _lifeline: Lifeline<&'static str>,
}

impl Actor for StorageActor {
    type Context = SyncContext<Self>;
}

/// Fault injection (tests only): a named message makes the storage actor panic,
/// stall (its own thread) or fail.
fn fault(message: &str) -> Result<()> {
    #[cfg(feature = "faults")]
    match keel_storage::faults::check(&format!("storage:{message}")) {
        Some(keel_storage::faults::Fault::Stall(d)) => std::thread::sleep(d),
        Some(_) => return Err(Error::Io(format!("fault injected in storage:{message}"))),
        None => {}
    }
    #[cfg(not(feature = "faults"))]
    let _ = message;
    Ok(())
}

/// Opens (or resumes) the writer for a ref and takes its lock. Legal any time; fails
/// with `Locked` while another writer holds the ref.
#[derive(Message)]
#[rtype(result = "Result<(WriterId, Status)>")]
struct OpenWriter {
    namespace: String,
    reference: String,
    total: u64,
    expected: Option<Digest>,
}

/// Appends to an open writer; returns its new status.
#[derive(Message)]
#[rtype(result = "Result<Status>")]
struct Write {
    id: WriterId,
    offset: u64,
    data: Vec<u8>,
}

/// Commits an open writer, releasing its lock whatever the outcome.
#[derive(Message)]
#[rtype(result = "Result<(Digest, u64)>")]
struct Commit {
    id: WriterId,
    size: u64,
    expected: Option<Digest>,
    labels: BTreeMap<String, String>,
}

/// Releases a writer's lock; its bytes stay on disk for a later resume.
#[derive(Message)]
#[rtype(result = "()")]
struct Release {
    id: WriterId,
}

/// Removes an ingest that no writer holds.
#[derive(Message)]
#[rtype(result = "Result<()>")]
struct Abort {
    namespace: String,
    reference: String,
}

#[derive(Message)]
#[rtype(result = "Result<()>")]
struct Delete {
    namespace: String,
    digest: Digest,
}

#[derive(Message)]
#[rtype(result = "Result<keel_storage::Info>")]
struct UpdateLabels {
    namespace: String,
    digest: Digest,
    labels: BTreeMap<String, String>,
    mask: Vec<String>,
}

/// Re-hashes every blob; serialised with commits so it never sees one half done.
#[derive(Message)]
#[rtype(result = "Result<FsckReport>")]
struct Fsck;

impl StorageActor {
    fn writer(&mut self, id: WriterId) -> Result<&mut keel_storage::Writer> {
        self.writers.get_mut(&id).ok_or_else(|| {
            keel_storage::Error::FailedPrecondition("writer is closed".into()).into()
        })
    }

    fn release(&mut self, id: WriterId) -> Option<keel_storage::Writer> {
        let w = self.writers.remove(&id)?;
        self.locks
            .remove(&(w.namespace().to_string(), w.reference().to_string()));
        Some(w)
    }
}

impl Handler<OpenWriter> for StorageActor {
    type Result = Result<(WriterId, Status)>;

    fn handle(&mut self, m: OpenWriter, _: &mut Self::Context) -> Self::Result {
        fault("OpenWriter")?;
        let key = (m.namespace.clone(), m.reference.clone());
        if let Some(lock) = self.locks.get(&key) {
            let since = rfc3339(lock.since);
            return Err(keel_storage::Error::Locked(format!(
                "ref {} is locked since {since}",
                m.reference
            ))
            .into());
        }
        let w = self
            .store
            .open_writer(&m.namespace, &m.reference, m.total, m.expected)?;
        let id = WriterId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let status = w.status();
        self.locks.insert(
            key,
            Lock {
                since: SystemTime::now(),
            },
        );
        self.writers.insert(id, w);
        Ok((id, status))
    }
}

impl Handler<Write> for StorageActor {
    type Result = Result<Status>;

    fn handle(&mut self, m: Write, _: &mut Self::Context) -> Self::Result {
        fault("Write")?;
        let w = self.writer(m.id)?;
        w.write(m.offset, m.data)?;
        Ok(w.status())
    }
}

impl Handler<Commit> for StorageActor {
    type Result = Result<(Digest, u64)>;

    fn handle(&mut self, m: Commit, _: &mut Self::Context) -> Self::Result {
        fault("Commit")?;
        let w = self
            .release(m.id)
            .ok_or_else(|| keel_storage::Error::FailedPrecondition("writer is closed".into()))?;
        let size = w.status().offset;
        let d = self.store.commit(w, m.size, m.expected, m.labels)?;
        Ok((d, size))
    }
}

impl Handler<Release> for StorageActor {
    type Result = ();

    fn handle(&mut self, m: Release, _: &mut Self::Context) {
        // The one place an uncommitted writer's ref is unlocked, however its
        // stream ended (hung up, closed, broken, or its handler dropped).
        if let Some(w) = self.release(m.id) {
            tracing::info!(namespace = %w.namespace(), reference = %w.reference(), "content writer ended without a commit; ref unlocked");
        }
    }
}

impl Handler<Abort> for StorageActor {
    type Result = Result<()>;

    fn handle(&mut self, m: Abort, _: &mut Self::Context) -> Self::Result {
        if let Some(lock) = self.locks.get(&(m.namespace.clone(), m.reference.clone())) {
            let since = rfc3339(lock.since);
            return Err(keel_storage::Error::Locked(format!(
                "ref {} is locked since {since}; its writer must finish first",
                m.reference
            ))
            .into());
        }
        Ok(self.store.abort(&m.namespace, &m.reference)?)
    }
}

impl Handler<Delete> for StorageActor {
    type Result = Result<()>;

    fn handle(&mut self, m: Delete, _: &mut Self::Context) -> Self::Result {
        Ok(self.store.delete(&m.namespace, &m.digest)?)
    }
}

impl Handler<UpdateLabels> for StorageActor {
    type Result = Result<keel_storage::Info>;

    fn handle(&mut self, m: UpdateLabels, _: &mut Self::Context) -> Self::Result {
        Ok(self
            .store
            .update_labels(&m.namespace, &m.digest, m.labels, &m.mask)?)
    }
}

impl Handler<Fsck> for StorageActor {
    type Result = Result<FsckReport>;

    fn handle(&mut self, _: Fsck, _: &mut Self::Context) -> Self::Result {
        Ok(self.store.fsck()?)
    }
}

/// How long a caller waits for a failed storage actor to be brought back.
const REVIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct Shared {
    store: Arc<ContentStore>,
    next_id: Arc<AtomicU64>,
    actor: Revivable<StorageActor>,
    deaths: mpsc::UnboundedSender<Death<&'static str>>,
}

/// keel's handle on the storage actor. Cheap to clone; every clone shares one bound on
/// the messages in flight, and stays valid when the actor is replaced.
#[derive(Clone)]
pub struct StorageHandle {
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for StorageHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageHandle")
            .field("in_flight_free", &self.permits.available_permits())
            .finish()
    }
}

impl StorageHandle {
    /// Starts the storage actor on its own thread. Must run inside an actix `System`.
    /// Its failures are reported on `deaths` (as `"storage"`).
    pub fn start(store: ContentStore, deaths: mpsc::UnboundedSender<Death<&'static str>>) -> Self {
        let h = Self {
            shared: Arc::new(Shared {
                store: Arc::new(store),
                next_id: Arc::new(AtomicU64::new(1)),
                actor: Revivable::default(),
                deaths,
            }),
            permits: Arc::new(Semaphore::new(MAILBOX_BOUND)),
        };
        h.restart();
        h
    }

    /// Starts a storage actor on the store, in place of one that failed (or the
    /// first). Writers and ref locks start empty.
    pub fn restart(&self) {
        let s = self.shared.clone();
        let addr = SyncArbiter::start(1, move || StorageActor {
            store: s.store.clone(),
            writers: HashMap::new(),
            locks: HashMap::new(),
            next_id: s.next_id.clone(),
            _lifeline: Lifeline::new("storage", s.deaths.clone()),
        });
        self.shared.actor.started(addr);
    }

    /// The store, for reads (which may run concurrently with the actor on a blocking
    /// thread: committed blobs are immutable and sled reads are consistent).
    pub fn store(&self) -> &Arc<ContentStore> {
        &self.shared.store
    }

    async fn call<M>(&self, msg: M) -> Result<M::Result>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        StorageActor: Handler<M>,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::ActorGone("storage actor"))?;
        self.shared
            .actor
            .live(REVIVE_WAIT)
            .await
            .ok_or(Error::ActorGone("storage actor"))?
            .send(msg)
            .await
            .map_err(|_| Error::ActorGone("storage actor"))
    }

    /// Opens or resumes a writer and locks its ref. Drop the lease (or commit) to unlock.
    pub async fn open_writer(
        &self,
        namespace: &str,
        reference: &str,
        total: u64,
        expected: Option<Digest>,
    ) -> Result<(WriterLease, Status)> {
        let (id, status) = self
            .call(OpenWriter {
                namespace: namespace.to_string(),
                reference: reference.to_string(),
                total,
                expected,
            })
            .await??;
        Ok((
            WriterLease {
                id,
                handle: self.clone(),
                done: false,
            },
            status,
        ))
    }

    pub async fn abort(&self, namespace: &str, reference: &str) -> Result<()> {
        self.call(Abort {
            namespace: namespace.into(),
            reference: reference.into(),
        })
        .await?
    }

    pub async fn delete(&self, namespace: &str, digest: Digest) -> Result<()> {
        self.call(Delete {
            namespace: namespace.into(),
            digest,
        })
        .await?
    }

    pub async fn update_labels(
        &self,
        namespace: &str,
        digest: Digest,
        labels: BTreeMap<String, String>,
        mask: Vec<String>,
    ) -> Result<keel_storage::Info> {
        self.call(UpdateLabels {
            namespace: namespace.into(),
            digest,
            labels,
            mask,
        })
        .await?
    }

    pub async fn fsck(&self) -> Result<FsckReport> {
        self.call(Fsck).await?
    }

    /// Writes a whole blob read from `src` under a fresh `reference` and commits it;
    /// returns its digest and size. Content already stored counts as written.
    pub async fn put(
        &self,
        namespace: &str,
        reference: &str,
        src: impl tokio::io::AsyncRead + Unpin,
        labels: BTreeMap<String, String>,
    ) -> Result<(Digest, u64)> {
        let (digest, size, _) = self.put_new(namespace, reference, src, labels).await?;
        Ok((digest, size))
    }

    /// [`StorageHandle::put`], also telling whether the blob is new to the namespace
    /// (false when the same content was already stored).
    pub async fn put_new(
        &self,
        namespace: &str,
        reference: &str,
        mut src: impl tokio::io::AsyncRead + Unpin,
        labels: BTreeMap<String, String>,
    ) -> Result<(Digest, u64, bool)> {
        use sha2::Digest as _;
        use tokio::io::AsyncReadExt;
        let (lease, status) = self.open_writer(namespace, reference, 0, None).await?;
        if status.offset != 0 {
            return Err(Error::AlreadyExists(format!(
                "ref {reference} already holds {} bytes",
                status.offset
            )));
        }
        let mut hasher = sha2::Sha256::new();
        let mut offset = 0u64;
        let mut buf = vec![0u8; PUT_CHUNK];
        loop {
            let n = src
                .read(&mut buf)
                .await
                .map_err(|e| Error::Io(format!("read {reference}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            lease.write(offset, buf[..n].to_vec()).await?;
            offset += n as u64;
        }
        let digest = Digest::from_sha256(&hasher.finalize());
        match lease.commit(offset, Some(digest.clone()), labels).await {
            Err(Error::Storage(keel_storage::Error::AlreadyExists(_))) => {
                Ok((digest, offset, false))
            }
            r => r.map(|(d, size)| (d, size, true)),
        }
    }
}

/// An open writer with its ref locked. Dropping it releases the lock (the bytes stay
/// for a resume); [`WriterLease::commit`] consumes it.
#[derive(Debug)]
pub struct WriterLease {
    id: WriterId,
    handle: StorageHandle,
    done: bool,
}

impl WriterLease {
    /// Appends data at `offset`; returns the writer's new status.
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> Result<Status> {
        self.handle
            .call(Write {
                id: self.id,
                offset,
                data,
            })
            .await?
    }

    /// Commits; returns the digest and size. The lock is released whatever the outcome.
    pub async fn commit(
        mut self,
        size: u64,
        expected: Option<Digest>,
        labels: BTreeMap<String, String>,
    ) -> Result<(Digest, u64)> {
        self.done = true;
        self.handle
            .call(Commit {
                id: self.id,
                size,
                expected,
                labels,
            })
            .await?
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        if !self.done {
            // Fire and forget: a drop cannot wait, and the actor handles it in order
            // after any write already queued.
            if let Some(addr) = self.handle.shared.actor.addr() {
                addr.do_send(Release { id: self.id });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_storage::{ContentOptions, ContentStore};
    fn start(dir: &std::path::Path) -> StorageHandle {
        let db = keel_storage::open_db(dir).unwrap();
        let (store, _) = ContentStore::open(dir, db, &ContentOptions::default()).unwrap();
        StorageHandle::start(store, mpsc::unbounded_channel().0)
    }

    #[actix_rt::test]
    async fn one_writer_per_ref_and_release_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let h = start(dir.path());
        let (lease, st) = h.open_writer("default", "r", 0, None).await.unwrap();
        assert_eq!(st.offset, 0);
        lease.write(0, b"abc".to_vec()).await.unwrap();

        let err = h.open_writer("default", "r", 0, None).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Storage(keel_storage::Error::Locked(_))),
            "{msg}"
        );
        assert!(msg.starts_with("ref r is locked since 20"), "{msg}");
        assert!(
            h.abort("default", "r").await.is_err(),
            "abort refuses a locked ref"
        );
        // Another namespace's ref of the same name is independent.
        let (_other, _) = h.open_writer("other", "r", 0, None).await.unwrap();

        drop(lease);
        let (lease, st) = h.open_writer("default", "r", 0, None).await.unwrap();
        assert_eq!(st.offset, 3, "resumes where the bytes end");
        lease.write(3, b"def".to_vec()).await.unwrap();
        let (d, size) = lease.commit(6, None, BTreeMap::new()).await.unwrap();
        assert_eq!(size, 6);
        assert_eq!(h.store().info("default", &d).unwrap().size, 6);
        // After a commit the ref is free again.
        let (_l, st) = h.open_writer("default", "r", 0, None).await.unwrap();
        assert_eq!(st.offset, 0);
    }
}
