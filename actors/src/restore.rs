//! Finding out, after keeld restarts, what became of each task's shim.
//!
//! [`probe`] asks a task's shim what it knows, within a deadline, and never guesses:
//! a shim that does not answer in time is [`Found::Unreachable`] (the task stays
//! `unknown` and is probed again later); a shim is [`Found::Dead`] only when nothing
//! listens on its socket any more. [`cleanup_orphan`] removes what a crash during
//! create can leave without a task record: a shim, its socket, a bundle, a cgroup.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use keel_protocol::containerd::api;
use keel_protocol::shim::ShimClient;
use keel_protocol::types::system_time;
use sha2::Digest;

use crate::shim::ShimCommand;

/// Deadline of one probe step (connect, Connect, State).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Scans of /proc for an orphan's shim processes, and the pause after each kill
/// (a second to be rid of a `start` and the daemon it forks, at the most).
const ORPHAN_KILL_ROUNDS: usize = 50;
const ORPHAN_KILL_PAUSE: Duration = Duration::from_millis(20);

/// What a probe found.
pub enum Found {
    /// The shim answers and knows the task.
    Alive {
        shim: ShimClient,
        shim_pid: u32,
        pid: u32,
        status: api::Status,
        /// The exit, when the task is stopped.
        exit: Option<(u32, SystemTime)>,
    },
    /// The shim answers but has no such task: keeld crashed before Create finished.
    NoTask,
    /// Nothing listens on the shim's socket: the shim is gone.
    Dead,
    /// The shim did not answer in time (it may be stopped or overloaded).
    Unreachable(String),
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Alive { status, pid, .. } => write!(f, "Alive({status:?}, pid {pid})"),
            Found::NoTask => f.write_str("NoTask"),
            Found::Dead => f.write_str("Dead"),
            Found::Unreachable(why) => write!(f, "Unreachable({why})"),
        }
    }
}

/// Whether something accepts connections on a unix socket path. `Ok(false)` only
/// when the path is gone or the connection is refused (no listener).
pub fn listening(path: &Path) -> std::io::Result<bool> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Why one probe step gave no answer.
enum Step {
    /// The shim answered NotFound: it has no such task.
    NoTask,
    Failed(String),
}

async fn step<T>(
    what: &str,
    f: impl std::future::Future<Output = keel_protocol::Result<T>>,
) -> Result<T, Step> {
    match tokio::time::timeout(PROBE_TIMEOUT, f).await {
        Err(_) => Err(Step::Failed(format!("{what} timed out"))),
        Ok(Err(keel_protocol::Error::NotFound(_))) => Err(Step::NoTask),
        Ok(Err(e)) => Err(Step::Failed(format!("{what}: {e}"))),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Asks the shim at `address`, serving task API `task_api`, about task `id`.
pub async fn probe(address: &str, task_api: u32, namespace: &str, id: &str) -> Found {
    let Some(path) = address.strip_prefix("unix://") else {
        return Found::Unreachable(format!("shim address {address:?} is not unix://"));
    };
    // One connection: refused or missing is the shim gone; anything else it
    // answers on.
    let stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Found::Dead
        }
        Err(e) => return Found::Unreachable(format!("connect {path}: {e}")),
    };
    let shim = match stream
        .set_nonblocking(true)
        .map_err(|e| keel_protocol::Error::Unavailable(e.to_string()))
        .and_then(|()| ShimClient::from_stream(stream, namespace))
        .and_then(|s| s.task_api(task_api))
    {
        Ok(s) => s,
        Err(e) => return Found::Unreachable(e.to_string()),
    };
    // Both questions at once, on the one connection.
    let connect = api::ConnectRequest {
        id: id.to_string(),
        ..Default::default()
    };
    let state = api::StateRequest {
        id: id.to_string(),
        ..Default::default()
    };
    let (conn, state) = match tokio::join!(
        step("Connect", shim.connect_shim(&connect, Some(PROBE_TIMEOUT))),
        step("State", shim.state(&state, Some(PROBE_TIMEOUT))),
    ) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(Step::NoTask), _) | (_, Err(Step::NoTask)) => return Found::NoTask,
        (Err(Step::Failed(why)), _) | (_, Err(Step::Failed(why))) => {
            return Found::Unreachable(why)
        }
    };
    let status = state.status.enum_value_or_default();
    let exit = (status == api::Status::STOPPED).then(|| {
        (
            state.exit_status,
            state
                .exited_at
                .as_ref()
                .map_or_else(SystemTime::now, system_time),
        )
    });
    Found::Alive {
        shim,
        shim_pid: conn.shim_pid,
        pid: if state.pid != 0 {
            state.pid
        } else {
            conn.task_pid
        },
        status,
        exit,
    }
}

/// The socket a containerd 1.6 shim listens on for task `id`: a hash of the
/// `-address` it was given, the namespace and the id, under `/run/containerd/s`.
pub fn shim_socket(keel_socket: &Path, namespace: &str, id: &str) -> PathBuf {
    let h = sha2::Sha256::digest(format!("{}/{namespace}/{id}", keel_socket.display()).as_bytes());
    Path::new("/run/containerd/s").join(hex::encode(h))
}

/// A shim process serving a keeld, found in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimProcess {
    pub pid: i32,
    pub namespace: String,
    pub id: String,
}

/// Parses a shim's command line (`containerd-shim-… -namespace NS -address A … -id ID
/// …`); `None` unless it is a shim started for `keel_socket`.
fn parse_shim_cmdline(args: &[&str], keel_socket: &str) -> Option<(String, String)> {
    let name = Path::new(args.first()?).file_name()?.to_str()?;
    if !name.starts_with("containerd-shim-") {
        return None;
    }
    let flag = |f: &str| {
        args.windows(2)
            .find(|w| w[0] == f)
            .map(|w| w[1].to_string())
    };
    (flag("-address")? == keel_socket).then_some(())?;
    Some((flag("-namespace")?, flag("-id")?))
}

/// Whether process `pid` is the shim `cmd` launched (its command line names the
/// same runtime, keeld socket, namespace and id): a shim's pid is checked before it
/// is signalled, in case it was reused.
pub fn is_shim_of(pid: u32, cmd: &ShimCommand) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let text = String::from_utf8_lossy(&raw);
    let args: Vec<&str> = text.split('\0').filter(|a| !a.is_empty()).collect();
    parse_shim_cmdline(&args, &cmd.keel_socket.display().to_string())
        .is_some_and(|(ns, id)| ns == cmd.namespace && id == cmd.id)
}

/// Shim processes started with `-address keel_socket`, from `/proc`.
pub fn shim_processes(keel_socket: &Path) -> Vec<ShimProcess> {
    let want = keel_socket.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid: i32 = p.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(p.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&raw);
            let args: Vec<&str> = text.split('\0').filter(|a| !a.is_empty()).collect();
            let (namespace, id) = parse_shim_cmdline(&args, &want)?;
            Some(ShimProcess { pid, namespace, id })
        })
        .collect()
}

/// Removes what a crash during create can leave for a task with no record: its shim
/// (killed: it was never given a container), runc state and mounts (the shim's
/// `delete`), the shim's socket, the bundle and the task's cgroup.
pub async fn cleanup_orphan(cmd: &ShimCommand) {
    let (ns, id) = (&cmd.namespace, &cmd.id);
    // A shim `start` that was still running when keeld died can fork the daemon shim
    // between a scan of /proc and the kill: scan again until none is left.
    for _ in 0..ORPHAN_KILL_ROUNDS {
        let found: Vec<ShimProcess> = shim_processes(&cmd.keel_socket)
            .into_iter()
            .filter(|p| &p.namespace == ns && &p.id == id)
            .collect();
        if found.is_empty() {
            break;
        }
        for p in found {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        tokio::time::sleep(ORPHAN_KILL_PAUSE).await;
    }
    if cmd.bundle.exists() {
        if let Err(e) = cmd.delete().await {
            tracing::debug!(namespace = %ns, task_id = %id, error = %e, "orphan: shim delete");
        }
    }
    let _ = std::fs::remove_file(shim_socket(&cmd.keel_socket, ns, id));
    match crate::bundle::remove_bundle(&cmd.bundle) {
        Ok(()) => tracing::info!(namespace = %ns, task_id = %id, "orphan removed"),
        Err(e) => {
            tracing::warn!(namespace = %ns, task_id = %id, error = %e, "orphaned bundle not removed")
        }
    }
    crate::bundle::remove_cgroups(ns, id, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_nobody_listens_on_is_not_listening() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        assert!(!listening(&p).unwrap(), "missing path");
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(listening(&p).unwrap());
        drop(l);
        assert!(!listening(&p).unwrap(), "stale socket file, no listener");
    }

    #[test]
    fn shim_socket_matches_containerd_naming() {
        // sha256 of "/run/keel/keel.sock/default/web", as containerd computes it.
        assert_eq!(
            shim_socket(Path::new("/run/keel/keel.sock"), "default", "web"),
            Path::new("/run/containerd/s/9ef5b22dfc9aa194ddd8f1a050e277be82889ccdd73ffc9222e4b590fb85fba2")
        );
    }

    #[test]
    fn shim_command_lines_are_matched_by_address() {
        let args = [
            "/usr/bin/containerd-shim-runc-v2",
            "-namespace",
            "ns1",
            "-address",
            "/run/keel/keel.sock",
            "-publish-binary",
            "/usr/bin/keeld",
            "-id",
            "web",
        ];
        assert_eq!(
            parse_shim_cmdline(&args, "/run/keel/keel.sock"),
            Some(("ns1".into(), "web".into()))
        );
        assert_eq!(parse_shim_cmdline(&args, "/run/other.sock"), None);
        assert_eq!(
            parse_shim_cmdline(
                &["/bin/sleep", "-address", "/run/keel/keel.sock"],
                "/run/keel/keel.sock"
            ),
            None
        );
        assert_eq!(
            parse_shim_cmdline(&args[..5], "/run/keel/keel.sock"),
            None,
            "no -id"
        );
    }
}
