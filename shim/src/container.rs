//! The container through libcontainer, in this process: create (the init
//! process waits to be started), exec (a tenant process, started at once),
//! signals, pause and resume, delete; the rootfs mounts containerd hands over;
//! the terminal's console socket.
//!
//! libcontainer forks the container's processes from this process and waits for
//! its intermediate ones itself. It runs synchronously on the shim's only thread,
//! so the reaper (`reaper.rs`), which runs between requests, never takes an exit
//! libcontainer is waiting for, and a container process never exits before the
//! shim has recorded its pid.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount;
use libcontainer::config::YoukiConfig;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::get_executor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::mount::MsFlags;

use crate::service::Error;

/// What a new process's stdio is: descriptors, or a terminal.
#[derive(Debug)]
pub enum Streams {
    Fds {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// The process gets a new terminal; its master arrives on this socket.
    Terminal(ConsoleSocket),
}

fn lc(what: &str, e: LibcontainerError) -> Error {
    match e {
        LibcontainerError::IncorrectStatus(s) => {
            Error::FailedPrecondition(format!("{what}: the container is {s}"))
        }
        LibcontainerError::Exist => Error::AlreadyExists(format!("{what}: {e}")),
        LibcontainerError::InvalidInput(m) => Error::InvalidArgument(format!("{what}: {m}")),
        LibcontainerError::InvalidSpec(_) | LibcontainerError::MissingSpec(_) => {
            Error::InvalidArgument(format!("{what}: spec: {e}"))
        }
        other => Error::Internal(format!("{what}: {other}")),
    }
}

fn base(
    id: &str,
    root: &Path,
    streams: Streams,
) -> Result<(ContainerBuilder, Option<ConsoleSocket>), Error> {
    let b = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_executor(Workload)
        .with_root_path(root)
        .map_err(|e| lc("state directory", e))?;
    Ok(match streams {
        Streams::Fds {
            stdin,
            stdout,
            stderr,
        } => (
            b.with_stdin(stdin).with_stdout(stdout).with_stderr(stderr),
            None,
        ),
        Streams::Terminal(console) => (
            b.with_console_socket(Some(console.path.clone())),
            Some(console),
        ),
    })
}

/// Creates the container from `bundle`'s config.json: its init process is
/// made and waits for [`Container::start`]. Returns the console master too when
/// the process has a terminal.
pub fn create(
    id: &str,
    root: &Path,
    bundle: &Path,
    streams: Streams,
    no_pivot: bool,
) -> Result<(Container, Option<OwnedFd>), Error> {
    std::fs::create_dir_all(root)
        .map_err(|e| Error::Internal(format!("state directory {}: {e}", root.display())))?;
    let (b, console) = base(id, root, streams)?;
    let container = b
        .validate_id()
        .map_err(|e| lc("id", e))?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .with_no_pivot(no_pivot)
        .build()
        .map_err(|e| lc("create", e))?;
    match console.map(|c| c.receive()).transpose() {
        Ok(master) => Ok((container, master)),
        Err(e) => {
            let mut container = container;
            let _ = delete(&mut container);
            Err(e)
        }
    }
}

/// Brings the loopback interface up in the network namespace of `pid` when it
/// is not the shim's own, as runc does for a container given a new one
/// (libcontainer leaves it down). On a thread of its own: setns(2) of a network
/// namespace moves only the calling thread.
pub fn loopback_up(pid: i32) -> Result<(), Error> {
    let theirs = format!("/proc/{pid}/ns/net");
    let same = |a: &str, b: &str| -> Option<bool> {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (std::fs::metadata(a).ok()?, std::fs::metadata(b).ok()?);
        Some(a.ino() == b.ino() && a.dev() == b.dev())
    };
    if same(&theirs, "/proc/self/ns/net") != Some(false) {
        return Ok(());
    }
    let ns = std::fs::File::open(&theirs)
        .map_err(|e| Error::Internal(format!("network namespace of {pid}: {e}")))?;
    std::thread::spawn(move || -> Result<(), String> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns: {e}"))?;
        // SAFETY: a datagram socket, and ioctls on an ifreq naming "lo" that
        // outlives them.
        unsafe {
            let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if sock < 0 {
                return Err(format!("socket: {}", std::io::Error::last_os_error()));
            }
            let sock = <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock);
            let mut req: libc::ifreq = std::mem::zeroed();
            req.ifr_name[0] = b'l' as libc::c_char;
            req.ifr_name[1] = b'o' as libc::c_char;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
                return Err(format!("lo: {}", std::io::Error::last_os_error()));
            }
            req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
                return Err(format!("lo up: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| Error::Internal("loopback: the thread panicked".into()))?
    .map_err(|e| Error::Internal(format!("loopback of {pid}: {e}")))
}

/// The state of a container to be restored from a checkpoint (at Start): what
/// libcontainer needs to signal, pause, measure and delete it once CRIU has
/// made its processes. Until then it has no pid.
pub fn prepare_restore(id: &str, root: &Path, bundle: &Path) -> Result<Container, Error> {
    let dir = root.join(id);
    if dir.exists() {
        return Err(Error::AlreadyExists(format!(
            "container {id:?} exists in {}",
            root.display()
        )));
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Internal(format!("state directory {}: {e}", dir.display())))?;
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .map_err(|e| Error::InvalidArgument(format!("bundle: config.json: {e}")))?;
    let made = (|| {
        YoukiConfig::from_spec(&spec, id)
            .map_err(|e| Error::InvalidArgument(format!("spec: {e}")))?
            .save(&dir)
            .map_err(|e| Error::Internal(format!("state: {e}")))?;
        let mut c = Container::new(id, ContainerStatus::Created, None, bundle, &dir)
            .map_err(|e| lc("restore", e))?;
        c.set_systemd(false)
            .set_annotations(spec.annotations().clone());
        c.save().map_err(|e| lc("restore", e))?;
        Ok(c)
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    made
}

/// For the process `pid` CRIU is restoring, once CRIU has made its namespaces:
/// its (empty) network namespace's loopback interface up, then the container's
/// prestart and createRuntime hooks (as runc runs them at that point).
pub fn restore_namespaces(container: &Container, pid: i32) -> Result<(), Error> {
    loopback_up(pid)?;
    let Some(hooks) = container.spec().map_err(|e| lc("hooks", e))?.hooks else {
        return Ok(());
    };
    let mut state = container.state.clone();
    state.pid = Some(pid);
    state.status = ContainerStatus::Creating;
    for set in [hooks.prestart(), hooks.create_runtime()] {
        libcontainer::hooks::run_hooks(set.as_ref(), Some(&state), None, None, None)
            .map_err(|e| Error::FailedPrecondition(format!("restore: hook: {e}")))?;
    }
    Ok(())
}

/// Records the restored init `pid`: the container is running.
pub fn restored(container: &mut Container, pid: i32) -> Result<(), Error> {
    container
        .set_pid(pid)
        .set_status(ContainerStatus::Running)
        .save()
        .map_err(|e| lc("restore", e))
}

/// Starts a process in the running container as `process` (a runtime-spec
/// Process in JSON, in a file). Returns its pid once it has executed.
pub fn exec(
    id: &str,
    root: &Path,
    process: &Path,
    streams: Streams,
) -> Result<(i32, Option<OwnedFd>), Error> {
    let (b, console) = base(id, root, streams)?;
    let pid = b
        .as_tenant()
        .with_detach(true)
        .with_process(Some(process))
        .build()
        .map_err(|e| lc("exec", e))?;
    match console.map(|c| c.receive()).transpose() {
        Ok(master) => Ok((pid.as_raw(), master)),
        Err(e) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            Err(e)
        }
    }
}

/// Pauses (freezes) the container.
pub fn pause(container: &mut Container) -> Result<(), Error> {
    container.pause().map_err(|e| lc("pause", e))
}

/// Resumes (thaws) the container.
pub fn resume(container: &mut Container) -> Result<(), Error> {
    container.resume().map_err(|e| lc("resume", e))
}

/// Starts the init process.
pub fn start(container: &mut Container) -> Result<(), Error> {
    container.start().map_err(|e| lc("start", e))
}

/// Removes the container: what is left of it is killed, its cgroup and state go.
pub fn delete(container: &mut Container) -> Result<(), Error> {
    // The rootfs bind a restore makes for CRIU, if a shim died during one: it
    // must not be walked when libcontainer removes its directory.
    let _ = nix::mount::umount2(
        &container.root.join(crate::checkpoint::CRIU_ROOT),
        nix::mount::MntFlags::MNT_DETACH,
    );
    let cgroup = cgroup(container).ok();
    container.delete(true).map_err(|e| lc("delete", e))?;
    if let Some(c) = cgroup {
        crate::cgroups::remove_everywhere(&c);
    }
    Ok(())
}

/// The container's cgroup, as libcontainer made it.
pub fn cgroup(container: &Container) -> Result<PathBuf, Error> {
    Ok(container.spec().map_err(|e| lc("cgroup", e))?.cgroup_path)
}

/// For `delete` after the shim is gone: kills and removes the container left
/// in `root`, returning its init pid (0 when there is none).
pub fn remove_leftover(root: &Path, id: &str) -> Result<u32, Error> {
    let dir = root.join(id);
    if !dir.exists() {
        return Ok(0);
    }
    let mut c = Container::load(dir).map_err(|e| lc("load", e))?;
    let pid = c.pid().map(|p| p.as_raw().unsigned_abs()).unwrap_or(0);
    delete(&mut c)?;
    Ok(pid)
}

/// Mounts containerd's rootfs mounts on `<bundle>/rootfs`, in order.
pub fn mount_rootfs(bundle: &Path, mounts: &[Mount]) -> Result<(), Error> {
    if mounts.is_empty() {
        return Ok(());
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target)
        .map_err(|e| Error::Internal(format!("{}: {e}", target.display())))?;
    for (i, m) in mounts.iter().enumerate() {
        let (flags, data) = mount_flags(&m.options);
        let fstype = if m.type_ == "bind" || m.type_.is_empty() {
            None
        } else {
            Some(m.type_.as_str())
        };
        let data = (!data.is_empty()).then_some(data.as_str());
        let mounted = nix::mount::mount(Some(m.source.as_str()), &target, fstype, flags, data)
            .and_then(|()| {
                // A read-only bind needs a remount to be read-only.
                if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
                    nix::mount::mount(
                        None::<&str>,
                        &target,
                        None::<&str>,
                        flags | MsFlags::MS_REMOUNT,
                        None::<&str>,
                    )
                } else {
                    Ok(())
                }
            });
        if let Err(e) = mounted {
            unmount_rootfs(bundle);
            return Err(Error::InvalidArgument(format!(
                "rootfs[{i}] ({} {}): {e}",
                m.type_, m.source
            )));
        }
    }
    Ok(())
}

/// Unmounts whatever is mounted on `<bundle>/rootfs`.
pub fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    for _ in 0..16 {
        if nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// Mount options as flags and the rest as data, as mount(8) reads them.
fn mount_flags(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, f) = match o.as_str() {
            "ro" => (true, MsFlags::MS_RDONLY),
            "rw" => (false, MsFlags::MS_RDONLY),
            "bind" => (true, MsFlags::MS_BIND),
            "rbind" => (true, MsFlags::MS_BIND | MsFlags::MS_REC),
            "nosuid" => (true, MsFlags::MS_NOSUID),
            "suid" => (false, MsFlags::MS_NOSUID),
            "nodev" => (true, MsFlags::MS_NODEV),
            "dev" => (false, MsFlags::MS_NODEV),
            "noexec" => (true, MsFlags::MS_NOEXEC),
            "exec" => (false, MsFlags::MS_NOEXEC),
            "sync" => (true, MsFlags::MS_SYNCHRONOUS),
            "async" => (false, MsFlags::MS_SYNCHRONOUS),
            "noatime" => (true, MsFlags::MS_NOATIME),
            "relatime" => (true, MsFlags::MS_RELATIME),
            "strictatime" => (true, MsFlags::MS_STRICTATIME),
            "nodiratime" => (true, MsFlags::MS_NODIRATIME),
            "defaults" => continue,
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        if set {
            flags |= f;
        } else {
            flags &= !f;
        }
    }
    (flags, data.join(","))
}

/// Runs the process's program as libcontainer's default executor does, with
/// the signal dispositions this process ignores (SIGPIPE: Rust ignores it) put
/// back to the default first: ignored signals stay ignored across exec.
#[derive(Debug, Clone)]
struct Workload;

impl Executor for Workload {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        // SAFETY: resetting a disposition in the single-threaded child about to exec.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
        let _ = nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&nix::sys::signal::SigSet::empty()),
            None,
        );
        get_executor().exec(spec)
    }

    /// The program must exist and be executable. Unlike libcontainer's default,
    /// a spec without PATH is fine (as with runc): a bare name is then looked
    /// for on the usual PATH.
    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        let process = spec.process().as_ref();
        let Some(program) = process
            .and_then(|p| p.args().as_ref())
            .and_then(|a| a.first())
        else {
            return Err(ExecutorValidationError::ArgValidationError(
                "process.args is empty".into(),
            ));
        };
        let path = process
            .and_then(|p| p.env().as_ref())
            .and_then(|env| env.iter().find_map(|e| e.strip_prefix("PATH=")))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        let found = if program.contains('/') {
            Some(PathBuf::from(program))
        } else {
            path.split(':')
                .map(|d| Path::new(d).join(program))
                .find(|p| p.is_file())
        };
        let executable = found.as_ref().is_some_and(|p| {
            nix::unistd::access(p.as_path(), nix::unistd::AccessFlags::X_OK).is_ok() && p.is_file()
        });
        if !executable {
            return Err(ExecutorValidationError::ArgValidationError(format!(
                "{program:?}: no such executable in the container"
            )));
        }
        Ok(())
    }
}

/// A socket libcontainer sends a new terminal's master to.
#[derive(Debug)]
pub struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Listens on a new socket of this shim's own (a short path: sun_path holds
    /// 108 bytes), in the shims' socket directory.
    pub fn new() -> Result<Self, Error> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Path::new(crate::launch::SOCKET_DIR);
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))?;
        let path = dir.join(format!("keel-console-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::Internal(format!("console socket {}: {e}", path.display())))?;
        Ok(Self { path, listener })
    }

    /// Takes the master the container sent (it is already queued on the socket).
    fn receive(self) -> Result<OwnedFd, Error> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        self.listener
            .set_nonblocking(true)
            .map_err(|e| Error::Internal(format!("console socket: {e}")))?;
        let (conn, _) = self
            .listener
            .accept()
            .map_err(|e| Error::Internal(format!("console socket: nothing was sent: {e}")))?;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| Error::Internal(format!("console socket: {e}")))?;
        for c in msg
            .cmsgs()
            .map_err(|e| Error::Internal(format!("console socket: {e}")))?
        {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(&fd) = fds.first() {
                    // SAFETY: the kernel just gave this process the descriptor.
                    return Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                }
            }
        }
        Err(Error::Internal(
            "console socket: no terminal was sent".into(),
        ))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (f, d) = mount_flags(&o(&["rbind", "ro"]));
        assert_eq!(f, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY);
        assert!(d.is_empty());
        let (f, d) = mount_flags(&o(&["index=off", "lowerdir=/a:/b", "nosuid", "rw"]));
        assert_eq!(f, MsFlags::MS_NOSUID);
        assert_eq!(d, "index=off,lowerdir=/a:/b");
    }
}
