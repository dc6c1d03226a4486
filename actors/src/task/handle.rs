//! [`TaskHandle`]: keel's handle on one task actor. It bounds the requests in
//! flight to the actor, and it outlives the actor: handles share the task's
//! [`Slot`], which its supervisor points at the actor it brings back after a
//! failure.

use super::*;
use crate::supervision::Revivable;

/// Where a task's actor is reached, shared by every handle on the task. When the
/// actor fails and its supervisor brings it back, the slot gets the new actor's
/// address and a new generation: handles keep working.
pub(super) struct Slot {
    actor: Revivable<TaskActor>,
    /// The pid of the task's shim as its actor last learned it (0: not yet known).
    pub(super) shim_pid: AtomicU32,
    /// Set when the task is gone (deleted, or never created): a stop from then on
    /// is the task's end, not a failure.
    pub(super) deleted: std::sync::atomic::AtomicBool,
    /// Requests in flight to the actor, bounded here: actix's own mailbox bound does
    /// not hold for every way of sending.
    in_flight: tokio::sync::Semaphore,
}

impl Slot {
    pub(super) fn new(shim_pid: u32) -> Arc<Self> {
        Arc::new(Self {
            actor: Revivable::default(),
            shim_pid: AtomicU32::new(shim_pid),
            deleted: std::sync::atomic::AtomicBool::new(false),
            in_flight: tokio::sync::Semaphore::new(TASK_REQUESTS_IN_FLIGHT),
        })
    }

    /// An actor for the task was started at `addr`.
    pub(super) fn started(&self, addr: Addr<TaskActor>) {
        self.actor.started(addr);
    }

    /// Whether the task's current actor runs.
    pub(super) fn running(&self) -> bool {
        self.actor.addr().is_some_and(|a| a.connected())
    }
}

/// keel's handle on one task actor. Cheap to clone; clones share the task's slot.
#[derive(Clone)]
pub struct TaskHandle {
    pub id: String,
    pub(super) slot: Arc<Slot>,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("id", &self.id).finish()
    }
}

impl TaskHandle {
    pub(super) fn new(id: String, slot: Arc<Slot>) -> Self {
        Self { id, slot }
    }

    /// The pid of the shim keel launched for this task (0 while not known, as for
    /// a restored task whose shim has not answered yet).
    pub fn shim_pid(&self) -> u32 {
        self.slot.shim_pid.load(Ordering::Relaxed)
    }

    /// The current actor's address; if that actor is gone and not by a delete, the
    /// next one's, once its supervisor has brought it back.
    async fn live_addr(&self) -> Result<Addr<TaskActor>> {
        if self.slot.deleted.load(Ordering::Relaxed) {
            if let Some(addr) = self.slot.actor.addr() {
                return Ok(addr);
            }
        }
        self.slot
            .actor
            .live(REVIVE_WAIT)
            .await
            .ok_or_else(|| self.lost())
    }

    /// What a request gets when the actor went while handling it (or one queued
    /// before it).
    fn lost(&self) -> Error {
        if self.slot.deleted.load(Ordering::Relaxed) {
            Error::NotFound(format!("task {} is gone", self.id))
        } else {
            Error::Internal(format!(
                "task {}'s actor failed while this request was in its hands; it is restarted from its record and its shim",
                self.id
            ))
        }
    }

    /// Sends a request and waits for its answer; ResourceExhausted when the task
    /// already has [`TASK_REQUESTS_IN_FLIGHT`] requests waiting; Internal when the
    /// actor failed with the request in its hands.
    pub(super) async fn call<M>(&self, m: M) -> Result<M::Result>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        TaskActor: Handler<M>,
    {
        let _slot = self.slot.in_flight.try_acquire().map_err(|_| {
            Error::Busy(format!(
                "task {} has {TASK_REQUESTS_IN_FLIGHT} requests waiting; try again",
                self.id
            ))
        })?;
        self.send(m).await
    }

    /// Sends without taking a slot: for Wait, which only registers a waiter and may
    /// stay pending for the task's lifetime.
    pub(super) async fn send<M>(&self, m: M) -> Result<M::Result>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        TaskActor: Handler<M>,
    {
        self.live_addr()
            .await?
            .send(m)
            .await
            .map_err(|_| self.lost())
    }

    /// Sends a message that needs no answer, to whichever actor is current.
    pub(super) fn tell<M>(&self, m: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        TaskActor: Handler<M>,
    {
        if let Some(addr) = self.slot.actor.addr() {
            addr.do_send(m);
        }
    }

    /// Reports an exit learned from the shim's events; the actor records and
    /// publishes it unless it already has.
    pub fn notify_exit(&self, status: u32, at: SystemTime) {
        self.tell(Exited { status, at });
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
    /// A wait outlives a failure of the task's actor: it is made again on the actor
    /// that comes back, which knows the exit from its record or its shim.
    pub async fn wait(&self, exec_id: &str) -> Result<ExitRecord> {
        loop {
            let generation = self.slot.actor.generation();
            let r = self
                .send(Wait {
                    exec_id: exec_id.to_string(),
                })
                .await
                .and_then(|answer| answer);
            match r {
                Ok(exit) => return Ok(exit),
                Err(Error::Internal(_))
                    if self.slot.actor.next_life(generation, REVIVE_WAIT).await =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }
    /// The task's processes, as its shim lists them (none once its shim is gone).
    pub async fn pids(&self) -> Result<Vec<ProcessEntry>> {
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
