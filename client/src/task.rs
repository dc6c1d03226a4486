//! Tasks and processes: a [`Task`] is a container's running instance and its init
//! process; a [`Process`] is one process of it (the init process, or one added
//! with [`Task::exec`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use keel_protocol::api::tasks::*;
use keel_protocol::api::types::{Descriptor, Mount};
use keel_protocol::types::{json_any, system_time, LINUX_RESOURCES_TYPE_URL, PROCESS_TYPE_URL};
use keel_protocol::{Error, Result};
use protobuf::well_known_types::any::Any;
use protobuf::{Enum, MessageField};

use crate::checkpoint::CheckpointOptions;
use crate::client::{Client, Retry};
use crate::containers::Limits;
use crate::io::{Io, Streams};
use crate::metrics::Metrics;

/// How long output copies may go on after a process exits.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// A process's exit: its status and when it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, or 128 + the signal that killed it.
    pub code: u32,
    /// When it exited.
    pub exited_at: SystemTime,
}

/// A process's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited.
    Stopped,
    /// Frozen.
    Paused,
    /// Being frozen.
    Pausing,
    /// keeld does not know (its shim is not answering).
    Unknown,
}

impl Status {
    fn from_proto(s: i32) -> Self {
        match keel_protocol::api::tasks::Status::from_i32(s) {
            Some(keel_protocol::api::tasks::Status::CREATED) => Status::Created,
            Some(keel_protocol::api::tasks::Status::RUNNING) => Status::Running,
            Some(keel_protocol::api::tasks::Status::STOPPED) => Status::Stopped,
            Some(keel_protocol::api::tasks::Status::PAUSED) => Status::Paused,
            Some(keel_protocol::api::tasks::Status::PAUSING) => Status::Pausing,
            _ => Status::Unknown,
        }
    }

    /// The name keelctl and ctr print: `RUNNING`, `STOPPED`…
    pub fn name(self) -> &'static str {
        match self {
            Status::Created => "CREATED",
            Status::Running => "RUNNING",
            Status::Stopped => "STOPPED",
            Status::Paused => "PAUSED",
            Status::Pausing => "PAUSING",
            Status::Unknown => "UNKNOWN",
        }
    }
}

/// What keeld reports of a process (`Tasks.Get`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// The container's id.
    pub id: String,
    /// Its pid on the host (0 before it starts).
    pub pid: u32,
    /// Its state.
    pub status: Status,
    /// Its exit, once it has one.
    pub exit: Option<ExitStatus>,
    /// Its stdio as the shim was given it (FIFO paths, `file://` URLs, or empty).
    pub stdin: String,
    /// See `stdin`.
    pub stdout: String,
    /// See `stdin`.
    pub stderr: String,
    /// Whether it has a terminal.
    pub terminal: bool,
}

impl TaskState {
    fn from_proto(p: keel_protocol::api::tasks::Process) -> Self {
        let status = Status::from_proto(p.status.value());
        Self {
            id: p.container_id,
            pid: p.pid,
            status,
            exit: (status == Status::Stopped).then(|| exit_status(p.exit_status, &p.exited_at)),
            stdin: p.stdin,
            stdout: p.stdout,
            stderr: p.stderr,
            terminal: p.terminal,
        }
    }
}

/// One process of a task (`Tasks.ListPids`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its pid on the host.
    pub pid: u32,
    /// The exec id it was added with; empty for the init process and for
    /// processes it started itself.
    pub exec_id: String,
}

/// Options of a task's creation, beyond its IO.
#[derive(Debug, Clone, Default)]
pub struct TaskOptions {
    /// Runtime options for this task, replacing the container's.
    pub runtime_options: Option<Any>,
    /// Root filesystem mounts for this task (when its container has none).
    pub rootfs: Vec<Mount>,
    /// A checkpoint (its index descriptor) to restore the task from.
    pub checkpoint: Option<Descriptor>,
    /// The shim binary (an absolute path) to run this task with, instead of its
    /// container's runtime: containerd's `WithRuntimePath`.
    pub runtime_path: Option<String>,
}

/// One process: a task's init process, or one added with [`Task::exec`].
pub struct Process {
    client: Client,
    container_id: String,
    exec_id: String,
    io: Mutex<Io>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("container_id", &self.container_id)
            .field("exec_id", &self.exec_id)
            .finish()
    }
}

fn exit_status(
    code: u32,
    at: &MessageField<protobuf::well_known_types::timestamp::Timestamp>,
) -> ExitStatus {
    ExitStatus {
        code,
        exited_at: at.as_ref().map_or(SystemTime::UNIX_EPOCH, system_time),
    }
}

impl Process {
    fn new(client: Client, container_id: &str, exec_id: &str, io: Io) -> Self {
        Self {
            client,
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            io: Mutex::new(io),
        }
    }

    /// The container's id.
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// The exec id; empty for a task's init process.
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// Starts the process; returns its pid. Its stdin, if the [`Io`] has a source
    /// for it, is copied from now on and closed when the source ends.
    pub async fn start(&self) -> Result<u32> {
        let req = StartRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        };
        let r = self
            .client
            .call("Tasks.Start", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.start(ctx, &req).await }
            })
            .await?;
        let stdin = self.lock_io().take_stdin().map_err(|e| {
            Error::Internal(format!(
                "{} started, but its stdin cannot be opened: {e}",
                self.describe()
            ))
        })?;
        if let Some((mut fifo, mut source)) = stdin {
            let (client, id, exec_id) = (
                self.client.clone(),
                self.container_id.clone(),
                self.exec_id.clone(),
            );
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut source, &mut fifo).await;
                drop(fifo);
                let _ = close_stdin(&client, &id, &exec_id).await;
            });
        }
        Ok(r.pid)
    }

    /// "task ID" or "process EXEC of task ID", for messages.
    fn describe(&self) -> String {
        if self.exec_id.is_empty() {
            format!("task {}", self.container_id)
        } else {
            format!("process {} of task {}", self.exec_id, self.container_id)
        }
    }

    fn lock_io(&self) -> std::sync::MutexGuard<'_, Io> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the process to exit. Resolves once, with the exit keeld
    /// recorded, even if keeld crashed and restarted in between (the call is
    /// made again once keeld is back, and keeld answers with the exit it
    /// recorded or found at restore).
    pub async fn wait(&self) -> Result<ExitStatus> {
        let req = WaitRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        };
        let ctx = self.client.context_with(None);
        let r = self
            .client
            .call_in("Tasks.Wait", Retry::Always, ctx, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.wait(ctx, &req).await }
            })
            .await?;
        Ok(exit_status(r.exit_status, &r.exited_at))
    }

    /// Waits (up to 5 s) for the output this process wrote to be copied out, for
    /// an [`Io::copy`]; returns at once for other IO.
    pub async fn wait_output(&self) {
        let mut io = std::mem::take(&mut *self.lock_io());
        io.finish(OUTPUT_DRAIN).await;
    }

    /// Sends `signal` to the process.
    pub async fn kill(&self, signal: u32) -> Result<()> {
        self.kill_request(signal, false).await
    }

    async fn kill_request(&self, signal: u32, all: bool) -> Result<()> {
        let req = KillRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            signal,
            all,
            ..Default::default()
        };
        self.client
            .call("Tasks.Kill", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.kill(ctx, &req).await }
            })
            .await?;
        Ok(())
    }

    /// Tells the shim the process's stdin is done (end-of-file once what was
    /// written is read).
    pub async fn close_stdin(&self) -> Result<()> {
        close_stdin(&self.client, &self.container_id, &self.exec_id).await
    }

    /// Sets the size of the process's terminal.
    pub async fn resize(&self, width: u32, height: u32) -> Result<()> {
        let req = ResizePtyRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            width,
            height,
            ..Default::default()
        };
        self.client
            .call("Tasks.ResizePty", Retry::Always, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.resize_pty(ctx, &req).await }
            })
            .await?;
        Ok(())
    }

    /// The process's state.
    pub async fn status(&self) -> Result<TaskState> {
        let req = GetRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        };
        let r = self
            .client
            .call("Tasks.Get", Retry::Always, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.get(ctx, &req).await }
            })
            .await?;
        Ok(TaskState::from_proto(r.process.unwrap_or_default()))
    }

    /// Re-attaches to the process's stdio FIFOs: for a process whose IO was made
    /// with [`crate::io::Fifos::dir`] by another program, or an earlier run of
    /// this one. FailedPrecondition if its stdio is not FIFOs.
    pub async fn attach(&self) -> Result<Streams> {
        let s = self.status().await?;
        crate::io::attach(&s.stdin, &s.stdout, &s.stderr)
    }

    /// Deletes an exited exec process; returns its exit.
    pub async fn delete(&self) -> Result<ExitStatus> {
        let req = DeleteProcessRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        };
        let r = self
            .client
            .call("Tasks.DeleteProcess", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.delete_process(ctx, &req).await }
            })
            .await?;
        Ok(exit_status(r.exit_status, &r.exited_at))
    }
}

async fn close_stdin(client: &Client, id: &str, exec_id: &str) -> Result<()> {
    let req = CloseIORequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        stdin: true,
        ..Default::default()
    };
    client
        .call("Tasks.CloseIO", Retry::Always, |raw, ctx| {
            let req = req.clone();
            async move { raw.tasks.close_io(ctx, &req).await }
        })
        .await?;
    Ok(())
}

/// A container's task: its init process ([`Process`]'s methods apply to it) and
/// what acts on the whole task.
#[derive(Debug)]
pub struct Task {
    init: Process,
    pid: u32,
}

impl std::ops::Deref for Task {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.init
    }
}

impl Task {
    /// Creates the task of container `id` with `io` as its init process's stdio;
    /// it is created, not started. [`crate::Container::new_task`] does the same
    /// from a container in hand.
    pub async fn create(client: Client, id: &str, io: Io, options: TaskOptions) -> Result<Self> {
        let req = CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: options.rootfs,
            stdin: io.stdin.clone(),
            stdout: io.stdout.clone(),
            stderr: io.stderr.clone(),
            terminal: io.terminal,
            log_to_file: io.log_to_file,
            checkpoint: options.checkpoint.into(),
            options: options.runtime_options.into(),
            runtime_path: options.runtime_path.unwrap_or_default(),
            ..Default::default()
        };
        let r = client
            .call("Tasks.Create", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.create(ctx, &req).await }
            })
            .await?;
        Ok(Self {
            init: Process::new(client, id, "", io),
            pid: r.pid,
        })
    }

    pub(crate) async fn load(client: Client, id: &str) -> Result<Self> {
        let mut task = Self::handle(client, id);
        task.pid = task.init.status().await?.pid;
        Ok(task)
    }

    /// A handle to container `id`'s task, with no call made: whether there is one
    /// shows in the first call (NotFound), and [`Task::pid`] is 0.
    pub(crate) fn handle(client: Client, id: &str) -> Self {
        Self {
            init: Process::new(client, id, "", Io::null()),
            pid: 0,
        }
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        &self.init.container_id
    }

    /// The init process's pid when the task was created or loaded.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Starts the task and waits for it to exit, with the wait begun before the
    /// start (as ctr does), so that even an instant exit is answered at once.
    pub async fn wait_after_start(&self) -> Result<ExitStatus> {
        let waiting = self.wait();
        tokio::pin!(waiting);
        tokio::select! {
            biased;
            r = &mut waiting => return r,
            started = self.start() => { started?; }
        }
        waiting.await
    }

    /// Sends `signal` to every process of the task.
    pub async fn kill_all(&self, signal: u32) -> Result<()> {
        self.init.kill_request(signal, true).await
    }

    /// Freezes every process of the task.
    pub async fn pause(&self) -> Result<()> {
        let req = PauseTaskRequest {
            container_id: self.id().to_string(),
            ..Default::default()
        };
        self.client
            .call("Tasks.Pause", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.pause(ctx, &req).await }
            })
            .await?;
        Ok(())
    }

    /// Thaws a paused task.
    pub async fn resume(&self) -> Result<()> {
        let req = ResumeTaskRequest {
            container_id: self.id().to_string(),
            ..Default::default()
        };
        self.client
            .call("Tasks.Resume", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.resume(ctx, &req).await }
            })
            .await?;
        Ok(())
    }

    /// Adds a process running `args` with the container's environment, working
    /// directory and user; it is created, not started.
    pub async fn exec(&self, exec_id: &str, args: &[&str], io: Io) -> Result<Process> {
        let container = self.client.containers().get(self.id()).await?;
        let mut process = container.spec()?["process"].clone();
        if !process.is_object() {
            return Err(Error::FailedPrecondition(format!(
                "container {}'s spec has no process to start from",
                self.id()
            )));
        }
        process["args"] = serde_json::json!(args);
        process["terminal"] = serde_json::json!(io.terminal);
        let spec = serde_json::to_vec(&process).map_err(|e| Error::Internal(e.to_string()))?;
        self.exec_spec(exec_id, spec, io).await
    }

    /// Adds a process from a whole OCI process spec (JSON).
    pub async fn exec_spec(&self, exec_id: &str, process_json: Vec<u8>, io: Io) -> Result<Process> {
        let req = ExecProcessRequest {
            container_id: self.id().to_string(),
            exec_id: exec_id.to_string(),
            stdin: io.stdin.clone(),
            stdout: io.stdout.clone(),
            stderr: io.stderr.clone(),
            terminal: io.terminal,
            spec: MessageField::some(json_any(PROCESS_TYPE_URL, process_json)),
            ..Default::default()
        };
        self.client
            .call("Tasks.Exec", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.exec(ctx, &req).await }
            })
            .await?;
        Ok(Process::new(self.client.clone(), self.id(), exec_id, io))
    }

    /// A process of this task added earlier, by exec id.
    pub fn process(&self, exec_id: &str) -> Process {
        Process::new(self.client.clone(), self.id(), exec_id, Io::null())
    }

    /// The task's processes, with the exec ids of those added by exec.
    pub async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        let req = ListPidsRequest {
            container_id: self.id().to_string(),
            ..Default::default()
        };
        let r = self
            .client
            .call("Tasks.ListPids", Retry::Always, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.list_pids(ctx, &req).await }
            })
            .await?;
        Ok(r.processes
            .into_iter()
            .map(|p| ProcessInfo {
                pid: p.pid,
                exec_id: p.exec_id,
            })
            .collect())
    }

    /// Changes the task's resource limits (those set in `limits`) and its
    /// annotations.
    pub async fn update(&self, limits: &Limits, annotations: &[(&str, &str)]) -> Result<()> {
        let resources = if limits.is_empty() {
            MessageField::none()
        } else {
            let json = serde_json::to_vec(&limits.resources()?)
                .map_err(|e| Error::Internal(e.to_string()))?;
            MessageField::some(json_any(LINUX_RESOURCES_TYPE_URL, json))
        };
        let req = UpdateTaskRequest {
            container_id: self.id().to_string(),
            resources,
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect::<HashMap<_, _>>(),
            ..Default::default()
        };
        self.client
            .call("Tasks.Update", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.update(ctx, &req).await }
            })
            .await?;
        Ok(())
    }

    /// The task's cgroup statistics, decoded (cgroup v1 or v2).
    pub async fn metrics(&self) -> Result<Metrics> {
        let req = MetricsRequest {
            filters: vec![format!("id=={}", self.id())],
            ..Default::default()
        };
        let r = self
            .client
            .call("Tasks.Metrics", Retry::Always, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.metrics(ctx, &req).await }
            })
            .await?;
        let Some(m) = r.metrics.into_iter().find(|m| m.id == self.id()) else {
            return Err(Error::NotFound(format!(
                "task {} has no metrics (is it running?)",
                self.id()
            )));
        };
        Metrics::decode(m.data.get_or_default())
    }

    /// Checkpoints the task with CRIU; returns the checkpoint's index descriptor
    /// in the content store (none when an image path was given).
    pub async fn checkpoint(&self, options: &CheckpointOptions) -> Result<Option<Descriptor>> {
        let req = options.request(self.id())?;
        let r = self
            .client
            .call("Tasks.Checkpoint", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.checkpoint(ctx, &req).await }
            })
            .await?;
        Ok(r.descriptors.into_iter().next())
    }

    /// Where keeld logs the task's output, for a task made with [`Io::keel_log`].
    pub async fn log_path(&self) -> Result<std::path::PathBuf> {
        let s = self.status().await?;
        match s.stdout.strip_prefix("file://") {
            Some(p) => Ok(p.into()),
            None => Err(Error::FailedPrecondition(format!(
                "task {} is not detached; it has no log file",
                self.id()
            ))),
        }
    }

    /// Deletes the task (with `force`, killing it first if it runs); returns the
    /// init process's exit.
    pub async fn delete(&self, force: bool) -> Result<ExitStatus> {
        let req = DeleteTaskRequest {
            container_id: self.id().to_string(),
            force,
            ..Default::default()
        };
        let r = self
            .client
            .call("Tasks.Delete", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.tasks.delete(ctx, &req).await }
            })
            .await?;
        Ok(exit_status(r.exit_status, &r.exited_at))
    }
}

/// Every task of the client's namespace matching `filter` (on `id`, `pid`,
/// `status`…; empty for all), as keeld reports them.
pub async fn list(client: &Client, filter: &str) -> Result<Vec<TaskState>> {
    let req = ListTasksRequest {
        filter: filter.to_string(),
        ..Default::default()
    };
    let r = client
        .call("Tasks.List", Retry::Always, |raw, ctx| {
            let req = req.clone();
            async move { raw.tasks.list(ctx, &req).await }
        })
        .await?;
    Ok(r.tasks.into_iter().map(TaskState::from_proto).collect())
}
