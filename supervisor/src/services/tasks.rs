//! `keel.services.tasks.v1.Tasks`: thin handlers over the task actors.

use std::sync::Arc;

use keel_actors::runtime_options;
use keel_actors::state::TaskState;
use keel_actors::storage::StorageHandle;
use keel_actors::task::{
    verify_checkpoint, CheckpointRequest, CreateTask, ExecSpec, Restore, TaskInfo, Tasks,
};
use keel_protocol::api::tasks::*;
use keel_protocol::api::tasks_ttrpc;
use keel_protocol::api::types::Descriptor;
use keel_protocol::filters::Adaptor;
use keel_protocol::limits::Limits;
use keel_protocol::types::timestamp;
use keel_protocol::{identifiers, validate, Error};
use keel_storage::meta::{from_nanos, ContainerRecord, ExitRecord};
use keel_storage::Meta;
use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use ttrpc::asynchronous::TtrpcContext;

use super::{blocking, filters, guarded, Rpc};
use crate::server::Auth;

#[derive(Debug)]
pub struct TasksService {
    pub auth: Arc<Auth>,
    pub meta: Meta,
    pub tasks: Tasks,
    /// The content store, where checkpoints go and restores come from.
    pub storage: StorageHandle,
    pub limits: Arc<Limits>,
}

fn status(s: TaskState) -> Status {
    match s {
        TaskState::Created => Status::CREATED,
        TaskState::Running => Status::RUNNING,
        TaskState::Pausing => Status::PAUSING,
        TaskState::Paused => Status::PAUSED,
        TaskState::Stopped => Status::STOPPED,
        TaskState::Unknown => Status::UNKNOWN,
    }
}

/// A process of task `container_id` as the API shows it: its id is its exec id,
/// or (as containerd has it) the task's own id for the init process, which is
/// what `TaskInfo::id` holds either way.
fn process(container_id: &str, i: &TaskInfo) -> Process {
    Process {
        container_id: container_id.to_string(),
        id: i.id.clone(),
        pid: i.pid,
        status: status(i.state).into(),
        stdin: i.stdin.clone(),
        stdout: i.stdout.clone(),
        stderr: i.stderr.clone(),
        terminal: i.terminal,
        exit_status: i.exit.as_ref().map_or(0, |e| e.exit_status),
        exited_at: i
            .exit
            .as_ref()
            .map(|e| timestamp(from_nanos(e.exited_ns)))
            .into(),
        ..Default::default()
    }
}

fn id(field: &str, v: &str) -> ttrpc::Result<()> {
    identifiers::validate(field, v).rpc()
}

/// A Create's `runtime_path` (containerd's): empty, or the absolute path of a shim
/// binary that is there.
fn runtime_path(v: &str, limits: &Limits) -> ttrpc::Result<Option<String>> {
    if v.is_empty() {
        return Ok(None);
    }
    validate::path("runtime_path", v, limits).rpc()?;
    if !v.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "runtime_path {v:?}: not an absolute path to a shim binary"
        ))
        .into());
    }
    match keel_actors::shim::resolve_runtime(v).map_err(Error::from) {
        Ok(_) => Ok(Some(v.to_string())),
        Err(Error::NotFound(m)) => Err(Error::NotFound(format!("runtime_path: {m}")).into()),
        Err(Error::InvalidArgument(m)) => {
            Err(Error::InvalidArgument(format!("runtime_path: {m}")).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// An exec id, when one is given (empty: the init process).
fn exec_id(v: &str) -> ttrpc::Result<()> {
    if v.is_empty() {
        Ok(())
    } else {
        id("exec_id", v)
    }
}

/// The fields a Metrics filter can name.
struct MetricFields<'a> {
    ns: &'a str,
    id: &'a str,
}

impl Adaptor for MetricFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "id" => Some(self.id.to_string()),
            [f] if f == "namespace" => Some(self.ns.to_string()),
            _ => None,
        }
    }
}

/// The fields a List filter can name: `id`, `namespace`, `pid`, `status`
/// (`created`, `running`, `stopped`, `paused`, `pausing`, `unknown`).
struct TaskFields<'a> {
    ns: &'a str,
    info: &'a TaskInfo,
}

impl Adaptor for TaskFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "id" => Some(self.info.id.clone()),
            [f] if f == "namespace" => Some(self.ns.to_string()),
            [f] if f == "pid" => Some(self.info.pid.to_string()),
            [f] if f == "status" => {
                Some(format!("{:?}", status(self.info.state)).to_ascii_lowercase())
            }
            _ => None,
        }
    }
}

fn exit_response(
    e: &ExitRecord,
) -> (
    u32,
    MessageField<protobuf::well_known_types::timestamp::Timestamp>,
) {
    (
        e.exit_status,
        MessageField::some(timestamp(from_nanos(e.exited_ns))),
    )
}

impl TasksService {
    /// The container record a task is made from, or NotFound.
    async fn container(&self, ns: &str, id: &str) -> ttrpc::Result<ContainerRecord> {
        let (meta, ns, cid) = (self.meta.clone(), ns.to_string(), id.to_string());
        blocking(move || meta.container(&ns, &cid))
            .await?
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
            .rpc()
    }
}

#[async_trait::async_trait]
impl tasks_ttrpc::Tasks for TasksService {
    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        guarded("Tasks.Create", async move {
            let ns = self.auth.request(ctx, "Tasks.Create").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            for (field, v) in [
                ("stdin", &req.stdin),
                ("stdout", &req.stdout),
                ("stderr", &req.stderr),
            ] {
                validate::path(field, v, &self.limits).rpc()?;
            }
            if req.terminal && req.log_to_file {
                return Err(Error::InvalidArgument(
                    "terminal: a task with a terminal cannot log to a file; run it in the foreground"
                        .into(),
                )
                .into());
            }
            // Cheap checks first; a checkpoint is verified blob by blob.
            let runtime_path = runtime_path(&req.runtime_path, &self.limits)?;
            // The task's own rootfs mounts, instead of its container's.
            let rootfs = if req.rootfs.is_empty() {
                None
            } else {
                Some(super::containers::validate_rootfs("rootfs", &req.rootfs, &self.limits).rpc()?)
            };
            // The task's own runtime options, checked as a container's are.
            let options = match req.options.as_ref() {
                Some(o) => {
                    validate::options("options", o, &self.limits).rpc()?;
                    let checked = runtime_options::check("options", &o.type_url, &o.value)
                        .map_err(Error::from)
                        .rpc()?;
                    Some(((o.type_url.clone(), o.value.clone()), checked))
                }
                None => None,
            };
            // Restored from a checkpoint in the content store, or (as containerd
            // takes it, from the task's options) from a CRIU image directory.
            let image_dir = options
                .as_ref()
                .map(|(_, o)| o.criu_image_path.clone())
                .filter(|p| !p.is_empty());
            let checkpoint = match (req.checkpoint.as_ref(), image_dir) {
                (Some(_), Some(_)) => {
                    return Err(Error::InvalidArgument(
                        "options.criu_image_path: a task is restored from a checkpoint or from an image directory, not both".into(),
                    )
                    .into())
                }
                (Some(d), None) => {
                    let (store, ns2, digest) =
                        (self.storage.store().clone(), ns.clone(), d.digest.clone());
                    let max_index = self.limits.checkpoint_index_bytes;
                    Some(blocking(move || verify_checkpoint(&store, &ns2, &digest, max_index)).await?)
                }
                (None, Some(dir)) => {
                    let dir = std::path::PathBuf::from(dir);
                    if !dir.join("inventory.img").is_file() {
                        return Err(Error::FailedPrecondition(format!(
                            "options.criu_image_path: {} holds no CRIU image (no inventory.img)",
                            dir.display()
                        ))
                        .into());
                    }
                    Some(Restore::Directory(dir))
                }
                (None, None) => None,
            };
            // The id is held before anything is read or made: of two concurrent creates
            // one gets AlreadyExists and touches nothing.
            let reservation = self.tasks.reserve(&ns, &req.container_id).rpc()?;
            let container = self.container(&ns, &req.container_id).await?;
            let handle = self
                .tasks
                .create(
                    reservation,
                    CreateTask {
                        namespace: ns,
                        container,
                        stdin: req.stdin,
                        stdout: req.stdout,
                        stderr: req.stderr,
                        terminal: req.terminal,
                        log_to_file: req.log_to_file,
                        checkpoint,
                        options: options.map(|(given, _)| given),
                        rootfs,
                        runtime_path,
                    },
                )
                .await
                .rpc()?;
            let info = handle.info().await.rpc()?;
            Ok(CreateTaskResponse {
                container_id: req.container_id,
                pid: info.pid,
                ..Default::default()
            })
        })
        .await
    }

    async fn start(&self, ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        guarded("Tasks.Start", async move {
            let ns = self.auth.request(ctx, "Tasks.Start").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            exec_id(&req.exec_id)?;
            let task = self.tasks.get(&ns, &req.container_id).rpc()?;
            let pid = if req.exec_id.is_empty() {
                task.start().await
            } else {
                task.start_exec(&req.exec_id).await
            }
            .rpc()?;
            Ok(StartResponse {
                pid,
                ..Default::default()
            })
        })
        .await
    }

    async fn delete(
        &self,
        ctx: &TtrpcContext,
        req: DeleteTaskRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        guarded("Tasks.Delete", async move {
            let ns = self.auth.request(ctx, "Tasks.Delete").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            let exit = self
                .tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .delete(req.force)
                .await
                .rpc()?;
            let (exit_status, exited_at) = exit_response(&exit);
            Ok(DeleteResponse {
                id: req.container_id,
                pid: exit.pid,
                exit_status,
                exited_at,
                ..Default::default()
            })
        })
        .await
    }

    async fn delete_process(
        &self,
        ctx: &TtrpcContext,
        req: DeleteProcessRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        guarded("Tasks.DeleteProcess", async move {
            let ns = self
                .auth
                .request(ctx, "Tasks.DeleteProcess")
                .rpc()?
                .namespace;
            id("container_id", &req.container_id)?;
            id("exec_id", &req.exec_id)?;
            let exit = self
                .tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .delete_exec(&req.exec_id)
                .await
                .rpc()?;
            let (exit_status, exited_at) = exit_response(&exit);
            Ok(DeleteResponse {
                id: req.exec_id,
                pid: exit.pid,
                exit_status,
                exited_at,
                ..Default::default()
            })
        })
        .await
    }

    async fn get(&self, ctx: &TtrpcContext, req: GetRequest) -> ttrpc::Result<GetResponse> {
        guarded("Tasks.Get", async move {
            let ns = self.auth.request(ctx, "Tasks.Get").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            exec_id(&req.exec_id)?;
            let task = self.tasks.get(&ns, &req.container_id).rpc()?;
            let info = if req.exec_id.is_empty() {
                task.info().await
            } else {
                task.exec_info(&req.exec_id).await
            }
            .rpc()?;
            Ok(GetResponse {
                process: MessageField::some(process(&req.container_id, &info)),
                ..Default::default()
            })
        })
        .await
    }

    async fn list(
        &self,
        ctx: &TtrpcContext,
        req: ListTasksRequest,
    ) -> ttrpc::Result<ListTasksResponse> {
        guarded("Tasks.List", async move {
            let ns = self.auth.request(ctx, "Tasks.List").rpc()?.namespace;
            let given: Vec<String> = Some(req.filter)
                .into_iter()
                .filter(|f| !f.is_empty())
                .collect();
            let filter = filters(given, &self.limits).await?;
            let mut tasks = Vec::new();
            for h in self.tasks.list(&ns) {
                let info = h.info().await;
                let info = info
                    .ok()
                    .filter(|info| filter.matches(&TaskFields { ns: &ns, info }));
                if let Some(info) = info {
                    tasks.push(process(&info.id, &info));
                }
            }
            Ok(ListTasksResponse {
                tasks,
                ..Default::default()
            })
        })
        .await
    }

    async fn kill(&self, ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        guarded("Tasks.Kill", async move {
            let ns = self.auth.request(ctx, "Tasks.Kill").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            exec_id(&req.exec_id)?;
            // Signal 0, as with kill(2), only checks that the process is there.
            if req.signal > 64 {
                return Err(Error::InvalidArgument(format!(
                    "signal {} is not a signal number (0-64)",
                    req.signal
                ))
                .into());
            }
            self.tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .kill(&req.exec_id, req.signal, req.all)
                .await
                .rpc()?;
            Ok(Empty::new())
        })
        .await
    }

    async fn wait(&self, ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        guarded("Tasks.Wait", async move {
            let ns = self.auth.request(ctx, "Tasks.Wait").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            exec_id(&req.exec_id)?;
            let exit = self
                .tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .wait(&req.exec_id)
                .await
                .rpc()?;
            let (exit_status, exited_at) = exit_response(&exit);
            Ok(WaitResponse {
                exit_status,
                exited_at,
                ..Default::default()
            })
        })
        .await
    }

    async fn list_pids(
        &self,
        ctx: &TtrpcContext,
        req: ListPidsRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        guarded("Tasks.ListPids", async move {
            let ns = self.auth.request(ctx, "Tasks.ListPids").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            let pids = self
                .tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .pids()
                .await
                .rpc()?;
            Ok(ListPidsResponse {
                processes: pids
                    .into_iter()
                    .map(|p| ProcessInfo {
                        pid: p.pid,
                        exec_id: p.exec_id,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        })
        .await
    }

    async fn exec(&self, ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        guarded("Tasks.Exec", async move {
            let ns = self.auth.request(ctx, "Tasks.Exec").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            id("exec_id", &req.exec_id)?;
            for (field, v) in [
                ("stdin", &req.stdin),
                ("stdout", &req.stdout),
                ("stderr", &req.stderr),
            ] {
                validate::path(field, v, &self.limits).rpc()?;
            }
            let process =
                validate::process("spec", req.spec.as_ref(), req.terminal, &self.limits).rpc()?;
            self.tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .exec(ExecSpec {
                    exec_id: req.exec_id,
                    process,
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                })
                .await
                .rpc()?;
            Ok(Empty::new())
        })
        .await
    }

    async fn resize_pty(&self, ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        guarded("Tasks.ResizePty", async move {
            let ns = self.auth.request(ctx, "Tasks.ResizePty").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            exec_id(&req.exec_id)?;
            if req.width == 0 || req.height == 0 {
                return Err(Error::InvalidArgument(format!(
                    "width, height: a terminal of {}x{} has no cells",
                    req.width, req.height
                ))
                .into());
            }
            // A terminal's size is two 16-bit numbers (struct winsize).
            if req.width > u32::from(u16::MAX) || req.height > u32::from(u16::MAX) {
                return Err(Error::InvalidArgument(format!(
                    "width, height: {}x{} is larger than a terminal can be ({max}x{max})",
                    req.width,
                    req.height,
                    max = u16::MAX
                ))
                .into());
            }
            self.tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .resize(&req.exec_id, req.width, req.height)
                .await
                .rpc()?;
            Ok(Empty::new())
        })
        .await
    }

    async fn close_io(&self, ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        guarded("Tasks.CloseIO", async move {
            let ns = self.auth.request(ctx, "Tasks.CloseIO").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            exec_id(&req.exec_id)?;
            if req.stdin {
                self.tasks
                    .get(&ns, &req.container_id)
                    .rpc()?
                    .close_stdin(&req.exec_id)
                    .await
                    .rpc()?;
            }
            Ok(Empty::new())
        })
        .await
    }

    async fn pause(&self, ctx: &TtrpcContext, req: PauseTaskRequest) -> ttrpc::Result<Empty> {
        guarded("Tasks.Pause", async move {
            let ns = self.auth.request(ctx, "Tasks.Pause").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            self.tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .pause()
                .await
                .rpc()?;
            Ok(Empty::new())
        })
        .await
    }

    async fn resume(&self, ctx: &TtrpcContext, req: ResumeTaskRequest) -> ttrpc::Result<Empty> {
        guarded("Tasks.Resume", async move {
            let ns = self.auth.request(ctx, "Tasks.Resume").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            self.tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .resume()
                .await
                .rpc()?;
            Ok(Empty::new())
        })
        .await
    }

    async fn checkpoint(
        &self,
        ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> ttrpc::Result<CheckpointTaskResponse> {
        guarded("Tasks.Checkpoint", async move {
            let ns = self.auth.request(ctx, "Tasks.Checkpoint").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            let container = self.container(&ns, &req.container_id).await?;
            // The task's runtime: its own shim path, else its container's.
            let runtime = self
                .tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .info()
                .await
                .rpc()?
                .runtime
                .unwrap_or_else(|| container.runtime.clone());
            let options = match req.options.as_ref() {
                Some(o) => {
                    validate::options("options", o, &self.limits).rpc()?;
                    runtime_options::check_checkpoint("options", &runtime, &o.type_url, &o.value)
                        .map_err(Error::from)
                        .rpc()?
                }
                None => Default::default(),
            };
            // `exit` and `image_path` may come in the options too, as containerd
            // sends them.
            let exit = req.exit || options.exit;
            let image_path = match (req.image_path.as_str(), options.image_path.as_str()) {
                (a, b) if !a.is_empty() && !b.is_empty() && a != b => {
                    return Err(Error::InvalidArgument(format!(
                        "image_path {a:?} and options.image_path {b:?} differ"
                    ))
                    .into())
                }
                ("", b) => b.to_string(),
                (a, _) => a.to_string(),
            };
            validate::path("image_path", &image_path, &self.limits).rpc()?;
            let image_path = if image_path.is_empty() {
                None
            } else {
                let p = std::path::PathBuf::from(&image_path);
                if !p.is_absolute() {
                    return Err(Error::InvalidArgument(format!(
                        "image_path {image_path:?} must be an absolute path"
                    ))
                    .into());
                }
                Some(p)
            };
            let index = self
                .tasks
                .checkpoint(
                    &self.storage,
                    &ns,
                    &container,
                    CheckpointRequest {
                        exit,
                        image_path,
                        options,
                        rw: req.rw,
                    },
                )
                .await
                .rpc()?;
            Ok(CheckpointTaskResponse {
                descriptors: index
                    .map(|(digest, size)| Descriptor {
                        media_type: oci_spec::image::MediaType::ImageIndex.to_string(),
                        digest: digest.to_string(),
                        size: i64::try_from(size).unwrap_or(i64::MAX),
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            })
        })
        .await
    }

    async fn update(&self, ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        guarded("Tasks.Update", async move {
            let ns = self.auth.request(ctx, "Tasks.Update").rpc()?.namespace;
            id("container_id", &req.container_id)?;
            let resources = match req.resources.as_ref() {
                Some(any) => Some(validate::resources("resources", any, &self.limits).rpc()?),
                None => None,
            };
            validate::labels("annotations", &req.annotations, &self.limits).rpc()?;
            if resources.is_none() && req.annotations.is_empty() {
                return Err(Error::InvalidArgument(
                    "resources: nothing to update (give resources or annotations)".into(),
                )
                .into());
            }
            self.tasks
                .get(&ns, &req.container_id)
                .rpc()?
                .update(resources, req.annotations)
                .await
                .rpc()?;
            Ok(Empty::new())
        })
        .await
    }

    async fn metrics(
        &self,
        ctx: &TtrpcContext,
        req: MetricsRequest,
    ) -> ttrpc::Result<MetricsResponse> {
        guarded("Tasks.Metrics", async move {
            let ns = self.auth.request(ctx, "Tasks.Metrics").rpc()?.namespace;
            let filter = filters(req.filters, &self.limits).await?;
            let mut metrics = Vec::new();
            for h in self.tasks.list(&ns) {
                if !filter.matches(&MetricFields { ns: &ns, id: &h.id }) {
                    continue;
                }
                // A task that stopped or went away meanwhile has no metrics; skip it,
                // as containerd does.
                match h.stats().await {
                    Ok(data) => metrics.push(Metric {
                        timestamp: MessageField::some(keel_protocol::types::now()),
                        id: h.id.clone(),
                        data: MessageField::some(data),
                        ..Default::default()
                    }),
                    Err(e) => tracing::debug!(task_id = %h.id, error = %e, "no metrics"),
                }
            }
            Ok(MetricsResponse {
                metrics,
                ..Default::default()
            })
        })
        .await
    }
}
