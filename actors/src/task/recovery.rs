//! Finding a task again: the probe of a restored (or restarted) actor's shim, what
//! it found, the events a crash kept from the log, and the periodic reconciler's
//! check for a shim that died unnoticed.

use super::*;

impl TaskActor {
    /// Publishes the `/tasks/create` and `/tasks/start` of a restored task that a
    /// crash kept from the event log, before anything later of it.
    pub(super) fn announce_missed(&mut self) {
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
}

/// Ask the shim what became of a restored task; repeated, with a growing pause,
/// while the shim does not answer.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Probe;

impl Handler<Probe> for TaskActor {
    type Result = ();

    fn handle(&mut self, _: Probe, ctx: &mut Self::Context) {
        let probes = self.tasks.probes.clone();
        let (address, task_api, ns, id) = (
            self.record.shim_address.clone(),
            self.record.task_api,
            self.ns.clone(),
            self.id.clone(),
        );
        let addr = ctx.address();
        actix::spawn(async move {
            // At most PARALLEL_PROBES at once; each is bounded by its deadlines.
            let Ok(_slot) = probes.acquire().await else {
                return;
            };
            addr.do_send(Probed(restore::probe(&address, task_api, &ns, &id).await));
        });
    }
}

/// What a probe found.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Probed(pub(super) Found);

impl Handler<Probed> for TaskActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, Probed(found): Probed, ctx: &mut Self::Context) -> Self::Result {
        AtomicResponse::new(self.probed(found, ctx))
    }
}

impl TaskActor {
    /// Probes the shim now, holding every other request until the answer is
    /// applied: for an actor brought back after a failure, whose task was known a
    /// moment ago and should not show `unknown`.
    pub(super) fn probe_before_anything(&mut self, ctx: &mut Context<Self>) {
        let (address, task_api, ns, id) = (
            self.record.shim_address.clone(),
            self.record.task_api,
            self.ns.clone(),
            self.id.clone(),
        );
        let probe = async move { restore::probe(&address, task_api, &ns, &id).await }
            .into_actor(self)
            .then(|found, act, ctx| act.probed(found, ctx));
        ctx.wait(probe);
    }

    /// Applies what a probe of the shim found.
    fn probed(&mut self, found: Found, ctx: &mut Context<Self>) -> ResponseActFuture<Self, ()> {
        let (ns, id) = (self.ns.clone(), self.id.clone());
        let nothing =
            |act: &mut Self| -> ResponseActFuture<Self, ()> { Box::pin(async {}.into_actor(act)) };
        match found {
            Found::Unreachable(why) => {
                self.probe_backoff =
                    (self.probe_backoff * 2).clamp(Duration::from_millis(500), MAX_PROBE_BACKOFF);
                tracing::warn!(namespace = %ns, task_id = %id, why, retry_in = ?self.probe_backoff, "shim does not answer; the task stays unknown");
                ctx.notify_later(Probe, self.probe_backoff);
                nothing(self)
            }
            Found::Dead => {
                // Nothing listens on its socket. A shim process still there (its
                // socket file was removed) can never be reached again: end it.
                let pid = self.record.shim_pid;
                if restore::is_shim_of(pid, &self.cmd) {
                    tracing::warn!(namespace = %ns, task_id = %id, shim_pid = pid, "the shim lives but its socket is gone; ending it and cleaning up");
                    if let Ok(pid) = i32::try_from(pid) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                } else {
                    tracing::warn!(namespace = %ns, task_id = %id, "shim died while keeld was down; cleaning up");
                }
                ctx.notify(ShimDied);
                nothing(self)
            }
            Found::NoTask if self.record.started => {
                // The task ran, and its shim deleted it: keeld stopped in the
                // middle of a Delete, before the record was removed. Finish the
                // delete as it would have finished: an exit if none was recorded
                // (its status is unknown: 137, as for a shim that died), the
                // record removed and `/tasks/delete` published.
                tracing::warn!(namespace = %ns, task_id = %id, "shim no longer has the task (keeld stopped during its delete); finishing the delete");
                self.deleting = true;
                // In a delete's order: the record removed (durably), then the
                // event, then the shim's leftovers; a crash in between is finished
                // by the next start's reconciliation or orphan scan.
                let (cmd, meta) = (self.cmd.clone(), self.env.meta.clone());
                Box::pin(self.exited(137, SystemTime::now()).then(move |(), act, _| {
                    async move { durably(&meta, move |m| m.delete_task(&ns, &id)).await }
                    .into_actor(act)
                    .then(|removed, act, _| {
                        let published = removed.map(|()| act.publish_delete().1);
                        async move {
                            match published {
                                Ok(published) => {
                                    if let Some(p) = published {
                                        if let Err(e) = p.await {
                                            tracing::error!(error = %e, "publishing /tasks/delete failed");
                                        }
                                    }
                                    restore::cleanup_orphan(&cmd).await;
                                }
                                Err(e) => tracing::error!(error = %e, "removing the task record"),
                            }
                        }
                        .into_actor(act)
                    })
                    .map(|(), act, ctx| {
                        act.tasks.forget(&act.ns, &act.id);
                        ctx.stop();
                    })
                }))
            }
            Found::NoTask => {
                tracing::warn!(namespace = %ns, task_id = %id, "shim has no such task (keeld stopped during create); removing it");
                let (cmd, meta) = (self.cmd.clone(), self.env.meta.clone());
                self.deleting = true;
                Box::pin(
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
                )
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
                self.slot.shim_pid.store(shim_pid, Ordering::Relaxed);
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
                    Some((status, at)) if self.exit.is_none() => self.exited(status, at),
                    _ => nothing(self),
                }
            }
        }
    }
}

/// The periodic reconciler's check: a shim that died without anyone noticing.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Check;

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
