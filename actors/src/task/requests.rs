//! Requests a task actor passes to its shim: kill, resize, pause and resume, update,
//! statistics, stdin, process list, and what it answers itself (its info, Wait).

use super::*;

impl TaskActor {
    pub(super) fn info(&self) -> TaskInfo {
        TaskInfo {
            id: self.id.clone(),
            runtime_options: self.record.runtime_options.clone(),
            runtime: self.record.runtime.clone(),
            rootfs: self.record.rootfs.clone(),
            pid: self.record.pid,
            state: self.state,
            stdin: self.record.stdin.clone(),
            stdout: self.record.stdout.clone(),
            stderr: self.record.stderr.clone(),
            terminal: self.record.terminal,
            exit: self.exit.clone(),
        }
    }
}

#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(super) struct Kill {
    /// Empty: the init process.
    pub(super) exec_id: String,
    pub(super) signal: u32,
    pub(super) all: bool,
}

impl Handler<Kill> for TaskActor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, m: Kill, ctx: &mut Self::Context) -> Self::Result {
        let shim = self
            .state
            .can_kill(&self.id)
            .and_then(|()| self.check_process_alive(&m.exec_id))
            .and_then(|()| self.live_shim());
        let shim = self.fault("Kill", ctx).and(shim);
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
pub(super) fn announce<T: Send + 'static>(
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
pub(super) fn shim_call<T: 'static, F>(
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
pub(super) struct Resize {
    pub(super) exec_id: String,
    pub(super) width: u32,
    pub(super) height: u32,
}

impl Handler<Resize> for TaskActor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, m: Resize, ctx: &mut Self::Context) -> Self::Result {
        let shim = self
            .state
            .can_kill(&self.id)
            .and_then(|()| self.check_process_alive(&m.exec_id))
            .and_then(|()| self.live_shim());
        let shim = self.fault("Resize", ctx).and(shim);
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
pub(super) async fn freeze(
    shim: &ShimClient,
    id: String,
    pause: bool,
) -> keel_protocol::Result<()> {
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
pub(super) struct Freeze {
    pub(super) pause: bool,
}

impl Handler<Freeze> for TaskActor {
    type Result = AtomicResponse<Self, Result<()>>;

    fn handle(&mut self, m: Freeze, ctx: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.fault("Freeze", ctx) {
            return AtomicResponse::new(Box::pin(async move { Err(e) }.into_actor(self)));
        }
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
pub(super) struct Update {
    pub(super) resources: Option<Vec<u8>>,
    pub(super) annotations: HashMap<String, String>,
}

impl Handler<Update> for TaskActor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, m: Update, ctx: &mut Self::Context) -> Self::Result {
        let shim = self
            .state
            .can_update(&self.id)
            .and_then(|()| self.live_shim());
        let shim = self.fault("Update", ctx).and(shim);
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
pub(super) struct Stats;

impl Handler<Stats> for TaskActor {
    type Result = ResponseFuture<Result<protobuf::well_known_types::any::Any>>;

    fn handle(&mut self, _: Stats, ctx: &mut Self::Context) -> Self::Result {
        let shim = self
            .state
            .can_update(&self.id)
            .and_then(|()| self.live_shim());
        let shim = self.fault("Stats", ctx).and(shim);
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
pub(super) struct CloseStdin {
    pub(super) exec_id: String,
}

impl Handler<CloseStdin> for TaskActor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, m: CloseStdin, ctx: &mut Self::Context) -> Self::Result {
        let shim = self
            .check_process_alive(&m.exec_id)
            .and_then(|()| self.live_shim());
        let shim = self.fault("CloseStdin", ctx).and(shim);
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
pub(super) struct Get;

impl Handler<Get> for TaskActor {
    type Result = MessageResult<Get>;

    fn handle(&mut self, _: Get, ctx: &mut Self::Context) -> Self::Result {
        let _ = self.fault("Get", ctx);
        MessageResult(self.info())
    }
}

#[derive(Message)]
#[rtype(result = "Result<ExitRecord>")]
pub(super) struct Wait {
    pub(super) exec_id: String,
}

impl Handler<Wait> for TaskActor {
    type Result = ResponseFuture<Result<ExitRecord>>;

    fn handle(&mut self, m: Wait, ctx: &mut Self::Context) -> Self::Result {
        let _ = self.fault("Wait", ctx);
        // A waiter dropped unanswered: by this actor failing (the handle then waits
        // on the actor that comes back), or by the process being deleted.
        let me = ctx.address().downgrade();
        let slot = self.slot.clone();
        let gone = move |deleted: String| {
            let failed = !slot.deleted.load(Ordering::Relaxed)
                && !me.upgrade().is_some_and(|a| a.connected());
            if failed {
                Error::Internal(format!("{deleted}: its actor failed"))
            } else {
                Error::FailedPrecondition(format!("{deleted} was deleted"))
            }
        };
        if !m.exec_id.is_empty() {
            let rx = self.wait_exec(&m.exec_id);
            let what = format!("exec {} of task {}", m.exec_id, self.id);
            return Box::pin(async move { rx?.await.map_err(|_| gone(what)) });
        }
        if let Some(e) = &self.exit {
            let e = e.clone();
            return Box::pin(async move { Ok(e) });
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        let what = format!("task {}", self.id);
        Box::pin(async move { rx.await.map_err(|_| gone(what)) })
    }
}

/// A process of a task, as its shim lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEntry {
    /// Host pid.
    pub pid: u32,
    /// Exec id of a process started with Exec; empty for the init process and for
    /// processes the task's own processes started.
    pub exec_id: String,
}

impl ProcessEntry {
    /// Reads a shim's process entry: the runc shims put the exec id of a process
    /// they exec'd in its `info` (`containerd.runc.v1.ProcessDetails`).
    fn from_shim(p: &api::ProcessInfo) -> Self {
        use keel_protocol::containerd::shim::oci::ProcessDetails;
        use protobuf::{Message, MessageFull};
        let name = ProcessDetails::descriptor();
        let exec_id = p
            .info
            .as_ref()
            .filter(|any| any.type_url.rsplit('/').next() == Some(name.full_name()))
            .and_then(|any| ProcessDetails::parse_from_bytes(&any.value).ok())
            .map(|d| d.exec_id)
            .unwrap_or_default();
        Self {
            pid: p.pid,
            exec_id,
        }
    }
}

#[derive(Message)]
#[rtype(result = "Result<Vec<ProcessEntry>>")]
pub(super) struct Pids;

impl Handler<Pids> for TaskActor {
    type Result = ResponseFuture<Result<Vec<ProcessEntry>>>;

    fn handle(&mut self, _: Pids, ctx: &mut Self::Context) -> Self::Result {
        let fault = self.fault("Pids", ctx);
        let shim = self.live_shim().ok();
        let req = api::PidsRequest {
            id: self.id.clone(),
            ..Default::default()
        };
        Box::pin(async move {
            fault?;
            let Some(shim) = shim else {
                return Ok(Vec::new());
            };
            let r = shim.pids(&req, rpc_timeout()).await?;
            Ok(r.processes.iter().map(ProcessEntry::from_shim).collect())
        })
    }
}
