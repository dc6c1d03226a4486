//! One actor per task, supervising its containerd-shim-runc-v2.
//!
//! [`Tasks::create`] writes the bundle, launches the shim (`start`), records the shim's
//! address durably *before* the task is reported created, connects, sends Create and
//! then starts a [`TaskActor`] on the task arbiter. The actor owns the task's shim
//! connection and its state machine; every request goes through its mailbox.
//! Requests that change state (start, delete, an exit) are atomic: the actor handles
//! nothing else until they finish, so an exit is never published before the start.
//!
//! The actor watches its shim with a pending `Wait` (sent with no timeout: the Go shim
//! turns a timeout into a deadline). Wait returning is the exit; Wait failing while
//! the shim process is gone is the shim's death, handled as containerd does: run the
//! shim's `delete` subcommand and report exit 137.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use keel_protocol::containerd::api;
use keel_protocol::containerd::events::task as ev;
use keel_protocol::shim::ShimClient;
use keel_protocol::types::{pack, system_time, timestamp};
use keel_storage::meta::{
    from_nanos, nanos, ContainerRecord, ExecRecord, ExitRecord, MountRecord, TaskRecord,
};
use keel_storage::Meta;
use protobuf::MessageField;
use tokio::sync::oneshot;

use crate::monitor::MonitorHandle;
use crate::restore::{self, Found};
use crate::shim::{resolve_runtime, LogFifo, PidFd, ShimCommand};
use crate::state::TaskState;
use crate::{Error, Result};

mod checkpoint;
mod exec;
pub use checkpoint::{check_image_tar, criu_ready, verify_checkpoint, CheckpointRequest};
pub use exec::ExecSpec;

/// Deadline for one shim RPC other than Wait.
const SHIM_RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait before dialling a live shim again after its connection broke.
const REDIAL_PAUSE: Duration = Duration::from_millis(100);
/// How long a forced delete waits for the killed task to exit.
const FORCE_KILL_WAIT: Duration = Duration::from_secs(10);
/// Requests one task may have waiting before more are refused.
const TASK_REQUESTS_IN_FLIGHT: usize = 64;
/// containerd's default runtime.
const DEFAULT_RUNTIME: &str = "io.containerd.runc.v2";
/// Shims probed at once while restoring.
const PARALLEL_PROBES: usize = 16;
/// Longest pause between probes of a shim that does not answer.
const MAX_PROBE_BACKOFF: Duration = Duration::from_secs(10);
/// How often every task's shim is checked for a death nobody reported.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// What every task needs from keeld.
#[derive(Debug)]
pub struct TaskEnv {
    pub meta: Meta,
    /// Publishes the task's events and records its exits.
    pub monitor: MonitorHandle,
    /// keeld's state directory; bundles live in `<state>/tasks/<ns>/<id>`.
    pub state_dir: PathBuf,
    /// keeld's socket: the shims' `-address` and `TTRPC_ADDRESS`.
    pub keel_socket: PathBuf,
    /// A directory on disk (under keeld's root, not the state tmpfs) for large
    /// scratch work: the CRIU image a task is restored from waits here for Start.
    pub scratch_dir: PathBuf,
    /// Bounds on what clients send (checkpoint images among them).
    pub limits: keel_protocol::limits::Limits,
}

impl TaskEnv {
    /// Where the CRIU image of a task restored from a checkpoint is unpacked, until
    /// its Start has restored it.
    fn restore_dir(&self, ns: &str, id: &str) -> PathBuf {
        self.scratch_dir.join("restore").join(ns).join(id)
    }

    fn bundle(&self, ns: &str, id: &str) -> PathBuf {
        self.state_dir.join("tasks").join(ns).join(id)
    }

    fn log_file(&self, ns: &str, id: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(ns)
            .join(format!("{id}.log"))
    }

    fn runc_root(&self) -> PathBuf {
        self.state_dir.join("runc")
    }
}

/// A Create request, validated by the service.
#[derive(Debug, Clone)]
pub struct CreateTask {
    pub namespace: String,
    pub container: ContainerRecord,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    /// Keep stdout and stderr in keel's per-task log file.
    pub log_to_file: bool,
    /// Restore from this CRIU image tar (verified by [`verify_checkpoint`]).
    pub checkpoint: Option<PathBuf>,
}

/// A task as the API shows it.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub id: String,
    pub pid: u32,
    pub state: TaskState,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    pub exit: Option<ExitRecord>,
}

fn rpc_timeout() -> Option<Duration> {
    Some(SHIM_RPC_TIMEOUT)
}

/// Whether a process exists and is not a zombie. The shim is not keeld's child
/// (`start` double-forks), so waitpid is not available.
fn process_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// Adapts the container's spec to its bundle: rootfs at `<bundle>/rootfs` (where the
/// shim mounts it), an absolute cgroups path `/keel/<ns>/<id>`, and a terminal
/// exactly when the task has one.
fn bundle_spec(spec: &[u8], ns: &str, id: &str, terminal: bool) -> Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(spec)
        .map_err(|e| Error::InvalidArgument(format!("spec is not valid JSON: {e}")))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::InvalidArgument("spec must be a JSON object".into()))?;
    let root = obj.entry("root").or_insert_with(|| serde_json::json!({}));
    root["path"] = serde_json::json!("rootfs");
    let linux = obj.entry("linux").or_insert_with(|| serde_json::json!({}));
    linux["cgroupsPath"] = serde_json::json!(format!("/keel/{ns}/{id}"));
    if let Some(p) = obj.get_mut("process").and_then(|p| p.as_object_mut()) {
        p.insert("terminal".into(), serde_json::json!(terminal));
    }
    Ok(serde_json::to_vec_pretty(&v).expect("json serialises"))
}

fn mounts(rootfs: &[MountRecord]) -> Vec<api::Mount> {
    rootfs
        .iter()
        .map(|m| api::Mount {
            type_: m.kind.clone(),
            source: m.source.clone(),
            target: m.target.clone(),
            options: m.options.clone(),
            ..Default::default()
        })
        .collect()
}

/// Removes a bundle without ever following into a still-mounted rootfs: files are
/// unlinked one by one and `rootfs` is only `rmdir`ed, which fails if it is a mount
/// point or not empty.
pub(crate) fn remove_bundle(bundle: &Path) -> Result<()> {
    let rootfs = bundle.join("rootfs");
    if rootfs.exists() {
        let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
        std::fs::remove_dir(&rootfs)
            .map_err(|e| Error::Io(format!("remove {}: {e}", rootfs.display())))?;
    }
    let entries = match std::fs::read_dir(bundle) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::Io(format!("read {}: {e}", bundle.display()))),
    };
    for entry in entries.flatten() {
        let p = entry.path();
        let r = if entry.file_name() == checkpoint::CHECKPOINT_DIR || entry.file_name() == "work" {
            // The unpacked CRIU image and the shim's work directory (CRIU's restore
            // log): plain files, never a mount.
            std::fs::remove_dir_all(&p)
        } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| Error::Io(format!("remove {}: {e}", p.display())))?;
    }
    std::fs::remove_dir(bundle).map_err(|e| Error::Io(format!("remove {}: {e}", bundle.display())))
}

/// Removes a task's cgroup (`/keel/<ns>/<id>`), if runc left it, from the unified
/// hierarchy or from every v1 controller; with `parent`, also the namespace's
/// `/keel/<ns>` once it is empty. Only [`CgroupParents::remove`] passes `parent`: runc
/// creates the parent of a new task's cgroup, which must not vanish under it.
pub(crate) fn remove_cgroups(ns: &str, id: &str, parent: bool) {
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root.to_path_buf()]
    } else {
        match std::fs::read_dir(root) {
            Ok(entries) => entries.flatten().map(|c| c.path()).collect(),
            Err(_) => return,
        }
    };
    for h in hierarchies {
        let base = h.join("keel").join(ns);
        let _ = std::fs::remove_dir(base.join(id));
        if parent {
            let _ = std::fs::remove_dir(&base);
        }
    }
}

/// Keeps `/keel/<ns>` from being removed while a shim's Create (where runc makes the
/// task's cgroup under it) is under way: creates hold it shared, removal exclusive.
#[derive(Debug, Clone, Default)]
struct CgroupParents(Arc<tokio::sync::RwLock<()>>);

impl CgroupParents {
    /// Removes a task's cgroup and, once empty, its namespace's parent.
    async fn remove(&self, ns: &str, id: &str) {
        let _exclusive = self.0.write().await;
        remove_cgroups(ns, id, true);
    }
}

/// Runs blocking work (files, hashing, child processes) off the async threads.
async fn blocking_io<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io(format!("blocking task: {e}")))?
}

/// [`blocking_io`] for store work.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> keel_storage::Result<T> + Send + 'static,
) -> Result<T> {
    blocking_io(move || f().map_err(Error::from)).await
}

/// [`blocking`] store work that no event follows, flushed before it returns.
async fn durably(
    meta: &Meta,
    f: impl FnOnce(&Meta) -> keel_storage::Result<()> + Send + 'static,
) -> Result<()> {
    let meta = meta.clone();
    blocking(move || f(&meta).and_then(|()| meta.flush())).await
}

/// The registry of live task actors, and the way to create one.
#[derive(Clone)]
pub struct Tasks {
    env: Arc<TaskEnv>,
    arbiter: ArbiterHandle,
    live: Arc<Mutex<HashMap<(String, String), TaskHandle>>>,
    /// Ids held by a create under way (or a container delete): taken under the
    /// `live` lock, so an id is never both reserved twice or reserved and live.
    reserved: Arc<Mutex<std::collections::HashSet<TaskKey>>>,
    /// Bounds how many shims are probed at once during a restore.
    probes: Arc<tokio::sync::Semaphore>,
    cgroups: CgroupParents,
    /// Orphans (found at restore) still being cleaned up, by namespace and id: a
    /// create of the same id waits for its cleanup, which would otherwise take the
    /// new task's shim, container and bundle for the orphan's.
    orphans: Arc<Mutex<HashMap<TaskKey, tokio::sync::watch::Receiver<bool>>>>,
}

/// A task's namespace and id.
type TaskKey = (String, String);

/// A task id held by [`Tasks::reserve`]; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    reserved: Arc<Mutex<std::collections::HashSet<TaskKey>>>,
    key: TaskKey,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").field("env", &self.env).finish()
    }
}

impl Tasks {
    /// `arbiter` is where task actors run; ttrpc handlers are not on an actix arbiter.
    pub fn new(env: TaskEnv, arbiter: ArbiterHandle) -> Self {
        Self {
            env: Arc::new(env),
            arbiter,
            live: Arc::default(),
            reserved: Arc::default(),
            probes: Arc::new(tokio::sync::Semaphore::new(PARALLEL_PROBES)),
            cgroups: CgroupParents::default(),
            orphans: Arc::default(),
        }
    }

    pub fn env(&self) -> &TaskEnv {
        &self.env
    }

    pub fn get(&self, ns: &str, id: &str) -> Result<TaskHandle> {
        self.live
            .lock()
            .expect("task registry")
            .get(&(ns.to_string(), id.to_string()))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("task {id} not found in namespace {ns}")))
    }

    pub fn list(&self, ns: &str) -> Vec<TaskHandle> {
        let live = self.live.lock().expect("task registry");
        let mut v: Vec<_> = live
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|(_, h)| h.clone())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Holds task id `id` of `ns` until the reservation is dropped: AlreadyExists
    /// while the task exists or another reservation holds it. A create takes one
    /// before any side effect, so of two concurrent creates of an id one gets
    /// AlreadyExists and touches nothing.
    pub fn reserve(&self, ns: &str, id: &str) -> Result<Reservation> {
        let key = (ns.to_string(), id.to_string());
        let live = self.live.lock().expect("task registry");
        let mut reserved = self.reserved.lock().expect("task reservations");
        if live.contains_key(&key) || !reserved.insert(key.clone()) {
            return Err(Error::AlreadyExists(format!(
                "task {id} already exists in namespace {ns}"
            )));
        }
        Ok(Reservation {
            reserved: self.reserved.clone(),
            key,
        })
    }

    fn forget(&self, ns: &str, id: &str) {
        self.live
            .lock()
            .expect("task registry")
            .remove(&(ns.to_string(), id.to_string()));
    }

    /// Restores after a restart: every task record becomes a task actor at once,
    /// `unknown` (or `stopped`, when its exit was recorded) until its shim answers a
    /// probe, which happens in the background. Bundles with no task record (a crash
    /// during create) are cleaned up, and the periodic reconciler starts. Returns how
    /// many tasks were restored.
    pub async fn restore_all(&self, logged: &crate::monitor::LoggedLifecycle) -> Result<usize> {
        let meta = self.env.meta.clone();
        let found = blocking(move || {
            let mut v = Vec::new();
            for ns in meta.namespaces()? {
                for t in meta.tasks(&ns)? {
                    let exit = meta.exit(&ns, &t.id, "")?;
                    let runtime = meta.container(&ns, &t.id)?.map(|c| c.runtime);
                    let mut execs = HashMap::new();
                    for e in meta.execs(&ns, &t.id)? {
                        let exited = meta.exit(&ns, &t.id, &e.exec_id)?;
                        execs.insert(e.exec_id.clone(), exec::ExecProcess::restored(e, exited));
                    }
                    v.push((ns.clone(), t, exit, runtime, execs));
                }
            }
            Ok(v)
        })
        .await?;
        let restored = found.len();
        for (ns, record, exit, runtime, execs) in found {
            let id = record.id.clone();
            let unannounced = logged.missing(&ns, &id, record.created_ns);
            // Known once the shim answers the probe.
            let shim_pid = Arc::new(AtomicU32::new(0));
            let cmd = self.shim_command(&ns, &id, runtime.as_deref());
            // The shim logs into the bundle's FIFO: drain it again at once.
            let log = if cmd.bundle.exists() {
                LogFifo::open(&cmd.bundle, &ns, &id)
                    .map_err(|e| tracing::warn!(task_id = %id, error = %e, "log FIFO not reopened"))
                    .ok()
            } else {
                None
            };
            let actor = TaskActor {
                ns: ns.clone(),
                id: id.clone(),
                state: if exit.is_some() {
                    TaskState::Stopped
                } else {
                    TaskState::Unknown
                },
                shim: None,
                shim_alive: true,
                deleting: false,
                cmd,
                record,
                env: self.env.clone(),
                tasks: self.clone(),
                exit,
                waiters: Vec::new(),
                execs,
                _log: log,
                probe_backoff: Duration::ZERO,
                shim_pid: shim_pid.clone(),
                unannounced,
            };
            let addr = TaskActor::start_in_arbiter(&self.arbiter, |_| actor);
            self.live
                .lock()
                .expect("task registry")
                .insert((ns, id.clone()), TaskHandle::new(id, addr, shim_pid));
        }

        // Orphans: bundles and shims of this keeld with no task record.
        let mut candidates: std::collections::BTreeSet<(String, String)> =
            restore::bundles(&self.env.state_dir).into_iter().collect();
        candidates.extend(
            restore::shim_processes(&self.env.keel_socket)
                .into_iter()
                .map(|p| (p.namespace, p.id)),
        );
        for (ns, id) in candidates {
            let known = self
                .live
                .lock()
                .expect("task registry")
                .contains_key(&(ns.clone(), id.clone()));
            let valid = keel_protocol::identifiers::validate("namespace", &ns).is_ok()
                && keel_protocol::identifiers::validate("id", &id).is_ok();
            if known || !valid {
                continue;
            }
            tracing::warn!(namespace = %ns, task_id = %id, "bundle or shim without a task record (keeld stopped during create); cleaning up");
            let cmd = self.shim_command(&ns, &id, None);
            let (done, cleaning) = tokio::sync::watch::channel(false);
            let key = (ns, id);
            self.orphans
                .lock()
                .expect("orphan registry")
                .insert(key.clone(), cleaning);
            let orphans = self.orphans.clone();
            tokio::spawn(async move {
                restore::cleanup_orphan(&cmd).await;
                orphans.lock().expect("orphan registry").remove(&key);
                let _ = done.send(true);
            });
        }

        // CRIU images unpacked for a restore whose task is gone.
        for (ns, id) in restore::task_dirs(&self.env.scratch_dir.join("restore")) {
            if self.get(&ns, &id).is_err() {
                let dir = self.env.restore_dir(&ns, &id);
                tracing::info!(namespace = %ns, task_id = %id, "removing the unpacked checkpoint of a task that is gone");
                let _ = std::fs::remove_dir_all(dir);
            }
        }

        let tasks = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RECONCILE_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                let all: Vec<TaskHandle> = tasks
                    .live
                    .lock()
                    .expect("task registry")
                    .values()
                    .cloned()
                    .collect();
                for h in all {
                    h.addr.do_send(Check);
                }
            }
        });
        Ok(restored)
    }

    /// The shim command for a task, with its container's runtime when known.
    fn shim_command(&self, ns: &str, id: &str, runtime: Option<&str>) -> ShimCommand {
        let binary = resolve_runtime(runtime.unwrap_or(DEFAULT_RUNTIME))
            .or_else(|_| resolve_runtime(DEFAULT_RUNTIME))
            .unwrap_or_else(|_| PathBuf::from("containerd-shim-runc-v2"));
        ShimCommand {
            binary,
            namespace: ns.to_string(),
            id: id.to_string(),
            keel_socket: self.env.keel_socket.clone(),
            bundle: self.env.bundle(ns, id),
        }
    }

    /// The runtime options keel gives the shim with Create (`containerd.runc.v1.Options`).
    fn runc_options(&self) -> Result<protobuf::well_known_types::any::Any> {
        let options = keel_protocol::containerd::shim::oci::Options {
            root: self.env.runc_root().display().to_string(),
            ..Default::default()
        };
        let mut any = pack(&options)?;
        any.type_url = "containerd.runc.v1.Options".into();
        Ok(any)
    }

    /// Creates the task: bundle, shim, Create. On failure nothing is left behind.
    /// `reservation` holds the task's id (taken before the container was read).
    pub async fn create(&self, reservation: Reservation, req: CreateTask) -> Result<TaskHandle> {
        let ns = req.namespace.clone();
        let id = req.container.id.clone();
        let key = (ns.clone(), id.clone());
        if reservation.key != key {
            return Err(Error::InvalidArgument(format!(
                "task {id}: the reservation is for {:?}",
                reservation.key
            )));
        }
        let meta = self.env.meta.clone();
        let (n2, i2) = (ns.clone(), id.clone());
        if blocking(move || meta.task(&n2, &i2)).await?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "task {id} already exists in namespace {ns}"
            )));
        }
        // An unknown runtime is the caller's error.
        resolve_runtime(&req.container.runtime)?;
        let cleaning = self
            .orphans
            .lock()
            .expect("orphan registry")
            .get(&key)
            .cloned();
        if let Some(mut cleaning) = cleaning {
            tracing::info!(namespace = %ns, task_id = %id, "waiting for the cleanup of an orphan of the same id");
            let _ = cleaning.wait_for(|done| *done).await;
        }
        let cmd = self.shim_command(&ns, &id, Some(&req.container.runtime));
        let bundle = cmd.bundle.clone();
        match self.create_inner(&req, &cmd).await {
            Ok(handle) => {
                self.live
                    .lock()
                    .expect("task registry")
                    .insert(key, handle.clone());
                drop(reservation);
                Ok(handle)
            }
            Err((e, shim)) => {
                tracing::warn!(namespace = %ns, task_id = %id, error = %e, "task create failed; cleaning up");
                // The record goes first, so that a crash during the cleanup leaves an
                // orphan for the next start to clean up, not a task that never ran.
                let (n2, i2) = (ns.clone(), id.clone());
                let _ = durably(&self.env.meta, move |m| m.delete_task(&n2, &i2)).await;
                if let Some(shim) = shim {
                    let _ = shim
                        .delete(
                            &api::DeleteRequest {
                                id: id.clone(),
                                ..Default::default()
                            },
                            rpc_timeout(),
                        )
                        .await;
                    let _ = shim
                        .shutdown(
                            &api::ShutdownRequest {
                                id: id.clone(),
                                ..Default::default()
                            },
                            rpc_timeout(),
                        )
                        .await;
                }
                let _ = remove_bundle(&bundle);
                let _ = std::fs::remove_dir_all(self.env.restore_dir(&ns, &id));
                self.cgroups.remove(&ns, &id).await;
                Err(e)
            }
        }
    }

    async fn create_inner(
        &self,
        req: &CreateTask,
        cmd: &ShimCommand,
    ) -> Result<TaskHandle, (Error, Option<ShimClient>)> {
        let ns = &req.namespace;
        let id = &req.container.id;
        let bundle = &cmd.bundle;
        let fail = |e: Error| (e, None);
        if bundle.exists() {
            // A leftover from a crash during create; nothing references it.
            remove_bundle(bundle).map_err(fail)?;
        }
        std::fs::create_dir_all(bundle.join("rootfs"))
            .map_err(|e| fail(Error::Io(format!("create bundle: {e}"))))?;
        let spec = bundle_spec(&req.container.spec, ns, id, req.terminal).map_err(fail)?;
        std::fs::write(bundle.join("config.json"), spec)
            .map_err(|e| fail(Error::Io(format!("write config.json: {e}"))))?;
        let log = LogFifo::open(bundle, ns, id).map_err(fail)?;
        let checkpoint_dir = match &req.checkpoint {
            Some(tar) => {
                let (tar, dir) = (tar.clone(), self.env.restore_dir(ns, id));
                let (d, limits) = (dir.clone(), self.env.limits.clone());
                let _ = std::fs::remove_dir_all(&dir);
                blocking_io(move || checkpoint::unpack_image(&tar, &d, &limits))
                    .await
                    .map_err(fail)?;
                Some(dir)
            }
            None => None,
        };

        let (stdout, stderr, log_path) =
            if req.log_to_file && req.stdout.is_empty() && req.stderr.is_empty() {
                let p = self.env.log_file(ns, id);
                std::fs::create_dir_all(p.parent().expect("log dir"))
                    .map_err(|e| fail(Error::Io(format!("create log dir: {e}"))))?;
                let url = format!("file://{}", p.display());
                (url.clone(), url, Some(p.display().to_string()))
            } else {
                (req.stdout.clone(), req.stderr.clone(), None)
            };

        let address = cmd.start().await.map_err(fail)?;
        // The shim's address is durable before anything reports the task created, so
        // a crash from here on leaves a task keel can find and reconcile.
        let mut record = TaskRecord {
            id: id.clone(),
            bundle: bundle.display().to_string(),
            shim_address: address.clone(),
            shim_pid: 0,
            pid: 0,
            stdin: req.stdin.clone(),
            stdout,
            stderr,
            terminal: req.terminal,
            log_path,
            created_ns: nanos(SystemTime::now()),
            started: false,
        };
        let persist = |record: TaskRecord| {
            let meta = self.env.meta.clone();
            let ns = ns.clone();
            async move { blocking(move || meta.put_task(&ns, &record)).await }
        };
        persist(record.clone()).await.map_err(fail)?;

        let shim = ShimClient::connect(&address, ns)
            .await
            .map_err(|e| fail(e.into()))?;
        let with_shim = |e: Error| (e, Some(shim.clone()));
        let conn = shim
            .connect_shim(
                &api::ConnectRequest {
                    id: id.clone(),
                    ..Default::default()
                },
                rpc_timeout(),
            )
            .await
            .map_err(|e| with_shim(e.into()))?;
        record.shim_pid = conn.shim_pid;

        let any = self.runc_options().map_err(with_shim)?;
        let create = api::CreateTaskRequest {
            id: id.clone(),
            bundle: bundle.display().to_string(),
            rootfs: mounts(&req.container.rootfs),
            terminal: req.terminal,
            stdin: req.stdin.clone(),
            stdout: record.stdout.clone(),
            stderr: record.stderr.clone(),
            options: MessageField::some(any),
            checkpoint: checkpoint_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            ..Default::default()
        };
        let created = {
            let _parent_stays = self.cgroups.0.read().await;
            shim.create(&create, rpc_timeout())
                .await
                .map_err(|e| with_shim(e.into()))?
        };
        record.pid = created.pid;
        // Shim pid and task pid can be read back from the shim (Connect, State), so
        // this update need not wait for the disk.
        let (meta, ns2, r2) = (self.env.meta.clone(), ns.clone(), record.clone());
        blocking(move || meta.update_task_lazily(&ns2, &r2))
            .await
            .map_err(with_shim)?;

        let event = ev::TaskCreate {
            container_id: id.clone(),
            bundle: record.bundle.clone(),
            pid: created.pid,
            ..Default::default()
        };
        // Reported created only once its event is on disk.
        if let Err(e) = self
            .env
            .monitor
            .publish(
                ns,
                "/tasks/create",
                pack(&event).map_err(|e| with_shim(e.into()))?,
            )
            .await
        {
            tracing::error!(namespace = %ns, task_id = %id, error = %e, "publishing /tasks/create failed");
        }

        let shim_pid = Arc::new(AtomicU32::new(record.shim_pid));
        let actor = TaskActor {
            ns: ns.clone(),
            id: id.clone(),
            state: TaskState::Created,
            shim: Some(shim.clone()),
            shim_alive: true,
            deleting: false,
            cmd: cmd.clone(),
            record,
            env: self.env.clone(),
            tasks: self.clone(),
            exit: None,
            waiters: Vec::new(),
            execs: HashMap::new(),
            _log: Some(log),
            probe_backoff: Duration::ZERO,
            shim_pid: shim_pid.clone(),
            unannounced: (false, false),
        };
        let addr = TaskActor::start_in_arbiter(&self.arbiter, |_| actor);
        Ok(TaskHandle::new(id.clone(), addr, shim_pid))
    }
}

/// Supervises one task. Owned by its arbiter; reached only through [`TaskHandle`].
struct TaskActor {
    ns: String,
    id: String,
    state: TaskState,
    /// The connection to the shim; `None` until a restore reaches it.
    shim: Option<ShimClient>,
    shim_alive: bool,
    /// Set once Delete has begun: exits and shim death are expected from then on.
    deleting: bool,
    cmd: ShimCommand,
    record: TaskRecord,
    env: Arc<TaskEnv>,
    tasks: Tasks,
    exit: Option<ExitRecord>,
    waiters: Vec<oneshot::Sender<ExitRecord>>,
    /// Processes added with Exec, by exec id.
    execs: HashMap<String, exec::ExecProcess>,
    _log: Option<LogFifo>,
    /// Pause before the next probe of a shim that did not answer.
    probe_backoff: Duration,
    /// The shim's pid as the handle shows it (for checking who forwards events).
    shim_pid: Arc<AtomicU32>,
    /// Restored: whether `/tasks/create` and `/tasks/start` are missing from the
    /// event log (keeld died before they reached it); published once the shim
    /// shows the task exists.
    unannounced: (bool, bool),
}

impl Actor for TaskActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.shim.is_some() {
            self.watch(ctx);
        } else {
            // Restored: find out from the shim what became of the task.
            ctx.notify(Probe);
        }
    }
}

impl TaskActor {
    /// Watches the shim: a pidfd on its process, and a pending Wait for the exit.
    fn watch(&mut self, ctx: &mut Context<Self>) {
        let Some(shim) = self.shim.clone() else {
            return;
        };
        // Liveness, first way: a pidfd on the shim becomes readable when it dies.
        match PidFd::open(self.record.shim_pid) {
            Ok(pidfd) => {
                let addr = ctx.address();
                actix::spawn(async move {
                    if pidfd.exited().await.is_ok() {
                        addr.do_send(ShimDied);
                    }
                });
            }
            Err(e) => {
                tracing::warn!(task_id = %self.id, error = %e, "no pidfd on the shim; relying on Wait")
            }
        }
        // Second way, and the exit itself: a pending Wait.
        let id = self.id.clone();
        let shim_pid = self.record.shim_pid;
        let (address, ns) = (self.record.shim_address.clone(), self.ns.clone());
        let addr = ctx.address();
        actix::spawn(async move {
            let mut shim = shim;
            loop {
                let req = api::WaitRequest {
                    id: id.clone(),
                    ..Default::default()
                };
                match shim.wait(&req, None).await {
                    Ok(r) => {
                        let at = r
                            .exited_at
                            .as_ref()
                            .map_or_else(SystemTime::now, system_time);
                        addr.do_send(Exited {
                            status: r.exit_status,
                            at,
                        });
                        return;
                    }
                    Err(e) if !process_alive(shim_pid) => {
                        tracing::warn!(task_id = %id, shim_pid, error = %e, "shim is gone");
                        addr.do_send(ShimDied);
                        return;
                    }
                    // The connection broke while the shim lives: dial it again, and
                    // hand the new connection to the actor for every later request.
                    Err(e @ keel_protocol::Error::Transport(_)) => {
                        tracing::warn!(task_id = %id, shim_pid, error = %e, "connection to the shim broke; connecting again");
                        tokio::time::sleep(REDIAL_PAUSE).await;
                        match ShimClient::connect(&address, &ns).await {
                            Ok(fresh) => {
                                shim = fresh.clone();
                                addr.do_send(Redialled(fresh));
                            }
                            Err(e) => {
                                tracing::warn!(task_id = %id, shim_pid, error = %e, "connecting to the shim again failed; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(task_id = %id, shim_pid, error = %e, "wait on shim failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// The live shim connection, or FailedPrecondition naming the task's state.
    fn live_shim(&self) -> Result<ShimClient> {
        self.shim
            .clone()
            .filter(|_| self.shim_alive)
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "task {} has no live shim (it is {})",
                    self.id, self.state
                ))
            })
    }
}

impl TaskActor {
    fn info(&self) -> TaskInfo {
        TaskInfo {
            id: self.id.clone(),
            pid: self.record.pid,
            state: self.state,
            stdin: self.record.stdin.clone(),
            stdout: self.record.stdout.clone(),
            stderr: self.record.stderr.clone(),
            terminal: self.record.terminal,
            exit: self.exit.clone(),
        }
    }

    /// Publishes the `/tasks/create` and `/tasks/start` of a restored task that a
    /// crash kept from the event log, before anything later of it.
    fn announce_missed(&mut self) {
        let (create, start) = std::mem::take(&mut self.unannounced);
        let mut missed = Vec::new();
        if create {
            let e = ev::TaskCreate {
                container_id: self.id.clone(),
                bundle: self.record.bundle.clone(),
                pid: self.record.pid,
                ..Default::default()
            };
            missed.push(("/tasks/create", pack(&e)));
        }
        if start && self.record.started {
            let e = ev::TaskStart {
                container_id: self.id.clone(),
                pid: self.record.pid,
                ..Default::default()
            };
            missed.push(("/tasks/start", pack(&e)));
        }
        for (topic, event) in missed {
            tracing::warn!(namespace = %self.ns, task_id = %self.id, topic, "publishing an event a crash kept from the log");
            match event {
                // Queued now, in order; delivery needs no waiting for.
                Ok(any) => drop(self.env.monitor.publish(&self.ns, topic, any)),
                Err(e) => tracing::error!(topic, error = %e, "encoding a missed event"),
            }
        }
    }

    /// Has the monitor record and publish the exit (once), then wakes the waiters.
    fn exited(&mut self, status: u32, at: SystemTime) -> ResponseActFuture<Self, ()> {
        if self.exit.is_some() {
            return Box::pin(async {}.into_actor(self));
        }
        let rec = ExitRecord {
            container_id: self.id.clone(),
            exec_id: String::new(),
            pid: self.record.pid,
            exit_status: status,
            exited_ns: nanos(at),
            seq: 0,
        };
        let monitor = self.env.monitor.clone();
        let (ns, r2) = (self.ns.clone(), rec.clone());
        Box::pin(async move { monitor.exit(&ns, r2).await }.into_actor(self).map(
            move |standing, act, _| {
                let rec = match standing {
                    Ok(standing) => standing,
                    Err(e) => {
                        tracing::error!(task_id = %act.id, error = %e, "recording exit failed");
                        rec
                    }
                };
                tracing::info!(namespace = %act.ns, task_id = %act.id, exit_status = rec.exit_status, "task exited");
                act.state = TaskState::Stopped;
                for w in act.waiters.drain(..) {
                    let _ = w.send(rec.clone());
                }
                act.exit = Some(rec);
            },
        ))
    }
}

/// The init process exited (Wait returned).
#[derive(Message)]
#[rtype(result = "()")]
struct Exited {
    status: u32,
    at: SystemTime,
}

impl Handler<Exited> for TaskActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, m: Exited, _: &mut Self::Context) -> Self::Result {
        AtomicResponse::new(self.exited(m.status, m.at))
    }
}

/// A new connection to the live shim, after the last one broke.
#[derive(Message)]
#[rtype(result = "()")]
struct Redialled(ShimClient);

impl Handler<Redialled> for TaskActor {
    type Result = ();

    fn handle(&mut self, m: Redialled, _: &mut Self::Context) {
        if self.shim_alive {
            tracing::info!(task_id = %self.id, "connected to the shim again");
            self.shim = Some(m.0);
        }
    }
}

/// The shim process is gone: clean up with its `delete` subcommand and report 137.
#[derive(Message)]
#[rtype(result = "()")]
struct ShimDied;

impl Handler<ShimDied> for TaskActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: ShimDied, _: &mut Self::Context) -> Self::Result {
        // The pidfd and the failed Wait can both report it; handle it once. During a
        // delete the shim is expected to go.
        let first = std::mem::replace(&mut self.shim_alive, false);
        if self.deleting || !first {
            return AtomicResponse::new(Box::pin(async {}.into_actor(self)));
        }
        let cmd = self.cmd.clone();
        let address = self.record.shim_address.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let r = cmd.delete().await;
                // A SIGKILLed shim leaves its socket behind.
                if let Some(path) = address.strip_prefix("unix://") {
                    let _ = std::fs::remove_file(path);
                }
                r
            }
            .into_actor(self)
            .then(|r, act, ctx| {
                let status = match r {
                    Ok(resp) => resp.exit_status,
                    Err(e) => {
                        tracing::error!(task_id = %act.id, error = %e, "shim delete failed");
                        255
                    }
                };
                // The shim's cleanup killed every process of the container, the exec
                // processes too; no Wait will ever report theirs.
                for (exec_id, _) in act.execs.iter().filter(|(_, p)| p.pending()) {
                    ctx.notify(exec::ExecExited {
                        exec_id: exec_id.clone(),
                        status: 137,
                        at: SystemTime::now(),
                    });
                }
                act.exited(status, SystemTime::now())
            }),
        ))
    }
}

/// Ask the shim what became of a restored task; repeated, with a growing pause,
/// while the shim does not answer.
#[derive(Message)]
#[rtype(result = "()")]
struct Probe;

impl Handler<Probe> for TaskActor {
    type Result = ();

    fn handle(&mut self, _: Probe, ctx: &mut Self::Context) {
        let probes = self.tasks.probes.clone();
        let (address, ns, id) = (
            self.record.shim_address.clone(),
            self.ns.clone(),
            self.id.clone(),
        );
        let addr = ctx.address();
        actix::spawn(async move {
            // At most PARALLEL_PROBES at once; each is bounded by its deadlines.
            let Ok(_slot) = probes.acquire().await else {
                return;
            };
            addr.do_send(Probed(restore::probe(&address, &ns, &id).await));
        });
    }
}

/// What a probe found.
#[derive(Message)]
#[rtype(result = "()")]
struct Probed(Found);

impl Handler<Probed> for TaskActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, Probed(found): Probed, ctx: &mut Self::Context) -> Self::Result {
        let (ns, id) = (self.ns.clone(), self.id.clone());
        let nothing = |act: &mut Self| AtomicResponse::new(Box::pin(async {}.into_actor(act)));
        match found {
            Found::Unreachable(why) => {
                self.probe_backoff =
                    (self.probe_backoff * 2).clamp(Duration::from_millis(500), MAX_PROBE_BACKOFF);
                tracing::warn!(namespace = %ns, task_id = %id, why, retry_in = ?self.probe_backoff, "shim does not answer; the task stays unknown");
                ctx.notify_later(Probe, self.probe_backoff);
                nothing(self)
            }
            Found::Dead => {
                tracing::warn!(namespace = %ns, task_id = %id, "shim died while keeld was down; cleaning up");
                ctx.notify(ShimDied);
                nothing(self)
            }
            Found::NoTask => {
                tracing::warn!(namespace = %ns, task_id = %id, "shim has no such task (keeld stopped during create); removing it");
                let (cmd, meta) = (self.cmd.clone(), self.env.meta.clone());
                self.deleting = true;
                AtomicResponse::new(Box::pin(
                    async move {
                        // The record goes first: a crash during the cleanup then
                        // leaves an orphan (cleaned up at the next start), never a
                        // record whose shim is gone, which would come back as a
                        // task that stopped without ever having run.
                        let (n2, i2) = (ns.clone(), id.clone());
                        if let Err(e) = durably(&meta, move |m| m.delete_task(&n2, &i2)).await {
                            tracing::error!(task_id = %id, error = %e, "removing the task record");
                            return;
                        }
                        // As for an orphan: the shim was never given a container.
                        restore::cleanup_orphan(&cmd).await;
                    }
                    .into_actor(self)
                    .map(|(), act, ctx| {
                        act.tasks.forget(&act.ns, &act.id);
                        ctx.stop();
                    }),
                ))
            }
            Found::Alive {
                shim,
                shim_pid,
                pid,
                status,
                exit,
            } => {
                self.shim = Some(shim.clone());
                self.record.shim_pid = shim_pid;
                self.shim_pid.store(shim_pid, Ordering::Relaxed);
                if pid != 0 {
                    self.record.pid = pid;
                }
                let state = match status {
                    api::Status::CREATED => TaskState::Created,
                    api::Status::RUNNING => TaskState::Running,
                    api::Status::PAUSED => TaskState::Paused,
                    api::Status::PAUSING => TaskState::Pausing,
                    api::Status::STOPPED => TaskState::Stopped,
                    api::Status::UNKNOWN => TaskState::Unknown,
                };
                if state != TaskState::Created {
                    self.record.started = true;
                }
                if self.exit.is_none() {
                    self.state = state;
                }
                if let Err(e) = self.env.meta.update_task_lazily(&ns, &self.record) {
                    tracing::warn!(task_id = %id, error = %e, "updating the task record");
                }
                tracing::info!(namespace = %ns, task_id = %id, state = %self.state, pid, "task restored");
                self.announce_missed();
                self.watch(ctx);
                // Exec processes that were running when keeld stopped: their exits,
                // including those that happened meanwhile, come from the shim's Wait.
                for (exec_id, p) in &self.execs {
                    if p.pending() {
                        exec::watch_exec(ctx.address(), shim.clone(), id.clone(), exec_id.clone());
                    }
                }
                match exit {
                    // An exit while keeld was down; recorded and published once.
                    Some((status, at)) if self.exit.is_none() => {
                        AtomicResponse::new(self.exited(status, at))
                    }
                    _ => nothing(self),
                }
            }
        }
    }
}

/// The periodic reconciler's check: a shim that died without anyone noticing.
#[derive(Message)]
#[rtype(result = "()")]
struct Check;

impl Handler<Check> for TaskActor {
    type Result = ();

    fn handle(&mut self, _: Check, ctx: &mut Self::Context) {
        let pid = self.record.shim_pid;
        if self.shim.is_some()
            && self.shim_alive
            && !self.deleting
            && pid != 0
            && !process_alive(pid)
        {
            tracing::warn!(namespace = %self.ns, task_id = %self.id, shim_pid = pid, "reconciler: shim is gone");
            ctx.notify(ShimDied);
        }
    }
}

#[derive(Message)]
#[rtype(result = "Result<u32>")]
struct Start;

impl Handler<Start> for TaskActor {
    type Result = AtomicResponse<Self, Result<u32>>;

    fn handle(&mut self, _: Start, _: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.state.can_start(&self.id) {
            return AtomicResponse::new(Box::pin(async move { Err(e) }.into_actor(self)));
        }
        let shim = match self.live_shim() {
            Ok(s) => s,
            Err(e) => return AtomicResponse::new(Box::pin(async move { Err(e) }.into_actor(self))),
        };
        let req = api::StartRequest {
            id: self.id.clone(),
            ..Default::default()
        };
        // A task created from a checkpoint is restored by CRIU at Start.
        let image = self.env.restore_dir(&self.ns, &self.id);
        let restoring = image.exists();
        let timeout = if restoring {
            Some(checkpoint::CRIU_RPC_TIMEOUT)
        } else {
            rpc_timeout()
        };
        AtomicResponse::new(Box::pin(
            async move {
                let r = shim.start(&req, timeout).await;
                if restoring && r.is_ok() {
                    let _ =
                        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(image)).await;
                }
                r
            }
            .into_actor(self)
            .then(|r, act, _| {
                let mut published = None;
                let result = match r {
                    Ok(resp) => {
                        act.state = TaskState::Running;
                        act.record.started = true;
                        act.record.pid = resp.pid;
                        // Whether it started is also the shim's to tell (State), so
                        // this update need not be flushed; the start event's flush,
                        // which follows, takes it along.
                        if let Err(e) = act.env.meta.update_task_lazily(&act.ns, &act.record) {
                            tracing::error!(error = %e, "persisting task start failed");
                        }
                        let event = ev::TaskStart {
                            container_id: act.id.clone(),
                            pid: resp.pid,
                            ..Default::default()
                        };
                        if let Ok(any) = pack(&event) {
                            published = Some(act.env.monitor.publish(&act.ns, "/tasks/start", any));
                        }
                        Ok(resp.pid)
                    }
                    Err(e) => Err(Error::from(e)),
                };
                async move {
                    if let Some(Err(e)) = match published {
                        Some(p) => Some(p.await),
                        None => None,
                    } {
                        tracing::error!(error = %e, "publishing /tasks/start failed");
                    }
                    result
                }
                .into_actor(act)
            }),
        ))
    }
}

#[derive(Message)]
#[rtype(result = "Result<()>")]
struct Kill {
    /// Empty: the init process.
    exec_id: String,
    signal: u32,
    all: bool,
}

impl Handler<Kill> for TaskActor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, m: Kill, _: &mut Self::Context) -> Self::Result {
        let shim = self
            .state
            .can_kill(&self.id)
            .and_then(|()| self.check_process_alive(&m.exec_id))
            .and_then(|()| self.live_shim());
        let req = api::KillRequest {
            id: self.id.clone(),
            exec_id: m.exec_id,
            signal: m.signal,
            all: m.all,
            ..Default::default()
        };
        shim_call(shim, |shim| async move {
            shim.kill(&req, rpc_timeout()).await.map(|_| ())
        })
    }
}

/// Publishes a task event after a shim call succeeded; resolves with `result` once the
/// event is delivered (a failed publication is logged, never turned into a failure of
/// the call, which already happened).
fn announce<T: Send + 'static>(
    monitor: &MonitorHandle,
    ns: &str,
    topic: &'static str,
    event: Result<protobuf::well_known_types::any::Any>,
    result: T,
) -> impl std::future::Future<Output = T> + Send + 'static {
    let published = event.map(|any| monitor.publish(ns, topic, any));
    async move {
        let r = match published {
            Ok(p) => p.await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::error!(topic, error = %e, "publishing a task event failed");
        }
        result
    }
}

/// One shim call for a handler: `shim` is the checked connection (or why there is
/// none), `call` the request made on it.
fn shim_call<T: 'static, F>(
    shim: Result<ShimClient>,
    call: impl FnOnce(ShimClient) -> F,
) -> ResponseFuture<Result<T>>
where
    F: std::future::Future<Output = keel_protocol::Result<T>> + 'static,
{
    match shim {
        Ok(shim) => {
            let pending = call(shim);
            Box::pin(async move { pending.await.map_err(Error::from) })
        }
        Err(e) => Box::pin(async move { Err(e) }),
    }
}

/// Resize the terminal of the init process (`exec_id` empty) or an exec process.
#[derive(Message)]
#[rtype(result = "Result<()>")]
struct Resize {
    exec_id: String,
    width: u32,
    height: u32,
}

impl Handler<Resize> for TaskActor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, m: Resize, _: &mut Self::Context) -> Self::Result {
        let shim = self
            .state
            .can_kill(&self.id)
            .and_then(|()| self.check_process_alive(&m.exec_id))
            .and_then(|()| self.live_shim());
        let req = api::ResizePtyRequest {
            id: self.id.clone(),
            exec_id: m.exec_id,
            width: m.width,
            height: m.height,
            ..Default::default()
        };
        shim_call(shim, |shim| async move {
            shim.resize_pty(&req, rpc_timeout()).await.map(|_| ())
        })
    }
}

/// Has the shim pause (freeze) or resume (thaw) every process of task `id`.
async fn freeze(shim: &ShimClient, id: String, pause: bool) -> keel_protocol::Result<()> {
    if pause {
        let req = api::PauseRequest {
            id,
            ..Default::default()
        };
        shim.pause(&req, rpc_timeout()).await.map(|_| ())
    } else {
        let req = api::ResumeRequest {
            id,
            ..Default::default()
        };
        shim.resume(&req, rpc_timeout()).await.map(|_| ())
    }
}

/// Pause (freeze) or resume (thaw) the task's processes.
#[derive(Message)]
#[rtype(result = "Result<()>")]
struct Freeze {
    pause: bool,
}

impl Handler<Freeze> for TaskActor {
    type Result = AtomicResponse<Self, Result<()>>;

    fn handle(&mut self, m: Freeze, _: &mut Self::Context) -> Self::Result {
        let allowed = if m.pause {
            self.state.can_pause(&self.id)
        } else {
            self.state.can_resume(&self.id)
        };
        let shim = match allowed.and_then(|()| self.live_shim()) {
            Ok(s) => s,
            Err(e) => return AtomicResponse::new(Box::pin(async move { Err(e) }.into_actor(self))),
        };
        let before = self.state;
        if m.pause {
            self.state = TaskState::Pausing;
        }
        let id = self.id.clone();
        AtomicResponse::new(Box::pin(
            async move { freeze(&shim, id, m.pause).await }
                .into_actor(self)
                .then(move |r, act, _| {
                    // An exit that arrived meanwhile wins over either outcome.
                    let settled = act.state == TaskState::Stopped;
                    match r {
                        Err(e) => {
                            if !settled {
                                act.state = before;
                            }
                            Box::pin(async move { Err(Error::from(e)) }.into_actor(act))
                                as ResponseActFuture<Self, Result<()>>
                        }
                        Ok(_) => {
                            if !settled {
                                act.state = if m.pause {
                                    TaskState::Paused
                                } else {
                                    TaskState::Running
                                };
                            }
                            let (topic, event) = if m.pause {
                                let e = ev::TaskPaused {
                                    container_id: act.id.clone(),
                                    ..Default::default()
                                };
                                ("/tasks/paused", pack(&e))
                            } else {
                                let e = ev::TaskResumed {
                                    container_id: act.id.clone(),
                                    ..Default::default()
                                };
                                ("/tasks/resumed", pack(&e))
                            };
                            let done = announce(
                                &act.env.monitor,
                                &act.ns,
                                topic,
                                event.map_err(Error::from),
                                Ok(()),
                            );
                            Box::pin(done.into_actor(act))
                        }
                    }
                }),
        ))
    }
}

/// Change the task's resource limits (OCI `LinuxResources` as JSON) and annotations.
#[derive(Message)]
#[rtype(result = "Result<()>")]
struct Update {
    resources: Option<Vec<u8>>,
    annotations: HashMap<String, String>,
}

impl Handler<Update> for TaskActor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, m: Update, _: &mut Self::Context) -> Self::Result {
        let shim = self
            .state
            .can_update(&self.id)
            .and_then(|()| self.live_shim());
        let req = api::UpdateTaskRequest {
            id: self.id.clone(),
            resources: m
                .resources
                .map(|json| {
                    keel_protocol::types::json_any(
                        keel_protocol::types::LINUX_RESOURCES_TYPE_URL,
                        json,
                    )
                })
                .into(),
            annotations: m.annotations,
            ..Default::default()
        };
        shim_call(shim, |shim| async move {
            shim.update(&req, rpc_timeout()).await.map(|_| ())
        })
    }
}

/// The task's cgroup statistics, as the shim reports them (an `Any` holding
/// containerd's cgroups `Metrics`, v1 or v2).
#[derive(Message)]
#[rtype(result = "Result<protobuf::well_known_types::any::Any>")]
struct Stats;

impl Handler<Stats> for TaskActor {
    type Result = ResponseFuture<Result<protobuf::well_known_types::any::Any>>;

    fn handle(&mut self, _: Stats, _: &mut Self::Context) -> Self::Result {
        let shim = self
            .state
            .can_update(&self.id)
            .and_then(|()| self.live_shim());
        let req = api::StatsRequest {
            id: self.id.clone(),
            ..Default::default()
        };
        let id = self.id.clone();
        shim_call(shim, |shim| async move {
            let r = shim.stats(&req, rpc_timeout()).await?;
            r.stats.into_option().ok_or_else(|| {
                keel_protocol::Error::Internal(format!("the shim of task {id} sent no stats"))
            })
        })
    }
}

#[derive(Message)]
#[rtype(result = "Result<()>")]
struct CloseStdin {
    exec_id: String,
}

impl Handler<CloseStdin> for TaskActor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, m: CloseStdin, _: &mut Self::Context) -> Self::Result {
        let shim = self
            .check_process_alive(&m.exec_id)
            .and_then(|()| self.live_shim());
        let req = api::CloseIORequest {
            id: self.id.clone(),
            exec_id: m.exec_id,
            stdin: true,
            ..Default::default()
        };
        shim_call(shim, |shim| async move {
            shim.close_io(&req, rpc_timeout()).await.map(|_| ())
        })
    }
}

#[derive(Message)]
#[rtype(result = "TaskInfo")]
struct Get;

impl Handler<Get> for TaskActor {
    type Result = MessageResult<Get>;

    fn handle(&mut self, _: Get, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.info())
    }
}

#[derive(Message)]
#[rtype(result = "Result<ExitRecord>")]
struct Wait {
    exec_id: String,
}

impl Handler<Wait> for TaskActor {
    type Result = ResponseFuture<Result<ExitRecord>>;

    fn handle(&mut self, m: Wait, _: &mut Self::Context) -> Self::Result {
        if !m.exec_id.is_empty() {
            let rx = self.wait_exec(&m.exec_id);
            let (id, exec_id) = (self.id.clone(), m.exec_id);
            return Box::pin(async move {
                rx?.await.map_err(|_| {
                    Error::FailedPrecondition(format!("exec {exec_id} of task {id} was deleted"))
                })
            });
        }
        if let Some(e) = &self.exit {
            let e = e.clone();
            return Box::pin(async move { Ok(e) });
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        let id = self.id.clone();
        Box::pin(async move {
            rx.await
                .map_err(|_| Error::FailedPrecondition(format!("task {id} was deleted")))
        })
    }
}

#[derive(Message)]
#[rtype(result = "Result<Vec<u32>>")]
struct Pids;

impl Handler<Pids> for TaskActor {
    type Result = ResponseFuture<Result<Vec<u32>>>;

    fn handle(&mut self, _: Pids, _: &mut Self::Context) -> Self::Result {
        let shim = self.live_shim().ok();
        let req = api::PidsRequest {
            id: self.id.clone(),
            ..Default::default()
        };
        Box::pin(async move {
            let Some(shim) = shim else {
                return Ok(Vec::new());
            };
            let r = shim.pids(&req, rpc_timeout()).await?;
            Ok(r.processes.iter().map(|p| p.pid).collect())
        })
    }
}

#[derive(Message)]
#[rtype(result = "Result<ExitRecord>")]
struct Delete {
    force: bool,
}

impl Handler<Delete> for TaskActor {
    type Result = AtomicResponse<Self, Result<ExitRecord>>;

    fn handle(&mut self, m: Delete, _: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.state.can_delete(&self.id, m.force) {
            return AtomicResponse::new(Box::pin(async move { Err(e) }.into_actor(self)));
        }
        self.deleting = true;
        let (shim, id) = (self.live_shim().ok(), self.id.clone());
        // Restored, and its shim never answered (only a forced delete gets here).
        let unreached = self.shim.is_none() && self.shim_alive;
        let (cmd, shim_pid) = (self.cmd.clone(), self.record.shim_pid);
        let address = self.record.shim_address.clone();
        let running = self.exit.is_none() && self.state != TaskState::Created;
        AtomicResponse::new(Box::pin(
            async move {
                let Some(shim) = shim else {
                    if !unreached {
                        return None;
                    }
                    // End the unresponsive shim and clean up as for a dead one.
                    if shim_pid != 0 && process_alive(shim_pid) {
                        if let Ok(pid) = i32::try_from(shim_pid) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                    let deleted = cmd.delete().await;
                    if let Some(path) = address.strip_prefix("unix://") {
                        let _ = std::fs::remove_file(path);
                    }
                    return deleted.ok();
                };
                if running {
                    let kill = api::KillRequest {
                        id: id.clone(),
                        signal: 9,
                        all: true,
                        ..Default::default()
                    };
                    let _ = shim.kill(&kill, rpc_timeout()).await;
                    let wait = api::WaitRequest {
                        id: id.clone(),
                        ..Default::default()
                    };
                    let _ = tokio::time::timeout(FORCE_KILL_WAIT, shim.wait(&wait, None)).await;
                }
                let deleted = shim
                    .delete(
                        &api::DeleteRequest {
                            id: id.clone(),
                            ..Default::default()
                        },
                        rpc_timeout(),
                    )
                    .await;
                // Shutdown may close the connection before it answers ("early eof").
                let _ = shim
                    .shutdown(
                        &api::ShutdownRequest {
                            id,
                            ..Default::default()
                        },
                        rpc_timeout(),
                    )
                    .await;
                deleted.ok()
            }
            .into_actor(self)
            .then(|deleted, act, _| {
                let status = deleted.as_ref().map_or(137, |d| d.exit_status);
                let at = deleted
                    .as_ref()
                    .and_then(|d| d.exited_at.as_ref())
                    .map_or_else(SystemTime::now, system_time);
                let record_exit: ResponseActFuture<Self, ()> =
                    if act.exit.is_none() && act.record.started {
                        act.exited(status, at)
                    } else {
                        Box::pin(async {}.into_actor(act))
                    };
                record_exit.then(|(), act, _| {
                    let (ns, id, bundle, meta) = (
                        act.ns.clone(),
                        act.id.clone(),
                        PathBuf::from(&act.record.bundle),
                        act.env.meta.clone(),
                    );
                    let log_path = act.record.log_path.clone();
                    let address = act.record.shim_address.clone();
                    let cgroups = act.tasks.cgroups.clone();
                    let restore_image = act.env.restore_dir(&ns, &id);
                    async move {
                        remove_bundle(&bundle)?;
                        let _ = std::fs::remove_dir_all(restore_image);
                        cgroups.remove(&ns, &id).await;
                        if let Some(p) = log_path {
                            let _ = std::fs::remove_file(p);
                        }
                        if let Some(path) = address.strip_prefix("unix://") {
                            let _ = std::fs::remove_file(path);
                        }
                        blocking(move || meta.delete_task(&ns, &id)).await
                    }
                    .into_actor(act)
                    .then(|r, act, _| {
                        let published = r.map(|()| {
                            let exit = act.exit.clone().unwrap_or(ExitRecord {
                                container_id: act.id.clone(),
                                exec_id: String::new(),
                                pid: act.record.pid,
                                exit_status: 0,
                                exited_ns: nanos(SystemTime::now()),
                                seq: 0,
                            });
                            let event = ev::TaskDelete {
                                container_id: act.id.clone(),
                                id: act.id.clone(),
                                pid: exit.pid,
                                exit_status: exit.exit_status,
                                exited_at: MessageField::some(timestamp(from_nanos(
                                    exit.exited_ns,
                                ))),
                                ..Default::default()
                            };
                            let published = pack(&event)
                                .ok()
                                .map(|any| act.env.monitor.publish(&act.ns, "/tasks/delete", any));
                            act.tasks.forget(&act.ns, &act.id);
                            (exit, published)
                        });
                        // Acknowledged once the delete event, and with it the removal
                        // of the task's records, is on disk.
                        async move {
                            let (exit, published) = published?;
                            if let Some(Err(e)) = match published {
                                Some(p) => Some(p.await),
                                None => None,
                            } {
                                tracing::error!(error = %e, "publishing /tasks/delete failed");
                            }
                            Ok(exit)
                        }
                        .into_actor(act)
                        .map(|r, _, ctx| {
                            if r.is_ok() {
                                ctx.stop();
                            }
                            r
                        })
                    })
                })
            }),
        ))
    }
}

/// keel's handle on one task actor.
#[derive(Clone)]
pub struct TaskHandle {
    pub id: String,
    addr: Addr<TaskActor>,
    /// The pid of the task's shim as its actor last learned it (0: not yet known).
    shim_pid: Arc<AtomicU32>,
    /// Requests in flight to the actor, bounded here: actix's own mailbox bound does
    /// not hold for every way of sending.
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("id", &self.id).finish()
    }
}

impl TaskHandle {
    fn new(id: String, addr: Addr<TaskActor>, shim_pid: Arc<AtomicU32>) -> Self {
        Self {
            id,
            addr,
            shim_pid,
            in_flight: Arc::new(tokio::sync::Semaphore::new(TASK_REQUESTS_IN_FLIGHT)),
        }
    }

    /// The pid of the shim keel launched for this task (0 while not known, as for
    /// a restored task whose shim has not answered yet).
    pub fn shim_pid(&self) -> u32 {
        self.shim_pid.load(Ordering::Relaxed)
    }

    /// Sends a request and waits for its answer; Unavailable when the task already
    /// has [`TASK_REQUESTS_IN_FLIGHT`] requests waiting.
    async fn call<M>(&self, m: M) -> Result<M::Result>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        TaskActor: Handler<M>,
    {
        let _slot = self.in_flight.try_acquire().map_err(|_| {
            Error::Busy(format!(
                "task {} has {TASK_REQUESTS_IN_FLIGHT} requests waiting; try again",
                self.id
            ))
        })?;
        self.send(m).await
    }

    /// Sends without taking a slot: for Wait, which only registers a waiter and may
    /// stay pending for the task's lifetime.
    async fn send<M>(&self, m: M) -> Result<M::Result>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        TaskActor: Handler<M>,
    {
        self.addr
            .send(m)
            .await
            .map_err(|_| Error::NotFound(format!("task {} is gone", self.id)))
    }

    /// Reports an exit learned from the shim's events; the actor records and
    /// publishes it unless it already has.
    pub fn notify_exit(&self, status: u32, at: SystemTime) {
        self.addr.do_send(Exited { status, at });
    }

    pub async fn start(&self) -> Result<u32> {
        self.call(Start).await?
    }

    /// Signals the init process (`exec_id` empty) or an exec process.
    pub async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        self.call(Kill {
            exec_id: exec_id.to_string(),
            signal,
            all,
        })
        .await?
    }

    /// Closes the task's stdin (the shim holds the FIFO open, so the writer closing
    /// its end is not enough for the process to see EOF).
    pub async fn close_stdin(&self, exec_id: &str) -> Result<()> {
        self.call(CloseStdin {
            exec_id: exec_id.to_string(),
        })
        .await?
    }

    pub async fn info(&self) -> Result<TaskInfo> {
        self.call(Get).await
    }

    /// Waits for the init process (`exec_id` empty) or an exec process to exit.
    pub async fn wait(&self, exec_id: &str) -> Result<ExitRecord> {
        self.send(Wait {
            exec_id: exec_id.to_string(),
        })
        .await?
    }

    pub async fn pids(&self) -> Result<Vec<u32>> {
        self.call(Pids).await?
    }

    /// Resizes a process's terminal (`exec_id` empty: the init process).
    pub async fn resize(&self, exec_id: &str, width: u32, height: u32) -> Result<()> {
        self.call(Resize {
            exec_id: exec_id.to_string(),
            width,
            height,
        })
        .await?
    }

    /// Freezes every process of the task; publishes `/tasks/paused`.
    pub async fn pause(&self) -> Result<()> {
        self.call(Freeze { pause: true }).await?
    }

    /// Thaws a paused task; publishes `/tasks/resumed`.
    pub async fn resume(&self) -> Result<()> {
        self.call(Freeze { pause: false }).await?
    }

    /// Changes resource limits (`resources`: OCI `LinuxResources` JSON) and annotations.
    pub async fn update(
        &self,
        resources: Option<Vec<u8>>,
        annotations: HashMap<String, String>,
    ) -> Result<()> {
        self.call(Update {
            resources,
            annotations,
        })
        .await?
    }

    /// The task's cgroup statistics as the shim encodes them.
    pub async fn stats(&self) -> Result<protobuf::well_known_types::any::Any> {
        self.call(Stats).await?
    }

    pub async fn delete(&self, force: bool) -> Result<ExitRecord> {
        self.call(Delete { force }).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_spec_sets_rootfs_and_absolute_cgroup() {
        let out = bundle_spec(
            br#"{"ociVersion":"1.0.2","root":{"path":"/elsewhere","readonly":true},"process":{"terminal":false}}"#,
            "ns",
            "web",
            true,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["root"]["path"], "rootfs");
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["linux"]["cgroupsPath"], "/keel/ns/web");
        assert_eq!(v["process"]["terminal"], true);
        assert!(matches!(
            bundle_spec(b"[1]", "n", "i", false),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn bundle_removal_never_descends_into_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("t1");
        std::fs::create_dir_all(b.join("rootfs/bin")).unwrap();
        std::fs::write(b.join("config.json"), "{}").unwrap();
        // rootfs not empty (as if still mounted): refused, nothing inside removed.
        assert!(remove_bundle(&b).is_err());
        assert!(b.join("rootfs/bin").exists());
        std::fs::remove_dir(b.join("rootfs/bin")).unwrap();
        remove_bundle(&b).unwrap();
        assert!(!b.exists());
    }

    #[test]
    fn own_process_is_alive_and_pid_zero_is_not() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(0));
    }
}
