//! keeld's lifecycle: lock the root, then hand over to the root supervisor
//! ([`crate::root`]), which starts every part in order, supervises them, and on
//! SIGTERM/SIGINT (or a failure past its limits) shuts down in order: stop
//! accepting → stop the actors → flush storage → remove the socket.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};

use crate::config::Config;
use crate::root::Ending;

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
pub fn run(cfg: Config) -> anyhow::Result<Ending> {
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .thread_name("keeld-rt")
            .enable_all()
            .build()
            .expect("tokio runtime")
    });
    system.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<Ending> {
    create_private_dir(&cfg.root)?;
    create_private_dir(&cfg.state)?;
    let _lock = RootLock::acquire(&cfg.root)?;
    let running = crate::root::startup(&cfg).await?;
    tracing::info!(
        address = %cfg.address.display(),
        root = %cfg.root.display(),
        state = %cfg.state.display(),
        version = crate::VERSION,
        revision = crate::REVISION,
        "keeld serving"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    running.run(&cfg).await
}
