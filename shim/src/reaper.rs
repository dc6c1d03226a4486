//! Exits: the shim is a child subreaper, so every process of its containers that
//! has no other parent ends up its child. On SIGCHLD it reaps them all and hands
//! each exit to the service, which keeps it until Delete (a supervisor that was
//! down when a process exited still gets its exit from State or Wait).

use std::time::SystemTime;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal that killed it.
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    /// An exit by SIGKILL now (137), for a task ended with no process to reap.
    pub fn killed() -> Self {
        Self {
            status: 128 + libc::SIGKILL as u32,
            at: SystemTime::now(),
        }
    }
}

/// Makes this process a child subreaper.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps children as they exit, for the life of the runtime. Installs the
/// SIGCHLD handler before it returns, so no exit is missed.
pub fn start(on_exit: impl Fn(i32, Exit) + Send + 'static) -> std::io::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap(&on_exit);
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(())
}

fn reap(on_exit: &impl Fn(i32, Exit)) {
    loop {
        let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, code.unsigned_abs()),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as u32),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        on_exit(
            pid.as_raw(),
            Exit {
                status,
                at: SystemTime::now(),
            },
        );
    }
}
