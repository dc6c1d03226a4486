//! The `start` and `delete` subcommands, run by containerd or keeld with the
//! bundle as working directory.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use containerd_shim_protos::api::DeleteResponse;
use protobuf::Message;
use sha2::{Digest, Sha256};

use crate::args::Args;
use crate::guard::Guard;
use crate::{cgroups, container, options};

/// Where shims' sockets live (containerd 1.6's fixed directory).
pub const SOCKET_DIR: &str = "/run/containerd/s";

/// File in the bundle naming libcontainer's state directory, for `delete`.
pub const ROOT_FILE: &str = "keel-root";

/// Largest options accepted on `start`'s stdin.
const MAX_OPTIONS: u64 = 64 * 1024;

type Result<T> = std::result::Result<T, String>;

/// The shim's socket: containerd's name for it, a hash of address, namespace and id.
pub fn socket_path(args: &Args) -> PathBuf {
    let hash = Sha256::digest(format!("{}/{}/{}", args.address, args.namespace, args.id));
    Path::new(SOCKET_DIR).join(hex::encode(hash))
}

/// `start`: listen, write `address`, start the shim on the socket, print its address.
pub fn start(args: &Args) -> Result<()> {
    let bundle = std::env::current_dir().map_err(|e| format!("working directory: {e}"))?;
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(MAX_OPTIONS + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| format!("read options: {e}"))?;
    if stdin.len() as u64 > MAX_OPTIONS {
        return Err(format!("options on stdin: larger than {MAX_OPTIONS} bytes"));
    }
    let opts = if stdin.is_empty() {
        Default::default()
    } else {
        let any = protobuf::well_known_types::any::Any::parse_from_bytes(&stdin)
            .map_err(|e| format!("options on stdin: {e}"))?;
        options::decode("options", &any.type_url, &any.value).map_err(|e| e.to_string())?
    };
    let path = socket_path(args);
    let address = format!("unix://{}", path.display());
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            // A shim for this task already serves there.
            write_address(&bundle, &address)?;
            print!("{address}");
            return std::io::stdout().flush().map_err(|e| e.to_string());
        }
        let _ = std::fs::remove_file(&path);
    }
    std::fs::create_dir_all(SOCKET_DIR).map_err(|e| format!("{SOCKET_DIR}: {e}"))?;
    let listener = UnixListener::bind(&path).map_err(|e| format!("listen on {address}: {e}"))?;
    let mut child = match launch(args, &bundle, &listener, &opts.shim_cgroup) {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    if let Err(e) = write_address(&bundle, &address) {
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    print!("{address}");
    std::io::stdout().flush().map_err(|e| e.to_string())
}

fn launch(
    args: &Args,
    bundle: &Path,
    listener: &UnixListener,
    shim_cgroup: &str,
) -> Result<std::process::Child> {
    let exe = std::fs::read_link("/proc/self/exe").map_err(|e| format!("own binary: {e}"))?;
    let guard = Guard::new(&exe).map_err(|e| format!("own binary: {e}"))?;
    let mut cmd = Command::new(&exe);
    cmd.args([
        "-namespace",
        &args.namespace,
        "-id",
        &args.id,
        "-address",
        &args.address,
    ]);
    if args.debug {
        cmd.arg("-debug");
    }
    let fd = listener.as_raw_fd();
    cmd.current_dir(bundle)
        .env(crate::guard::HOME_ENV, crate::guard::HOME_FD.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    // SAFETY: only dup2, fcntl and the guard's syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let flags = libc::fcntl(3, libc::F_GETFD);
            if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            guard.apply()
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("start shim: {e}"))?;
    let pid = child.id();
    if !shim_cgroup.is_empty() {
        if let Err(e) = cgroups::add_process(shim_cgroup, pid) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("options.shim_cgroup {shim_cgroup:?}: {e}"));
        }
    }
    // As containerd's shims: one more likely to be chosen by the OOM killer than
    // whoever started it.
    if let Ok(own) = std::fs::read_to_string("/proc/self/oom_score_adj") {
        if let Ok(v) = own.trim().parse::<i32>() {
            let _ = std::fs::write(
                format!("/proc/{pid}/oom_score_adj"),
                (v + 1).min(1000).to_string(),
            );
        }
    }
    Ok(child)
}

/// Writes `<bundle>/address` atomically.
fn write_address(bundle: &Path, address: &str) -> Result<()> {
    let tmp = bundle.join(".address");
    std::fs::write(&tmp, address).map_err(|e| format!("write address: {e}"))?;
    std::fs::rename(&tmp, bundle.join("address")).map_err(|e| format!("write address: {e}"))
}

/// `delete`: the shim is gone; kill what is left of its container, remove it,
/// and print a `DeleteResponse` (exit 137 at now, as containerd's shims do).
pub fn delete(args: &Args) -> Result<()> {
    let cwd = std::env::current_dir().map_err(|e| format!("working directory: {e}"))?;
    let bundle = match &args.bundle {
        Some(b) => PathBuf::from(b),
        None => cwd,
    };
    let mut pid = 0;
    if let Ok(root) = std::fs::read_to_string(bundle.join(ROOT_FILE)) {
        match container::remove_leftover(Path::new(root.trim()), &args.id) {
            Ok(p) => pid = p,
            Err(e) => eprintln!("io.containerd.keel.v1: delete {}: {e}", args.id),
        }
    }
    container::unmount_rootfs(&bundle);
    let _ = std::fs::remove_file(socket_path(args));
    let now = std::time::SystemTime::now();
    let resp = DeleteResponse {
        pid,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: protobuf::MessageField::some(now.into()),
        ..Default::default()
    };
    let bytes = resp.write_to_bytes().map_err(|e| e.to_string())?;
    std::io::stdout()
        .write_all(&bytes)
        .map_err(|e| e.to_string())
}
