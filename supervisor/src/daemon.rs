//! keeld's lifecycle: lock the root, open storage, start the actors, serve ttrpc,
//! and on SIGTERM/SIGINT shut down in order: stop accepting → stop the actors →
//! flush storage → remove the socket.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use keel_actors::events::EventSink;
use keel_actors::monitor::MonitorHandle;
use keel_actors::storage::StorageHandle;
use keel_actors::task::{TaskEnv, Tasks};
use keel_protocol::api::{
    containers_ttrpc, content_ttrpc, events_ttrpc, tasks_ttrpc, version_ttrpc,
};
use keel_protocol::containerd::shim::events_ttrpc_async::create_events;
use keel_storage::{ContentOptions, ContentStore};
use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{signal, SignalKind};
use ttrpc::asynchronous::Server;

use crate::config::Config;
use crate::server::{prepare_socket, Auth, ConnHook};
use crate::services::{
    containers::ContainersService, content::ContentService, events::EventsService,
    shim_events::ShimEventsService, tasks::TasksService, version::VersionService,
};

/// Holds `<root>/keeld.lock` for the daemon's lifetime: one keeld per root.
#[derive(Debug)]
pub struct RootLock {
    _lock: Flock<File>,
}

impl RootLock {
    pub fn acquire(root: &Path) -> anyhow::Result<Self> {
        let path = root.join("keeld.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("open lock file {}", path.display()))?;
        let mut lock = match Flock::lock(file.try_clone()?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, errno)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                anyhow::bail!(
                    "another keeld{} holds the lock {} ({errno}); refusing to start a second daemon on root {}",
                    if holder.is_empty() { String::new() } else { format!(" (pid {holder})") },
                    path.display(),
                    root.display()
                );
            }
        };
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{}", std::process::id())?;
        lock.sync_all()?;
        Ok(Self { _lock: lock })
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Runs keeld until SIGTERM or SIGINT. Builds its own actix system on a one-thread
/// tokio runtime: actors live on the system arbiter (the storage actor on its own
/// thread), ttrpc connections are plain tokio tasks on the same thread, and blocking
/// work goes to the runtime's blocking pool. One thread rather than a pool: a
/// request's hand-offs between a connection and an actor are then wake-ups on one
/// thread, not thread switches (a quarter fewer context switches per task run, and
/// faster event fan-out; `bench/README.md`).
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .thread_name("keeld-rt")
            .enable_all()
            .build()
            .expect("tokio runtime")
    });
    system.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    create_private_dir(&cfg.root)?;
    create_private_dir(&cfg.state)?;
    let _lock = RootLock::acquire(&cfg.root)?;

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
    let storage = StorageHandle::start(store);
    let meta = keel_storage::Meta::open(db.clone())?;
    let events = EventSink::open(&cfg.root.join("events"), db.clone(), cfg.events)?;
    let monitor = MonitorHandle::start(meta.clone(), events.clone());
    let tasks = Tasks::new(
        TaskEnv {
            meta: meta.clone(),
            monitor: monitor.clone(),
            state_dir: cfg.state.clone(),
            keel_socket: cfg.address.clone(),
            scratch_dir: cfg.root.join("scratch"),
            limits: cfg.limits.clone(),
        },
        actix::Arbiter::current(),
    );

    // A crash can leave a record (an exit, a task, a container) and its event out of
    // step; settle that before any restored task reports its exit.
    let (reconciled, logged) = keel_actors::reconcile::reconcile_log(&meta, &events).await?;
    if reconciled != Default::default() {
        tracing::warn!(?reconciled, "records and logged events reconciled");
    }

    // Checkpoints a crash interrupted leave work directories and half-written
    // content behind.
    tasks.clean_interrupted_checkpoints(&storage).await;
    // Every persisted task is listed (unknown until its shim answers) before the
    // API serves; the shims are probed in the background.
    let restored = tasks.restore_all(&logged).await?;
    tracing::info!(tasks = restored, "restoring tasks");

    let auth = Arc::new(Auth::new(&cfg.access));
    let limits = Arc::new(cfg.limits.clone());
    let version = Arc::new(VersionService { auth: auth.clone() });
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
            },
        )))
        .register_service(tasks_ttrpc::create_tasks(Arc::new(TasksService {
            auth: auth.clone(),
            meta,
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
            monitor,
            tasks,
            limits,
        })));
    fs::set_permissions(&cfg.address, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", cfg.address.display()))?;
    server.start().await.context("start ttrpc server")?;
    tracing::info!(
        address = %cfg.address.display(),
        root = %cfg.root.display(),
        state = %cfg.state.display(),
        version = crate::VERSION,
        revision = crate::REVISION,
        "keeld serving"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);

    // Stop accepting and close connections first, so no request races the flush.
    if let Err(e) = server.shutdown().await {
        tracing::warn!(error = %e, "ttrpc server shutdown");
    }
    drop(storage);
    actix::System::current().stop();
    let flushed = tokio::task::spawn_blocking(move || db.flush()).await?;
    flushed.context("flush metadata")?;
    if let Err(e) = fs::remove_file(&cfg.address) {
        tracing::warn!(error = %e, "remove socket");
    }
    tracing::info!("keeld stopped");
    Ok(())
}
