//! A task's life through its shim: watching the shim (a pending Wait, a pidfd),
//! Start, the exit, the shim's death, a broken connection dialled again, and Delete.

use super::*;

impl TaskActor {
    /// Watches the shim: a pidfd on its process, and a pending Wait for the exit.
    pub(super) fn watch(&mut self, ctx: &mut Context<Self>) {
        let Some(shim) = self.shim.clone() else {
            return;
        };
        // Fault injection (tests only): the shim unwatched, so that only the
        // reconciler's periodic check can find it gone.
        if self.fault("Watch", ctx).is_err() {
            return;
        }
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
        let (address, task_api, ns) = (
            self.record.shim_address.clone(),
            self.record.task_api,
            self.ns.clone(),
        );
        let addr = ctx.address();
        actix::spawn(async move {
            let mut shim = shim;
            // Dialling a live shim again: the pause before the next try, and when
            // the tries began.
            let mut redial = (REDIAL_PAUSE, None::<std::time::Instant>);
            // Ends with the actor: one brought back after a failure watches anew.
            while addr.connected() {
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
                    // A shim that cannot be dialled for REDIAL_GIVE_UP (its socket
                    // was removed, say) is of no use: it is ended and cleaned up
                    // as a dead one, rather than dialled forever.
                    Err(e @ keel_protocol::Error::Transport(_)) => {
                        tracing::warn!(task_id = %id, shim_pid, error = %e, "connection to the shim broke; connecting again");
                        tokio::time::sleep(redial.0).await;
                        match ShimClient::connect(&address, &ns)
                            .await
                            .and_then(|s| s.task_api(task_api))
                        {
                            Ok(fresh) => {
                                shim = fresh.clone();
                                redial = (REDIAL_PAUSE, None);
                                addr.do_send(Redialled(fresh));
                            }
                            Err(e) => {
                                let since = *redial.1.get_or_insert_with(std::time::Instant::now);
                                if since.elapsed() >= REDIAL_GIVE_UP {
                                    tracing::error!(task_id = %id, shim_pid, error = %e, "the shim cannot be reached; ending it and cleaning up as for a dead one");
                                    if let Ok(pid) = i32::try_from(shim_pid) {
                                        let _ = nix::sys::signal::kill(
                                            nix::unistd::Pid::from_raw(pid),
                                            nix::sys::signal::Signal::SIGKILL,
                                        );
                                    }
                                    addr.do_send(ShimDied);
                                    return;
                                }
                                redial.0 = (redial.0 * 2).min(REDIAL_MAX_PAUSE);
                                tracing::warn!(task_id = %id, shim_pid, error = %e, retry_in = ?redial.0, "connecting to the shim again failed");
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
    pub(super) fn live_shim(&self) -> Result<ShimClient> {
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

    /// Has the monitor record and publish the exit (once), then wakes the waiters.
    /// Publishes `/tasks/delete` for this task, naming its recorded exit (or
    /// status 0 for a task that never ran). Its records must be removed first:
    /// the event's flush makes the removal durable with it. Returns the exit
    /// and the publication, done once both are on disk.
    pub(super) fn publish_delete(
        &self,
    ) -> (
        ExitRecord,
        Option<impl std::future::Future<Output = Result<u64>> + Send + 'static>,
    ) {
        let exit = self.exit.clone().unwrap_or(ExitRecord {
            container_id: self.id.clone(),
            exec_id: String::new(),
            pid: self.record.pid,
            exit_status: 0,
            exited_ns: nanos(SystemTime::now()),
            seq: 0,
        });
        let event = ev::TaskDelete {
            container_id: self.id.clone(),
            id: self.id.clone(),
            pid: exit.pid,
            exit_status: exit.exit_status,
            exited_at: MessageField::some(timestamp(from_nanos(exit.exited_ns))),
            ..Default::default()
        };
        let published = pack(&event)
            .ok()
            .map(|any| self.env.monitor.publish(&self.ns, "/tasks/delete", any));
        (exit, published)
    }

    pub(super) fn exited(&mut self, status: u32, at: SystemTime) -> ResponseActFuture<Self, ()> {
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
pub(super) struct Exited {
    pub(super) status: u32,
    pub(super) at: SystemTime,
}

impl Handler<Exited> for TaskActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, m: Exited, ctx: &mut Self::Context) -> Self::Result {
        let _ = self.fault("Exited", ctx);
        AtomicResponse::new(self.exited(m.status, m.at))
    }
}

/// A new connection to the live shim, after the last one broke.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Redialled(pub(super) ShimClient);

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
pub(super) struct ShimDied;

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

#[derive(Message)]
#[rtype(result = "Result<u32>")]
pub(super) struct Start;

impl Handler<Start> for TaskActor {
    type Result = AtomicResponse<Self, Result<u32>>;

    fn handle(&mut self, _: Start, ctx: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.fault("Start", ctx) {
            return AtomicResponse::new(Box::pin(async move { Err(e) }.into_actor(self)));
        }
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
#[rtype(result = "Result<ExitRecord>")]
pub(super) struct Delete {
    pub(super) force: bool,
}

impl Handler<Delete> for TaskActor {
    type Result = AtomicResponse<Self, Result<ExitRecord>>;

    fn handle(&mut self, m: Delete, ctx: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.fault("Delete", ctx) {
            return AtomicResponse::new(Box::pin(async move { Err(e) }.into_actor(self)));
        }
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
                delete_and_shut_down(&shim, &id).await
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
                            let (exit, published) = act.publish_delete();
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
