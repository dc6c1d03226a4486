//! [`Tasks`]: the registry of task actors (and the ids reserved by creates under
//! way), the restore of every task after a restart, and the periodic reconciler.

use super::*;

/// The registry of live task actors, and the way to create one.
#[derive(Clone)]
pub struct Tasks {
    pub(super) env: Arc<TaskEnv>,
    pub(super) arbiter: ArbiterHandle,
    pub(super) live: Arc<Mutex<HashMap<(String, String), TaskHandle>>>,
    /// Ids held by a create under way (or a container delete): taken under the
    /// `live` lock, so an id is never both reserved twice or reserved and live.
    /// With each, the pid of the shim the create started (0 until it answers).
    pub(super) reserved: Reserved,
    /// Bounds how many shims are probed at once during a restore.
    pub(super) probes: Arc<tokio::sync::Semaphore>,
    pub(super) cgroups: CgroupParents,
    /// Orphans (found at restore) still being cleaned up, by namespace and id: a
    /// create of the same id waits for its cleanup, which would otherwise take the
    /// new task's shim, container and bundle for the orphan's.
    pub(super) orphans: Arc<Mutex<HashMap<TaskKey, tokio::sync::watch::Receiver<bool>>>>,
    /// Where failed task actors' lifelines report, and where the task supervisor
    /// reads them once [`Tasks::supervise`] starts it.
    pub(super) deaths: mpsc::UnboundedSender<crate::supervision::Death<TaskKey>>,
    pub(super) death_inbox: life::DeathInbox,
    /// Set when keeld shuts down: actors ending now are not failures.
    pub(super) closing: Arc<std::sync::atomic::AtomicBool>,
    /// True once the restore's scan for orphans is done (a create waits for it).
    pub(super) orphan_scan: Arc<Mutex<tokio::sync::watch::Receiver<bool>>>,
    /// Runtime names resolved to shim binaries.
    pub(super) runtimes: Arc<Mutex<HashMap<String, PathBuf>>>,
}

pub(super) type Reserved = Arc<Mutex<HashMap<TaskKey, u32>>>;

/// A task id held by [`Tasks::reserve`]; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    pub(super) reserved: Reserved,
    pub(super) key: TaskKey,
}

impl Reservation {
    /// The create's shim answered with its pid: the events it sends about the
    /// task before the create is done are its own.
    pub(super) fn shim_started(&self, pid: u32) {
        if let Some(p) = lock(&self.reserved).get_mut(&self.key) {
            *p = pid;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.reserved).remove(&self.key);
    }
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").field("env", &self.env).finish()
    }
}

impl Tasks {
    /// `arbiter` is where task actors run; ttrpc handlers are not on an actix arbiter.
    pub fn new(env: TaskEnv, arbiter: ArbiterHandle) -> Self {
        let (deaths, inbox) = mpsc::unbounded_channel();
        Self {
            deaths,
            death_inbox: Arc::new(Mutex::new(Some(inbox))),
            closing: Arc::default(),
            orphan_scan: Arc::new(Mutex::new(tokio::sync::watch::channel(true).1)),
            runtimes: Arc::default(),
            env: Arc::new(env),
            arbiter,
            live: Arc::default(),
            reserved: Arc::default(),
            probes: Arc::new(tokio::sync::Semaphore::new(PARALLEL_PROBES)),
            cgroups: CgroupParents::default(),
            orphans: Arc::default(),
        }
    }

    /// keeld is shutting down: task actors that end from now on are not restarted.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn env(&self) -> &TaskEnv {
        &self.env
    }

    pub fn get(&self, ns: &str, id: &str) -> Result<TaskHandle> {
        lock(&self.live)
            .get(&(ns.to_string(), id.to_string()))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("task {id} not found in namespace {ns}")))
    }

    /// The pid of the shim of task `id` while its create is under way (once the
    /// shim has answered).
    pub fn creating_shim_pid(&self, ns: &str, id: &str) -> Option<u32> {
        lock(&self.reserved)
            .get(&(ns.to_string(), id.to_string()))
            .copied()
            .filter(|pid| *pid != 0)
    }

    pub fn list(&self, ns: &str) -> Vec<TaskHandle> {
        let live = lock(&self.live);
        let mut v: Vec<_> = live
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|(_, h)| h.clone())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Holds task id `id` of `ns` until the reservation is dropped: AlreadyExists
    /// while the task exists or another reservation holds it. A create takes one
    /// before any side effect, so of two concurrent creates of an id one gets
    /// AlreadyExists and touches nothing.
    pub fn reserve(&self, ns: &str, id: &str) -> Result<Reservation> {
        let key = (ns.to_string(), id.to_string());
        let live = lock(&self.live);
        let mut reserved = lock(&self.reserved);
        if live.contains_key(&key) || reserved.contains_key(&key) {
            return Err(Error::AlreadyExists(format!(
                "task {id} already exists in namespace {ns}"
            )));
        }
        reserved.insert(key.clone(), 0);
        Ok(Reservation {
            reserved: self.reserved.clone(),
            key,
        })
    }

    /// The task is gone (deleted, or never created): its handles now say so, and
    /// its actor's stop is no failure.
    pub(super) fn forget(&self, ns: &str, id: &str) {
        if let Some(h) = lock(&self.live).remove(&(ns.to_string(), id.to_string())) {
            h.slot.deleted.store(true, Ordering::Relaxed);
        }
    }

    /// Restores after a restart: every task record becomes a task actor at once,
    /// `unknown` (or `stopped`, when its exit was recorded) until its shim answers a
    /// probe, which happens in the background. Bundles with no task record (a crash
    /// during create) are cleaned up, and the periodic reconciler starts. Returns how
    /// many tasks were restored.
    pub async fn restore_all(&self, logged: &crate::reconcile::LoggedLifecycle) -> Result<usize> {
        let meta = self.env.meta.clone();
        let found = blocking(move || {
            let mut v = Vec::new();
            for ns in meta.namespaces()? {
                for t in meta.tasks(&ns)? {
                    v.push((ns.clone(), Durable::of(&meta, &ns, t)?));
                }
            }
            Ok(v)
        })
        .await?;
        let restored = found.len();
        // Every task is registered now, so that the API lists each one from its
        // first answer; the actors themselves start in the background, a batch at
        // a time, so that the API answers meanwhile whatever the number of tasks. A
        // request to a task whose actor has not started yet waits for it.
        let mut starting = Vec::with_capacity(restored);
        {
            let mut live = lock(&self.live);
            for (ns, durable) in found {
                let id = durable.record.id.clone();
                let slot = Slot::new(0);
                live.insert((ns.clone(), id.clone()), TaskHandle::new(id, slot.clone()));
                let unannounced =
                    logged.missing(&ns, &durable.record.id, durable.record.created_ns);
                starting.push((ns, durable, unannounced, slot));
            }
        }
        let tasks = self.clone();
        tokio::spawn(async move {
            let mut n = 0;
            for (ns, durable, unannounced, slot) in starting {
                let origin = Origin::Revived {
                    unannounced,
                    restart: false,
                };
                tasks.spawn_actor(&ns, durable, origin, Some(slot));
                n += 1;
                if n % RESTORE_BATCH == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });

        // Orphans (bundles and shims of this keeld with no task record) and
        // unpacked checkpoints of tasks that are gone are found and removed in the
        // background: the API need not wait for a scan of /proc. A create waits for
        // the scan, and for the cleanup of an orphan of its id.
        let (scanned, scan) = tokio::sync::watch::channel(false);
        *lock(&self.orphan_scan) = scan;
        let tasks = self.clone();
        tokio::spawn(async move {
            tasks.clean_orphans().await;
            let _ = scanned.send(true);
        });

        let tasks = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RECONCILE_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                let all: Vec<TaskHandle> = lock(&tasks.live).values().cloned().collect();
                for h in all {
                    h.tell(Check);
                }
            }
        });
        Ok(restored)
    }

    /// Finds what a crash during a create left without a task record, and starts
    /// its cleanup; removes the unpacked checkpoints of tasks that are gone.
    async fn clean_orphans(&self) {
        let (state, socket) = (self.env.state_dir.clone(), self.env.keel_socket.clone());
        let candidates = blocking_io(move || {
            let mut c: std::collections::BTreeSet<(String, String)> =
                bundle::bundles(&state).into_iter().collect();
            c.extend(
                restore::shim_processes(&socket)
                    .into_iter()
                    .map(|p| (p.namespace, p.id)),
            );
            Ok(c)
        })
        .await
        .unwrap_or_default();
        for (ns, id) in candidates {
            let known = lock(&self.live).contains_key(&(ns.clone(), id.clone()));
            let valid = keel_protocol::identifiers::validate("namespace", &ns).is_ok()
                && keel_protocol::identifiers::validate("id", &id).is_ok();
            if known || !valid {
                continue;
            }
            tracing::warn!(namespace = %ns, task_id = %id, "bundle or shim without a task record (keeld stopped during create); cleaning up");
            // The shim its create started, when the bundle says which.
            let cmd = self.shim_command(&ns, &id, None).with_bundle_binary();
            let (done, cleaning) = tokio::sync::watch::channel(false);
            let key = (ns, id);
            lock(&self.orphans).insert(key.clone(), cleaning);
            let orphans = self.orphans.clone();
            tokio::spawn(async move {
                restore::cleanup_orphan(&cmd).await;
                lock(&orphans).remove(&key);
                let _ = done.send(true);
            });
        }
        for (ns, id) in bundle::task_dirs(&self.env.scratch_dir.join("restore")) {
            if self.get(&ns, &id).is_err() {
                let dir = self.env.restore_dir(&ns, &id);
                tracing::info!(namespace = %ns, task_id = %id, "removing the unpacked checkpoint of a task that is gone");
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// The shim command for a task, with its container's runtime when known.
    pub(super) fn shim_command(&self, ns: &str, id: &str, runtime: Option<&str>) -> ShimCommand {
        let binary = self
            .runtime_binary(runtime.unwrap_or(DEFAULT_RUNTIME))
            .or_else(|_| self.runtime_binary(DEFAULT_RUNTIME))
            .unwrap_or_else(|_| PathBuf::from("containerd-shim-runc-v2"));
        ShimCommand {
            binary,
            namespace: ns.to_string(),
            id: id.to_string(),
            keel_socket: self.env.keel_socket.clone(),
            bundle: self.env.bundle(ns, id),
        }
    }

    /// A runtime name's shim binary, found on PATH once and remembered (a restore
    /// of many tasks of one runtime looks it up once).
    fn runtime_binary(&self, name: &str) -> Result<PathBuf> {
        if let Some(p) = lock(&self.runtimes).get(name) {
            return Ok(p.clone());
        }
        let p = resolve_runtime(name)?;
        lock(&self.runtimes).insert(name.to_string(), p.clone());
        Ok(p)
    }
}
