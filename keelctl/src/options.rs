//! keelctl's runtime options flags (ctr's names where ctr has them): they become
//! the container's `containerd.runc.v1.Options`.

use clap::Args;
use keel_client::containers::pack_runc;
use keel_client::protocol::containerd::shim::oci::Options;
use keel_client::protocol::protobuf::well_known_types::any::Any;
#[derive(Debug, Default, Args)]
pub struct RuncFlags {
    /// OCI runtime binary the shim runs instead of `runc` (a name on keeld's PATH
    /// or an absolute path).
    #[arg(long, value_name = "BINARY")]
    pub runc_binary: Option<String>,
    /// The OCI runtime's state directory (keel's own by default).
    #[arg(long, value_name = "DIR")]
    pub runc_root: Option<String>,
    /// Use systemd's cgroup driver (refused where systemd is not PID 1).
    #[arg(long)]
    pub runc_systemd_cgroup: bool,
    /// Enter the root filesystem with chroot, not pivot_root.
    #[arg(long)]
    pub no_pivot: bool,
    /// Keep the caller's session keyring instead of a new one.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Cgroup the task's shim is put in.
    #[arg(long, value_name = "PATH")]
    pub shim_cgroup: Option<String>,
    /// Owner (uid) of the pipes carrying the task's stdio.
    #[arg(long, value_name = "UID")]
    pub io_uid: Option<u32>,
    /// Group (gid) of the pipes carrying the task's stdio.
    #[arg(long, value_name = "GID")]
    pub io_gid: Option<u32>,
    /// Directory CRIU works in (and leaves its logs in) when the task is restored.
    #[arg(long, value_name = "DIR")]
    pub criu_work_path: Option<String>,
}

impl RuncFlags {
    /// The options the flags give, packed; `None` when no flag was given.
    pub fn options(&self) -> anyhow::Result<Option<Any>> {
        let o = self.fields();
        if o == Options::default() {
            return Ok(None);
        }
        Ok(Some(pack_runc(&o)?))
    }

    /// A task's own options: the flags' with a CRIU image directory to restore
    /// from.
    pub fn task_options(&self, image_dir: &std::path::Path) -> anyhow::Result<Any> {
        let dir = std::path::absolute(image_dir)?;
        let o = Options {
            criu_image_path: dir.display().to_string(),
            ..self.fields()
        };
        Ok(pack_runc(&o)?)
    }

    fn fields(&self) -> Options {
        Options {
            binary_name: self.runc_binary.clone().unwrap_or_default(),
            root: self.runc_root.clone().unwrap_or_default(),
            systemd_cgroup: self.runc_systemd_cgroup,
            no_pivot_root: self.no_pivot,
            no_new_keyring: self.no_new_keyring,
            shim_cgroup: self.shim_cgroup.clone().unwrap_or_default(),
            io_uid: self.io_uid.unwrap_or_default(),
            io_gid: self.io_gid.unwrap_or_default(),
            criu_work_path: self.criu_work_path.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// `tasks checkpoint`'s flags for CRIU (ctr's names): they become the request's
/// `containerd.runc.v1.CheckpointOptions`.
#[derive(Debug, Default, Args)]
pub struct CheckpointFlags {
    /// Dump established TCP connections (they are restored too).
    #[arg(long)]
    pub tcp_established: bool,
    /// Dump unix sockets connected outside the container.
    #[arg(long)]
    pub external_unix_sockets: bool,
    /// Dump a task that has a terminal.
    #[arg(long)]
    pub terminal: bool,
    /// Dump file locks.
    #[arg(long)]
    pub file_locks: bool,
    /// A namespace left out of the dump, to be given empty at restore (network).
    #[arg(long = "empty-ns", value_name = "NS")]
    pub empty_namespaces: Vec<String>,
    /// How CRIU handles cgroups (soft, full, strict, ignore); keel's shim only.
    #[arg(long, value_name = "MODE")]
    pub cgroups_mode: Option<String>,
    /// Directory CRIU works in and leaves its logs in.
    #[arg(long, value_name = "DIR")]
    pub work_path: Option<std::path::PathBuf>,
    /// Also store the task's filesystem changes (the upper directory of its
    /// overlay rootfs); a restore onto an overlay puts them back.
    #[arg(long)]
    pub rw: bool,
}

impl CheckpointFlags {
    /// The library's checkpoint options with the flags' CRIU options set.
    pub fn apply(&self, mut o: keel_client::CheckpointOptions) -> keel_client::CheckpointOptions {
        o = o
            .tcp_established(self.tcp_established)
            .external_unix_sockets(self.external_unix_sockets)
            .terminal(self.terminal)
            .file_locks(self.file_locks)
            .rw(self.rw);
        for ns in &self.empty_namespaces {
            o = o.empty_namespace(ns);
        }
        if let Some(m) = &self.cgroups_mode {
            o = o.cgroups_mode(m);
        }
        if let Some(p) = &self.work_path {
            o = o.work_path(p);
        }
        o
    }
}
