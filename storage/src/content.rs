//! Content-addressed blob store with crash-safe, resumable ingest.
//!
//! Layout under `<root>/content`:
//! - `blobs/sha256/<hex>`: committed blobs, immutable, named by the sha256 of their bytes;
//! - `ingest/<sha256(namespace NUL ref)>/{meta.json,data}`: writers in progress; the
//!   offset of a writer is the length of `data`, so a writer reopened after a crash
//!   resumes where the bytes on disk end, its hash rebuilt from them.
//!
//! Metadata lives in sled: `content.info` maps `namespace NUL digest` → [`Info`],
//! `content.refs` maps `digest NUL namespace` → () (which namespaces hold a blob), and
//! `content.intents` records a commit or delete between its steps so that startup can
//! finish it. A commit is acknowledged only after: data fsynced → intent flushed →
//! rename into blobs/ → blobs/ fsynced → metadata flushed. Nothing is ever deleted
//! because metadata and files disagree; the disagreement is reported.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_protocol::filters::{Adaptor, Filter};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use crate::digest::{validate_ref, Digest};
use crate::durable::{self, sync_dir};
use crate::{Error, Result};

/// Read buffer used when hashing files.
const HASH_BUF: usize = 1 << 20;
/// Ask the kernel to start writeback every this many bytes, so the fsync at commit has
/// little left to do (the disk works while keel hashes).
const WRITEBACK_EVERY: u64 = 32 << 20;
/// Largest label key plus value, as containerd.
const MAX_LABEL_SIZE: usize = 4096;

/// Tunables of the content store.
#[derive(Debug, Clone)]
pub struct ContentOptions {
    /// Partial ingests untouched for longer than this are removed at startup.
    pub ingest_max_age: Duration,
}

impl Default for ContentOptions {
    fn default() -> Self {
        Self {
            ingest_max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Metadata of a committed blob, as seen from one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub digest: Digest,
    pub size: u64,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub labels: BTreeMap<String, String>,
}

/// State of an ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub reference: String,
    pub offset: u64,
    /// Expected total size, 0 when unknown.
    pub total: u64,
    pub expected: Option<Digest>,
    pub started_at: SystemTime,
    pub updated_at: SystemTime,
}

#[derive(Serialize, Deserialize)]
struct InfoRecord {
    size: u64,
    created_ns: u64,
    updated_ns: u64,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct IngestMeta {
    namespace: String,
    reference: String,
    total: u64,
    expected: Option<String>,
    started_ns: u64,
}

#[derive(Serialize, Deserialize)]
enum Intent {
    /// A commit between its fsync and its metadata: finish it if the blob is in place
    /// and its bytes hash to the digest.
    Commit {
        namespace: String,
        digest: String,
        labels: BTreeMap<String, String>,
    },
    /// A delete whose metadata is gone: remove the file if no namespace refers to it.
    Delete { digest: String },
}

/// What the startup check found. Nothing it reports was deleted.
#[derive(Debug, Default, Clone)]
pub struct StartupReport {
    pub blobs: usize,
    pub ingests_kept: Vec<String>,
    pub ingests_removed: Vec<String>,
    pub commits_finished: Vec<String>,
    pub mismatches: Vec<String>,
}

/// Result of [`ContentStore::fsck`].
#[derive(Debug, Default, Clone)]
pub struct FsckReport {
    pub checked: u64,
    pub bytes: u64,
    /// (digest, actual digest or empty, message)
    pub corrupt: Vec<(String, String, String)>,
    pub mismatches: Vec<String>,
}

fn nanos(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()).unwrap_or(u64::MAX)
}

fn from_nanos(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n)
}

fn info_key(ns: &str, d: &Digest) -> Vec<u8> {
    format!("{ns}\0{d}").into_bytes()
}

fn refs_key(d: &Digest, ns: &str) -> Vec<u8> {
    format!("{d}\0{ns}").into_bytes()
}

/// sha256 of a file's first `len` bytes (all of it when `len` is None), and bytes read.
fn hash_file(path: &Path, len: Option<u64>) -> Result<(Sha256, u64)> {
    let mut f = File::open(path).map_err(Error::io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut done = 0u64;
    loop {
        let want = match len {
            Some(l) => usize::try_from((l - done).min(HASH_BUF as u64)).unwrap_or(HASH_BUF),
            None => HASH_BUF,
        };
        if want == 0 {
            break;
        }
        let n = f.read(&mut buf[..want]).map_err(Error::io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok((h, done))
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::InvalidArgument("label key must not be empty".into()));
        }
        if k.len() + v.len() > MAX_LABEL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "label {k:?} is {} bytes, the limit for key and value is {MAX_LABEL_SIZE}",
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

impl Adaptor for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "digest" => Some(self.digest.to_string()),
            [f] if f == "size" => Some(self.size.to_string()),
            [f] if f == "labels" => (!self.labels.is_empty()).then(String::new),
            [f, k] if f == "labels" => self.labels.get(k).cloned(),
            _ => None,
        }
    }
}

impl Adaptor for Status {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "ref" => Some(self.reference.clone()),
            [f] if f == "expected" => self.expected.as_ref().map(ToString::to_string),
            [f] if f == "total" => Some(self.total.to_string()),
            _ => None,
        }
    }
}

/// The content store. Shared by reference: reads may run on any thread; every
/// mutation (writers, commit, delete, label updates) must come from one thread, the
/// storage actor's, which is what serialises them.
#[derive(Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
    db: crate::durable::Db,
    info: sled::Tree,
    refs: sled::Tree,
    intents: sled::Tree,
}

impl ContentStore {
    /// Opens the store under `root/content`, finishes interrupted commits and deletes,
    /// and checks that metadata and files agree.
    pub fn open(
        root: &Path,
        db: crate::durable::Db,
        opts: &ContentOptions,
    ) -> Result<(Self, StartupReport)> {
        let base = root.join("content");
        let blobs = base.join("blobs").join("sha256");
        let ingest = base.join("ingest");
        for d in [&blobs, &ingest] {
            durable::create_dir(d)?;
        }
        let store = Self {
            info: db.open_tree("content.info")?,
            refs: db.open_tree("content.refs")?,
            intents: db.open_tree("content.intents")?,
            blobs,
            ingest,
            db,
        };
        let report = store.startup_check(opts)?;
        Ok((store, report))
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(d.hex())
    }

    fn ingest_dir(&self, ns: &str, reference: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(ns.as_bytes());
        h.update([0u8]);
        h.update(reference.as_bytes());
        self.ingest.join(hex::encode(h.finalize()))
    }

    fn decode_info(&self, d: Digest, v: &[u8]) -> Result<Info> {
        let r: InfoRecord =
            serde_json::from_slice(v).map_err(|e| Error::Corrupt(format!("info of {d}: {e}")))?;
        Ok(Info {
            digest: d,
            size: r.size,
            created_at: from_nanos(r.created_ns),
            updated_at: from_nanos(r.updated_ns),
            labels: r.labels,
        })
    }

    fn encode_info(info: &Info) -> Vec<u8> {
        serde_json::to_vec(&InfoRecord {
            size: info.size,
            created_ns: nanos(info.created_at),
            updated_ns: nanos(info.updated_at),
            labels: info.labels.clone(),
        })
        .expect("info record serialises")
    }

    /// Metadata of a blob in namespace `ns`.
    pub fn info(&self, ns: &str, d: &Digest) -> Result<Info> {
        match self.info.get(info_key(ns, d))? {
            Some(v) => self.decode_info(d.clone(), &v),
            None => Err(Error::NotFound(format!(
                "content {d} not found in namespace {ns}"
            ))),
        }
    }

    /// Path of a blob visible in `ns`, with its metadata, for reading.
    pub fn reader_path(&self, ns: &str, d: &Digest) -> Result<(PathBuf, Info)> {
        let info = self.info(ns, d)?;
        Ok((self.blob_path(d), info))
    }

    /// Blobs of a namespace that match the filter, sorted by digest.
    pub fn list(&self, ns: &str, filter: &Filter) -> Result<Vec<Info>> {
        let mut out = Vec::new();
        for item in self.info.scan_prefix(format!("{ns}\0").as_bytes()) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k);
            let ds = key.split_once('\0').map(|(_, d)| d).unwrap_or_default();
            let d =
                Digest::parse("stored digest", ds).map_err(|e| Error::Corrupt(e.to_string()))?;
            let info = self.decode_info(d, &v)?;
            if filter.matches(&info) {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Sets labels. `mask` holds `labels` (replace all) or `labels.<key>` entries (set,
    /// or remove when absent from `labels`); an empty mask replaces all labels.
    pub fn update_labels(
        &self,
        ns: &str,
        d: &Digest,
        labels: BTreeMap<String, String>,
        mask: &[String],
    ) -> Result<Info> {
        validate_labels(&labels)?;
        let mut info = self.info(ns, d)?;
        if mask.is_empty() || mask.iter().any(|m| m == "labels") {
            info.labels = labels;
        } else {
            for m in mask {
                let Some(key) = m.strip_prefix("labels.") else {
                    return Err(Error::InvalidArgument(format!(
                        "update_mask path {m:?} cannot be updated; only labels and labels.<key>"
                    )));
                };
                match labels.get(key) {
                    Some(v) => info.labels.insert(key.to_string(), v.clone()),
                    None => info.labels.remove(key),
                };
            }
        }
        info.updated_at = SystemTime::now();
        self.info
            .insert(info_key(ns, d), Self::encode_info(&info))?;
        self.flush()?;
        Ok(info)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Removes a blob from a namespace; the file goes when no namespace holds it.
    pub fn delete(&self, ns: &str, d: &Digest) -> Result<()> {
        self.info(ns, d)?;
        let intent_key = format!("delete\0{d}");
        let intent = serde_json::to_vec(&Intent::Delete {
            digest: d.to_string(),
        })
        .expect("intent serialises");
        (&self.info, &self.refs, &self.intents).transaction(
            |(info, refs, intents): &(TransactionalTree, TransactionalTree, TransactionalTree)| {
                info.remove(info_key(ns, d))?;
                refs.remove(refs_key(d, ns))?;
                intents.insert(intent_key.as_bytes(), intent.clone())?;
                Ok::<_, ConflictableTransactionError<Error>>(())
            },
        )?;
        self.flush()?;
        self.finish_delete(d)?;
        self.intents.remove(intent_key.as_bytes())?;
        self.flush()
    }

    fn held_anywhere(&self, d: &Digest) -> Result<bool> {
        Ok(self
            .refs
            .scan_prefix(format!("{d}\0").as_bytes())
            .next()
            .transpose()?
            .is_some())
    }

    fn finish_delete(&self, d: &Digest) -> Result<()> {
        if !self.held_anywhere(d)? {
            let p = self.blob_path(d);
            match fs::remove_file(&p) {
                Ok(()) => sync_dir(&self.blobs)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", p)(e)),
            }
        }
        Ok(())
    }

    fn read_ingest_meta(dir: &Path) -> Result<IngestMeta> {
        let p = dir.join("meta.json");
        let bytes = fs::read(&p).map_err(Error::io("read", &p))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))
    }

    fn status_from_disk(dir: &Path, meta: &IngestMeta) -> Result<Status> {
        let data = dir.join("data");
        let md = fs::metadata(&data).map_err(Error::io("stat", &data))?;
        Ok(Status {
            reference: meta.reference.clone(),
            offset: md.len(),
            total: meta.total,
            expected: meta
                .expected
                .as_deref()
                .and_then(|e| Digest::parse("expected", e).ok()),
            started_at: from_nanos(meta.started_ns),
            updated_at: md.modified().unwrap_or_else(|_| SystemTime::now()),
        })
    }

    /// Status of the ingest `reference` in `ns`, from disk.
    pub fn status(&self, ns: &str, reference: &str) -> Result<Status> {
        validate_ref(reference)?;
        let dir = self.ingest_dir(ns, reference);
        let meta = match Self::read_ingest_meta(&dir) {
            Ok(m) => m,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "no ingest with ref {reference:?} in namespace {ns}"
                )))
            }
            Err(e) => return Err(e),
        };
        Self::status_from_disk(&dir, &meta)
    }

    /// Ingests of a namespace that match the filter (on `ref`, `expected`, `total`).
    pub fn list_statuses(&self, ns: &str, filter: &Filter) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.ingest).map_err(Error::io("read", &self.ingest))? {
            let dir = entry.map_err(Error::io("read", &self.ingest))?.path();
            let Ok(meta) = Self::read_ingest_meta(&dir) else {
                continue;
            };
            if meta.namespace != ns {
                continue;
            }
            if let Ok(st) = Self::status_from_disk(&dir, &meta) {
                if filter.matches(&st) {
                    out.push(st);
                }
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Opens (or resumes) the writer for `reference`. The caller holds the ref's lock.
    pub fn open_writer(
        &self,
        ns: &str,
        reference: &str,
        total: u64,
        expected: Option<Digest>,
    ) -> Result<Writer> {
        validate_ref(reference)?;
        let dir = self.ingest_dir(ns, reference);
        let data = dir.join("data");
        let meta = match Self::read_ingest_meta(&dir) {
            Ok(mut meta) if data.exists() => {
                let recorded = meta.expected.clone();
                if let (Some(e), Some(r)) = (&expected, &recorded) {
                    if e.to_string() != *r {
                        return Err(Error::FailedPrecondition(format!(
                            "ref {reference:?} was opened expecting {r}, not {e}; abort it first"
                        )));
                    }
                }
                if total != 0 && meta.total != 0 && total != meta.total {
                    return Err(Error::FailedPrecondition(format!(
                        "ref {reference:?} was opened expecting {} bytes, not {total}; abort it first",
                        meta.total
                    )));
                }
                if meta.total == 0 {
                    meta.total = total;
                }
                if recorded.is_none() {
                    meta.expected = expected.as_ref().map(ToString::to_string);
                }
                meta
            }
            _ => {
                // New, or a leftover without data (a commit moved it out): start afresh.
                let _ = fs::remove_dir_all(&dir);
                fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
                File::create(&data).map_err(Error::io("create", &data))?;
                IngestMeta {
                    namespace: ns.to_string(),
                    reference: reference.to_string(),
                    total,
                    expected: expected.as_ref().map(ToString::to_string),
                    started_ns: nanos(SystemTime::now()),
                }
            }
        };
        let tmp = dir.join("meta.json.tmp");
        let mut f = File::create(&tmp).map_err(Error::io("create", &tmp))?;
        f.write_all(&serde_json::to_vec(&meta).expect("meta serialises"))
            .map_err(Error::io("write", &tmp))?;
        f.sync_all().map_err(Error::io("fsync", &tmp))?;
        fs::rename(&tmp, dir.join("meta.json")).map_err(Error::io("rename", &tmp))?;
        sync_dir(&dir)?;

        // The offset is where the bytes on disk end; the hasher rebuilds their hash on
        // its own thread while new bytes already arrive.
        let file = OpenOptions::new()
            .append(true)
            .open(&data)
            .map_err(Error::io("open", &data))?;
        let md = file.metadata().map_err(Error::io("stat", &data))?;
        let offset = md.len();
        let hasher = Hasher::start(data.clone(), offset)?;
        Ok(Writer {
            namespace: ns.to_string(),
            reference: reference.to_string(),
            dir,
            file,
            hasher,
            offset,
            writeback_from: offset,
            total: meta.total,
            expected: meta
                .expected
                .as_deref()
                .map(|e| Digest::parse("expected", e))
                .transpose()?,
            started_at: from_nanos(meta.started_ns),
            updated_at: md.modified().unwrap_or_else(|_| SystemTime::now()),
        })
    }

    /// Removes an ingest. The caller holds the ref's lock.
    pub fn abort(&self, ns: &str, reference: &str) -> Result<()> {
        validate_ref(reference)?;
        let dir = self.ingest_dir(ns, reference);
        if !dir.exists() {
            return Err(Error::NotFound(format!(
                "no ingest with ref {reference:?} in namespace {ns}"
            )));
        }
        fs::remove_dir_all(&dir).map_err(Error::io("remove", &dir))
    }

    /// Commits a writer: verifies size and digest, makes the bytes durable, moves them
    /// into blobs/ and records the metadata; returns only once all of it is on disk.
    pub fn commit(
        &self,
        w: Writer,
        size: u64,
        expected: Option<Digest>,
        labels: BTreeMap<String, String>,
    ) -> Result<Digest> {
        validate_labels(&labels)?;
        let ns = w.namespace.clone();
        let discard = |w: &Writer, msg: String| -> Error {
            let _ = fs::remove_dir_all(&w.dir);
            Error::FailedPrecondition(format!(
                "{msg}; nothing committed, ingest {:?} discarded",
                w.reference
            ))
        };
        let want_size = if size != 0 { size } else { w.total };
        if want_size != 0 && want_size != w.offset {
            return Err(discard(
                &w,
                format!(
                    "size mismatch: expected {want_size} bytes, got {}",
                    w.offset
                ),
            ));
        }
        if let (Some(a), Some(b)) = (&expected, &w.expected) {
            if a != b {
                return Err(discard(
                    &w,
                    format!("expected digest {a} differs from the {b} the writer was opened with"),
                ));
            }
        }
        let mut w = w;
        let actual = w.hasher.finish()?;
        if let Some(e) = expected.as_ref().or(w.expected.as_ref()) {
            if *e != actual {
                return Err(discard(
                    &w,
                    format!("digest mismatch: expected {e}, got {actual}"),
                ));
            }
        }
        if self.info.contains_key(info_key(&ns, &actual))? {
            let _ = fs::remove_dir_all(&w.dir);
            return Err(Error::AlreadyExists(format!(
                "content {actual} already exists"
            )));
        }

        w.file
            .sync_data()
            .map_err(Error::io("fsync", w.dir.join("data")))?;
        let intent_key = format!("commit\0{ns}\0{actual}");
        let intent = Intent::Commit {
            namespace: ns.clone(),
            digest: actual.to_string(),
            labels: labels.clone(),
        };
        self.intents.insert(
            intent_key.as_bytes(),
            serde_json::to_vec(&intent).expect("intent serialises"),
        )?;
        self.flush()?;

        let target = self.blob_path(&actual);
        let data = w.dir.join("data");
        if self.held_anywhere(&actual)? && target.exists() {
            // Another namespace holds the same bytes; keep its file untouched.
            fs::remove_file(&data).map_err(Error::io("remove", &data))?;
        } else {
            fs::rename(&data, &target).map_err(Error::io("rename", &data))?;
            sync_dir(&self.blobs)?;
        }
        let now = SystemTime::now();
        let info = Info {
            digest: actual.clone(),
            size: w.offset,
            created_at: now,
            updated_at: now,
            labels,
        };
        self.record(&ns, &info, Some(&intent_key))?;
        let _ = fs::remove_dir_all(&w.dir);
        Ok(actual)
    }

    fn record(&self, ns: &str, info: &Info, intent_key: Option<&str>) -> Result<()> {
        let value = Self::encode_info(info);
        (&self.info, &self.refs, &self.intents).transaction(
            |(t_info, t_refs, t_intents): &(
                TransactionalTree,
                TransactionalTree,
                TransactionalTree,
            )| {
                t_info.insert(info_key(ns, &info.digest), value.clone())?;
                t_refs.insert(refs_key(&info.digest, ns), &[] as &[u8])?;
                if let Some(k) = intent_key {
                    t_intents.remove(k.as_bytes())?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(())
            },
        )?;
        self.flush()
    }

    fn startup_check(&self, opts: &ContentOptions) -> Result<StartupReport> {
        let mut report = StartupReport::default();

        // 1. Finish interrupted commits and deletes.
        for item in self.intents.iter() {
            let (k, v) = item?;
            let intent: Intent =
                serde_json::from_slice(&v).map_err(|e| Error::Corrupt(format!("intent: {e}")))?;
            match intent {
                Intent::Commit {
                    namespace,
                    digest,
                    labels,
                } => {
                    let d = Digest::parse("intent digest", &digest)?;
                    let path = self.blob_path(&d);
                    if path.exists()
                        && Digest::from_sha256(&hash_file(&path, None)?.0.finalize()) == d
                    {
                        let size = fs::metadata(&path).map_err(Error::io("stat", &path))?.len();
                        let now = SystemTime::now();
                        let info = Info {
                            digest: d,
                            size,
                            created_at: now,
                            updated_at: now,
                            labels,
                        };
                        self.record(&namespace, &info, None)?;
                        report
                            .commits_finished
                            .push(format!("{namespace}/{digest}"));
                    }
                }
                Intent::Delete { digest } => {
                    self.finish_delete(&Digest::parse("intent digest", &digest)?)?
                }
            }
            self.intents.remove(k)?;
        }
        self.flush()?;

        // 2. Partial ingests: keep resumable ones, drop stale and empty shells.
        let now = SystemTime::now();
        for entry in fs::read_dir(&self.ingest).map_err(Error::io("read", &self.ingest))? {
            let dir = entry.map_err(Error::io("read", &self.ingest))?.path();
            let data = dir.join("data");
            let meta = Self::read_ingest_meta(&dir).ok();
            let age = fs::metadata(if data.exists() { &data } else { &dir })
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            let name = meta.as_ref().map_or_else(
                || dir.display().to_string(),
                |m| format!("{}/{}", m.namespace, m.reference),
            );
            if meta.is_none() || !data.exists() || age > opts.ingest_max_age {
                fs::remove_dir_all(&dir).map_err(Error::io("remove", &dir))?;
                report.ingests_removed.push(name);
            } else {
                report.ingests_kept.push(name);
            }
        }

        // 3. Metadata and blobs must agree.
        report.mismatches = self.mismatches(&mut report.blobs)?;
        Ok(report)
    }

    /// Metadata without a blob (or with a blob of the wrong size), and blobs without
    /// metadata. Counts blob files into `blobs`.
    fn mismatches(&self, blobs: &mut usize) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut on_disk = BTreeMap::new();
        for entry in fs::read_dir(&self.blobs).map_err(Error::io("read", &self.blobs))? {
            let entry = entry.map_err(Error::io("read", &self.blobs))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            on_disk.insert(name, len);
        }
        *blobs = on_disk.len();
        let mut seen = std::collections::BTreeSet::new();
        for item in self.info.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).to_string();
            let (ns, ds) = key.split_once('\0').unwrap_or(("?", &key));
            let Ok(d) = Digest::parse("stored digest", ds) else {
                out.push(format!("metadata key {key:?} does not name a digest"));
                continue;
            };
            let info = self.decode_info(d.clone(), &v)?;
            match on_disk.get(d.hex()) {
                None => out.push(format!("{ns}/{d}: metadata without a blob file")),
                Some(len) if *len != info.size => out.push(format!(
                    "{ns}/{d}: metadata says {} bytes, blob file has {len}",
                    info.size
                )),
                Some(_) => {}
            }
            seen.insert(d.hex().to_string());
        }
        for name in on_disk.keys() {
            if !seen.contains(name) {
                out.push(format!(
                    "blob file {} has no metadata",
                    self.blobs.join(name).display()
                ));
            }
        }
        Ok(out)
    }

    /// Re-hashes every blob; reports corrupt ones and metadata/blob mismatches.
    pub fn fsck(&self) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        let mut count = 0;
        report.mismatches = self.mismatches(&mut count)?;
        let mut names: Vec<_> = fs::read_dir(&self.blobs)
            .map_err(Error::io("read", &self.blobs))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
            .collect();
        names.sort();
        for name in names {
            let path = self.blobs.join(&name);
            let claimed = format!("sha256:{name}");
            match hash_file(&path, None) {
                Ok((h, n)) => {
                    report.checked += 1;
                    report.bytes += n;
                    let actual = Digest::from_sha256(&h.finalize());
                    if actual.hex() != name {
                        report.corrupt.push((
                            claimed,
                            actual.to_string(),
                            "bytes do not match the digest".into(),
                        ));
                    }
                }
                Err(e) => report.corrupt.push((claimed, String::new(), e.to_string())),
            }
        }
        Ok(report)
    }
}

/// Chunks queued for a writer's hasher thread, at most (a chunk is one write, at
/// most a 4 MiB ttrpc frame: this bounds what one writer holds to 16 MiB).
const HASH_QUEUE: usize = 4;

/// Hashes a writer's bytes on a thread of its own, so writing and hashing overlap.
/// It first hashes what is already on disk (a resumed ingest), then every chunk the
/// writer hands it, in order.
#[derive(Debug)]
struct Hasher {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<Result<Sha256>>>,
}

impl Hasher {
    fn start(existing: PathBuf, existing_len: u64) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(HASH_QUEUE);
        let thread = std::thread::Builder::new()
            .name("keel-hash".into())
            .spawn(move || {
                let (mut h, n) = hash_file(&existing, Some(existing_len))?;
                if n != existing_len {
                    return Err(Error::Corrupt(format!(
                        "{} shrank while being hashed: {n} of {existing_len} bytes",
                        existing.display()
                    )));
                }
                for chunk in rx {
                    h.update(&chunk);
                }
                Ok(h)
            })
            .map_err(Error::io("spawn hasher for", PathBuf::new()))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn feed(&self, chunk: Vec<u8>) -> Result<()> {
        match &self.tx {
            Some(tx) if tx.send(chunk).is_ok() => Ok(()),
            _ => Err(Error::Corrupt("hasher thread stopped".into())),
        }
    }

    /// Waits for every queued chunk to be hashed; returns the digest.
    fn finish(&mut self) -> Result<Digest> {
        drop(self.tx.take());
        let thread = self
            .thread
            .take()
            .ok_or_else(|| Error::Corrupt("hasher already finished".into()))?;
        let h = thread
            .join()
            .map_err(|_| Error::Corrupt("hasher thread panicked".into()))??;
        Ok(Digest::from_sha256(&h.finalize()))
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An open ingest. Owned by the storage actor while a client streams into it.
#[derive(Debug)]
pub struct Writer {
    namespace: String,
    reference: String,
    dir: PathBuf,
    file: File,
    hasher: Hasher,
    offset: u64,
    writeback_from: u64,
    total: u64,
    expected: Option<Digest>,
    started_at: SystemTime,
    updated_at: SystemTime,
}

impl Writer {
    pub fn status(&self) -> Status {
        Status {
            reference: self.reference.clone(),
            offset: self.offset,
            total: self.total,
            expected: self.expected.clone(),
            started_at: self.started_at,
            updated_at: self.updated_at,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// Appends `data`, which must start at the writer's offset.
    pub fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<()> {
        if offset != self.offset {
            return Err(Error::FailedPrecondition(format!(
                "write at offset {offset}, but ref {:?} has {} bytes; resume from {}",
                self.reference, self.offset, self.offset
            )));
        }
        let end = self.offset + data.len() as u64;
        if self.total != 0 && end > self.total {
            return Err(Error::FailedPrecondition(format!(
                "write of {} bytes at {offset} goes past the expected size {} of ref {:?}",
                data.len(),
                self.total,
                self.reference
            )));
        }
        self.file
            .write_all(&data)
            .map_err(Error::io("write", self.dir.join("data")))?;
        self.hasher.feed(data)?;
        self.offset = end;
        self.updated_at = SystemTime::now();
        if self.offset - self.writeback_from >= WRITEBACK_EVERY {
            self.start_writeback();
        }
        Ok(())
    }

    /// Starts asynchronous writeback of what was written since the last call.
    fn start_writeback(&mut self) {
        let from = i64::try_from(self.writeback_from).unwrap_or(i64::MAX);
        let len = i64::try_from(self.offset - self.writeback_from).unwrap_or(0);
        // SAFETY: sync_file_range only reads the fd, which `self.file` keeps open; it
        // neither reads nor writes our memory. A failure only loses the head start.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                from,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.writeback_from = self.offset;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> ContentStore {
        let db = crate::open_db(dir).unwrap();
        ContentStore::open(dir, db, &ContentOptions::default())
            .unwrap()
            .0
    }

    fn sha(data: &[u8]) -> Digest {
        Digest::from_sha256(&Sha256::digest(data))
    }

    #[test]
    fn write_commit_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut w = s.open_writer("default", "r1", 11, None).unwrap();
        w.write(0, b"hello ".to_vec()).unwrap();
        w.write(6, b"world".to_vec()).unwrap();
        let d = s
            .commit(
                w,
                11,
                Some(sha(b"hello world")),
                BTreeMap::from([("a".into(), "b".into())]),
            )
            .unwrap();
        assert_eq!(d, sha(b"hello world"));
        let (path, info) = s.reader_path("default", &d).unwrap();
        assert_eq!(fs::read(path).unwrap(), b"hello world");
        assert_eq!(info.size, 11);
        assert_eq!(info.labels["a"], "b");
        // Not visible from another namespace.
        assert!(matches!(s.info("other", &d), Err(Error::NotFound(_))));
        // No ingest left behind.
        assert!(s
            .list_statuses("default", &Filter::default())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn resume_after_reopen_rebuilds_hash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(dir.path());
            let mut w = s.open_writer("default", "r1", 0, None).unwrap();
            w.write(0, b"abc".to_vec()).unwrap();
            // dropped without commit: as after a crash
        }
        let s = store(dir.path());
        assert_eq!(s.status("default", "r1").unwrap().offset, 3);
        let mut w = s.open_writer("default", "r1", 0, None).unwrap();
        assert_eq!(w.status().offset, 3);
        assert!(matches!(
            w.write(0, b"abc".to_vec()),
            Err(Error::FailedPrecondition(_))
        ));
        w.write(3, b"def".to_vec()).unwrap();
        assert_eq!(
            s.commit(w, 6, None, BTreeMap::new()).unwrap(),
            sha(b"abcdef")
        );
    }

    #[test]
    fn mismatches_commit_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut w = s.open_writer("default", "r", 0, None).unwrap();
        w.write(0, b"data".to_vec()).unwrap();
        let err = s.commit(w, 5, None, BTreeMap::new()).unwrap_err();
        assert!(
            matches!(&err, Error::FailedPrecondition(m) if m.contains("expected 5") && m.contains("got 4")),
            "{err}"
        );

        let mut w = s.open_writer("default", "r", 0, None).unwrap();
        w.write(0, b"data".to_vec()).unwrap();
        let wrong = sha(b"other");
        let err = s
            .commit(w, 0, Some(wrong.clone()), BTreeMap::new())
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&wrong.to_string()) && msg.contains(&sha(b"data").to_string()),
            "{msg}"
        );
        assert!(s.list("default", &Filter::default()).unwrap().is_empty());
        assert_eq!(
            fs::read_dir(dir.path().join("content/blobs/sha256"))
                .unwrap()
                .count(),
            0
        );

        let mut w = s.open_writer("default", "r", 3, None).unwrap();
        assert!(matches!(
            w.write(0, b"data".to_vec()),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn existing_digest_is_already_exists_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut w = s.open_writer("default", "a", 0, None).unwrap();
        w.write(0, b"x".to_vec()).unwrap();
        let d = s.commit(w, 0, None, BTreeMap::new()).unwrap();
        let before = s.info("default", &d).unwrap();
        let mut w = s.open_writer("default", "b", 0, None).unwrap();
        w.write(0, b"x".to_vec()).unwrap();
        assert!(matches!(
            s.commit(w, 0, None, BTreeMap::new()),
            Err(Error::AlreadyExists(_))
        ));
        assert_eq!(s.info("default", &d).unwrap(), before);
        // The same bytes in a second namespace share the file; deleting one keeps it.
        let mut w = s.open_writer("other", "b", 0, None).unwrap();
        w.write(0, b"x".to_vec()).unwrap();
        s.commit(w, 0, None, BTreeMap::new()).unwrap();
        s.delete("default", &d).unwrap();
        assert!(s.reader_path("other", &d).unwrap().0.exists());
        s.delete("other", &d).unwrap();
        assert!(!dir
            .path()
            .join("content/blobs/sha256")
            .join(d.hex())
            .exists());
    }

    #[test]
    fn labels_filters_and_update_mask() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        for (r, body, app) in [("1", "one", "web"), ("2", "two", "db")] {
            let mut w = s.open_writer("default", r, 0, None).unwrap();
            w.write(0, body.as_bytes().to_vec()).unwrap();
            s.commit(w, 0, None, BTreeMap::from([("app".into(), app.into())]))
                .unwrap();
        }
        let web = s
            .list("default", &Filter::parse("labels.app==web").unwrap())
            .unwrap();
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].digest, sha(b"one"));
        let d = sha(b"two");
        let i = s
            .update_labels(
                "default",
                &d,
                BTreeMap::from([("tier".into(), "x".into())]),
                &["labels.tier".into()],
            )
            .unwrap();
        assert_eq!(i.labels.len(), 2);
        let i = s
            .update_labels("default", &d, BTreeMap::new(), &["labels.app".into()])
            .unwrap();
        assert_eq!(i.labels, BTreeMap::from([("tier".into(), "x".into())]));
        assert!(matches!(
            s.update_labels("default", &d, BTreeMap::new(), &["size".into()]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn startup_finishes_interrupted_commit_and_reports_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let d = sha(b"payload");
        {
            let s = store(dir.path());
            // A crash after rename, before metadata: blob in place plus the intent.
            fs::write(s.blob_path(&d), b"payload").unwrap();
            let intent = Intent::Commit {
                namespace: "default".into(),
                digest: d.to_string(),
                labels: BTreeMap::new(),
            };
            s.intents
                .insert(b"commit\0default\0x", serde_json::to_vec(&intent).unwrap())
                .unwrap();
            s.flush().unwrap();
            // And an orphan file nobody committed.
            fs::write(s.blob_path(&sha(b"orphan")), b"orphan").unwrap();
        }
        let db = crate::open_db(dir.path()).unwrap();
        let (s, report) = ContentStore::open(dir.path(), db, &ContentOptions::default()).unwrap();
        assert_eq!(report.commits_finished.len(), 1);
        assert_eq!(s.info("default", &d).unwrap().size, 7);
        assert_eq!(report.mismatches.len(), 1, "{:?}", report.mismatches);
        assert!(
            s.blob_path(&sha(b"orphan")).exists(),
            "never deletes on mismatch"
        );
    }

    #[test]
    fn startup_finishes_an_interrupted_delete() {
        let dir = tempfile::tempdir().unwrap();
        let d = sha(b"doomed");
        let kept = sha(b"kept");
        {
            let s = store(dir.path());
            for bytes in [&b"doomed"[..], &b"kept"[..]] {
                let mut w = s.open_writer("default", "r", 0, None).unwrap();
                w.write(0, bytes.to_vec()).unwrap();
                s.commit(w, 0, None, BTreeMap::new()).unwrap();
            }
            // A crash after the delete's records and intent were flushed, before
            // the file went: what `delete` leaves between its two flushes.
            let intent = serde_json::to_vec(&Intent::Delete {
                digest: d.to_string(),
            })
            .unwrap();
            s.info.remove(info_key("default", &d)).unwrap();
            s.refs.remove(refs_key(&d, "default")).unwrap();
            s.intents
                .insert(format!("delete\0{d}").as_bytes(), intent)
                .unwrap();
            s.flush().unwrap();
            assert!(s.blob_path(&d).exists());
        }
        let db = crate::open_db(dir.path()).unwrap();
        let (s, report) = ContentStore::open(dir.path(), db, &ContentOptions::default()).unwrap();
        assert!(!s.blob_path(&d).exists(), "the delete was finished");
        assert!(s.info("default", &d).is_err());
        assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
        assert_eq!(s.intents.len(), 0, "the intent is gone");
        assert_eq!(
            s.info("default", &kept).unwrap().size,
            4,
            "others untouched"
        );
    }

    #[test]
    fn fsck_finds_corrupt_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut w = s.open_writer("default", "r", 0, None).unwrap();
        w.write(0, b"good bytes".to_vec()).unwrap();
        let d = s.commit(w, 0, None, BTreeMap::new()).unwrap();
        assert!(s.fsck().unwrap().corrupt.is_empty());
        fs::write(s.blob_path(&d), b"bad bytes!").unwrap();
        let r = s.fsck().unwrap();
        assert_eq!(r.checked, 1);
        assert_eq!(r.corrupt.len(), 1);
        assert_eq!(r.corrupt[0].0, d.to_string());
    }

    #[test]
    fn stale_ingests_are_removed_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(dir.path());
            let mut w = s.open_writer("default", "old", 0, None).unwrap();
            w.write(0, b"x".to_vec()).unwrap();
        }
        let db = crate::open_db(dir.path()).unwrap();
        let opts = ContentOptions {
            ingest_max_age: Duration::ZERO,
        };
        std::thread::sleep(Duration::from_millis(20));
        let (s, report) = ContentStore::open(dir.path(), db, &opts).unwrap();
        assert_eq!(report.ingests_removed, vec!["default/old".to_string()]);
        assert!(matches!(
            s.status("default", "old"),
            Err(Error::NotFound(_))
        ));
    }
}
