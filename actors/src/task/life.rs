//! How a task actor comes to life, and comes back.
//!
//! There is one way: [`Tasks::spawn_actor`] builds the actor from the task's
//! durable record (its shim's address and pid, its pid, whether it started), its
//! recorded exits and its exec processes, as read from sled. A create hands it the
//! shim it has just connected to; a restore after a crash, and a restart after the
//! actor failed, hand it nothing, and the actor probes its shim, as restore always
//! has: it learns the task's real state, publishes the `/tasks/create` and
//! `/tasks/start` the log misses, and any exit that happened meanwhile, once.
//!
//! The task supervisor (one-for-one, [`TASK_INTENSITY`] per task) receives each
//! failed actor's death from its [`Lifeline`] and brings it back the same way;
//! handles keep working through their [`Slot`]. A task that keeps failing is
//! escalated to the root supervisor.

use keel_storage::meta::TaskRecord;

use super::*;
use crate::supervision::{Death, Decision, Escalation, Escalations, Lifeline, Supervisor};

/// How a task actor comes to life.
pub(super) enum Origin {
    /// Just created: its shim is connected, the task is Created, and the bundle's
    /// log FIFO is being drained.
    Created { shim: ShimClient, log: LogFifo },
    /// Read back from its record: after keeld restarted, or after the actor failed
    /// (`restart`). `unannounced`: whether `/tasks/create` and `/tasks/start` are
    /// missing from the log.
    Revived {
        unannounced: (bool, bool),
        restart: bool,
    },
}

/// What sled holds of a task.
pub(super) struct Durable {
    pub(super) record: TaskRecord,
    pub(super) exit: Option<ExitRecord>,
    pub(super) execs: HashMap<String, exec::ExecProcess>,
    /// Its runtime (its own shim path, else its container's), when known.
    pub(super) runtime: Option<String>,
}

impl Durable {
    /// Reads task `id` of `ns` (blocking); `None` when it has no record.
    pub(super) fn read(meta: &Meta, ns: &str, id: &str) -> keel_storage::Result<Option<Self>> {
        let Some(record) = meta.task(ns, id)? else {
            return Ok(None);
        };
        Self::of(meta, ns, record).map(Some)
    }

    /// The rest of what sled holds of the task of `record`.
    pub(super) fn of(meta: &Meta, ns: &str, mut record: TaskRecord) -> keel_storage::Result<Self> {
        let id = record.id.clone();
        let exit = meta.exit(ns, &id, "")?;
        if record.runtime.is_none() {
            // A record from before the runtime was kept in it; kept from now on.
            record.runtime = meta.container(ns, &id)?.map(|c| c.runtime);
        }
        let runtime = record.runtime.clone();
        let id = &id;
        let mut execs = HashMap::new();
        for e in meta.execs(ns, id)? {
            let exited = meta.exit(ns, id, &e.exec_id)?;
            execs.insert(e.exec_id.clone(), exec::ExecProcess::restored(e, exited));
        }
        Ok(Self {
            record,
            exit,
            execs,
            runtime,
        })
    }
}

/// Where a task supervisor's deaths come in, until it starts.
pub(super) type DeathInbox = Arc<Mutex<Option<mpsc::UnboundedReceiver<Death<TaskKey>>>>>;

impl Tasks {
    /// Starts task `ns`/`durable`'s actor, the one way a task actor comes to life
    /// (see the module doc). With `slot`, the actor takes over an existing task's
    /// handles (a restart after a failure); else a new slot is made. Registers the
    /// task and returns its handle.
    pub(super) fn spawn_actor(
        &self,
        ns: &str,
        durable: Durable,
        origin: Origin,
        slot: Option<Arc<Slot>>,
    ) -> TaskHandle {
        let Durable {
            record,
            exit,
            execs,
            runtime,
        } = durable;
        let id = record.id.clone();
        let cmd = self.shim_command(ns, &id, runtime.as_deref());
        let (state, shim, log, unannounced, restart) = match origin {
            Origin::Created { shim, log } => (
                TaskState::Created,
                Some(shim),
                Some(log),
                (false, false),
                false,
            ),
            Origin::Revived {
                unannounced,
                restart,
            } => {
                // The shim logs into the bundle's FIFO: drain it again at once.
                let log = if cmd.bundle.exists() {
                    LogFifo::open(&cmd.bundle, ns, &id)
                        .map_err(
                            |e| tracing::warn!(task_id = %id, error = %e, "log FIFO not reopened"),
                        )
                        .ok()
                } else {
                    None
                };
                let state = if exit.is_some() {
                    TaskState::Stopped
                } else {
                    TaskState::Unknown
                };
                (state, None, log, unannounced, restart)
            }
        };
        let shim_pid = if shim.is_some() { record.shim_pid } else { 0 };
        let slot = match slot {
            Some(s) => {
                s.shim_pid.store(shim_pid, Ordering::Relaxed);
                s
            }
            None => Slot::new(shim_pid),
        };
        let key = (ns.to_string(), id.clone());
        let actor = TaskActor {
            ns: ns.to_string(),
            id: id.clone(),
            state,
            shim,
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
            slot: slot.clone(),
            _lifeline: Lifeline::new(key.clone(), self.deaths.clone()),
            unannounced,
            restart,
        };
        let addr = TaskActor::start_in_arbiter(&self.arbiter, |_| actor);
        slot.started(addr);
        let handle = TaskHandle::new(id, slot);
        lock(&self.live).insert(key, handle.clone());
        handle
    }

    /// Starts the task supervisor: one-for-one restarts of failed task actors under
    /// `supervisor`'s intensity (per task), escalating to `escalations` beyond it.
    pub fn supervise(&self, supervisor: Supervisor, escalations: Escalations) {
        let Some(mut inbox) = lock(&self.death_inbox).take() else {
            return;
        };
        let tasks = self.clone();
        tokio::spawn(async move {
            // One intensity window per task.
            let mut per_task: HashMap<TaskKey, Supervisor> = HashMap::new();
            while let Some(Death { child, cause }) = inbox.recv().await {
                // Ordinary ends: keeld shutting down, a task deleted (or replaced
                // by a newer incarnation of its id, whose actor is running).
                if tasks.closing.load(Ordering::Relaxed) {
                    continue;
                }
                let (ns, id) = child.clone();
                let Ok(handle) = tasks.get(&ns, &id) else {
                    continue;
                };
                if handle.slot.deleted.load(Ordering::Relaxed) || handle.slot.running() {
                    continue;
                }
                let s = per_task
                    .entry(child.clone())
                    .or_insert_with(|| supervisor.for_child());
                match s.failed(&format!("{ns}/{id}"), &cause) {
                    Decision::Restart => {
                        if let Err(e) = tasks.revive(&ns, &id, handle.slot.clone()).await {
                            tracing::error!(namespace = %ns, task_id = %id, error = %e, "bringing a failed task actor back");
                            let _ = escalations.send(Escalation {
                                from: supervisor.name().to_string(),
                                cause: format!("task {ns}/{id} could not be brought back: {e}"),
                            });
                        }
                    }
                    Decision::Escalate => {
                        let _ = escalations.send(Escalation {
                            from: supervisor.name().to_string(),
                            cause: format!("task {ns}/{id} keeps failing: {cause}"),
                        });
                    }
                }
            }
        });
    }

    /// Brings a failed task actor back from its record, on its slot.
    async fn revive(&self, ns: &str, id: &str, slot: Arc<Slot>) -> Result<()> {
        let (meta, n2, i2) = (self.env.meta.clone(), ns.to_string(), id.to_string());
        let Some(durable) = blocking(move || Durable::read(&meta, &n2, &i2)).await? else {
            // Its record went with the failure (a delete was under way): it is gone.
            slot.deleted.store(true, Ordering::Relaxed);
            self.forget(ns, id);
            return Ok(());
        };
        let unannounced = crate::reconcile::LoggedLifecycle::of_task(&self.env.events, ns, id)
            .missing(ns, id, durable.record.created_ns);
        self.spawn_actor(
            ns,
            durable,
            Origin::Revived {
                unannounced,
                restart: true,
            },
            Some(slot),
        );
        tracing::info!(namespace = %ns, task_id = %id, "task actor brought back; probing its shim");
        Ok(())
    }
}

/// Locks a registry mutex, whatever a panic elsewhere left it: the maps it guards
/// are changed in single steps, never left half-changed.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
