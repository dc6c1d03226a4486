//! The root supervisor: keeld's parts, started in order by [`startup`], and what a
//! failure means once a part's own supervisor hands it up.
//!
//! ```text
//! root                      escalates by exiting: systemd (Restart=always) starts
//! │                         keeld again, and the restore path brings every task back
//! ├── storage actor         escalate: the root starts a new one on the same store
//! ├── event exchange        escalate: the root starts a new flusher thread
//! ├── monitor               one-for-one
//! ├── tasks                 one-for-one, each task actor on its own
//! └── api                   a request that panics fails alone, with Internal
//! ```
//!
//! Every supervisor restarts at most [`INTENSITY`] times in its window (per task
//! for the task actors); one failure more is handed up, and at the root it ends
//! keeld, cleanly: stop serving, flush sled, remove the socket, exit non-zero.
//! Every restart is logged with its cause and counted, and `keelctl debug
//! supervision` shows the counts.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_actors::events::EventSink;
use keel_actors::monitor::MonitorHandle;
use keel_actors::storage::StorageHandle;
use keel_actors::supervision::{
    Death, Decision, Escalation, Intensity, Strategy, SupervisionStats, Supervisor,
};
use keel_actors::task::{TaskEnv, Tasks};
use keel_protocol::api::{
    containers_ttrpc, content_ttrpc, events_ttrpc, tasks_ttrpc, version_ttrpc,
};
use keel_protocol::containerd::shim::events_ttrpc_async::create_events;
use keel_storage::{ContentOptions, ContentStore};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use ttrpc::asynchronous::Server;

use crate::config::Config;
use crate::server::{prepare_socket, Auth, ConnHook};
use crate::services::{
    containers::ContainersService, content::ContentService, events::EventsService,
    shim_events::ShimEventsService, tasks::TasksService, version::VersionService,
};

/// Each supervisor's restart intensity: at most this many restarts in a minute.
pub const INTENSITY: Intensity = Intensity {
    max: 3,
    within: Duration::from_secs(60),
};
/// Request handlers may fail more often before the API escalates: each failure is
/// one request's alone.
const API_INTENSITY: Intensity = Intensity {
    max: 20,
    within: Duration::from_secs(60),
};

/// keeld, started: its parts and the root's inboxes.
pub struct Running {
    server: Server,
    tasks: Tasks,
    db: keel_storage::durable::Db,
    storage: StorageHandle,
    events: EventSink,
    monitor: MonitorHandle,
    /// Deaths of the parts the root restarts itself (storage, exchange, monitor).
    deaths: mpsc::UnboundedReceiver<Death<&'static str>>,
    /// Failures the tasks' and the API's supervisors hand up.
    escalations: mpsc::UnboundedReceiver<Escalation>,
    stats: SupervisionStats,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").finish_non_exhaustive()
    }
}

/// Starts keeld, in this order: opens storage (the content store, sled, the event
/// log), starts the actors under their supervisors, reconciles the records with the
/// log, restores every task, and starts the API.
pub async fn startup(cfg: &Config) -> anyhow::Result<Running> {
    keel_actors::supervision::install_panic_hook();
    let stats = SupervisionStats::default();
    let (death_tx, deaths) = mpsc::unbounded_channel();
    let (escalate, escalations) = mpsc::unbounded_channel();

    // Where a start's time goes, logged once it serves.
    let mut phases = Phases::new();

    // Storage.
    let db = keel_storage::open_db(&cfg.root)?;
    let opts = ContentOptions {
        ingest_max_age: cfg.ingest_max_age,
    };
    let (store, report) = ContentStore::open(&cfg.root, db.clone(), &opts)?;
    for m in &report.mismatches {
        tracing::error!(mismatch = %m, "content store: metadata and blobs disagree; nothing was deleted, run `keelctl content fsck`");
    }
    tracing::info!(
        blobs = report.blobs,
        ingests_kept = report.ingests_kept.len(),
        ingests_removed = report.ingests_removed.len(),
        commits_finished = report.commits_finished.len(),
        mismatches = report.mismatches.len(),
        "content store checked"
    );
    for r in &report.ingests_removed {
        tracing::info!(ingest = %r, "removed a stale partial ingest");
    }
    let meta = keel_storage::Meta::open(db.clone())?;
    let events = EventSink::open(&cfg.root.join("events"), db.clone(), cfg.events)?;
    phases.done("storage");

    // The actors, each under its supervisor (the root's records of storage,
    // exchange and monitor are made here, so that they show before any failure).
    for (name, strategy) in [
        ("root", Strategy::OneForOne),
        ("storage", Strategy::Escalate),
        ("exchange", Strategy::Escalate),
        ("monitor", Strategy::OneForOne),
    ] {
        Supervisor::new(name, strategy, INTENSITY, &stats);
    }
    let storage = StorageHandle::start(store, death_tx.clone());
    events.supervise(death_tx.clone());
    let monitor = MonitorHandle::start(meta.clone(), events.clone(), death_tx);
    let tasks = Tasks::new(
        TaskEnv {
            meta: meta.clone(),
            monitor: monitor.clone(),
            events: events.clone(),
            state_dir: cfg.state.clone(),
            keel_socket: cfg.address.clone(),
            scratch_dir: cfg.root.join("scratch"),
            limits: cfg.limits.clone(),
        },
        actix::Arbiter::current(),
    );
    tasks.supervise(
        Supervisor::new("tasks", Strategy::OneForOne, INTENSITY, &stats),
        escalate.clone(),
    );
    crate::services::supervise(
        Supervisor::new("api", Strategy::OneForOne, API_INTENSITY, &stats),
        escalate,
    );

    phases.done("actors");
    // A crash can leave a record (an exit, a task, a container) and its event out of
    // step; settle that before any restored task reports its exit.
    let (reconciled, logged) = keel_actors::reconcile::reconcile_log(&meta, &events).await?;
    if reconciled != Default::default() {
        tracing::warn!(?reconciled, "records and logged events reconciled");
    }
    phases.done("reconcile");
    // Checkpoints a crash interrupted leave work directories and half-written
    // content behind.
    tasks.clean_interrupted_checkpoints(&storage).await;
    // Every persisted task is listed (unknown until its shim answers) before the
    // API serves; the shims are probed in the background.
    let restored = tasks.restore_all(&logged).await?;
    phases.done("restore");
    let server = serve(cfg, &meta, &events, &monitor, &tasks, &storage, &stats).await?;
    phases.done("api");
    tracing::info!(
        tasks = restored,
        storage_ms = phases.ms("storage"),
        actors_ms = phases.ms("actors"),
        reconcile_ms = phases.ms("reconcile"),
        restore_ms = phases.ms("restore"),
        api_ms = phases.ms("api"),
        "started; restoring tasks (their shims are probed in the background)"
    );
    Ok(Running {
        server,
        tasks,
        db,
        storage,
        events,
        monitor,
        deaths,
        escalations,
        stats,
    })
}

/// Starts the API on keeld's socket.
async fn serve(
    cfg: &Config,
    meta: &keel_storage::Meta,
    events: &EventSink,
    monitor: &MonitorHandle,
    tasks: &Tasks,
    storage: &StorageHandle,
    stats: &SupervisionStats,
) -> anyhow::Result<Server> {
    let auth = Arc::new(Auth::new(&cfg.access));
    let limits = Arc::new(cfg.limits.clone());
    let version = Arc::new(VersionService {
        auth: auth.clone(),
        stats: stats.clone(),
    });
    prepare_socket(&cfg.address)?;
    let addr = format!("unix://{}", cfg.address.display());
    let mut server = Server::new()
        .bind(&addr)
        .with_context(|| format!("bind {}", cfg.address.display()))?
        .set_accept_hook(ConnHook::new(&cfg.limits))
        .register_service(version_ttrpc::create_version(version.clone()))
        .register_service(version_ttrpc::create_health(version))
        .register_service(content_ttrpc::create_content(Arc::new(
            ContentService::new(auth.clone(), storage.clone(), limits.clone()),
        )))
        .register_service(containers_ttrpc::create_containers(Arc::new(
            ContainersService {
                auth: auth.clone(),
                meta: meta.clone(),
                events: events.clone(),
                tasks: tasks.clone(),
                limits: limits.clone(),
                default_runtime: cfg.default_runtime.clone(),
            },
        )))
        .register_service(tasks_ttrpc::create_tasks(Arc::new(TasksService {
            auth: auth.clone(),
            meta: meta.clone(),
            tasks: tasks.clone(),
            storage: storage.clone(),
            limits: limits.clone(),
        })))
        .register_service(events_ttrpc::create_events(Arc::new(EventsService {
            auth: auth.clone(),
            events: events.clone(),
            limits: limits.clone(),
        })))
        .register_service(create_events(Arc::new(ShimEventsService {
            auth,
            monitor: monitor.clone(),
            tasks: tasks.clone(),
            limits,
        })));
    fs::set_permissions(&cfg.address, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", cfg.address.display()))?;
    server.start().await.context("start ttrpc server")?;
    Ok(server)
}

/// Why keeld ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// SIGTERM or SIGINT.
    Signal(&'static str),
    /// A failure beyond what the supervisors may restart.
    Escalated(String),
}

impl Running {
    /// Supervises until a signal, or a failure the root must end keeld for; then
    /// shuts down in order: stop accepting, stop the actors, flush storage, remove
    /// the socket.
    pub async fn run(mut self, cfg: &Config) -> anyhow::Result<Ending> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // The root restarts the storage actor and the exchange's flusher itself
        // (their strategy is to escalate to it), within its own window.
        let root = Supervisor::new("root", Strategy::OneForOne, INTENSITY, &self.stats);
        let mut parts: std::collections::HashMap<&'static str, Supervisor> =
            std::collections::HashMap::new();
        let ending = loop {
            tokio::select! {
                _ = term.recv() => break Ending::Signal("SIGTERM"),
                _ = int.recv() => break Ending::Signal("SIGINT"),
                Some(e) = self.escalations.recv() => {
                    break Ending::Escalated(format!("{}: {}", e.from, e.cause));
                }
                Some(Death { child, cause }) = self.deaths.recv() => {
                    let strategy = if child == "monitor" {
                        Strategy::OneForOne
                    } else {
                        Strategy::Escalate
                    };
                    let own = parts
                        .entry(child)
                        .or_insert_with(|| Supervisor::new(child, strategy, INTENSITY, &self.stats));
                    let decision = match own.failed(child, &cause) {
                        Decision::Escalate if strategy == Strategy::Escalate => {
                            root.failed(child, &cause)
                        }
                        d => d,
                    };
                    match (decision, child) {
                        (Decision::Escalate, _) => break Ending::Escalated(format!("{child}: {cause}")),
                        (Decision::Restart, "storage") => self.storage.restart(),
                        (Decision::Restart, "exchange") => {
                            if let Err(e) = self.events.restart_flusher() {
                                break Ending::Escalated(format!("exchange: restarting its flusher: {e}"));
                            }
                        }
                        (Decision::Restart, _) => self.monitor.restart(),
                    }
                }
            }
        };
        match &ending {
            Ending::Signal(which) => tracing::info!(signal = which, "shutting down"),
            Ending::Escalated(why) => tracing::error!(
                cause = %why,
                "a failure beyond what keeld's supervisors may restart: exiting, for systemd to start keeld again (the restore brings every task back)"
            ),
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // Stop accepting and close connections first, so no request races the flush.
        if let Err(e) = self.server.shutdown().await {
            tracing::warn!(error = %e, "ttrpc server shutdown");
        }
        self.tasks.close();
        drop(self.storage);
        actix::System::current().stop();
        if let Err(e) = self.events.close() {
            tracing::warn!(error = %e, "closing the event log");
        }
        let db = self.db;
        let flushed = tokio::task::spawn_blocking(move || db.flush()).await?;
        flushed.context("flush metadata")?;
        if let Err(e) = fs::remove_file(&cfg.address) {
            tracing::warn!(error = %e, "remove socket");
        }
        tracing::info!("keeld stopped");
        Ok(ending)
    }
}

/// How long each phase of a start took.
struct Phases {
    last: std::time::Instant,
    took: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new() -> Self {
        Self {
            last: std::time::Instant::now(),
            took: Vec::new(),
        }
    }

    /// Phase `name` ends now (it began when the one before ended).
    fn done(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.took.push((name, now - self.last));
        self.last = now;
    }

    fn ms(&self, name: &str) -> f64 {
        self.took
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, d)| d.as_secs_f64() * 1000.0)
    }
}
