//! One actor per task, supervising its containerd-shim-runc-v2.
//!
//! [`Tasks::create`] writes the bundle, launches the shim (`start`), records the shim's
//! address durably *before* the task is reported created, connects, sends Create and
//! then starts a `TaskActor` on the task arbiter. The actor owns the task's shim
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
use tokio::sync::mpsc;

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

use crate::bundle::{self, remove_bundle, CgroupParents};
use crate::monitor::MonitorHandle;
use crate::restore::{self, Found};
use crate::shim::{resolve_runtime, LogFifo, PidFd, ShimCommand};
use crate::state::TaskState;
use crate::{Error, Result};

mod checkpoint;
mod create;
mod exec;
mod handle;
mod life;
mod lifecycle;
mod recovery;
mod registry;
mod requests;
mod rw_layer;
pub use checkpoint::{check_image_tar, criu_ready, verify_checkpoint, CheckpointRequest};
pub use exec::ExecSpec;
use handle::Slot;
pub use handle::TaskHandle;
use life::{lock, Durable, Origin};
use lifecycle::*;
use recovery::*;
pub use registry::{Reservation, Tasks};
pub use requests::ProcessEntry;
use requests::*;

/// Deadline for one shim RPC other than Wait.
const SHIM_RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait before dialling a live shim again after its connection broke;
/// doubled after each failed try, up to REDIAL_MAX_PAUSE.
const REDIAL_PAUSE: Duration = Duration::from_millis(100);
const REDIAL_MAX_PAUSE: Duration = Duration::from_secs(30);
/// How long a live shim may stay out of reach before it is ended and cleaned up.
const REDIAL_GIVE_UP: Duration = Duration::from_secs(120);
/// How long a forced delete waits for the killed task to exit.
const FORCE_KILL_WAIT: Duration = Duration::from_secs(10);
/// Requests one task may have waiting before more are refused.
const TASK_REQUESTS_IN_FLIGHT: usize = 64;
/// containerd's default runtime.
const DEFAULT_RUNTIME: &str = "io.containerd.runc.v2";
/// Task actors a restore starts before it lets the API answer again.
const RESTORE_BATCH: usize = 64;
/// Shims probed at once while restoring.
const PARALLEL_PROBES: usize = 16;
/// Longest pause between probes of a shim that does not answer.
const MAX_PROBE_BACKOFF: Duration = Duration::from_secs(10);
/// How long a request waits for a failed task actor to be brought back.
const REVIVE_WAIT: Duration = Duration::from_secs(10);
/// How often every task's shim is checked for a death nobody reported.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// A task's namespace and id.
type TaskKey = (String, String);

/// What every task needs from keeld.
#[derive(Debug)]
pub struct TaskEnv {
    pub meta: Meta,
    /// Publishes the task's events and records its exits.
    pub monitor: MonitorHandle,
    /// keeld's state directory; bundles live in `<state>/tasks/<ns>/<id>`.
    pub state_dir: PathBuf,
    /// The event exchange, read when an actor is brought back (what the log
    /// misses of its task).
    pub events: crate::events::EventSink,
    /// keeld's socket: the shims' `-address` and `TTRPC_ADDRESS`.
    pub keel_socket: PathBuf,
    /// A directory on disk (under keeld's root, not the state tmpfs) for large
    /// scratch work: the CRIU image a task is restored from waits here for Start.
    pub scratch_dir: PathBuf,
    /// Bounds on what clients send (checkpoint images among them).
    pub limits: keel_protocol::limits::Limits,
}

impl TaskEnv {
    fn restore_dir(&self, ns: &str, id: &str) -> PathBuf {
        bundle::restore_dir(&self.scratch_dir, ns, id)
    }

    fn bundle(&self, ns: &str, id: &str) -> PathBuf {
        bundle::bundle_dir(&self.state_dir, ns, id)
    }

    fn log_file(&self, ns: &str, id: &str) -> PathBuf {
        bundle::log_file(&self.state_dir, ns, id)
    }

    fn runc_root(&self) -> PathBuf {
        bundle::runc_root(&self.state_dir)
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
    /// Restore the task's process instead of starting it anew.
    pub checkpoint: Option<Restore>,
    /// The task's own runtime options (type URL, value), checked by
    /// [`crate::runtime_options::check`]; its container's apply when `None`.
    pub options: Option<(String, Vec<u8>)>,
    /// The task's own rootfs mounts (checked as a container's); its container's
    /// when `None`. The shim mounts them and unmounts them at Delete.
    pub rootfs: Option<Vec<MountRecord>>,
    /// The shim binary to run it with (an absolute path), instead of its
    /// container's runtime: containerd's `runtime_path`.
    pub runtime_path: Option<String>,
}

impl CreateTask {
    /// The runtime the task runs under: its own shim path, else its container's.
    pub fn runtime(&self) -> &str {
        self.runtime_path
            .as_deref()
            .unwrap_or(&self.container.runtime)
    }
}

/// Where a restored task's CRIU image comes from.
#[derive(Debug, Clone)]
pub enum Restore {
    /// A checkpoint's image tar in the content store (verified by
    /// [`verify_checkpoint`]), unpacked for the restore and removed with the task,
    /// and the CRIU options its restore needs again (given to runc in a CRIU
    /// configuration file, as the shim passes none). Its filesystem changes, when
    /// it was taken with them (`rw`), go into the upper directory of the task's
    /// overlay rootfs before the shim mounts it.
    Image {
        tar: PathBuf,
        rw: Option<PathBuf>,
        criu: Vec<String>,
    },
    /// A CRIU image directory the caller gave (`options.criu_image_path`), used
    /// as it is and left in place.
    Directory(PathBuf),
}

/// A task as the API shows it.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub id: String,
    /// The runtime options it was created with (type URL, value), if any.
    pub runtime_options: Option<(String, Vec<u8>)>,
    /// The runtime it runs under (its own shim path, else its container's), when
    /// known; `None` for an exec process.
    pub runtime: Option<String>,
    /// Its own rootfs mounts, when its Create gave them instead of its container's.
    pub rootfs: Option<Vec<MountRecord>>,
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

/// Deletes the task's init process in its shim, then asks the shim to exit.
/// Shutdown may close the connection before it answers ("early eof"), so only
/// Delete's answer counts.
async fn delete_and_shut_down(shim: &ShimClient, id: &str) -> Option<api::DeleteResponse> {
    let deleted = shim
        .delete(
            &api::DeleteRequest {
                id: id.to_string(),
                ..Default::default()
            },
            rpc_timeout(),
        )
        .await;
    // Fault injection (tests only): a stall between the shim's delete and its
    // shutdown, for keeld to be killed in.
    if let Some(keel_storage::faults::Fault::Stall(d)) =
        keel_storage::faults::check(&format!("task:{id}:Shutdown"))
    {
        tokio::time::sleep(d).await;
    }
    let _ = shim
        .shutdown(
            &api::ShutdownRequest {
                id: id.to_string(),
                ..Default::default()
            },
            rpc_timeout(),
        )
        .await;
    deleted.ok()
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
    /// Shared with every handle on the task, and with the actor that replaces this
    /// one if it fails.
    slot: Arc<Slot>,
    /// Reports this actor's death to the task supervisor unless it stops the
    /// ordinary way.
    _lifeline: crate::supervision::Lifeline<TaskKey>,
    /// Restored: whether `/tasks/create` and `/tasks/start` are missing from the
    /// event log (keeld died before they reached it); published once the shim
    /// shows the task exists.
    unannounced: (bool, bool),
    /// Brought back after a failure: its first probe holds every request.
    restart: bool,
}

impl TaskActor {
    /// Fault injection (tests only): message `message` of this task makes its actor
    /// panic (here), stall (its mailbox, not the thread) or fail (an error instead
    /// of the shim call).
    fn fault(&self, message: &str, ctx: &mut Context<Self>) -> Result<()> {
        #[cfg(feature = "faults")]
        match keel_storage::faults::check(&format!("task:{}:{message}", self.id)) {
            Some(keel_storage::faults::Fault::Stall(d)) => {
                ctx.wait(actix::fut::wrap_future(actix::clock::sleep(d)));
            }
            Some(_) => {
                return Err(Error::Shim(format!(
                    "fault injected at task:{}:{message}",
                    self.id
                )))
            }
            None => {}
        }
        #[cfg(not(feature = "faults"))]
        let _ = (message, ctx);
        Ok(())
    }
}

impl Actor for TaskActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.shim.is_some() {
            self.watch(ctx);
        } else if self.restart {
            // Brought back after a failure: the task was known a moment ago.
            self.probe_before_anything(ctx);
        } else {
            // Restored: find out from the shim what became of the task, in the
            // background (it shows `unknown` meanwhile).
            ctx.notify(Probe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_pid_zero_is_not() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(0));
    }
}
