//! Processes added to a running task with Exec. Each has its own stdio, its own
//! `/tasks/exec-added` and `/tasks/exec-started` events, and its own exit, recorded
//! and published once (with its exec id) like the init process's.

use keel_protocol::types::{json_any, PROCESS_TYPE_URL};

use super::*;

/// An exec process as its task actor tracks it.
pub(super) struct ExecProcess {
    /// What is stored of it: pid, whether it started, stdio.
    rec: ExecRecord,
    exit: Option<ExitRecord>,
    waiters: Vec<oneshot::Sender<ExitRecord>>,
}

impl ExecProcess {
    /// An exec process as it was stored, with its exit if one was recorded.
    pub(super) fn restored(rec: ExecRecord, exit: Option<ExitRecord>) -> Self {
        Self {
            rec,
            exit,
            waiters: Vec::new(),
        }
    }

    /// Started and not known to have exited: its exit is still to be learned.
    pub(super) fn pending(&self) -> bool {
        self.rec.started && self.exit.is_none()
    }
}

/// What Exec runs: an OCI process (JSON) with its own stdio.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub exec_id: String,
    /// OCI runtime-spec `Process`, as JSON.
    pub process: Vec<u8>,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

fn err<T: 'static>(act: &mut TaskActor, e: Error) -> ResponseActFuture<TaskActor, Result<T>> {
    Box::pin(async move { Err(e) }.into_actor(act))
}

impl TaskActor {
    /// The exec process `exec_id`, or NotFound naming it.
    fn exec_process(&mut self, exec_id: &str) -> Result<&mut ExecProcess> {
        let id = &self.id;
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} not found in task {id}")))
    }

    /// Checks that `exec_id` (empty: the init process) names a live process.
    pub(super) fn check_process_alive(&mut self, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Ok(());
        }
        let id = self.id.clone();
        let p = self.exec_process(exec_id)?;
        if p.exit.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} of task {id} has exited"
            )));
        }
        Ok(())
    }

    /// Stores exec process `exec_id` as it is now. Unflushed: the event announcing
    /// the change flushes it before anyone is told.
    fn store_exec(&mut self, exec_id: &str) {
        let Some(p) = self.execs.get(exec_id) else {
            return;
        };
        if let Err(e) = self.env.meta.put_exec(&self.ns, &self.id, &p.rec) {
            tracing::error!(task_id = %self.id, exec_id, error = %e, "persisting exec process failed");
        }
    }

    /// Registers a Wait on an exec process; resolves with its exit.
    pub(super) fn wait_exec(&mut self, exec_id: &str) -> Result<oneshot::Receiver<ExitRecord>> {
        let p = self.exec_process(exec_id)?;
        let (tx, rx) = oneshot::channel();
        match &p.exit {
            Some(e) => {
                let _ = tx.send(e.clone());
            }
            None => p.waiters.push(tx),
        }
        Ok(rx)
    }
}

/// Add an exec process (not started yet).
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(super) struct AddExec(pub ExecSpec);

impl Handler<AddExec> for TaskActor {
    type Result = AtomicResponse<Self, Result<()>>;

    fn handle(&mut self, AddExec(spec): AddExec, _: &mut Self::Context) -> Self::Result {
        let check = self.state.can_exec(&self.id).and_then(|()| {
            if self.execs.contains_key(&spec.exec_id) {
                Err(Error::AlreadyExists(format!(
                    "exec {} already exists in task {}",
                    spec.exec_id, self.id
                )))
            } else {
                self.live_shim()
            }
        });
        let shim = match check {
            Ok(s) => s,
            Err(e) => return AtomicResponse::new(err(self, e)),
        };
        let exec_id = spec.exec_id.clone();
        let rec = ExecRecord {
            exec_id: spec.exec_id.clone(),
            pid: 0,
            started: false,
            stdin: spec.stdin.clone(),
            stdout: spec.stdout.clone(),
            stderr: spec.stderr.clone(),
            terminal: spec.terminal,
        };
        let req = api::ExecProcessRequest {
            id: self.id.clone(),
            exec_id: spec.exec_id,
            terminal: spec.terminal,
            stdin: spec.stdin,
            stdout: spec.stdout,
            stderr: spec.stderr,
            spec: MessageField::some(json_any(PROCESS_TYPE_URL, spec.process)),
            ..Default::default()
        };
        AtomicResponse::new(Box::pin(
            async move { shim.exec(&req, rpc_timeout()).await }
                .into_actor(self)
                .then(move |r, act, _| {
                    if let Err(e) = r {
                        return err(act, Error::from(e));
                    }
                    act.execs.insert(
                        exec_id.clone(),
                        ExecProcess {
                            rec,
                            exit: None,
                            waiters: Vec::new(),
                        },
                    );
                    act.store_exec(&exec_id);
                    let event = ev::TaskExecAdded {
                        container_id: act.id.clone(),
                        exec_id,
                        ..Default::default()
                    };
                    let done = announce(
                        &act.env.monitor,
                        &act.ns,
                        "/tasks/exec-added",
                        pack(&event).map_err(Error::from),
                        Ok(()),
                    );
                    Box::pin(done.into_actor(act))
                }),
        ))
    }
}

/// Start an added exec process; answers its pid.
#[derive(Message)]
#[rtype(result = "Result<u32>")]
pub(super) struct StartExec(pub String);

impl Handler<StartExec> for TaskActor {
    type Result = AtomicResponse<Self, Result<u32>>;

    fn handle(&mut self, StartExec(exec_id): StartExec, _: &mut Self::Context) -> Self::Result {
        let id = self.id.clone();
        let check = self.exec_process(&exec_id).and_then(|p| {
            if p.rec.started {
                Err(Error::FailedPrecondition(format!(
                    "cannot start exec {exec_id} of task {id}: it was started already"
                )))
            } else {
                Ok(())
            }
        });
        let shim = match check
            .and_then(|()| self.state.can_exec(&self.id))
            .and_then(|()| self.live_shim())
        {
            Ok(s) => s,
            Err(e) => return AtomicResponse::new(err(self, e)),
        };
        let req = api::StartRequest {
            id: id.clone(),
            exec_id: exec_id.clone(),
            ..Default::default()
        };
        let waiter = shim.clone();
        AtomicResponse::new(Box::pin(
            async move { shim.start(&req, rpc_timeout()).await }
                .into_actor(self)
                .then(move |r, act, ctx| {
                    let pid = match r {
                        Ok(resp) => resp.pid,
                        Err(e) => return err(act, Error::from(e)),
                    };
                    if let Some(p) = act.execs.get_mut(&exec_id) {
                        p.rec.started = true;
                        p.rec.pid = pid;
                    }
                    act.store_exec(&exec_id);
                    watch_exec(ctx.address(), waiter, id.clone(), exec_id.clone());
                    let event = ev::TaskExecStarted {
                        container_id: id,
                        exec_id,
                        pid,
                        ..Default::default()
                    };
                    let done = announce(
                        &act.env.monitor,
                        &act.ns,
                        "/tasks/exec-started",
                        pack(&event).map_err(Error::from),
                        Ok(pid),
                    );
                    Box::pin(done.into_actor(act))
                }),
        ))
    }
}

/// Waits through the shim for an exec process to exit, and tells its actor. The
/// shim's forwarded exit event may come first; the first report is the one kept.
pub(super) fn watch_exec(addr: Addr<TaskActor>, shim: ShimClient, id: String, exec_id: String) {
    actix::spawn(async move {
        let wait = api::WaitRequest {
            id,
            exec_id: exec_id.clone(),
            ..Default::default()
        };
        match shim.wait(&wait, None).await {
            Ok(w) => addr.do_send(ExecExited {
                exec_id,
                status: w.exit_status,
                at: w
                    .exited_at
                    .as_ref()
                    .map_or_else(SystemTime::now, system_time),
            }),
            // The shim no longer has it: it was deleted before keeld's record of that
            // reached the disk.
            Err(e) if matches!(Error::from(e.clone()), Error::NotFound(_)) => {
                addr.do_send(ExecGone(exec_id));
            }
            Err(e) => tracing::debug!(exec_id = %exec_id, error = %e, "exec wait ended"),
        }
    });
}

/// The shim does not know exec process `.0`: forget it.
#[derive(Message)]
#[rtype(result = "()")]
struct ExecGone(String);

impl Handler<ExecGone> for TaskActor {
    type Result = ();

    fn handle(&mut self, ExecGone(exec_id): ExecGone, _: &mut Self::Context) {
        tracing::warn!(namespace = %self.ns, task_id = %self.id, exec_id, "the shim has no such exec process; forgetting it");
        self.execs.remove(&exec_id);
        let (meta, ns, id) = (self.env.meta.clone(), self.ns.clone(), self.id.clone());
        actix::spawn(async move {
            if let Err(e) = durably(&meta, move |m| m.delete_exec(&ns, &id, &exec_id)).await {
                tracing::error!(error = %e, "removing the exec record");
            }
        });
    }
}

/// An exec process exited (its Wait returned, or the shim's event said so).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct ExecExited {
    pub exec_id: String,
    pub status: u32,
    pub at: SystemTime,
}

impl Handler<ExecExited> for TaskActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, m: ExecExited, _: &mut Self::Context) -> Self::Result {
        let none = |act: &mut Self| AtomicResponse::new(Box::pin(async {}.into_actor(act)));
        let Some(p) = self.execs.get(&m.exec_id) else {
            return none(self);
        };
        if p.exit.is_some() {
            return none(self);
        }
        let rec = ExitRecord {
            container_id: self.id.clone(),
            exec_id: m.exec_id.clone(),
            pid: p.rec.pid,
            exit_status: m.status,
            exited_ns: nanos(m.at),
            seq: 0,
        };
        let (monitor, ns, r2) = (self.env.monitor.clone(), self.ns.clone(), rec.clone());
        AtomicResponse::new(Box::pin(
            async move { monitor.exit(&ns, r2).await }
                .into_actor(self)
                .map(move |standing, act, _| {
                    let rec = standing.unwrap_or_else(|e| {
                        tracing::error!(task_id = %act.id, exec_id = %rec.exec_id, error = %e, "recording exec exit failed");
                        rec
                    });
                    if let Some(p) = act.execs.get_mut(&m.exec_id) {
                        for w in p.waiters.drain(..) {
                            let _ = w.send(rec.clone());
                        }
                        p.exit = Some(rec);
                    }
                }),
        ))
    }
}

/// Delete an exec process that exited or never started; answers its exit.
#[derive(Message)]
#[rtype(result = "Result<ExitRecord>")]
pub(super) struct DeleteExec(pub String);

impl Handler<DeleteExec> for TaskActor {
    type Result = AtomicResponse<Self, Result<ExitRecord>>;

    fn handle(&mut self, DeleteExec(exec_id): DeleteExec, _: &mut Self::Context) -> Self::Result {
        let id = self.id.clone();
        let check = self.exec_process(&exec_id).and_then(|p| {
            if p.pending() {
                Err(Error::FailedPrecondition(format!(
                    "cannot delete exec {exec_id} of task {id}: it is running; kill it first"
                )))
            } else {
                Ok(p.exit.clone())
            }
        });
        let exit = match check {
            Ok(e) => e,
            Err(e) => return AtomicResponse::new(err(self, e)),
        };
        let shim = self.live_shim().ok();
        let req = api::DeleteRequest {
            id: id.clone(),
            exec_id: exec_id.clone(),
            ..Default::default()
        };
        let (meta, ns) = (self.env.meta.clone(), self.ns.clone());
        AtomicResponse::new(Box::pin(
            async move {
                // A shim that is gone took the process with it.
                let deleted = match shim {
                    Some(shim) => Some(shim.delete(&req, rpc_timeout()).await?),
                    None => None,
                };
                let (ns2, id2, exec2) = (ns, id.clone(), exec_id.clone());
                // No event follows: flushed here, so a restart cannot bring it back.
                durably(&meta, move |m| m.delete_exec(&ns2, &id2, &exec2)).await?;
                Ok(exit.unwrap_or_else(|| ExitRecord {
                    container_id: id,
                    exec_id,
                    pid: deleted.as_ref().map_or(0, |d| d.pid),
                    exit_status: deleted.as_ref().map_or(0, |d| d.exit_status),
                    exited_ns: deleted
                        .as_ref()
                        .and_then(|d| d.exited_at.as_ref())
                        .map_or_else(|| nanos(SystemTime::now()), |t| nanos(system_time(t))),
                    seq: 0,
                }))
            }
            .into_actor(self)
            .map(|r: Result<ExitRecord>, act, _| {
                if let Ok(e) = &r {
                    act.execs.remove(&e.exec_id);
                }
                r
            }),
        ))
    }
}

impl TaskHandle {
    /// Adds an exec process to a running task; publishes `/tasks/exec-added`.
    pub async fn exec(&self, spec: ExecSpec) -> Result<()> {
        self.call(AddExec(spec)).await?
    }

    /// Starts an added exec process; publishes `/tasks/exec-started`.
    pub async fn start_exec(&self, exec_id: &str) -> Result<u32> {
        self.call(StartExec(exec_id.to_string())).await?
    }

    /// An exec process as the API shows it (`id` is the exec id).
    pub async fn exec_info(&self, exec_id: &str) -> Result<TaskInfo> {
        self.call(GetExec(exec_id.to_string())).await?
    }

    /// Deletes an exec process that exited (or never started).
    pub async fn delete_exec(&self, exec_id: &str) -> Result<ExitRecord> {
        self.call(DeleteExec(exec_id.to_string())).await?
    }

    /// Reports an exec exit learned from the shim's events.
    pub fn notify_exec_exit(&self, exec_id: &str, status: u32, at: SystemTime) {
        self.tell(ExecExited {
            exec_id: exec_id.to_string(),
            status,
            at,
        });
    }
}

#[derive(Message)]
#[rtype(result = "Result<TaskInfo>")]
struct GetExec(String);

impl Handler<GetExec> for TaskActor {
    type Result = Result<TaskInfo>;

    fn handle(&mut self, GetExec(exec_id): GetExec, _: &mut Self::Context) -> Self::Result {
        let task_state = self.state;
        let p = self.exec_process(&exec_id)?;
        let state = if p.exit.is_some() {
            TaskState::Stopped
        } else if !p.rec.started {
            TaskState::Created
        } else if matches!(task_state, TaskState::Paused | TaskState::Pausing) {
            task_state
        } else {
            TaskState::Running
        };
        Ok(TaskInfo {
            id: exec_id,
            runtime_options: None,
            runtime: None,
            rootfs: None,
            pid: p.rec.pid,
            state,
            stdin: p.rec.stdin.clone(),
            stdout: p.rec.stdout.clone(),
            stderr: p.rec.stderr.clone(),
            terminal: p.rec.terminal,
            exit: p.exit.clone(),
        })
    }
}
