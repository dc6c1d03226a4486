//! Checkpoint and restore with CRIU, through the shim (which runs `runc checkpoint`
//! and `runc restore`).
//!
//! Checkpoint: check CRIU first (so a missing or broken CRIU leaves the task running,
//! never paused) → pause → the shim dumps into a work directory → resume (or let the
//! task exit) → the image directory as a tar, the container's spec and the runtime
//! options go into the content store through the storage actor → an OCI image index
//! referencing them, labelled as a collection root. The task is frozen only while
//! CRIU dumps it, not while the blobs are written: keel keeps no writable layer that
//! would have to stay still meanwhile.
//!
//! Restore: the index and every blob it references are verified by digest, the CRIU
//! image is checked and unpacked on disk (`bundle::restore_dir`) and the shim is
//! given its path with Create; the shim restores the process at Start.

use std::collections::BTreeMap;
use std::io::Read;

use keel_protocol::checkpoint::{
    self as layout, Blob, Checkpoint, RootfsMount, MEDIA_TYPE_CONFIG, MEDIA_TYPE_CRIU_TAR,
    MEDIA_TYPE_RUNTIME_OPTIONS, MEDIA_TYPE_RW_LAYER,
};
use keel_storage::{ContentStore, Digest};
use sha2::Digest as _;

use super::rw_layer;
use super::*;
use crate::storage::StorageHandle;
use keel_protocol::containerd::shim::oci::{CheckpointOptions, Options};
use protobuf::Message;

/// Deadline for the shim's CRIU work: a dump, or a restore at Start.
pub(super) const CRIU_RPC_TIMEOUT: Duration = Duration::from_secs(120);
/// The oldest CRIU keel accepts (older ones fail on kernels >= 6.13).
const CRIU_MIN_VERSION: (u32, u32) = (4, 1);

/// What a checkpoint is asked to do.
#[derive(Debug, Clone, Default)]
pub struct CheckpointRequest {
    /// Let the task exit after the dump instead of resuming it.
    pub exit: bool,
    /// Leave the raw CRIU image in this (absolute) directory instead of the store.
    pub image_path: Option<PathBuf>,
    /// What CRIU may dump (established TCP connections, external unix sockets, a
    /// terminal, file locks, namespaces left empty) and where it works, checked by
    /// [`crate::runtime_options::check_checkpoint`]. `exit` and `image_path` are
    /// taken from the fields above.
    pub options: CheckpointOptions,
    /// Also store the task's filesystem changes (the upper directory of its
    /// overlay rootfs) as a layer; only into the content store.
    pub rw: bool,
}

/// Parses the version `criu --version` prints (`Version: 4.1.1`).
fn criu_version(out: &str) -> Option<(u32, u32)> {
    let v = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
}

/// Checks the CRIU runc will use (`criu` on keeld's PATH, which the shims inherit):
/// present, at least 4.1, and passing `criu check`. FailedPrecondition saying what is
/// wrong otherwise.
pub fn criu_ready() -> Result<()> {
    let unavailable = |why: String| {
        Error::FailedPrecondition(format!(
            "checkpoint needs CRIU >= {}.{}: {why}",
            CRIU_MIN_VERSION.0, CRIU_MIN_VERSION.1
        ))
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    let criu = std::env::split_paths(&path)
        .map(|d| d.join("criu"))
        .find(|p| p.is_file())
        .ok_or_else(|| unavailable("no criu on keeld's PATH".into()))?;
    let out = std::process::Command::new(&criu)
        .arg("--version")
        .output()
        .map_err(|e| unavailable(format!("{} --version: {e}", criu.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = criu_version(&text)
        .ok_or_else(|| unavailable(format!("{} printed no version", criu.display())))?;
    if version < CRIU_MIN_VERSION {
        return Err(unavailable(format!(
            "{} is version {}.{}",
            criu.display(),
            version.0,
            version.1
        )));
    }
    let check = std::process::Command::new(&criu)
        .arg("check")
        .output()
        .map_err(|e| unavailable(format!("{} check: {e}", criu.display())))?;
    if !check.status.success() {
        let said = String::from_utf8_lossy(&check.stderr);
        let last = said.lines().rev().find(|l| !l.trim().is_empty());
        return Err(unavailable(format!(
            "`{} check` failed: {}",
            criu.display(),
            last.unwrap_or("no output")
        )));
    }
    Ok(())
}

/// What a checkpoint records for its restore besides the image and the spec.
struct Restorable {
    /// The task's runtime options, as given.
    runtime_options: Option<(String, Vec<u8>)>,
    /// The CRIU options the restore needs again ([`criu_restore`]).
    criu_restore: Vec<String>,
    /// The runtime the task runs under (its own shim path, else its container's).
    runtime: String,
    /// The rootfs it runs on (its own mounts, else its container's).
    rootfs: Vec<MountRecord>,
    /// Its filesystem changes, stored as a layer (digest, size).
    rw: Option<(Digest, u64)>,
}

/// The CRIU options a restore of a dump taken with `o` needs given again: CRIU
/// keeps none of them in the image, and the runc shim passes none at restore.
fn criu_restore(o: &CheckpointOptions) -> Vec<String> {
    [
        (o.open_tcp, "tcp-established"),
        (o.external_unix_sockets, "ext-unix-sk"),
        (o.file_locks, "file-locks"),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| name.to_string())
    .collect()
}

/// Has the shim dump the task into `path` (pausing it around the dump when it runs).
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(super) struct Dump {
    /// Where the image goes.
    pub path: PathBuf,
    /// CRIU's work directory (its logs).
    pub work: PathBuf,
    pub exit: bool,
    /// The rest of what the shim passes on to `runc checkpoint`.
    pub options: CheckpointOptions,
    /// Also pack the filesystem changes, while the task is frozen for its dump.
    pub rw: Option<RwPack>,
}

/// The filesystem changes a checkpoint packs: the upper directory, the layer tar
/// to write, and the bounds a restore will hold it to.
pub(super) struct RwPack {
    pub upper: PathBuf,
    pub layer: PathBuf,
    pub limits: keel_protocol::limits::Limits,
}

impl Handler<Dump> for TaskActor {
    type Result = AtomicResponse<Self, Result<()>>;

    fn handle(&mut self, m: Dump, _: &mut Self::Context) -> Self::Result {
        let shim = self
            .state
            .can_checkpoint(&self.id)
            .and_then(|()| self.live_shim());
        let shim = match shim {
            Ok(s) => s,
            Err(e) => return AtomicResponse::new(Box::pin(async move { Err(e) }.into_actor(self))),
        };
        let before = self.state;
        let pause_here = before == TaskState::Running;
        if pause_here {
            self.state = TaskState::Pausing;
        }
        let id = self.id.clone();
        let options = CheckpointOptions {
            exit: m.exit,
            work_path: m.work.display().to_string(),
            image_path: String::new(),
            ..m.options
        };
        let request = pack(&options).map(|mut any| {
            any.type_url = keel_protocol::types::CHECKPOINT_OPTIONS_TYPE_URL.into();
            api::CheckpointTaskRequest {
                id: id.clone(),
                path: m.path.display().to_string(),
                options: MessageField::some(any),
                ..Default::default()
            }
        });
        AtomicResponse::new(Box::pin(
            async move {
                let request = request?;
                if pause_here {
                    freeze(&shim, id.clone(), true).await?;
                }
                // The filesystem changes are copied while the task is frozen, so
                // that they match the dump; first, so that a copy that fails
                // leaves a task that runs on, even one that was to exit.
                let packed = match m.rw {
                    Some(rw) => {
                        blocking_io(move || rw_layer::pack(&rw.upper, &rw.layer, &rw.limits)).await
                    }
                    None => Ok(()),
                };
                let dumped = match packed {
                    Ok(()) => shim
                        .checkpoint(&request, Some(CRIU_RPC_TIMEOUT))
                        .await
                        .map(drop)
                        .map_err(|e| match e {
                            keel_protocol::Error::Internal(m)
                            | keel_protocol::Error::Transport(m) => {
                                Error::Io(format!("checkpoint of task {id} failed: {m}"))
                            }
                            e => Error::from(e),
                        }),
                    Err(e) => Err(e),
                };
                // A task that is to exit is left to die; any other is thawed again,
                // whether the dump worked or not.
                if pause_here && !(m.exit && dumped.is_ok()) {
                    if let Err(e) = freeze(&shim, id.clone(), false).await {
                        tracing::error!(task_id = %id, error = %e, "resuming after checkpoint failed");
                    }
                }
                dumped
            }
            .into_actor(self)
            .map(move |r, act, _| {
                // An exit that arrived meanwhile wins.
                if act.state != TaskState::Stopped {
                    act.state = before;
                }
                r
            }),
        ))
    }
}

impl TaskHandle {
    async fn dump(
        &self,
        path: PathBuf,
        work: PathBuf,
        exit: bool,
        options: CheckpointOptions,
        rw: Option<RwPack>,
    ) -> Result<()> {
        self.call(Dump {
            path,
            work,
            exit,
            options,
            rw,
        })
        .await?
    }
}

/// Removes a directory tree when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "removing checkpoint work directory failed");
            }
        }
    }
}

/// An I/O error of `what` on `path`, as [`Error::Io`].
pub(super) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::Io(format!("{what} {}: {e}", path.display()))
}

/// Packs the CRIU image directory into a tar file.
fn pack_image(dir: &Path, tar_path: &Path) -> Result<()> {
    let file = std::fs::File::create(tar_path).map_err(io_err("create", tar_path))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    builder
        .append_dir_all(".", dir)
        .map_err(io_err("archive", dir))?;
    builder
        .into_inner()
        .and_then(|w| w.into_inner().map_err(std::io::IntoInnerError::into_error))
        .map_err(io_err("write", tar_path))?;
    Ok(())
}

/// Checks a CRIU image tar without writing anything: every entry a regular file or
/// a directory, under a plain relative path, at most `limits.checkpoint_entries` of
/// them holding at most `limits.checkpoint_bytes`. A CRIU image directory holds only
/// such files; anything else (a link, a device, a path with `..`) is refused, so
/// unpacking can neither escape its directory nor fill the disk. FailedPrecondition
/// naming the first offending entry.
pub fn check_image_tar(tar: impl Read, limits: &keel_protocol::limits::Limits) -> Result<()> {
    for_each_image_entry(tar, limits, |_| Ok(()))
}

/// Walks the entries of a CRIU image tar, checked as [`check_image_tar`] says, and
/// hands each to `f`.
fn for_each_image_entry<R: Read>(
    tar: R,
    limits: &keel_protocol::limits::Limits,
    mut f: impl FnMut(&mut tar::Entry<'_, R>) -> Result<()>,
) -> Result<()> {
    let bad = |why: String| Error::FailedPrecondition(format!("checkpoint image: {why}"));
    let mut archive = tar::Archive::new(tar);
    // Raw: a long name or a PAX header is an entry of its own, refused below,
    // never read into memory (a CRIU image's names are short).
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar: {e}")))?
        .raw(true);
    let mut budget = TarBudget::default();
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a tar: {e}")))?;
        let path = budget.admit(&entry, limits).map_err(bad)?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(bad(format!(
                "entry {:?} is a {kind:?}; only files and directories are accepted",
                path
            )));
        }
        f(&mut entry)?;
    }
    Ok(())
}

/// A tar's entries and bytes so far, against the checkpoint bounds.
#[derive(Default)]
pub(super) struct TarBudget {
    entries: usize,
    bytes: u64,
}

impl TarBudget {
    /// Counts `entry` and returns its path; says why when it passes
    /// `limits.checkpoint_entries` or `limits.checkpoint_bytes` or its path is
    /// not a plain relative one.
    pub(super) fn admit<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        limits: &keel_protocol::limits::Limits,
    ) -> std::result::Result<PathBuf, String> {
        self.count(entry.header().size().unwrap_or(u64::MAX), limits)?;
        let path = entry
            .path()
            .map_err(|e| format!("entry {} has no usable path: {e}", self.entries))?
            .into_owned();
        if !plain_relative(&path) {
            return Err(format!("entry {path:?} is not a plain relative path"));
        }
        Ok(path)
    }

    /// Counts one entry of `bytes`; says which bound it passes, if any.
    pub(super) fn count(
        &mut self,
        bytes: u64,
        limits: &keel_protocol::limits::Limits,
    ) -> std::result::Result<(), String> {
        self.entries += 1;
        if self.entries > limits.checkpoint_entries {
            return Err(format!(
                "more than {} entries (limits.checkpoint_entries)",
                limits.checkpoint_entries
            ));
        }
        self.bytes = self.bytes.saturating_add(bytes);
        if self.bytes > limits.checkpoint_bytes {
            return Err(format!(
                "more than {} bytes (limits.checkpoint_bytes)",
                limits.checkpoint_bytes
            ));
        }
        Ok(())
    }
}

/// Whether `path`, a tar entry's, is relative and stays where it is unpacked:
/// not empty, only plain names (and `.`).
fn plain_relative(path: &Path) -> bool {
    !path.as_os_str().is_empty()
        && path.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

/// Largest `descriptors.json` read from an image.
const MAX_DESCRIPTORS: u64 = 64 << 10;

/// Refuses to restore on `runtime` an image in `dir` that it cannot take back:
/// keel's shim hands its processes their stdio files itself, so CRIU records
/// them as external files (`file[…]` in the image's `descriptors.json`), which
/// only keel's shim gives back; runc gives back only pipes. An image without a
/// `descriptors.json` is left to the shim.
pub(super) fn check_restorable(dir: &Path, runtime: &str) -> Result<()> {
    if crate::runtime_options::is_keel_shim(runtime) {
        return Ok(());
    }
    let path = dir.join("descriptors.json");
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(());
    };
    if meta.len() > MAX_DESCRIPTORS {
        return Err(Error::InvalidArgument(format!(
            "checkpoint: {} is larger than {MAX_DESCRIPTORS} bytes",
            path.display()
        )));
    }
    let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
    let entries: Vec<String> = serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidArgument(format!("checkpoint: {}: {e}", path.display())))?;
    if let Some(e) = entries.iter().find(|e| e.starts_with("file[")) {
        return Err(Error::FailedPrecondition(format!(
            "checkpoint: its process's stdio was dumped as an external file ({e}), as {} dumps it; runtime {runtime} (runc) gives CRIU back only pipes: restore it on {}",
            crate::runtime_options::KEEL_SHIM,
            crate::runtime_options::KEEL_SHIM
        )));
    }
    Ok(())
}

/// Unpacks a CRIU image tar into `dir`, checking it as [`check_image_tar`] says
/// first, and again entry by entry as it unpacks.
pub(super) fn unpack_image(
    tar_path: &Path,
    dir: &Path,
    limits: &keel_protocol::limits::Limits,
) -> Result<()> {
    let open = || {
        std::fs::File::open(tar_path)
            .map(std::io::BufReader::new)
            .map_err(io_err("open", tar_path))
    };
    check_image_tar(open()?, limits)?;
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    for_each_image_entry(open()?, limits, |entry| {
        let unpacked = entry
            .unpack_in(dir)
            .map_err(io_err("unpack the checkpoint into", dir))?;
        if unpacked {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(
                "checkpoint image: an entry would land outside its directory".into(),
            ))
        }
    })
}

/// The sha256 of a file, streamed.
fn file_digest(path: &Path) -> Result<(Digest, u64)> {
    let mut f = std::fs::File::open(path).map_err(io_err("open", path))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((Digest::from_sha256(&hasher.finalize()), size))
}

/// Checks that the blob `digest` of `ns` is stored intact: present, `size` bytes (when
/// given) and hashing to its digest. Returns its path.
fn verified_blob(
    store: &ContentStore,
    ns: &str,
    digest: &str,
    size: Option<u64>,
) -> Result<PathBuf> {
    let d = Digest::parse("checkpoint", digest)?;
    let (path, info) = store.reader_path(ns, &d)?;
    let (actual, actual_size) = file_digest(&path)?;
    if actual != d || size.is_some_and(|s| s != actual_size) || info.size != actual_size {
        return Err(Error::FailedPrecondition(format!(
            "checkpoint: blob {d} does not verify: {actual_size} bytes hashing to {actual}"
        )));
    }
    Ok(path)
}

/// Reads and checks a checkpoint index (at most `max_index` bytes) and every blob it
/// references. Returns how to restore it: the paths of its CRIU image tar and of
/// its filesystem changes (when taken) in the store, and the CRIU options its
/// restore needs again.
pub fn verify_checkpoint(
    store: &ContentStore,
    ns: &str,
    digest: &str,
    max_index: usize,
) -> Result<Restore> {
    let d = Digest::parse("checkpoint", digest)?;
    let size = store.info(ns, &d)?.size;
    if size > max_index as u64 {
        return Err(Error::InvalidArgument(format!(
            "checkpoint: {digest} is {size} bytes, more than a checkpoint index may be ({max_index}, limits.checkpoint_index_bytes)"
        )));
    }
    let index_path = verified_blob(store, ns, digest, None)?;
    let bytes = std::fs::read(&index_path).map_err(io_err("read", &index_path))?;
    let checkpoint = Checkpoint::parse(digest, &bytes)?;
    let (mut image, mut rw) = (None, None);
    for blob in checkpoint.blobs() {
        let path = verified_blob(store, ns, &blob.digest, Some(blob.size))?;
        match blob.media_type.as_str() {
            MEDIA_TYPE_CRIU_TAR => image = Some(path),
            MEDIA_TYPE_RW_LAYER => rw = Some(path),
            _ => {}
        }
    }
    Ok(Restore::Image {
        tar: image.expect("a parsed checkpoint has an image"),
        rw,
        criu: checkpoint.criu_restore,
    })
}

impl Tasks {
    /// Checkpoints a task. Returns the index's digest and size, or `None` when the
    /// image was left in `req.image_path`.
    pub async fn checkpoint(
        &self,
        storage: &StorageHandle,
        ns: &str,
        container: &ContainerRecord,
        req: CheckpointRequest,
    ) -> Result<Option<(Digest, u64)>> {
        let id = &container.id;
        let task = self.get(ns, id)?;
        // Checked here as well as in Dump (which decides, atomically) so that a task
        // that cannot be checkpointed is refused for that, before CRIU is examined.
        let info = task.info().await?;
        info.state.can_checkpoint(id)?;
        if info.terminal && !req.options.terminal {
            return Err(Error::FailedPrecondition(format!(
                "cannot checkpoint task {id}: it has a terminal (allow it with options.terminal, keelctl --terminal)"
            )));
        }
        let rootfs = info
            .rootfs
            .clone()
            .unwrap_or_else(|| container.rootfs.clone());
        let upper = match (req.rw, rw_layer::upper_dir(&rootfs)) {
            (false, _) => None,
            (true, _) if req.image_path.is_some() => {
                return Err(Error::InvalidArgument(
                    "rw: the filesystem changes go into the content store with the checkpoint, not into an image_path".into(),
                ))
            }
            (true, Some(upper)) => Some(upper),
            (true, None) => {
                return Err(Error::FailedPrecondition(format!(
                    "rw: task {id} runs on no overlay rootfs with an upperdir, where its filesystem changes would be"
                )))
            }
        };
        blocking_io(criu_ready).await?;

        let stamp = nanos(SystemTime::now());
        let work = self
            .env
            .state_dir
            .join("checkpoints")
            .join(ns)
            .join(format!("{id}-{stamp}"));
        // CRIU works (and leaves its logs) where the options say, else in scratch.
        let criu_work = match req.options.work_path.as_str() {
            "" => work.join("criu"),
            given => PathBuf::from(given),
        };
        std::fs::create_dir_all(&criu_work).map_err(io_err("create", &criu_work))?;
        let _scratch = Scratch(work.clone());

        if let Some(dir) = req.image_path {
            std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            let empty = std::fs::read_dir(&dir)
                .map_err(io_err("read", &dir))?
                .next()
                .is_none();
            if !empty {
                return Err(Error::InvalidArgument(format!(
                    "image_path {} is not empty",
                    dir.display()
                )));
            }
            task.dump(dir, criu_work, req.exit, req.options, None)
                .await?;
            return Ok(None);
        }

        let image_dir = work.join("image");
        std::fs::create_dir_all(&image_dir).map_err(io_err("create", &image_dir))?;
        let criu_restore = criu_restore(&req.options);
        let (tar_path, rw_path) = (work.join("image.tar"), work.join("rw.tar"));
        let rw = upper.map(|upper| RwPack {
            upper,
            layer: rw_path.clone(),
            limits: self.env.limits.clone(),
        });
        task.dump(image_dir.clone(), criu_work, req.exit, req.options, rw)
            .await?;
        let (dir, tp) = (image_dir.clone(), tar_path.clone());
        blocking_io(move || pack_image(&dir, &tp)).await?;

        // The blobs this checkpoint adds to the store, for the cleanup if it fails
        // (and, through NEW_IMAGE_FILE, after a crash) before the index is stored.
        let mut added = Vec::new();
        let stored = async {
            let image = self
                .store_blob(storage, ns, (id, stamp), "image", &tar_path, &mut added)
                .await?;
            let rw = match req.rw {
                true => Some(
                    self.store_blob(storage, ns, (id, stamp), "rw", &rw_path, &mut added)
                        .await?,
                ),
                false => None,
            };
            let restorable = Restorable {
                runtime_options: info.runtime_options.clone(),
                criu_restore: criu_restore.clone(),
                runtime: info
                    .runtime
                    .clone()
                    .unwrap_or_else(|| container.runtime.clone()),
                rootfs,
                rw,
            };
            self.store_checkpoint(storage, ns, container, restorable, image, stamp)
                .await
        }
        .await;
        if stored.is_err() {
            for digest in added {
                drop_unreferenced(storage, ns, digest).await;
            }
            abort_ingests(storage, ns, id, stamp).await;
        }
        let (digest, size) = stored?;

        let event = ev::TaskCheckpointed {
            container_id: id.clone(),
            checkpoint: digest.to_string(),
            ..Default::default()
        };
        if let Err(e) = self
            .env
            .monitor
            .publish(ns, "/tasks/checkpointed", pack(&event)?)
            .await
        {
            tracing::error!(namespace = %ns, task_id = %id, error = %e, "publishing /tasks/checkpointed failed");
        }
        Ok(Some((digest, size)))
    }

    /// Stores the file `path` of checkpoint `stamp` of task `id` as its blob `what`;
    /// a blob new to the store is added to `added` and to the work directory's
    /// NEW_IMAGE_FILE.
    async fn store_blob(
        &self,
        storage: &StorageHandle,
        ns: &str,
        (id, stamp): (&str, u64),
        what: &str,
        path: &Path,
        added: &mut Vec<Digest>,
    ) -> Result<(Digest, u64)> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(io_err("open", path))?;
        let (digest, size, new) = storage
            .put_new(ns, &ingest_ref(ns, id, stamp, what), file, BTreeMap::new())
            .await?;
        if new {
            added.push(digest.clone());
            let list: Vec<String> = added.iter().map(ToString::to_string).collect();
            let record = path.with_file_name(NEW_IMAGE_FILE);
            let _ = std::fs::write(record, list.join("\n"));
        }
        Ok((digest, size))
    }

    /// Writes the rest of a dumped checkpoint into the content store, its CRIU image
    /// tar (and its filesystem changes, when taken) being stored: the container's spec, the runtime options the task runs
    /// with (as given, when any were), then the index that references them all.
    async fn store_checkpoint(
        &self,
        storage: &StorageHandle,
        ns: &str,
        container: &ContainerRecord,
        restorable: Restorable,
        (image_digest, image_size): (Digest, u64),
        stamp: u64,
    ) -> Result<(Digest, u64)> {
        let Restorable {
            runtime_options: options,
            criu_restore,
            runtime,
            rootfs,
            rw,
        } = restorable;
        let id = &container.id;
        let reference = |what: &str| ingest_ref(ns, id, stamp, what);
        let put_bytes = |what: &'static str, bytes: Vec<u8>| {
            let r = reference(what);
            async move {
                storage
                    .put(ns, &r, std::io::Cursor::new(bytes), BTreeMap::new())
                    .await
            }
        };
        let (config_digest, config_size) =
            put_bytes("config", layout::config_blob(&container.spec)?).await?;
        let options = match options {
            Some((type_url, value)) => {
                // The options a container restored from this checkpoint runs with:
                // not the image directory this task may itself have come from.
                let value = match Options::parse_from_bytes(&value) {
                    Ok(o) if !o.criu_image_path.is_empty() => Options {
                        criu_image_path: String::new(),
                        ..o
                    }
                    .write_to_bytes()
                    .map_err(|e| Error::Io(format!("encode runtime options: {e}")))?,
                    _ => value,
                };
                let any = protobuf::well_known_types::any::Any {
                    type_url,
                    value,
                    ..Default::default()
                };
                let bytes = protobuf::Message::write_to_bytes(&any)
                    .map_err(|e| Error::Io(format!("encode runtime options: {e}")))?;
                Some(put_bytes("options", bytes).await?)
            }
            None => None,
        };

        let blob = |media: &str, d: Digest, size: u64| Blob {
            media_type: media.to_string(),
            digest: d.to_string(),
            size,
        };
        let checkpoint = Checkpoint {
            image: blob(MEDIA_TYPE_CRIU_TAR, image_digest, image_size),
            config: blob(MEDIA_TYPE_CONFIG, config_digest, config_size),
            options: options.map(|(d, size)| blob(MEDIA_TYPE_RUNTIME_OPTIONS, d, size)),
            rw: rw.map(|(d, size)| blob(MEDIA_TYPE_RW_LAYER, d, size)),
            runtime,
            container: id.clone(),
            rootfs: rootfs
                .into_iter()
                .map(|m| RootfsMount {
                    kind: m.kind,
                    source: m.source,
                    options: m.options,
                })
                .collect(),
            created: keel_protocol::types::rfc3339(SystemTime::now()),
            criu_restore,
        };
        let index = checkpoint.to_index()?;
        let (digest, size) = storage
            .put(
                ns,
                &reference("index"),
                std::io::Cursor::new(index),
                checkpoint.index_labels(),
            )
            .await?;

        Ok((digest, size))
    }

    /// Cleans up after checkpoints that a crash interrupted (their work directories
    /// are still there): aborts their content ingests, then removes the work
    /// directories. None can be under way before keeld serves.
    pub async fn clean_interrupted_checkpoints(&self, storage: &StorageHandle) {
        let root = self.env.state_dir.join("checkpoints");
        let Ok(namespaces) = std::fs::read_dir(&root) else {
            return;
        };
        for ns in namespaces.flatten() {
            let ns_name = ns.file_name().to_string_lossy().to_string();
            for work in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let name = work.file_name().to_string_lossy().to_string();
                if let Some((id, stamp)) = work_dir_task(&name) {
                    tracing::warn!(namespace = %ns_name, task_id = id, "a checkpoint was interrupted; aborting its ingests");
                    abort_ingests(storage, &ns_name, id, stamp).await;
                    for blob in new_blobs(&work.path()) {
                        drop_unreferenced(storage, &ns_name, blob).await;
                    }
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&root) {
            tracing::warn!(path = %root.display(), error = %e, "removing checkpoint work directories failed");
        }
    }
}

/// The content ref a checkpoint writes one of its blobs under (`image`, `rw`,
/// `config`, `options`, `index`); `stamp` also names its work directory, `<id>-<stamp>`.
fn ingest_ref(ns: &str, id: &str, stamp: u64, what: &str) -> String {
    format!("checkpoint-{ns}-{id}-{stamp}-{what}")
}

/// The task id and stamp of a checkpoint work directory's name.
fn work_dir_task(name: &str) -> Option<(&str, u64)> {
    let (id, stamp) = name.rsplit_once('-')?;
    Some((id, stamp.parse().ok()?))
}

/// Names, in a checkpoint's work directory, the blobs (CRIU image, filesystem
/// changes) the checkpoint added to the content store, one per line, until the
/// index that references them is stored.
const NEW_IMAGE_FILE: &str = "new-image";

/// The blobs an interrupted checkpoint added, from its work directory.
fn new_blobs(work: &Path) -> Vec<Digest> {
    std::fs::read_to_string(work.join(NEW_IMAGE_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Digest::parse("new blob", l.trim()).ok())
        .collect()
}

/// Deletes blob `digest` of a checkpoint that failed, unless a stored index
/// references it (the same image stored by another checkpoint).
async fn drop_unreferenced(storage: &StorageHandle, ns: &str, digest: Digest) {
    let (store, ns2, d) = (storage.store().clone(), ns.to_string(), digest.to_string());
    let referenced = blocking_io(move || {
        let all = keel_protocol::filters::Filter::default();
        Ok(store.list(&ns2, &all)?.iter().any(|info| {
            info.labels
                .iter()
                .any(|(k, v)| k.starts_with(layout::LABEL_GC_REF_CONTENT) && *v == d)
        }))
    })
    .await;
    match referenced {
        Ok(true) => {}
        Ok(false) => match storage.delete(ns, digest.clone()).await {
            Ok(()) | Err(Error::Storage(keel_storage::Error::NotFound(_))) => {
                tracing::info!(namespace = ns, %digest, "removed the image blob of a failed checkpoint");
            }
            Err(e) => {
                tracing::warn!(namespace = ns, %digest, error = %e, "removing the image blob of a failed checkpoint failed")
            }
        },
        Err(e) => {
            tracing::warn!(namespace = ns, %digest, error = %e, "image blob of a failed checkpoint left in place")
        }
    }
}

/// Aborts whatever a checkpoint left half written in the content store.
async fn abort_ingests(storage: &StorageHandle, ns: &str, id: &str, stamp: u64) {
    for what in ["image", "rw", "config", "options", "index"] {
        let reference = ingest_ref(ns, id, stamp, what);
        match storage.abort(ns, &reference).await {
            Ok(()) => tracing::info!(namespace = ns, reference, "aborted a checkpoint's ingest"),
            Err(Error::Storage(keel_storage::Error::NotFound(_))) => {}
            Err(e) => {
                tracing::warn!(namespace = ns, reference, error = %e, "aborting a checkpoint's ingest failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_protocol::limits::Limits;

    #[test]
    fn work_directories_name_their_task_and_stamp() {
        assert_eq!(
            work_dir_task("web-1-1795396683"),
            Some(("web-1", 1_795_396_683))
        );
        assert_eq!(work_dir_task("x-y"), None);
        assert_eq!(work_dir_task("plain"), None);
        assert_eq!(
            ingest_ref("ns", "web-1", 5, "image"),
            "checkpoint-ns-web-1-5-image"
        );
    }

    #[test]
    fn criu_versions_are_read_from_its_output() {
        assert_eq!(criu_version("Version: 4.1.1\n"), Some((4, 1)));
        assert_eq!(criu_version("Version: 3.17\nGitID: x\n"), Some((3, 17)));
        assert_eq!(criu_version("Version: 4\n"), Some((4, 0)));
        assert_eq!(criu_version("criu: bad option\n"), None);
        assert!(criu_version("Version: 3.17").unwrap() < CRIU_MIN_VERSION);
        assert!(criu_version("Version: 4.1").unwrap() >= CRIU_MIN_VERSION);
    }

    #[test]
    fn an_image_round_trips_through_its_tar() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::create_dir_all(image.join("sub")).unwrap();
        std::fs::write(image.join("core-1.img"), b"core").unwrap();
        std::fs::write(image.join("sub/descriptors.json"), b"[]").unwrap();
        let tar = dir.path().join("image.tar");
        pack_image(&image, &tar).unwrap();
        let out = dir.path().join("out");
        unpack_image(&tar, &out, &Limits::default()).unwrap();
        assert_eq!(std::fs::read(out.join("core-1.img")).unwrap(), b"core");
        assert_eq!(
            std::fs::read(out.join("sub/descriptors.json")).unwrap(),
            b"[]"
        );
        // The same image over a bound is refused before anything is written.
        let small = Limits {
            checkpoint_bytes: 5,
            ..Limits::default()
        };
        let out2 = dir.path().join("out2");
        let e = unpack_image(&tar, &out2, &small).unwrap_err();
        assert!(e.to_string().contains("limits.checkpoint_bytes"), "{e}");
        assert!(!out2.exists());
        let few = Limits {
            checkpoint_entries: 2,
            ..Limits::default()
        };
        let e = unpack_image(&tar, &out2, &few).unwrap_err();
        assert!(e.to_string().contains("limits.checkpoint_entries"), "{e}");
    }

    /// A tar holding one entry of `kind` at `path`.
    fn tar_with(path: &str, kind: tar::EntryType, target: Option<&str>) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        if let Some(t) = target {
            h.set_link_name(t).unwrap();
        }
        // set_path refuses `..`; a hostile tar is written by hand.
        let name = h.as_old_mut().name.as_mut();
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn only_plain_files_and_directories_unpack() {
        let l = Limits::default();
        let cases = [
            tar_with("link", tar::EntryType::Symlink, Some("/etc/passwd")),
            tar_with("hard", tar::EntryType::Link, Some("/etc/shadow")),
            tar_with("dev", tar::EntryType::Char, None),
            tar_with("fifo", tar::EntryType::Fifo, None),
            tar_with("../escape", tar::EntryType::Regular, None),
            tar_with("/abs", tar::EntryType::Regular, None),
            b"not a tar at all, but long enough to be read as one header block or more".repeat(8),
        ];
        for t in cases {
            let e = check_image_tar(&t[..], &l).unwrap_err();
            assert!(
                matches!(&e, Error::FailedPrecondition(m) if m.starts_with("checkpoint image:")),
                "{e:?}"
            );
        }
        check_image_tar(
            &tar_with("core-1.img", tar::EntryType::Regular, None)[..],
            &l,
        )
        .unwrap();
    }

    #[actix_rt::test]
    async fn a_failed_checkpoints_new_image_goes_unless_an_index_references_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = keel_storage::open_db(dir.path()).unwrap();
        let (store, _) =
            ContentStore::open(dir.path(), db, &keel_storage::ContentOptions::default()).unwrap();
        let storage = StorageHandle::start(store, tokio::sync::mpsc::unbounded_channel().0);
        let put = |r: &'static str, bytes: &'static [u8], labels| {
            let storage = storage.clone();
            async move { storage.put_new("ns", r, bytes, labels).await.unwrap() }
        };
        let (kept, _, new) = put("a", b"image of a stored checkpoint", BTreeMap::new()).await;
        assert!(new);
        let labels = BTreeMap::from([(
            "containerd.io/gc.ref.content.m.0".to_string(),
            kept.to_string(),
        )]);
        put("index", b"its index", labels).await;
        let (_, _, again) = put("b", b"image of a stored checkpoint", BTreeMap::new()).await;
        assert!(!again, "the same content is not new");
        let (orphan, _, _) = put("c", b"image of a failed checkpoint", BTreeMap::new()).await;

        // As a crash leaves it: the work directory names the new blobs.
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join(NEW_IMAGE_FILE), format!("{orphan}\n{kept}")).unwrap();
        assert_eq!(new_blobs(&work), vec![orphan.clone(), kept.clone()]);
        drop_unreferenced(&storage, "ns", orphan.clone()).await;
        drop_unreferenced(&storage, "ns", kept.clone()).await;

        let store = storage.store();
        assert!(
            store.info("ns", &orphan).is_err(),
            "the orphan image is gone"
        );
        assert!(store.info("ns", &kept).is_ok(), "a referenced image stays");
        assert_eq!(new_blobs(dir.path()), Vec::<Digest>::new());
    }

    #[test]
    fn a_blob_that_does_not_hash_to_its_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = keel_storage::open_db(dir.path()).unwrap();
        let (store, _) =
            ContentStore::open(dir.path(), db, &keel_storage::ContentOptions::default()).unwrap();
        let e = verify_checkpoint(&store, "default", "sha256:nothex", 1 << 20).unwrap_err();
        assert!(matches!(e, Error::Storage(_)), "{e}");
        let missing = format!("sha256:{}", "0".repeat(64));
        let e = verify_checkpoint(&store, "default", &missing, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
    }
}
