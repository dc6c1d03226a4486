//! Checkpoint and restore of the task's container with CRIU, as `runc
//! checkpoint` and `runc restore` do them for containerd's runc shim, so that an
//! image taken by either shim is laid out the same way.
//!
//! Dump: the init process's tree, from the container's root, with every bind
//! mount and every masked file named external (CRIU cannot dump what comes from
//! outside the container), the cgroup the task may have been paused in given as
//! the one to freeze, and the options of containerd's `CheckpointOptions`. As
//! with runc, the network namespace is not dumped: it is made anew, empty, at
//! restore (the shim then brings its loopback interface up).
//! The init's stdio is handed to it by the shim, not made inside the container:
//! files and FIFOs are named external too (`file[mnt:inode]`) and recorded, with
//! pipes, in `descriptors.json`, as runc records them.
//!
//! Restore, in this order: the image's `descriptors.json` and cgroup mode are
//! read; the root filesystem is bind-mounted where CRIU can use it as the mount
//! namespace's root; CRIU is started and put in the container's cgroup (made,
//! with the spec's resources applied), which it is told is the cgroup root it
//! restores into; it is asked to restore with bind mounts mapped to their new
//! sources and every stdio entry of `descriptors.json` that is a pipe or an
//! external file given the new process's own stream; once it has made the
//! namespaces, the loopback comes up and the OCI hooks of that moment run; a
//! terminal's new master comes back from it; the rootfs bind goes. The restored
//! process is the shim's child (CRIU's `rst_sibling`).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use containerd_shim_protos::shim::oci::CheckpointOptions;
use nix::mount::MsFlags;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Spec};

use crate::cgroups;
use crate::criu::{self, Criu_cg_mode, Criu_opts, Criu_req_type, Swrk};
use crate::options::{plain_absolute, MAX_PATH};
use crate::service::Error;

/// Where the rootfs is bind-mounted for CRIU during a restore, in
/// libcontainer's directory for the container.
pub const CRIU_ROOT: &str = "criu-root";
/// Where this shim records the dump's `cgroups_mode` in an image, for its
/// restore (CRIU keeps the mode nowhere; runc ignores the file).
const CGROUPS_MODE: &str = "keel-cgroups-mode";
/// Where runc and this shim record the init's stdio in an image.
pub const DESCRIPTORS: &str = "descriptors.json";
/// The spec annotation naming a CRIU configuration file, as runc reads it.
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// The name CRIU knows an external network namespace by.
const NET_NS_KEY: &str = "extRootNetNS";
/// Namespaces made empty at restore, not dumped: the network one, as runc.
const EMPTY_NS: u32 = libc::CLONE_NEWNET as u32;
/// Largest `descriptors.json` read.
const MAX_DESCRIPTORS: u64 = 64 << 10;

/// A checkpoint of the running init `pid` of the container in `bundle`.
pub struct Dump<'a> {
    pub pid: i32,
    pub bundle: &'a Path,
    /// The container's cgroup (relative to the hierarchies' roots).
    pub cgroup: &'a Path,
    pub image: &'a Path,
    pub work: &'a Path,
    pub options: &'a CheckpointOptions,
}

/// A restore into the (not yet running) container `id` of `bundle`.
pub struct Restore<'a> {
    pub bundle: &'a Path,
    pub cgroup: &'a Path,
    /// libcontainer's directory for the container (the rootfs is bind-mounted
    /// under it for CRIU).
    pub state_dir: &'a Path,
    pub image: &'a Path,
    pub work: &'a Path,
    /// The new process's stdio, or `None` for a terminal.
    pub stdio: Option<[&'a OwnedFd; 3]>,
}

/// What a restore made.
pub struct Restored {
    pub pid: i32,
    /// The new terminal's master, when the process has one.
    pub master: Option<OwnedFd>,
}

fn spec(bundle: &Path) -> Result<Spec, Error> {
    Spec::load(bundle.join("config.json"))
        .map_err(|e| Error::InvalidArgument(format!("bundle: config.json: {e}")))
}

fn rootfs(spec: &Spec, bundle: &Path) -> Result<PathBuf, Error> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("spec: no root".into()))?;
    Ok(bundle.join(root.path()))
}

fn mkdir(dir: &Path, what: &str) -> Result<File, Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Internal(format!("{what} {}: {e}", dir.display())))?;
    File::open(dir).map_err(|e| Error::Internal(format!("{what} {}: {e}", dir.display())))
}

/// The mounts CRIU must take as external: binds (named by their destination)
/// and masked files (bind mounts of /dev/null, named `/dev/null`).
fn bind_destinations(spec: &Spec) -> Vec<(String, String)> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| {
            m.typ().as_deref() == Some("bind")
                || m.options()
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind")
        })
        .map(|m| {
            let source = m.source().as_ref().map(|s| s.display().to_string());
            (
                m.destination().display().to_string(),
                source.unwrap_or_default(),
            )
        })
        .collect()
}

fn masked_paths(spec: &Spec) -> Vec<String> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.masked_paths().clone())
        .unwrap_or_default()
}

fn config_file(spec: &Spec) -> Option<String> {
    spec.annotations()
        .as_ref()?
        .get(CRIU_CONFIG_ANNOTATION)
        .cloned()
}

fn net_ns_path(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// containerd's `cgroups_mode` names.
fn cgroups_mode(mode: &str) -> Result<Criu_cg_mode, Error> {
    Ok(match mode {
        "" | "soft" => Criu_cg_mode::SOFT,
        "full" => Criu_cg_mode::FULL,
        "strict" => Criu_cg_mode::STRICT,
        "ignore" => Criu_cg_mode::IGNORE,
        other => {
            return Err(Error::InvalidArgument(format!(
                "options.cgroups_mode: {other:?} is not one of soft, full, strict, ignore"
            )))
        }
    })
}

/// Checks what CRIU will be asked before anything is done.
pub fn check(o: &CheckpointOptions) -> Result<(), Error> {
    cgroups_mode(&o.cgroups_mode)?;
    if let Some(ns) = o.empty_namespaces.iter().find(|n| n.as_str() != "network") {
        return Err(Error::InvalidArgument(format!(
            "options.empty_namespaces: {ns:?}: CRIU can leave only \"network\" out of a dump"
        )));
    }
    for (name, p) in [("image_path", &o.image_path), ("work_path", &o.work_path)] {
        if !p.is_empty() && !plain_absolute(p) {
            return Err(Error::InvalidArgument(format!(
                "options.{name} {p:?}: not an absolute path of at most {MAX_PATH} bytes without \"..\""
            )));
        }
    }
    Ok(())
}

/// How the init's descriptor `fd` is recorded: its link as /proc shows it
/// (`pipe:[…]`, `/dev/pts/0`), or, for a file or FIFO from outside the
/// container, the external key CRIU is told of.
fn descriptor(pid: i32, fd: i32, terminal: bool) -> Result<(String, bool), Error> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|l| l.display().to_string())
        .map_err(|e| Error::FailedPrecondition(format!("stdio {fd} of {pid}: {e} (closed?)")))?;
    if !link.starts_with('/') || (terminal && link.starts_with("/dev/pts/")) {
        return Ok((link, false));
    }
    let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|e| Error::Internal(format!("stdio {fd} of {pid}: {e}")))?;
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .map_err(|e| Error::Internal(format!("stdio {fd} of {pid}: {e}")))?;
    let mnt: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Internal(format!("stdio {fd} of {pid}: no mnt_id")))?;
    Ok((format!("file[{mnt:x}:{:x}]", meta.ino()), true))
}

/// The last error lines of a CRIU log (read from its last 64 KiB), for an error.
fn log_tail(work: &Path, name: &str) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut f) = File::open(work.join(name)) {
        let _ = f
            .seek(SeekFrom::End(-(64 << 10)))
            .or_else(|_| f.rewind().map(|()| 0));
        let mut bytes = Vec::new();
        let _ = f.take(64 << 10).read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("rror ("))
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join("; ");
    format!("{tail} (log: {})", work.join(name).display())
}

pub fn dump(d: &Dump) -> Result<(), Error> {
    check(d.options)?;
    let spec = spec(d.bundle)?;
    let image = mkdir(d.image, "image directory")?;
    let work = mkdir(d.work, "work directory")?;

    let mut opts = Criu_opts::new();
    let mut descriptors = Vec::new();
    for fd in 0..3 {
        let (entry, external) = descriptor(d.pid, fd, d.options.terminal)?;
        if external && !opts.external.contains(&entry) {
            opts.external.push(entry.clone());
        }
        descriptors.push(entry);
    }
    let json = serde_json::to_vec(&descriptors)
        .map_err(|e| Error::Internal(format!("{DESCRIPTORS}: {e}")))?;
    std::fs::write(d.image.join(DESCRIPTORS), json)
        .map_err(|e| Error::Internal(format!("{DESCRIPTORS}: {e}")))?;
    if !d.options.cgroups_mode.is_empty() {
        std::fs::write(d.image.join(CGROUPS_MODE), &d.options.cgroups_mode)
            .map_err(|e| Error::Internal(format!("{CGROUPS_MODE}: {e}")))?;
    }

    for (dest, _) in bind_destinations(&spec) {
        opts.ext_mnt.push(ext_mount(&dest, &dest));
    }
    for path in masked_paths(&spec) {
        let inside = format!("/proc/{}/root{path}", d.pid);
        if std::fs::metadata(&inside).is_ok_and(|m| !m.is_dir()) {
            opts.ext_mnt.push(ext_mount(&path, "/dev/null"));
        }
    }
    if let Some(path) = net_ns_path(&spec) {
        let ino = std::fs::metadata(&path)
            .map_err(|e| Error::Internal(format!("network namespace {}: {e}", path.display())))?
            .ino();
        opts.external.push(format!("net[{ino}]:{NET_NS_KEY}"));
    }
    if let Some(conf) = config_file(&spec) {
        opts.set_config_file(conf);
    }
    let o = d.options;
    opts.set_pid(d.pid);
    opts.set_images_dir_fd(image.as_raw_fd());
    opts.set_work_dir_fd(work.as_raw_fd());
    opts.set_log_file("dump.log".into());
    opts.set_log_level(4);
    opts.set_root(rootfs(&spec, d.bundle)?.display().to_string());
    opts.set_manage_cgroups(true);
    opts.set_manage_cgroups_mode(cgroups_mode(&o.cgroups_mode)?);
    opts.set_freeze_cgroup(cgroups::freezer(d.cgroup).display().to_string());
    opts.set_leave_running(!o.exit);
    opts.set_tcp_established(o.open_tcp);
    opts.set_ext_unix_sk(o.external_unix_sockets);
    opts.set_shell_job(o.terminal);
    opts.set_file_locks(o.file_locks);
    opts.set_orphan_pts_master(true);
    // As runc: the network namespace is never dumped, only recreated empty (the
    // runtime does not manage network devices); `empty_namespaces` may name
    // nothing else.
    opts.set_empty_ns(EMPTY_NS);
    let swrk = Swrk::spawn(&[image.as_raw_fd(), work.as_raw_fd()])?;
    swrk.call(Criu_req_type::DUMP, opts, |_, _| Ok(()))
        .map_err(|e| Error::Internal(format!("{e}: {}", log_tail(d.work, "dump.log"))))?;
    Ok(())
}

fn ext_mount(key: &str, val: &str) -> criu::Ext_mount_map {
    let mut m = criu::Ext_mount_map::new();
    m.set_key(key.into());
    m.set_val(val.into());
    m
}

/// The entries of an image's `descriptors.json` (three, for fds 0, 1 and 2).
fn read_descriptors(image: &Path) -> Result<Vec<String>, Error> {
    let path = image.join(DESCRIPTORS);
    let bad =
        |why: String| Error::FailedPrecondition(format!("checkpoint {}: {why}", image.display()));
    let meta = std::fs::metadata(&path).map_err(|e| bad(format!("{DESCRIPTORS}: {e}")))?;
    if meta.len() > MAX_DESCRIPTORS {
        return Err(bad(format!(
            "{DESCRIPTORS} is larger than {MAX_DESCRIPTORS} bytes"
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| bad(format!("{DESCRIPTORS}: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("{DESCRIPTORS}: {e}")))
}

/// The cgroup mode the image was dumped with (CRIU's default, soft, when it
/// names none), for its restore.
fn restore_cgroups_mode(image: &Path) -> Result<Criu_cg_mode, Error> {
    let path = image.join(CGROUPS_MODE);
    match std::fs::metadata(&path) {
        Err(_) => return Ok(Criu_cg_mode::SOFT),
        Ok(m) if m.len() > 16 => {
            return Err(Error::FailedPrecondition(format!(
                "checkpoint {}: {CGROUPS_MODE} is not a cgroups mode",
                image.display()
            )))
        }
        Ok(_) => {}
    }
    let mode = std::fs::read_to_string(&path)
        .map_err(|e| Error::FailedPrecondition(format!("{}: {e}", path.display())))?;
    cgroups_mode(mode.trim()).map_err(|_| {
        Error::FailedPrecondition(format!(
            "checkpoint {}: {CGROUPS_MODE} names {mode:?}, not a cgroups mode",
            image.display()
        ))
    })
}

/// Unmounts and removes the rootfs bind for CRIU when dropped.
struct CriuRoot(PathBuf);

impl CriuRoot {
    fn mount(rootfs: &Path, at: PathBuf) -> Result<Self, Error> {
        std::fs::create_dir_all(&at)
            .map_err(|e| Error::Internal(format!("{}: {e}", at.display())))?;
        nix::mount::mount(
            Some(rootfs),
            &at,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| Error::Internal(format!("bind {} for CRIU: {e}", rootfs.display())))?;
        Ok(Self(at))
    }
}

impl Drop for CriuRoot {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Restores the process; `into_cgroup` places CRIU (its pid) in the container's
/// cgroup with the spec's resources applied, before CRIU restores anything;
/// `namespaces_made` is called with the restored pid once CRIU has made its
/// namespaces, before it restores their processes' files and sockets: the
/// network namespace, made empty, gets its loopback interface up then, and the
/// OCI hooks that run at that point run.
pub fn restore(
    r: &Restore,
    into_cgroup: impl FnOnce(u32, Option<&LinuxResources>) -> Result<(), Error>,
    mut namespaces_made: impl FnMut(i32) -> Result<(), Error>,
) -> Result<Restored, Error> {
    let spec = spec(r.bundle)?;
    if !r.image.join("inventory.img").is_file() {
        return Err(Error::FailedPrecondition(format!(
            "checkpoint {}: holds no CRIU image (no inventory.img)",
            r.image.display()
        )));
    }
    let descriptors = read_descriptors(r.image)?;
    let mode = restore_cgroups_mode(r.image)?;
    let image = File::open(r.image)
        .map_err(|e| Error::Internal(format!("image {}: {e}", r.image.display())))?;
    let work = mkdir(r.work, "work directory")?;
    let root = CriuRoot::mount(&rootfs(&spec, r.bundle)?, r.state_dir.join(CRIU_ROOT))?;

    let mut opts = Criu_opts::new();
    let mut inherit: Vec<RawFd> = vec![image.as_raw_fd(), work.as_raw_fd()];
    let mut given = BTreeSet::new();
    if let Some(stdio) = r.stdio {
        for (entry, fd) in descriptors.iter().zip(stdio) {
            if (entry.starts_with("pipe:") || entry.starts_with("file["))
                && given.insert(entry.clone())
            {
                opts.inherit_fd.push(inherit_fd(entry, fd.as_raw_fd()));
                inherit.push(fd.as_raw_fd());
            }
        }
    }
    for (dest, source) in bind_destinations(&spec) {
        opts.ext_mnt.push(ext_mount(&dest, &source));
    }
    if !masked_paths(&spec).is_empty() {
        opts.ext_mnt.push(ext_mount("/dev/null", "/dev/null"));
    }
    let net_ns = net_ns_path(&spec)
        .map(|p| {
            File::open(&p)
                .map_err(|e| Error::Internal(format!("network namespace {}: {e}", p.display())))
        })
        .transpose()?;
    if let Some(ns) = &net_ns {
        opts.inherit_fd.push(inherit_fd(NET_NS_KEY, ns.as_raw_fd()));
        inherit.push(ns.as_raw_fd());
    }
    if let Some(conf) = config_file(&spec) {
        opts.set_config_file(conf);
    }
    let mut cg = criu::Cgroup_root::new();
    cg.set_path(r.cgroup.display().to_string());
    opts.cg_root.push(cg);
    opts.set_images_dir_fd(image.as_raw_fd());
    opts.set_work_dir_fd(work.as_raw_fd());
    opts.set_log_file("restore.log".into());
    opts.set_log_level(4);
    opts.set_root(root.0.display().to_string());
    opts.set_manage_cgroups(true);
    opts.set_manage_cgroups_mode(mode);
    opts.set_rst_sibling(true);
    opts.set_notify_scripts(true);
    opts.set_orphan_pts_master(r.stdio.is_none());
    opts.set_empty_ns(EMPTY_NS);

    let swrk = Swrk::spawn(&inherit)?;
    into_cgroup(
        swrk.pid(),
        spec.linux().as_ref().and_then(|l| l.resources().as_ref()),
    )?;
    let mut master = None;
    let resp = swrk
        .call(Criu_req_type::RESTORE, opts, |n, fd| match n.script() {
            "orphan-pts-master" => {
                master = fd;
                Ok(())
            }
            "setup-namespaces" => namespaces_made(n.pid()),
            _ => Ok(()),
        })
        .map_err(|e| Error::Internal(format!("{e}: {}", log_tail(r.work, "restore.log"))))?;
    drop(root);
    let pid = resp.restore.pid();
    if pid <= 0 {
        return Err(Error::Internal("criu restore gave no pid".into()));
    }
    if r.stdio.is_none() && master.is_none() {
        // SAFETY: kill(2) with plain integers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return Err(Error::Internal(
            "criu restore gave no terminal master for a process with a terminal".into(),
        ));
    }
    Ok(Restored { pid, master })
}

fn inherit_fd(key: &str, fd: RawFd) -> criu::Inherit_fd {
    let mut i = criu::Inherit_fd::new();
    i.set_key(key.into());
    i.set_fd(fd);
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_criu_cannot_take_are_refused_naming_them() {
        let ok = CheckpointOptions {
            cgroups_mode: "full".into(),
            empty_namespaces: vec!["network".into()],
            work_path: "/w".into(),
            ..Default::default()
        };
        check(&ok).unwrap();
        for (o, field) in [
            (
                CheckpointOptions {
                    cgroups_mode: "loose".into(),
                    ..Default::default()
                },
                "options.cgroups_mode",
            ),
            (
                CheckpointOptions {
                    empty_namespaces: vec!["pid".into()],
                    ..Default::default()
                },
                "options.empty_namespaces",
            ),
            (
                CheckpointOptions {
                    image_path: "rel".into(),
                    ..Default::default()
                },
                "options.image_path",
            ),
        ] {
            let e = check(&o).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn a_file_from_outside_is_named_by_mount_and_inode() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("log")).unwrap();
        let me = std::process::id() as i32;
        let fd = f.as_raw_fd();
        let (entry, external) = descriptor(me, fd, false).unwrap();
        let ino = f.metadata().unwrap().ino();
        assert!(external);
        assert!(
            entry.starts_with("file[") && entry.ends_with(&format!(":{ino:x}]")),
            "{entry}"
        );
        let (r, w) = nix::unistd::pipe().unwrap();
        let (entry, external) = descriptor(me, w.as_raw_fd(), false).unwrap();
        assert!(!external && entry.starts_with("pipe:["), "{entry}");
        drop(r);
    }
}
