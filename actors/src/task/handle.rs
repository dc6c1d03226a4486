//! [`TaskHandle`]: keel's handle on one task actor, bounding the requests in flight
//! to it.

use super::*;

/// keel's handle on one task actor.
#[derive(Clone)]
pub struct TaskHandle {
    pub id: String,
    pub(super) addr: Addr<TaskActor>,
    /// The pid of the task's shim as its actor last learned it (0: not yet known).
    pub(super) shim_pid: Arc<AtomicU32>,
    /// Requests in flight to the actor, bounded here: actix's own mailbox bound does
    /// not hold for every way of sending.
    pub(super) in_flight: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("id", &self.id).finish()
    }
}

impl TaskHandle {
    pub(super) fn new(id: String, addr: Addr<TaskActor>, shim_pid: Arc<AtomicU32>) -> Self {
        Self {
            id,
            addr,
            shim_pid,
            in_flight: Arc::new(tokio::sync::Semaphore::new(TASK_REQUESTS_IN_FLIGHT)),
        }
    }

    /// The pid of the shim keel launched for this task (0 while not known, as for
    /// a restored task whose shim has not answered yet).
    pub fn shim_pid(&self) -> u32 {
        self.shim_pid.load(Ordering::Relaxed)
    }

    /// Sends a request and waits for its answer; Unavailable when the task already
    /// has [`TASK_REQUESTS_IN_FLIGHT`] requests waiting.
    pub(super) async fn call<M>(&self, m: M) -> Result<M::Result>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        TaskActor: Handler<M>,
    {
        let _slot = self.in_flight.try_acquire().map_err(|_| {
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
        self.addr
            .send(m)
            .await
            .map_err(|_| Error::NotFound(format!("task {} is gone", self.id)))
    }

    /// Reports an exit learned from the shim's events; the actor records and
    /// publishes it unless it already has.
    pub fn notify_exit(&self, status: u32, at: SystemTime) {
        self.addr.do_send(Exited { status, at });
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
    pub async fn wait(&self, exec_id: &str) -> Result<ExitRecord> {
        self.send(Wait {
            exec_id: exec_id.to_string(),
        })
        .await?
    }

    pub async fn pids(&self) -> Result<Vec<u32>> {
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
