//! The long-running shim: `containerd.task.v2.Task` (and the same service under
//! `containerd.task.v3.Task`) over ttrpc on the socket `start` passed as fd 3,
//! for the one task this shim was started for.
//!
//! Everything runs on one thread: a current-thread runtime, requests and the
//! reaper interleaving between awaits. The task's state sits behind a mutex
//! that is never held across an await.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use containerd_shim_protos::api::{
    self, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, ExecProcessRequest, KillRequest, PidsRequest, PidsResponse, ProcessInfo,
    StateRequest, StateResponse, StatsRequest, StatsResponse, Status, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::shim::oci::ProcessDetails;
use containerd_shim_protos::shim_async::{create_task, Task};
use containerd_shim_protos::topics;
use libcontainer::container::{Container, ContainerStatus};
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::{MessageField, MessageFull};
use tokio::sync::{watch, Notify};
use ttrpc::asynchronous::TtrpcContext;

use crate::args::Args;
use crate::console::Console;
use crate::container::{self as ctr, ConsoleSocket, Streams};
use crate::events::Publisher;
use crate::log::{log_info, log_warn};
use crate::reaper::{self, Exit};
use crate::stdio::{self, Held};
use crate::{cgroups, guard, launch, options};

mod restore;

/// A request the shim refuses or fails, with the status code it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    InvalidArgument(String),
    NotFound(String),
    AlreadyExists(String),
    FailedPrecondition(String),
    Unimplemented(String),
    Internal(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (Error::InvalidArgument(m)
        | Error::NotFound(m)
        | Error::AlreadyExists(m)
        | Error::FailedPrecondition(m)
        | Error::Unimplemented(m)
        | Error::Internal(m)) = self;
        f.write_str(m)
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Error::Internal(_) => ttrpc::Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

type Result<T> = std::result::Result<T, Error>;

/// Longest exec id taken (containerd's identifiers are at most 76 bytes).
const MAX_EXEC_ID: usize = 76;
/// Most exec processes a task may have at once.
const MAX_EXECS: usize = 1024;
/// Largest spec (exec's Process, Update's resources) taken.
const MAX_SPEC: usize = 1 << 20;

/// One process: the init or an exec.
#[derive(Debug)]
struct Proc {
    exec_id: String,
    /// 0 until started.
    pid: i32,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    exit: watch::Sender<Option<Exit>>,
    held: Held,
    console: Option<Console>,
}

impl Proc {
    fn new(exec_id: &str, stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Self {
        Self {
            exec_id: exec_id.to_string(),
            pid: 0,
            stdin: stdin.to_string(),
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
            terminal,
            exit: watch::channel(None).0,
            held: Held::default(),
            console: None,
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Records the exit and lets go of its stdio.
    fn set_exit(&mut self, exit: Exit) {
        self.exit.send_replace(Some(exit));
        self.held = Held::default();
    }
}

/// The task's container and init process.
#[derive(Debug)]
struct Init {
    container: Container,
    root: PathBuf,
    cgroup: PathBuf,
    proc: Proc,
    started: bool,
    /// Sends `/tasks/oom` while the container lives.
    oom: Option<tokio::task::JoinHandle<()>>,
    /// Checked when the init exits, so an OOM kill is told before the exit.
    oom_kills: Option<Arc<cgroups::OomKills>>,
    /// Made from a checkpoint: CRIU restores the process at Start.
    restore: Option<restore::Pending>,
    /// CRIU's work directory when a request names none (`criu_work_path`).
    criu_work: String,
}

impl Drop for Init {
    fn drop(&mut self) {
        if let Some(t) = self.oom.take() {
            t.abort();
        }
    }
}

#[derive(Debug, Default)]
struct State {
    init: Option<Init>,
    /// Exec processes by exec id; the spec file of one not yet started.
    execs: HashMap<String, (Proc, Option<PathBuf>)>,
}

/// The shim's one task.
#[derive(Debug)]
pub struct Shim {
    id: String,
    bundle: PathBuf,
    events: Publisher,
    state: Mutex<State>,
    shutdown: Notify,
}

fn ts(t: std::time::SystemTime) -> MessageField<protobuf::well_known_types::timestamp::Timestamp> {
    MessageField::some(t.into())
}

/// Packs a message into an `Any` named by its bare full name
/// (`containerd.events.TaskExit`, `io.containerd.cgroups.v1.Metrics`), as
/// containerd and its shims name them.
pub(crate) fn pack<M: MessageFull>(m: &M) -> Result<Any> {
    Ok(Any {
        type_url: M::descriptor().full_name().to_string(),
        value: m
            .write_to_bytes()
            .map_err(|e| Error::Internal(format!("encode {}: {e}", M::descriptor().full_name())))?,
        ..Default::default()
    })
}

/// An optional `Any`'s type and value (both empty when it is absent).
fn any_parts(any: &MessageField<Any>) -> (&str, &[u8]) {
    any.as_ref()
        .map(|o| (o.type_url.as_str(), o.value.as_slice()))
        .unwrap_or_default()
}

/// The bytes of a JSON payload a client sent in `field`, at most [`MAX_SPEC`].
fn bounded_json<'a>(field: &str, any: &'a MessageField<Any>) -> Result<&'a [u8]> {
    let (_, raw) = any_parts(any);
    if raw.len() > MAX_SPEC {
        return Err(Error::InvalidArgument(format!(
            "{field}: larger than {MAX_SPEC} bytes"
        )));
    }
    Ok(raw)
}

impl Shim {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_id(&self, id: &str) -> Result<()> {
        if id != self.id {
            return Err(Error::NotFound(format!(
                "task {id:?}: this shim serves {:?}",
                self.id
            )));
        }
        Ok(())
    }

    /// Called by the reaper for every child that exits.
    fn exited(&self, pid: i32, exit: Exit) {
        let mut st = self.lock();
        let st = &mut *st;
        let proc = match st.init.as_mut() {
            Some(i) if i.proc.pid == pid => {
                if i.oom_kills.as_ref().and_then(|k| k.new_kills()) == Some(true) {
                    self.events.publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        &TaskOOM {
                            container_id: self.id.clone(),
                            ..Default::default()
                        },
                    );
                }
                Some(&mut i.proc)
            }
            _ => st
                .execs
                .values_mut()
                .map(|(p, _)| p)
                .find(|p| p.pid == pid && p.exited().is_none()),
        };
        let Some(proc) = proc else { return };
        if proc.exited().is_some() {
            return;
        }
        proc.set_exit(exit);
        self.publish_exit(&proc.exec_id, pid, exit);
    }

    /// `/tasks/exit` for the init (`exec_id` empty) or an exec process.
    fn publish_exit(&self, exec_id: &str, pid: i32, exit: Exit) {
        let id = if exec_id.is_empty() {
            self.id.clone()
        } else {
            exec_id.to_string()
        };
        self.events.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            &TaskExit {
                container_id: self.id.clone(),
                id,
                pid: pid.unsigned_abs(),
                exit_status: exit.status,
                exited_at: ts(exit.at),
                ..Default::default()
            },
        );
    }

    fn create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        self.check_id(&req.id)?;
        let mut st = self.lock();
        if st.init.is_some() {
            return Err(Error::AlreadyExists(format!("task {:?} exists", req.id)));
        }
        let bundle = PathBuf::from(&req.bundle);
        if !bundle.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "bundle {:?}: not an absolute path",
                req.bundle
            )));
        }
        let (type_url, value) = any_parts(&req.options);
        let opts = options::decode("options", type_url, value)?;
        check_spec(&bundle)?;
        let image = restore::image(&req, &opts)?;
        let root = options::root(&opts, self.namespace());
        ctr::mount_rootfs(&bundle, &req.rootfs)?;
        let mut pending = None;
        let made = (|| {
            if let Some(image) = image {
                let (container, held, p) = restore::prepare(&req, image, &root, &bundle)?;
                pending = Some(p);
                return Ok((container, None, held));
            }
            if !opts.no_new_keyring {
                new_session_keyring()?;
            }
            let (streams, held) = streams(req.terminal, &req.stdin, &req.stdout, &req.stderr)?;
            let (container, master) =
                ctr::create(&req.id, &root, &bundle, streams, opts.no_pivot_root)?;
            Ok::<_, Error>((container, master, held))
        })();
        let (mut container, master, held) = match made {
            Ok(m) => m,
            Err(e) => {
                // What libcontainer may have left of a container it did not finish.
                let _ = ctr::remove_leftover(&root, &req.id);
                ctr::unmount_rootfs(&bundle);
                return Err(e);
            }
        };
        let pid = container.pid().map(|p| p.as_raw()).unwrap_or(0);
        let mut proc = Proc::new("", &req.stdin, &req.stdout, &req.stderr, req.terminal);
        proc.pid = pid;
        proc.held = held;
        let finished = (|| {
            std::fs::write(
                bundle.join(launch::ROOT_FILE),
                root.as_os_str().as_encoded_bytes(),
            )
            .map_err(|e| Error::Internal(format!("{}: {e}", launch::ROOT_FILE)))?;
            proc.console = master
                .map(|m| Console::start(m, &req.stdin, &req.stdout))
                .transpose()?;
            let cgroup = ctr::cgroup(&container)?;
            if pid != 0 {
                ctr::loopback_up(pid)?;
                if let Err(e) = cgroups::join_everywhere(&cgroup, pid.unsigned_abs()) {
                    log_warn!("{e}");
                }
            }
            Ok(cgroup)
        })();
        let cgroup = match finished {
            Ok(c) => c,
            Err(e) => {
                // Made but not handed over: nothing of it may stay.
                let _ = ctr::delete(&mut container);
                ctr::unmount_rootfs(&bundle);
                let _ = std::fs::remove_file(bundle.join(launch::ROOT_FILE));
                return Err(e);
            }
        };
        let (oom, oom_kills) = match pending {
            Some(_) => (None, None),
            None => self.watch_oom(pid),
        };
        st.init = Some(Init {
            container,
            root,
            cgroup,
            proc,
            started: false,
            oom,
            oom_kills,
            restore: pending,
            criu_work: opts.criu_work_path.clone(),
        });
        drop(st);
        self.events.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            &TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid: pid.unsigned_abs(),
                ..Default::default()
            },
        );
        Ok(CreateTaskResponse {
            pid: pid.unsigned_abs(),
            ..Default::default()
        })
    }

    /// Sends `/tasks/oom` for each OOM kill in the cgroup of `pid`; the count
    /// is checked again when the init exits.
    fn watch_oom(
        &self,
        pid: i32,
    ) -> (
        Option<tokio::task::JoinHandle<()>>,
        Option<Arc<cgroups::OomKills>>,
    ) {
        match cgroups::OomWatch::new(pid) {
            Ok(Some(mut watch)) => {
                let (events, id) = (self.events.clone(), self.id.clone());
                let kills = watch.kills.clone();
                let task = tokio::spawn(async move {
                    while watch.next().await.is_some() {
                        events.publish(
                            topics::TASK_OOM_EVENT_TOPIC,
                            &TaskOOM {
                                container_id: id.clone(),
                                ..Default::default()
                            },
                        );
                    }
                });
                (Some(task), Some(kills))
            }
            Ok(None) => (None, None),
            Err(e) => {
                log_warn!("{e}");
                (None, None)
            }
        }
    }

    fn namespace(&self) -> &str {
        self.events.namespace()
    }

    fn start(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        self.check_id(&req.id)?;
        let mut st = self.lock();
        let st = &mut *st;
        let init = st
            .init
            .as_mut()
            .ok_or_else(|| Error::NotFound(format!("task {:?} is not created", req.id)))?;
        if req.exec_id.is_empty() {
            if init.started || init.proc.exited().is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "task {:?} has already started",
                    req.id
                )));
            }
            if init.restore.is_some() {
                let master = self.restore(init)?;
                let (oom, kills) = self.watch_oom(init.proc.pid);
                (init.oom, init.oom_kills) = (oom, kills);
                init.proc.console = console_or_kill(master, &init.proc)?;
            } else {
                ctr::start(&mut init.container)?;
            }
            init.started = true;
            let pid = init.proc.pid.unsigned_abs();
            self.events.publish(
                topics::TASK_START_EVENT_TOPIC,
                &TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                },
            );
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        if !init.started || init.proc.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "exec {:?}: task {:?} is not running",
                req.exec_id, req.id
            )));
        }
        let (root, cgroup) = (init.root.clone(), init.cgroup.clone());
        let (proc, spec) = st
            .execs
            .get_mut(&req.exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {:?} does not exist", req.exec_id)))?;
        let Some(spec_path) = spec.take() else {
            return Err(Error::FailedPrecondition(format!(
                "exec {:?} has already started",
                req.exec_id
            )));
        };
        let started = (|| {
            let (streams, held) = streams(proc.terminal, &proc.stdin, &proc.stdout, &proc.stderr)?;
            let (pid, master) = ctr::exec(&self.id, &root, &spec_path, streams)?;
            Ok::<_, Error>((pid, master, held))
        })();
        let _ = std::fs::remove_file(&spec_path);
        let (pid, master, held) = started?;
        if let Err(e) = cgroups::join_everywhere(&cgroup, pid.unsigned_abs()) {
            log_warn!("exec {:?}: {e}", req.exec_id);
        }
        proc.pid = pid;
        proc.held = held;
        proc.console = console_or_kill(master, proc)?;
        self.events.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            &TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: pid.unsigned_abs(),
                ..Default::default()
            },
        );
        Ok(api::StartResponse {
            pid: pid.unsigned_abs(),
            ..Default::default()
        })
    }

    fn state(&self, req: &StateRequest) -> Result<StateResponse> {
        self.check_id(&req.id)?;
        let mut st = self.lock();
        let st = &mut *st;
        let init = st
            .init
            .as_mut()
            .ok_or_else(|| Error::NotFound(format!("task {:?} is not created", req.id)))?;
        let (proc, status) = if req.exec_id.is_empty() {
            let status = match init.proc.exited() {
                Some(_) => Status::STOPPED,
                None if init.restore.is_some() => Status::CREATED,
                None => {
                    let _ = init.container.refresh_status();
                    match init.container.status() {
                        ContainerStatus::Paused => Status::PAUSED,
                        ContainerStatus::Created | ContainerStatus::Creating => Status::CREATED,
                        ContainerStatus::Running => Status::RUNNING,
                        // Gone, its exit not reaped yet.
                        ContainerStatus::Stopped => Status::RUNNING,
                    }
                }
            };
            (&init.proc, status)
        } else {
            let (p, _) = st
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {:?} does not exist", req.exec_id)))?;
            let status = match (p.pid, p.exited()) {
                (_, Some(_)) => Status::STOPPED,
                (0, None) => Status::CREATED,
                _ => Status::RUNNING,
            };
            (p, status)
        };
        let exit = proc.exited();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: self.bundle.display().to_string(),
            pid: proc.pid.unsigned_abs(),
            status: status.into(),
            stdin: proc.stdin.clone(),
            stdout: proc.stdout.clone(),
            stderr: proc.stderr.clone(),
            terminal: proc.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| ts(e.at)).unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn delete(&self, req: &DeleteRequest) -> Result<DeleteResponse> {
        self.check_id(&req.id)?;
        let mut st = self.lock();
        if !req.exec_id.is_empty() {
            let (p, _) = st
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {:?} does not exist", req.exec_id)))?;
            if p.pid != 0 && p.exited().is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "exec {:?} is running",
                    req.exec_id
                )));
            }
            let (p, spec) = st.execs.remove(&req.exec_id).expect("checked above");
            if let Some(s) = spec {
                let _ = std::fs::remove_file(s);
            }
            let exit = p.exited();
            return Ok(DeleteResponse {
                pid: p.pid.unsigned_abs(),
                exit_status: exit.map(|e| e.status).unwrap_or(0),
                exited_at: exit.map(|e| ts(e.at)).unwrap_or_default(),
                ..Default::default()
            });
        }
        let init = st
            .init
            .as_mut()
            .ok_or_else(|| Error::NotFound(format!("task {:?} is not created", req.id)))?;
        if init.started && init.proc.exited().is_none() {
            return Err(Error::FailedPrecondition(format!(
                "task {:?} is running",
                req.id
            )));
        }
        ctr::delete(&mut init.container)?;
        let exit = match init.proc.exited() {
            Some(e) => e,
            None => {
                // Created, never started: delete killed it.
                let e = Exit::killed();
                init.proc.set_exit(e);
                e
            }
        };
        let pid = init.proc.pid.unsigned_abs();
        st.init = None;
        st.execs.clear();
        drop(st);
        ctr::unmount_rootfs(&self.bundle);
        let _ = std::fs::remove_file(self.bundle.join(launch::ROOT_FILE));
        self.events.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            &TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: ts(exit.at),
                id: req.id.clone(),
                ..Default::default()
            },
        );
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    fn kill(&self, req: &KillRequest) -> Result<()> {
        self.check_id(&req.id)?;
        // 0 only asks whether the process is there.
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (0..=64).contains(s))
            .ok_or_else(|| {
                Error::InvalidArgument(format!("signal {}: not a signal", req.signal))
            })?;
        let mut st = self.lock();
        let st = &mut *st;
        let init = st
            .init
            .as_mut()
            .ok_or_else(|| Error::NotFound(format!("task {:?} is not created", req.id)))?;
        let pid = if req.exec_id.is_empty() {
            if init.proc.exited().is_some() {
                return Err(Error::NotFound("process already finished".into()));
            }
            if init.proc.pid == 0 {
                // Created from a checkpoint, not restored: there is no process.
                // SIGKILL ends the task as it would a created one.
                if signal != libc::SIGKILL {
                    return Err(Error::FailedPrecondition(format!(
                        "task {:?} has no process yet (it is restored at Start)",
                        req.id
                    )));
                }
                let exit = Exit::killed();
                init.proc.set_exit(exit);
                self.publish_exit("", 0, exit);
                return Ok(());
            }
            if req.all && signal != 0 {
                // Each process of the cgroup, as it is: libcontainer's kill-all
                // would thaw a paused task and record the container as stopped.
                for pid in cgroups::pids(&init.cgroup)? {
                    // SAFETY: kill(2) with plain integers.
                    unsafe { libc::kill(pid, signal) };
                }
                // A frozen process dies only once thawed (other signals wait
                // for the resume).
                let _ = init.container.refresh_status();
                if signal == libc::SIGKILL && init.container.status() == ContainerStatus::Paused {
                    ctr::resume(&mut init.container)?;
                }
                return Ok(());
            }
            init.proc.pid
        } else {
            let (p, _) = st
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {:?} does not exist", req.exec_id)))?;
            if p.pid == 0 {
                return Err(Error::FailedPrecondition(format!(
                    "exec {:?} has not started",
                    req.exec_id
                )));
            }
            if p.exited().is_some() {
                return Err(Error::NotFound("process already finished".into()));
            }
            p.pid
        };
        // SAFETY: kill(2) with plain integers; real-time signals included.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(match nix::errno::Errno::last() {
                nix::errno::Errno::ESRCH => Error::NotFound("process already finished".into()),
                e => Error::Internal(format!("kill: {e}")),
            });
        }
        Ok(())
    }

    fn exec(&self, req: &ExecProcessRequest) -> Result<()> {
        self.check_id(&req.id)?;
        let id = &req.exec_id;
        if id.is_empty()
            || id.len() > MAX_EXEC_ID
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(Error::InvalidArgument(format!(
                "exec_id {id:?}: 1 to {MAX_EXEC_ID} letters, digits, '.', '_' or '-'"
            )));
        }
        let spec = bounded_json("spec", &req.spec)?;
        let process: oci_spec::runtime::Process = serde_json::from_slice(spec).map_err(|e| {
            Error::InvalidArgument(format!("spec: not a runtime-spec Process: {e}"))
        })?;
        if process.terminal().unwrap_or(false) != req.terminal {
            return Err(Error::InvalidArgument(
                "terminal: differs from spec.terminal".into(),
            ));
        }
        let mut st = self.lock();
        let st = &mut *st;
        let init = st
            .init
            .as_ref()
            .ok_or_else(|| Error::NotFound(format!("task {:?} is not created", req.id)))?;
        if init.proc.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "task {:?} has exited",
                req.id
            )));
        }
        if st.execs.contains_key(id) {
            return Err(Error::AlreadyExists(format!("exec {id:?} exists")));
        }
        if st.execs.len() >= MAX_EXECS {
            return Err(Error::FailedPrecondition(format!(
                "task {:?} has {MAX_EXECS} exec processes; delete some first",
                req.id
            )));
        }
        let dir = init.root.join(&self.id);
        let path = dir.join(format!("exec-{id}.json"));
        std::fs::write(&path, spec)
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
        st.execs.insert(
            id.clone(),
            (
                Proc::new(id, &req.stdin, &req.stdout, &req.stderr, req.terminal),
                Some(path),
            ),
        );
        self.events.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            &TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: id.clone(),
                ..Default::default()
            },
        );
        Ok(())
    }

    fn with_init<T>(&self, id: &str, f: impl FnOnce(&mut Init) -> Result<T>) -> Result<T> {
        self.check_id(id)?;
        let mut st = self.lock();
        let init = st
            .init
            .as_mut()
            .ok_or_else(|| Error::NotFound(format!("task {id:?} is not created")))?;
        f(init)
    }

    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Proc) -> Result<T>,
    ) -> Result<T> {
        self.check_id(id)?;
        let mut st = self.lock();
        let st = &mut *st;
        if exec_id.is_empty() {
            let init = st
                .init
                .as_mut()
                .ok_or_else(|| Error::NotFound(format!("task {id:?} is not created")))?;
            return f(&mut init.proc);
        }
        let (p, _) = st
            .execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id:?} does not exist")))?;
        f(p)
    }

    /// Pause (`true`) or resume, then `/tasks/paused` or `/tasks/resumed`.
    fn freeze(&self, id: &str, pause: bool) -> Result<()> {
        self.with_init(id, |i| {
            if pause {
                ctr::pause(&mut i.container)
            } else {
                ctr::resume(&mut i.container)
            }
        })?;
        let container_id = id.to_string();
        if pause {
            let e = TaskPaused {
                container_id,
                ..Default::default()
            };
            self.events.publish(topics::TASK_PAUSED_EVENT_TOPIC, &e);
        } else {
            let e = TaskResumed {
                container_id,
                ..Default::default()
            };
            self.events.publish(topics::TASK_RESUMED_EVENT_TOPIC, &e);
        }
        Ok(())
    }

    fn pids(&self, req: &PidsRequest) -> Result<PidsResponse> {
        self.check_id(&req.id)?;
        let st = self.lock();
        let init = st
            .init
            .as_ref()
            .ok_or_else(|| Error::NotFound(format!("task {:?} is not created", req.id)))?;
        let pids = cgroups::pids(&init.cgroup)?;
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let exec = st.execs.values().find(|(p, _)| p.pid == pid && pid != 0);
            let info = match exec {
                Some((p, _)) => MessageField::some(pack(&ProcessDetails {
                    exec_id: p.exec_id.clone(),
                    ..Default::default()
                })?),
                None => MessageField::none(),
            };
            processes.push(ProcessInfo {
                pid: pid.unsigned_abs(),
                info,
                ..Default::default()
            });
        }
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn update(&self, req: &api::UpdateTaskRequest) -> Result<()> {
        let raw = bounded_json("resources", &req.resources)?;
        let resources: Option<oci_spec::runtime::LinuxResources> = match raw {
            [] => None,
            raw => Some(serde_json::from_slice(raw).map_err(|e| {
                Error::InvalidArgument(format!("resources: not LinuxResources: {e}"))
            })?),
        };
        self.with_init(&req.id, |init| {
            if init.proc.exited().is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "task {:?} has exited",
                    req.id
                )));
            }
            if let Some(r) = &resources {
                cgroups::update(&init.cgroup, r)?;
            }
            // Annotations go into the container's state, which is what its OCI
            // hooks are given.
            if !req.annotations.is_empty() {
                let c = &mut init.container;
                let mut all = c.state.annotations.clone().unwrap_or_default();
                all.extend(req.annotations.iter().map(|(k, v)| (k.clone(), v.clone())));
                c.set_annotations(Some(all));
                c.save()
                    .map_err(|e| Error::Internal(format!("annotations: {e}")))?;
            }
            Ok(())
        })
    }
}

/// The terminal copies of `proc`, started and running, when it has a `master`.
/// A process whose terminal cannot be served is unusable: it is killed (its
/// exit reaped as any) and the error returned.
fn console_or_kill(master: Option<OwnedFd>, proc: &Proc) -> Result<Option<Console>> {
    master
        .map(|m| Console::start(m, &proc.stdin, &proc.stdout))
        .transpose()
        .inspect_err(|_| {
            // SAFETY: kill(2) with plain integers.
            unsafe { libc::kill(proc.pid, libc::SIGKILL) };
        })
}

/// A new process's stdio: its descriptors, or a terminal (whose FIFOs, copied by
/// the shim, must be FIFOs: checked before anything is made).
fn streams(terminal: bool, stdin: &str, stdout: &str, stderr: &str) -> Result<(Streams, Held)> {
    if terminal {
        crate::console::check(stdin, stdout)?;
        return Ok((Streams::Terminal(ConsoleSocket::new()?), Held::default()));
    }
    let o = stdio::open(stdin, stdout, stderr)?;
    Ok((
        Streams::Fds {
            stdin: o.stdin,
            stdout: o.stdout,
            stderr: o.stderr,
        },
        o.held,
    ))
}

/// Refuses what libcontainer, built as the keel shim builds it, would not do.
fn check_spec(bundle: &Path) -> Result<()> {
    let path = bundle.join("config.json");
    let raw = std::fs::read(&path)
        .map_err(|e| Error::InvalidArgument(format!("bundle: {}: {e}", path.display())))?;
    let spec: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| Error::InvalidArgument(format!("bundle: config.json: {e}")))?;
    if !spec["linux"]["seccomp"].is_null() {
        return Err(Error::InvalidArgument(
            "config.json linux.seccomp: io.containerd.keel.v1 is built without seccomp".into(),
        ));
    }
    Ok(())
}

/// Gives this process (and so the container it makes next) a new session keyring.
fn new_session_keyring() -> Result<()> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: keyctl(JOIN_SESSION_KEYRING, NULL) joins a new anonymous keyring.
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if r < 0 {
        return Err(Error::Internal(format!(
            "new session keyring: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Gives back to the kernel what making a container left free on the heap (the
/// shim lives as long as its task; that memory would stay with it).
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
}

/// The ttrpc face of [`Shim`].
#[derive(Debug, Clone)]
struct Service(Arc<Shim>);

type Rpc<T> = ttrpc::Result<T>;

#[async_trait]
impl Task for Service {
    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> Rpc<StateResponse> {
        Ok(self.0.state(&req)?)
    }

    async fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> Rpc<CreateTaskResponse> {
        let created = self.0.create(req);
        trim_heap();
        Ok(created?)
    }

    async fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> Rpc<api::StartResponse> {
        let started = self.0.start(req);
        trim_heap();
        Ok(started?)
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> Rpc<DeleteResponse> {
        Ok(self.0.delete(&req)?)
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> Rpc<PidsResponse> {
        Ok(self.0.pids(&req)?)
    }

    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> Rpc<Empty> {
        self.0.freeze(&req.id, true)?;
        Ok(Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> Rpc<Empty> {
        self.0.freeze(&req.id, false)?;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _: &TtrpcContext, req: api::CheckpointTaskRequest) -> Rpc<Empty> {
        self.0.checkpoint(&req)?;
        Ok(Empty::new())
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> Rpc<Empty> {
        self.0.kill(&req)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> Rpc<Empty> {
        self.0.exec(&req)?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> Rpc<Empty> {
        self.0
            .with_proc(&req.id, &req.exec_id, |p| match &p.console {
                Some(c) => c.resize(req.width, req.height),
                None => Err(Error::FailedPrecondition(
                    "resize: the process has no terminal".into(),
                )),
            })?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> Rpc<Empty> {
        self.0.with_proc(&req.id, &req.exec_id, |p| {
            if req.stdin {
                p.held.stdin = None;
                if let Some(c) = p.console.as_mut() {
                    c.close_stdin();
                }
            }
            Ok(())
        })?;
        Ok(Empty::new())
    }

    async fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> Rpc<Empty> {
        self.0.update(&req)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> Rpc<WaitResponse> {
        let mut rx = self
            .0
            .with_proc(&req.id, &req.exec_id, |p| Ok(p.exit.subscribe()))?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::NotFound(format!("task {:?} was deleted", req.id)))?
            .expect("waited for an exit");
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> Rpc<StatsResponse> {
        let cgroup = self.0.with_init(&req.id, |i| Ok(i.cgroup.clone()))?;
        Ok(StatsResponse {
            stats: MessageField::some(cgroups::metrics(&cgroup)?),
            ..Default::default()
        })
    }

    async fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> Rpc<ConnectResponse> {
        self.0.check_id(&req.id)?;
        let task_pid = self
            .0
            .lock()
            .init
            .as_ref()
            .map(|i| i.proc.pid.unsigned_abs())
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> Rpc<Empty> {
        // As containerd's shims: nothing while the task still exists.
        if self.0.lock().init.is_none() {
            self.0.shutdown.notify_one();
        }
        Ok(Empty::new())
    }
}

/// The task service under both names: v2 (containerd 1.6, keeld) and v3.
fn services(shim: Arc<Shim>) -> HashMap<String, ttrpc::asynchronous::Service> {
    let task: Arc<dyn Task + Send + Sync> = Arc::new(Service(shim));
    let mut all = create_task(task.clone());
    let v3 = create_task(task);
    for (name, service) in v3 {
        all.insert(name.replace(".v3.", ".v2."), service);
    }
    all
}

/// Runs the long-running shim until Shutdown (after Delete), SIGTERM or SIGINT.
pub fn serve(args: &Args) -> std::result::Result<(), String> {
    guard::return_home().map_err(|e| format!("mount namespace: {e}"))?;
    let bundle = std::env::current_dir().map_err(|e| format!("working directory: {e}"))?;
    // Logs go to the bundle's FIFO, which whoever started the shim reads.
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(bundle.join("log"))
        .map_err(|e| format!("log FIFO: {e}"))?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&log), 2)
        .map_err(|e| format!("log FIFO: {e}"))?;
    drop(log);
    if !guard::holds() {
        log_warn!("the shim's binary is not on a read-only mount: a container could rewrite it");
    }
    reaper::become_subreaper().map_err(|e| format!("subreaper: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let socket = launch::socket_path(args);
    let served = rt.block_on(async {
        let shim = Arc::new(Shim {
            id: args.id.clone(),
            bundle: bundle.clone(),
            events: Publisher::start(&args.namespace),
            state: Mutex::new(State::default()),
            shutdown: Notify::new(),
        });
        let s = shim.clone();
        reaper::start(move |pid, exit| s.exited(pid, exit)).map_err(|e| format!("SIGCHLD: {e}"))?;
        // Not for the hooks and containers this process starts.
        nix::fcntl::fcntl(
            3,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| format!("listening socket: {e}"))?;
        // SAFETY: fd 3 is the listening socket `start` passed, owned by nothing else.
        let server = unsafe { ttrpc::asynchronous::Server::new().add_unix_listener(3) }
            .map_err(|e| format!("listen: {e}"))?;
        let mut server = server.register_service(services(shim.clone()));
        server.start().await.map_err(|e| format!("serve: {e}"))?;
        log_info!("serving task {} in namespace {}", args.id, args.namespace);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = shim.shutdown.notified() => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = server.shutdown().await;
        Ok::<_, String>(())
    });
    let _ = std::fs::remove_file(socket);
    served
}
