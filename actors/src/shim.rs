//! Launching and cleaning up containerd-shim-runc-v2, exactly as containerd 1.6 does.
//!
//! `start`: `<shim> -namespace NS -address A -publish-binary B -id ID start` with the
//! bundle as working directory, `TTRPC_ADDRESS` pointing at keeld's socket (where the
//! shim forwards its events), stdin at EOF and stdout read alone: it is the shim's
//! socket address, without a newline. The shim needs `<bundle>/log`, a FIFO with a
//! reader, before it serves anything, so [`LogFifo`] creates and drains it first.
//!
//! `delete`: the same flags plus `-bundle`, for a shim that died; it kills and removes
//! the runc container and prints a `DeleteResponse` (exit 137) on stdout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keel_protocol::containerd::api::DeleteResponse;
use protobuf::Message;
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

use crate::{Error, Result};

/// How long `start` and `delete` may take (containerd: 5 s for cleanup).
const SHIM_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// What a shim command needs to know about keeld and the task.
#[derive(Debug, Clone)]
pub struct ShimCommand {
    /// Binary, e.g. `containerd-shim-runc-v2` resolved on PATH.
    pub binary: PathBuf,
    pub namespace: String,
    pub id: String,
    /// keeld's socket path: the shim's `-address` (it only feeds the socket-name hash,
    /// so it must be stable per keel instance) and its `TTRPC_ADDRESS`.
    pub keel_socket: PathBuf,
    pub bundle: PathBuf,
}

/// The file in a task's bundle naming the shim binary that serves it (containerd
/// 1.7's name for it), written before `start`: a task that keeld lost during its
/// create is cleaned up by its own shim.
const SHIM_BINARY_FILE: &str = "shim-binary-path";

/// Resolves a runtime name the way containerd does: an absolute path is the shim
/// binary itself; `io.containerd.runc.v2` is `containerd-shim-runc-v2`, looked for
/// on PATH, then next to keeld's own executable.
pub fn resolve_runtime(name: &str) -> Result<PathBuf> {
    let mut search: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
    {
        search.push(dir);
    }
    let search = std::env::join_paths(search).unwrap_or_default();
    resolve_runtime_in(name, &search)
}

/// [`resolve_runtime`] with an explicit search path.
pub fn resolve_runtime_in(name: &str, search: &std::ffi::OsStr) -> Result<PathBuf> {
    if name.starts_with('/') {
        let p = Path::new(name);
        if p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(Error::InvalidArgument(format!(
                "runtime {name:?}: a shim path must not contain \"..\""
            )));
        }
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(Error::NotFound(format!(
                "runtime {name:?}: no such shim binary"
            )))
        };
    }
    let parts: Vec<&str> = name.split('.').collect();
    let valid = |p: &&str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if parts.len() < 2 || !parts.iter().all(valid) {
        return Err(Error::InvalidArgument(format!(
            "runtime {name:?} is not a runtime name like io.containerd.runc.v2"
        )));
    }
    let binary = format!(
        "containerd-shim-{}-{}",
        parts[parts.len() - 2],
        parts[parts.len() - 1]
    );
    std::env::split_paths(search)
        .map(|d| d.join(&binary))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::NotFound(format!(
                "runtime {name:?}: no {binary} on PATH or next to keeld"
            ))
        })
}

/// Where a shim serves its task API, as its `start` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimAddress {
    /// `unix://…`
    pub address: String,
    /// The task API version it serves: 2 (`containerd.task.v2.Task`) or 3.
    pub task_api: u32,
}

/// The address a shim's `start` printed: plain (containerd 1.6's shims, task API
/// v2), or bootstrap JSON (`{"version":2,"address":…,"protocol":"ttrpc"}`, containerd
/// 1.7 and later), whose version names the task API the shim serves: 2 or 3
/// (`containerd.task.v3.Task`, containerd 2.0). keel speaks ttrpc; a shim speaking
/// gRPC, or naming any other version (containerd reads one below 2 as a plain
/// address, which JSON is not), is refused, saying so.
pub fn start_address(printed: &str) -> Result<ShimAddress> {
    #[derive(serde::Deserialize)]
    struct Bootstrap {
        version: u32,
        address: String,
        #[serde(default)]
        protocol: String,
    }
    let (address, task_api) = if printed.starts_with('{') {
        let b: Bootstrap = serde_json::from_str(printed).map_err(|e| {
            Error::Shim(format!(
                "shim start printed {printed:?}, not bootstrap JSON: {e}"
            ))
        })?;
        if !keel_protocol::shim::TASK_APIS.contains(&b.version) {
            return Err(Error::Shim(format!(
                "the shim's bootstrap JSON names task API v{}; keel speaks v2 and v3",
                b.version
            )));
        }
        if !(b.protocol.is_empty() || b.protocol.eq_ignore_ascii_case("ttrpc")) {
            return Err(Error::Shim(format!(
                "the shim speaks {:?}; keel speaks ttrpc",
                b.protocol
            )));
        }
        (b.address, b.version)
    } else {
        (printed.to_string(), 2)
    };
    if !address.starts_with("unix://") {
        return Err(Error::Shim(format!(
            "shim start printed {address:?}, not a unix:// address"
        )));
    }
    Ok(ShimAddress { address, task_api })
}

impl ShimCommand {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("-namespace")
            .arg(&self.namespace)
            .arg("-address")
            .arg(&self.keel_socket)
            .arg("-publish-binary")
            .arg(std::env::current_exe().unwrap_or_else(|_| PathBuf::from("keeld")))
            .arg("-id")
            .arg(&self.id)
            .current_dir(&self.bundle)
            .env("TTRPC_ADDRESS", &self.keel_socket)
            .env("GOMAXPROCS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // `start` and `delete` are short-lived children of keeld: if keeld dies
        // while one runs (even between its fork and its exec, when it is still a
        // copy of keeld that no cleanup would recognise), the kernel kills it. The
        // daemon shim that `start` forks does not inherit this.
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // prctl and getppid, both async-signal-safe; it allocates nothing.
        unsafe {
            c.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // keeld died before the setting took: nobody is left to wait.
                if u32::try_from(libc::getppid()) != Ok(parent) {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        c
    }

    /// Names the binary in the bundle, for [`ShimCommand::with_bundle_binary`].
    pub fn note_binary(&self) -> Result<()> {
        std::fs::write(
            self.bundle.join(SHIM_BINARY_FILE),
            self.binary.as_os_str().as_encoded_bytes(),
        )
        .map_err(|e| Error::Io(format!("write the shim's path into the bundle: {e}")))
    }

    /// The command with the binary its bundle names, when it names one that is
    /// there (an orphan's own shim), else as it is.
    pub fn with_bundle_binary(mut self) -> Self {
        if let Some(binary) = std::fs::read_to_string(self.bundle.join(SHIM_BINARY_FILE))
            .ok()
            .map(|p| PathBuf::from(p.trim()))
            .filter(|p| p.is_absolute() && p.is_file())
        {
            self.binary = binary;
        }
        self
    }

    /// Runs `start` with `stdin` (the runtime options, marshalled; may be empty)
    /// on its stdin; returns the address the shim printed.
    pub async fn start(&self, stdin: &[u8]) -> Result<ShimAddress> {
        use tokio::io::AsyncWriteExt;
        let mut c = self.command();
        c.arg("start").stdin(Stdio::piped());
        let run = async {
            let mut child = c.spawn()?;
            let mut input = child.stdin.take().expect("piped stdin");
            // Written while its output is read: `start` reads stdin to its end
            // first, but a shim that does not must not deadlock keeld.
            let feed = async move {
                let r = input.write_all(stdin).await;
                drop(input);
                r
            };
            let (fed, out) = tokio::join!(feed, child.wait_with_output());
            let out = out?;
            // A shim that exits without reading its stdin breaks the pipe: its exit
            // status tells what happened.
            if let Err(e) = fed {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(e);
                }
            }
            Ok(out)
        };
        let out = tokio::time::timeout(SHIM_COMMAND_TIMEOUT, run)
            .await
            .map_err(|_| Error::Shim(format!("{} start timed out", self.binary.display())))?
            .map_err(|e| Error::Shim(format!("run {} start: {e}", self.binary.display())))?;
        if !out.status.success() {
            return Err(Error::Shim(format!(
                "{} start failed ({}): {}",
                self.binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        start_address(String::from_utf8_lossy(&out.stdout).trim())
    }

    /// Runs `delete` for a shim that is gone: kills and removes the container, unmounts
    /// its rootfs, and reports (pid, exit status 137).
    pub async fn delete(&self) -> Result<DeleteResponse> {
        let mut c = self.command();
        c.arg("-bundle").arg(&self.bundle).arg("delete");
        let out = tokio::time::timeout(SHIM_COMMAND_TIMEOUT, c.output())
            .await
            .map_err(|_| Error::Shim(format!("{} delete timed out", self.binary.display())))?
            .map_err(|e| Error::Shim(format!("run {} delete: {e}", self.binary.display())))?;
        if !out.status.success() {
            return Err(Error::Shim(format!(
                "{} delete failed ({}): {}",
                self.binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        DeleteResponse::parse_from_bytes(&out.stdout)
            .map_err(|e| Error::Shim(format!("shim delete output: {e}")))
    }
}

/// A pidfd on a process that is not keeld's child (the shim double-forks): it becomes
/// readable when the process exits, with no polling and no pid-reuse race.
#[derive(Debug)]
pub struct PidFd {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl PidFd {
    pub fn open(pid: u32) -> Result<Self> {
        use std::os::fd::FromRawFd;
        let raw = libc::pid_t::try_from(pid)
            .map_err(|_| Error::InvalidArgument(format!("pid {pid} out of range")))?;
        // SAFETY: pidfd_open takes a pid and flags, touches no memory of ours, and
        // returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            return Err(Error::Io(format!(
                "pidfd_open({pid}): {}",
                std::io::Error::last_os_error()
            )));
        }
        let fd = i32::try_from(fd).map_err(|_| Error::Io("pidfd out of range".into()))?;
        // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd moves into the AsyncFd, which owns it until dropped, so
        // the descriptor stays open and refers to this pidfd for the AsyncFd's life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        }
        .map_err(|e| Error::Io(format!("register pidfd: {e}")))?;
        Ok(Self { fd })
    }

    /// Resolves when the process has exited.
    pub async fn exited(&self) -> Result<()> {
        let _ready = self
            .fd
            .readable()
            .await
            .map_err(|e| Error::Io(format!("pidfd: {e}")))?;
        Ok(())
    }
}

/// The bundle's `log` FIFO, held open read-write (so the shim's open never blocks and
/// never sees a missing reader) and drained into keel's log with the task's fields.
#[derive(Debug)]
pub struct LogFifo {
    task: tokio::task::JoinHandle<()>,
}

impl LogFifo {
    /// Creates `<bundle>/log` if needed, opens it and starts draining it.
    pub fn open(bundle: &Path, namespace: &str, id: &str) -> Result<Self> {
        let path = bundle.join("log");
        match nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(Error::Io(format!("mkfifo {}: {e}", path.display()))),
        }
        let rx = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&path)
            .map_err(|e| Error::Io(format!("open {}: {e}", path.display())))?;
        let (ns, id) = (namespace.to_string(), id.to_string());
        let task = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(rx).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "keel::shim", namespace = %ns, task_id = %id, "{line}");
            }
        });
        Ok(Self { task })
    }
}

impl Drop for LogFifo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pidfd_reports_a_process_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), pidfd.exited())
            .await
            .unwrap()
            .unwrap();
        child.wait().unwrap();
        assert!(PidFd::open(0).is_err() || PidFd::open(u32::MAX).is_err());
    }

    #[test]
    fn start_output_is_an_address_or_bootstrap_json() {
        let a = "unix:///run/containerd/s/abc";
        let at = |task_api| ShimAddress {
            address: a.to_string(),
            task_api,
        };
        assert_eq!(start_address(a).unwrap(), at(2));
        let json = |v: u32, protocol: &str| {
            format!(r#"{{"version":{v},"address":"{a}","protocol":"{protocol}"}}"#)
        };
        assert_eq!(start_address(&json(2, "ttrpc")).unwrap(), at(2));
        assert_eq!(start_address(&json(3, "ttrpc")).unwrap(), at(3));
        assert_eq!(start_address(&json(3, "TTRPC")).unwrap(), at(3));
        assert_eq!(
            start_address(&format!(r#"{{"version":3,"address":"{a}"}}"#)).unwrap(),
            at(3)
        );
        for refused in [
            json(4, "ttrpc"),
            json(1, "ttrpc"),
            json(2, "grpc"),
            r#"{"version":2,"address":"tcp://x"}"#.to_string(),
            "{not json".to_string(),
            "/run/x.sock".to_string(),
        ] {
            assert!(
                matches!(start_address(&refused), Err(Error::Shim(_))),
                "{refused}"
            );
        }
    }

    #[test]
    fn runtime_names_resolve_like_containerd() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("containerd-shim-runc-v2");
        std::fs::write(&bin, "").unwrap();
        let search = dir.path().as_os_str();
        assert_eq!(
            resolve_runtime_in("io.containerd.runc.v2", search).unwrap(),
            bin
        );
        assert!(matches!(
            resolve_runtime_in("io.containerd.nope.v9", search),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            resolve_runtime_in("../../bin/sh", search),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            resolve_runtime_in("", search),
            Err(Error::InvalidArgument(_))
        ));
        // An absolute path is the shim itself, wherever it is.
        let path = bin.display().to_string();
        assert_eq!(resolve_runtime_in(&path, "".as_ref()).unwrap(), bin);
        assert!(matches!(
            resolve_runtime_in(&format!("{path}.missing"), search),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            resolve_runtime_in("/usr/../bin/sh", search),
            Err(Error::InvalidArgument(_))
        ));
    }
}
