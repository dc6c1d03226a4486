//! `keelctl run`, `keelctl containers …` and `keelctl tasks …`, shaped like ctr.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use keel_protocol::api::containers::{container::Runtime, *};
use keel_protocol::api::tasks::*;
use keel_protocol::api::types::Mount;
use keel_protocol::types::{
    json_any, unpack, LINUX_RESOURCES_TYPE_URL, PROCESS_TYPE_URL, SPEC_TYPE_URL,
};
use keel_protocol::{Client, Error};
use protobuf::{Enum, MessageField};
use tokio::io::AsyncWriteExt;

use super::output::{table, Format};

/// What a container is made of, shared by `run` and `containers create`.
#[derive(Debug, Args)]
pub struct ContainerArgs {
    /// Host directory to use as the root filesystem (required, except for a restore,
    /// which uses the checkpointed container's unless this is given).
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Environment variable K=V (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Label K=V (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// Working directory inside the container.
    #[arg(long, default_value = "/")]
    pub cwd: String,
    #[command(flatten)]
    pub limits: Limits,
    /// Runtime name.
    #[arg(long, default_value = "io.containerd.runc.v2")]
    pub runtime: String,
    #[command(flatten)]
    pub runc: super::options::RuncFlags,
    #[command(flatten)]
    pub fs: super::mounts::MountFlags,
    pub id: String,
    /// Command and arguments (none for a restore).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Resource limits, for `run`, `containers create` and `tasks update`.
#[derive(Debug, Args)]
pub struct Limits {
    /// Memory limit in bytes.
    #[arg(long)]
    pub memory_limit: Option<i64>,
    /// CPU limit in cores (e.g. 0.5).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long)]
    pub pids_limit: Option<i64>,
}

impl Limits {
    /// The limits as OCI `LinuxResources` JSON (only those given).
    fn resources(&self) -> anyhow::Result<serde_json::Value> {
        let mut resources = serde_json::json!({});
        if let Some(m) = self.memory_limit {
            if m <= 0 {
                bail!("--memory-limit must be a positive number of bytes, got {m}");
            }
            resources["memory"] = serde_json::json!({ "limit": m, "swap": m });
        }
        if let Some(c) = self.cpus {
            if !(c > 0.0 && c <= 1024.0) {
                bail!("--cpus must be between 0 and 1024, got {c}");
            }
            let period: u64 = 100_000;
            // Bounded above, so the rounded quota fits easily.
            #[allow(clippy::cast_possible_truncation)]
            let quota = (c * period as f64).round() as i64;
            resources["cpu"] = serde_json::json!({ "quota": quota, "period": period });
        }
        if let Some(n) = self.pids_limit {
            if n <= 0 {
                bail!("--pids-limit must be positive, got {n}");
            }
            resources["pids"] = serde_json::json!({ "limit": n });
        }
        Ok(resources)
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Remove the task and container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Detach: output goes to the task's log file (`keelctl tasks logs`).
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Forward stdin to the container.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the container a terminal (keelctl's own is put in raw mode and its size
    /// followed).
    #[arg(short = 't', long, conflicts_with = "detach")]
    pub tty: bool,
    /// Restore the task from this checkpoint (the index digest `tasks checkpoint`
    /// printed): the container's spec comes from it and its process continues.
    #[arg(long, value_name = "DIGEST")]
    pub checkpoint: Option<String>,
    /// Restore the task from a raw CRIU image directory (one `tasks checkpoint
    /// --image-path` left) into the container the other arguments describe, as
    /// the one checkpointed was.
    #[arg(long, value_name = "DIR", conflicts_with = "checkpoint")]
    pub image_path: Option<PathBuf>,
    #[command(flatten)]
    pub container: ContainerArgs,
}

#[derive(Debug, Subcommand)]
pub enum ContainersCmd {
    /// Create a container (no task).
    Create(Box<ContainerArgs>),
    /// List containers.
    #[command(alias = "list")]
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        filters: Vec<String>,
    },
    /// Print a container as JSON.
    Info { id: String },
    /// Delete containers.
    #[command(alias = "del")]
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TasksCmd {
    /// Create and start a detached task for an existing container.
    Start { id: String },
    /// List tasks.
    #[command(alias = "list")]
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Signal a task.
    Kill {
        /// Signal name or number.
        #[arg(short = 's', long, default_value = "SIGTERM")]
        signal: String,
        /// Signal every process in the container.
        #[arg(short = 'a', long)]
        all: bool,
        /// Signal this exec process instead of the task's init process.
        #[arg(long, default_value = "")]
        exec_id: String,
        id: String,
    },
    /// Wait for a task (or an exec process) to exit; exits with its status.
    Wait {
        /// Wait for this exec process instead of the task's init process.
        #[arg(long, default_value = "")]
        exec_id: String,
        id: String,
    },
    /// Print a task's init process (or an exec process) as JSON.
    Info {
        /// Show this exec process instead of the init process.
        #[arg(long, default_value = "")]
        exec_id: String,
        id: String,
    },
    /// Delete tasks (or one exec process that has exited).
    #[command(alias = "del", alias = "delete")]
    Rm {
        /// Kill a running task first.
        #[arg(short = 'f', long)]
        force: bool,
        /// Delete this exec process of the task instead of the task.
        #[arg(long, conflicts_with = "force")]
        exec_id: Option<String>,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// List a task's processes.
    Ps { id: String },
    /// Print a detached task's output.
    Logs { id: String },
    /// Run a process in a running task, in the foreground; exits with its status.
    Exec {
        /// Id of the new process, unique within the task.
        #[arg(long)]
        exec_id: String,
        /// Forward stdin to the process.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Give the process a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        id: String,
        /// Command and arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Freeze every process of a task.
    Pause { id: String },
    /// Thaw a paused task.
    Resume { id: String },
    /// Change a task's resource limits.
    Update {
        #[command(flatten)]
        limits: Limits,
        id: String,
    },
    /// Print a task's cgroup statistics: memory, cpu, pids.
    Metrics {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        id: String,
    },
    /// Checkpoint a running task with CRIU into the content store; prints the
    /// checkpoint's index digest (restore it with `keelctl run --checkpoint`).
    Checkpoint {
        /// Let the task exit after the checkpoint instead of resuming it.
        #[arg(long)]
        exit: bool,
        /// Leave the raw CRIU image in this directory instead of the content store.
        #[arg(long, value_name = "DIR")]
        image_path: Option<PathBuf>,
        #[command(flatten)]
        criu: super::options::CheckpointFlags,
        id: String,
    },
}

/// The figures `tasks metrics` prints, from either cgroup version's metrics.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CgroupUsage {
    pub cgroup_version: u8,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub cpu_usage_ns: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
}

impl CgroupUsage {
    /// Decodes the shim's `io.containerd.cgroups.v1.Metrics` or `...v2.Metrics`.
    pub fn decode(any: &protobuf::well_known_types::any::Any) -> anyhow::Result<Self> {
        use keel_protocol::containerd::{cgroups, cgroups_v2};
        if let Ok(m) = unpack::<cgroups::metrics::Metrics>(any) {
            let mem = m.memory.usage.get_or_default();
            return Ok(Self {
                cgroup_version: 1,
                memory_usage_bytes: mem.usage,
                memory_limit_bytes: mem.limit,
                cpu_usage_ns: m.cpu.usage.total,
                pids_current: m.pids.current,
                pids_limit: m.pids.limit,
            });
        }
        let m = unpack::<cgroups_v2::metrics::Metrics>(any).with_context(|| {
            format!("metrics of type {:?} are not cgroup metrics", any.type_url)
        })?;
        Ok(Self {
            cgroup_version: 2,
            memory_usage_bytes: m.memory.usage,
            memory_limit_bytes: m.memory.usage_limit,
            cpu_usage_ns: m.cpu.usage_usec.saturating_mul(1000),
            pids_current: m.pids.current,
            pids_limit: m.pids.limit,
        })
    }
}

/// Signal names and numbers, as `kill -l` on Linux.
pub fn parse_signal(s: &str) -> anyhow::Result<u32> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    let sig: nix::sys::signal::Signal = format!("SIG{name}")
        .parse()
        .with_context(|| format!("unknown signal {s:?}"))?;
    Ok(u32::try_from(sig as i32)?)
}

pub(super) fn kv(list: &[String], what: &str) -> anyhow::Result<Vec<(String, String)>> {
    list.iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("{what} {s:?} must be K=V"),
        })
        .collect()
}

/// The OCI spec for a container, starting from runc's defaults as ctr does.
fn spec(a: &ContainerArgs) -> anyhow::Result<Vec<u8>> {
    let mut v = serde_json::to_value(oci_spec::runtime::Spec::default())?;
    v["hostname"] = serde_json::json!(a.id);
    let p = &mut v["process"];
    p["args"] = serde_json::json!(a.command);
    p["cwd"] = serde_json::json!(a.cwd);
    p["terminal"] = serde_json::json!(false);
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    for (k, val) in kv(&a.env, "--env")? {
        env.push(format!("{k}={val}"));
    }
    p["env"] = serde_json::json!(env);
    v["linux"]["resources"] = a.limits.resources()?;
    a.fs.apply(&mut v)?;
    Ok(serde_json::to_vec(&v)?)
}

/// A host directory as the container's rootfs: an rbind mount, read-only with
/// `--read-only`.
pub(super) fn rootfs_mount(
    dir: &std::path::Path,
    fs: &super::mounts::MountFlags,
) -> anyhow::Result<Mount> {
    let rootfs = std::fs::canonicalize(dir).with_context(|| format!("rootfs {}", dir.display()))?;
    Ok(Mount {
        type_: "bind".into(),
        source: rootfs.display().to_string(),
        options: fs.rootfs_options(),
        ..Default::default()
    })
}

async fn create_container(client: &Client, a: &ContainerArgs) -> anyhow::Result<()> {
    let Some(rootfs) = &a.rootfs else {
        bail!("--rootfs is required");
    };
    if a.command.is_empty() {
        bail!("a command to run is required");
    }
    let c = Container {
        id: a.id.clone(),
        labels: kv(&a.labels, "--label")?.into_iter().collect(),
        runtime: MessageField::some(Runtime {
            name: a.runtime.clone(),
            options: a.runc.options()?.into(),
            ..Default::default()
        }),
        spec: MessageField::some(json_any(SPEC_TYPE_URL, spec(a)?)),
        rootfs: vec![rootfs_mount(rootfs, &a.fs)?],
        ..Default::default()
    };
    put_container(client, c).await
}

/// Containers.Create.
pub(super) async fn put_container(client: &Client, c: Container) -> anyhow::Result<()> {
    client
        .containers
        .create(
            client.ctx(),
            &CreateContainerRequest {
                container: MessageField::some(c),
                ..Default::default()
            },
        )
        .await?;
    Ok(())
}

/// Deletes task and container `id`; the first error, if any (both are tried).
async fn delete_all(client: &Client, id: &str) -> anyhow::Result<()> {
    let task = client
        .tasks
        .delete(
            client.ctx(),
            &DeleteTaskRequest {
                container_id: id.into(),
                force: true,
                ..Default::default()
            },
        )
        .await;
    let container = client
        .containers
        .delete(
            client.ctx(),
            &DeleteContainerRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await;
    task.with_context(|| format!("removing task {id}"))?;
    container.with_context(|| format!("removing container {id}"))?;
    Ok(())
}

/// A Create request for a detached task: its output goes to keel's log file.
fn detached(id: &str) -> CreateTaskRequest {
    CreateTaskRequest {
        container_id: id.to_string(),
        log_to_file: true,
        ..Default::default()
    }
}

/// Creates the task and starts it.
async fn create_and_start(client: &Client, req: CreateTaskRequest) -> anyhow::Result<()> {
    client.tasks.create(client.ctx(), &req).await?;
    start(client, &req.container_id).await
}

/// Starts task `id`'s init process.
async fn start(client: &Client, id: &str) -> anyhow::Result<()> {
    let req = StartRequest {
        container_id: id.to_string(),
        ..Default::default()
    };
    client.tasks.start(client.ctx(), &req).await?;
    Ok(())
}

/// Copies a FIFO to our stdout or stderr until the writer side closes.
fn copy_out(path: PathBuf, to_stderr: bool) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut rx = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(false)
        .open_receiver(&path)?;
    Ok(tokio::spawn(async move {
        let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if to_stderr {
            Box::new(tokio::io::stderr())
        } else {
            Box::new(tokio::io::stdout())
        };
        let _ = tokio::io::copy(&mut rx, &mut out).await;
        let _ = out.flush().await;
    }))
}

/// keelctl's own terminal, in raw mode until dropped (keys go to the container's
/// terminal untouched).
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> anyhow::Result<Option<Self>> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !nix::unistd::isatty(std::os::fd::AsRawFd::as_raw_fd(&stdin)).unwrap_or(false) {
            return Ok(None);
        }
        let saved = tcgetattr(&stdin).context("read the terminal's mode")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("set the terminal raw")?;
        Ok(Some(Self(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.0);
    }
}

nix::ioctl_read_bad!(get_winsize, nix::libc::TIOCGWINSZ, nix::pty::Winsize);

/// The size (columns, rows) of the terminal on keelctl's stdin or stdout, if any.
fn terminal_size() -> Option<(u32, u32)> {
    use std::os::fd::AsRawFd;
    [std::io::stdin().as_raw_fd(), std::io::stdout().as_raw_fd()]
        .into_iter()
        .find_map(|fd| {
            let mut ws = nix::pty::Winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes one Winsize into `ws`, which lives across the
            // call; on a descriptor that is not a terminal it fails and writes nothing.
            let ok = unsafe { get_winsize(fd, &mut ws) }.is_ok();
            (ok && ws.ws_col > 0 && ws.ws_row > 0)
                .then(|| (u32::from(ws.ws_col), u32::from(ws.ws_row)))
        })
}

/// FIFOs for a foreground process's stdio, copied to and from keelctl's own.
struct ForegroundIo {
    _dir: tempfile::TempDir,
    stdin: Option<PathBuf>,
    stdout: PathBuf,
    /// None with a terminal, which carries both streams.
    stderr: Option<PathBuf>,
    tty: bool,
    copies: Vec<tokio::task::JoinHandle<()>>,
}

impl ForegroundIo {
    fn new(interactive: bool, tty: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("keelctl-").tempdir()?;
        let mk = |name: &str| -> anyhow::Result<PathBuf> {
            let p = dir.path().join(name);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
            Ok(p)
        };
        let stdout = mk("stdout")?;
        let stderr = if tty { None } else { Some(mk("stderr")?) };
        let stdin = if interactive {
            Some(mk("stdin")?)
        } else {
            None
        };
        let mut copies = vec![copy_out(stdout.clone(), false)?];
        if let Some(p) = &stderr {
            copies.push(copy_out(p.clone(), true)?);
        }
        Ok(Self {
            _dir: dir,
            stdin,
            stdout,
            stderr,
            tty,
            copies,
        })
    }

    /// (stdin, stdout, stderr) paths as the shim takes them; empty if none.
    fn paths(&self) -> (String, String, String) {
        let show = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        (
            show(&self.stdin),
            self.stdout.display().to_string(),
            show(&self.stderr),
        )
    }

    /// With a terminal: gives the process's terminal keelctl's size now and whenever
    /// it changes (SIGWINCH).
    fn follow_size(&self, client: &Client, id: &str, exec_id: &str) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        if !self.tty {
            return Ok(());
        }
        let mut winch = signal(SignalKind::window_change())?;
        let (client, id, exec_id) = (client.clone(), id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            loop {
                if let Some((width, height)) = terminal_size() {
                    let req = ResizePtyRequest {
                        container_id: id.clone(),
                        exec_id: exec_id.clone(),
                        width,
                        height,
                        ..Default::default()
                    };
                    if client.tasks.resize_pty(client.ctx(), &req).await.is_err() {
                        return;
                    }
                }
                if winch.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Forwards keelctl's stdin, then tells the shim stdin is done (as ctr does: the
    /// shim keeps the FIFO open). Only after Start: a CloseIO before Start could close
    /// stdin before the shim has copied what was written.
    fn forward_stdin(&self, client: &Client, id: &str, exec_id: &str) -> anyhow::Result<()> {
        let Some(p) = &self.stdin else {
            return Ok(());
        };
        let mut tx = tokio::net::unix::pipe::OpenOptions::new().open_sender(p)?;
        let req = CloseIORequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            stdin: true,
            ..Default::default()
        };
        let client = client.clone();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut tx).await;
            drop(tx);
            let _ = client.tasks.close_io(client.ctx(), &req).await;
        });
        Ok(())
    }

    /// Lets output still in flight drain; it ends when the shim closes its end after
    /// the exit.
    async fn finish(self) {
        for c in self.copies {
            let _ = tokio::time::timeout(Duration::from_secs(5), c).await;
        }
    }
}

async fn wait_for(client: &Client, id: &str, exec_id: &str) -> anyhow::Result<u32> {
    let req = WaitRequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    Ok(client.tasks.wait(client.ctx(), &req).await?.exit_status)
}

pub async fn run(client: &Client, a: RunArgs) -> anyhow::Result<i32> {
    let id = a.container.id.clone();
    let checkpoint = match &a.checkpoint {
        Some(digest) => MessageField::some(
            super::checkpoint::restore_container(client, &a.container, digest).await?,
        ),
        None => {
            create_container(client, &a.container).await?;
            MessageField::none()
        }
    };
    // From an image directory: the task's own options say where (with the
    // container's flags, which task options replace as a whole).
    let options = match &a.image_path {
        Some(dir) => MessageField::some(a.container.runc.task_options(dir)?),
        None => MessageField::none(),
    };
    if a.detach {
        let req = CreateTaskRequest {
            checkpoint,
            options,
            ..detached(&id)
        };
        let r = create_and_start(client, req).await;
        if r.is_err() {
            let _ = delete_all(client, &id).await;
        }
        r?;
        return Ok(0);
    }

    let io = ForegroundIo::new(a.interactive, a.tty)?;
    let raw = if a.tty { RawMode::enter()? } else { None };
    let result = async {
        let (stdin, stdout, stderr) = io.paths();
        let req = CreateTaskRequest {
            container_id: id.clone(),
            stdin,
            stdout,
            stderr,
            terminal: a.tty,
            checkpoint,
            options,
            ..Default::default()
        };
        // Waiting from before the start, as ctr does: the exit is answered as soon
        // as keel has it, with no request to make after the start returns.
        client.tasks.create(client.ctx(), &req).await?;
        let waiting = {
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(async move { wait_for(&client, &id, "").await })
        };
        let started = async {
            start(client, &id).await?;
            io.follow_size(client, &id, "")?;
            io.forward_stdin(client, &id, "")
        }
        .await;
        if let Err(e) = started {
            waiting.abort();
            return Err(e);
        }
        waiting.await?
    }
    .await;
    io.finish().await;
    drop(raw);
    if a.rm || result.is_err() {
        let removed = delete_all(client, &id).await;
        // --rm's removal is part of what the command promises: its failure is
        // the command's (the task's own status was printed by then, if any).
        if a.rm && result.is_ok() {
            removed.context("--rm")?;
        }
    }
    Ok(i32::try_from(result?).unwrap_or(255))
}

/// `keelctl tasks exec`: runs a process in a running task, in the foreground, with
/// the container's environment, working directory and user; exits with its status.
async fn exec(
    client: &Client,
    id: &str,
    exec_id: &str,
    interactive: bool,
    tty: bool,
    command: Vec<String>,
) -> anyhow::Result<i32> {
    let req = GetContainerRequest {
        id: id.to_string(),
        ..Default::default()
    };
    let c = client.containers.get(client.ctx(), &req).await?;
    let spec: serde_json::Value = serde_json::from_slice(&c.container.spec.value)
        .with_context(|| format!("container {id} has no readable spec"))?;
    let mut process = spec["process"].clone();
    if !process.is_object() {
        bail!("container {id}'s spec has no process to start from");
    }
    process["args"] = serde_json::json!(command);
    process["terminal"] = serde_json::json!(tty);

    let io = ForegroundIo::new(interactive, tty)?;
    let (stdin, stdout, stderr) = io.paths();
    let req = ExecProcessRequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        stdin,
        stdout,
        stderr,
        terminal: tty,
        spec: MessageField::some(json_any(PROCESS_TYPE_URL, serde_json::to_vec(&process)?)),
        ..Default::default()
    };
    client.tasks.exec(client.ctx(), &req).await?;
    let raw = if tty { RawMode::enter()? } else { None };
    let result = async {
        let req = StartRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        client.tasks.start(client.ctx(), &req).await?;
        io.follow_size(client, id, exec_id)?;
        io.forward_stdin(client, id, exec_id)?;
        wait_for(client, id, exec_id).await
    }
    .await;
    io.finish().await;
    drop(raw);
    let req = DeleteProcessRequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    if let Err(e) = client.tasks.delete_process(client.ctx(), &req).await {
        eprintln!("keelctl: delete exec {exec_id}: {e}");
    }
    Ok(i32::try_from(result?).unwrap_or(255))
}

fn status_name(s: i32) -> &'static str {
    match Status::from_i32(s).unwrap_or(Status::UNKNOWN) {
        Status::UNKNOWN => "UNKNOWN",
        Status::CREATED => "CREATED",
        Status::RUNNING => "RUNNING",
        Status::STOPPED => "STOPPED",
        Status::PAUSED => "PAUSED",
        Status::PAUSING => "PAUSING",
    }
}

pub async fn containers(client: &Client, cmd: ContainersCmd) -> anyhow::Result<i32> {
    match cmd {
        ContainersCmd::Create(a) => create_container(client, &a).await?,
        ContainersCmd::Ls { format, filters } => {
            let r = client
                .containers
                .list(
                    client.ctx(),
                    &ListContainersRequest {
                        filters,
                        ..Default::default()
                    },
                )
                .await?;
            match format {
                Format::Json => {
                    for c in &r.containers {
                        println!(
                            "{}",
                            serde_json::json!({"id": c.id, "runtime": c.runtime.name, "labels": c.labels})
                        );
                    }
                }
                Format::Table => {
                    let rows: Vec<Vec<String>> = r
                        .containers
                        .iter()
                        .map(|c| {
                            let labels: Vec<String> =
                                c.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                            vec![
                                c.id.clone(),
                                c.runtime.name.clone(),
                                if labels.is_empty() {
                                    "-".into()
                                } else {
                                    labels.join(",")
                                },
                            ]
                        })
                        .collect();
                    table(&["CONTAINER", "RUNTIME", "LABELS"], &rows);
                }
            }
        }
        ContainersCmd::Info { id } => {
            let r = client
                .containers
                .get(
                    client.ctx(),
                    &GetContainerRequest {
                        id,
                        ..Default::default()
                    },
                )
                .await?;
            let c = &r.container;
            let spec: serde_json::Value = serde_json::from_slice(&c.spec.value).unwrap_or_default();
            let j = serde_json::json!({
                "id": c.id, "labels": c.labels, "runtime": c.runtime.name, "spec": spec,
                "rootfs": c.rootfs.iter().map(|m| serde_json::json!({"type": m.type_, "source": m.source, "options": m.options})).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&j)?);
        }
        ContainersCmd::Rm { ids } => {
            for id in ids {
                client
                    .containers
                    .delete(
                        client.ctx(),
                        &DeleteContainerRequest {
                            id: id.clone(),
                            ..Default::default()
                        },
                    )
                    .await?;
                println!("{id}");
            }
        }
    }
    Ok(0)
}

pub async fn tasks(client: &Client, cmd: TasksCmd) -> anyhow::Result<i32> {
    match cmd {
        TasksCmd::Start { id } => create_and_start(client, detached(&id)).await?,
        TasksCmd::Ls { format } => {
            let r = client
                .tasks
                .list(client.ctx(), &ListTasksRequest::new())
                .await?;
            match format {
                Format::Json => {
                    for t in &r.tasks {
                        let status = status_name(t.status.value());
                        println!(
                            "{}",
                            serde_json::json!({"id": t.container_id, "pid": t.pid, "status": status, "exit_status": t.exit_status})
                        );
                    }
                }
                Format::Table => {
                    let rows: Vec<Vec<String>> = r
                        .tasks
                        .iter()
                        .map(|t| {
                            vec![
                                t.container_id.clone(),
                                t.pid.to_string(),
                                status_name(t.status.value()).to_string(),
                            ]
                        })
                        .collect();
                    table(&["TASK", "PID", "STATUS"], &rows);
                }
            }
        }
        TasksCmd::Kill {
            signal,
            all,
            exec_id,
            id,
        } => {
            let req = KillRequest {
                container_id: id,
                exec_id,
                signal: parse_signal(&signal)?,
                all,
                ..Default::default()
            };
            client.tasks.kill(client.ctx(), &req).await?;
        }
        TasksCmd::Info { exec_id, id } => {
            let req = GetRequest {
                container_id: id,
                exec_id: exec_id.clone(),
                ..Default::default()
            };
            let resp = client.tasks.get(client.ctx(), &req).await?;
            let p = resp.process.get_or_default();
            println!(
                "{}",
                serde_json::json!({
                    "id": p.container_id,
                    "exec_id": exec_id,
                    "pid": p.pid,
                    "status": status_name(p.status.value()),
                    "exit_status": p.exit_status,
                    "stdin": p.stdin,
                    "stdout": p.stdout,
                    "stderr": p.stderr,
                    "terminal": p.terminal,
                })
            );
        }
        TasksCmd::Wait { exec_id, id } => {
            let status = wait_for(client, &id, &exec_id).await?;
            println!("{status}");
            return Ok(i32::try_from(status).unwrap_or(255));
        }
        TasksCmd::Exec {
            exec_id,
            interactive,
            tty,
            id,
            command,
        } => return exec(client, &id, &exec_id, interactive, tty, command).await,
        TasksCmd::Rm {
            exec_id: Some(exec_id),
            ids,
            ..
        } => {
            let [id] = ids.as_slice() else {
                bail!("--exec-id deletes a process of one task; name exactly one");
            };
            let req = DeleteProcessRequest {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                ..Default::default()
            };
            let r = client.tasks.delete_process(client.ctx(), &req).await?;
            println!("{exec_id} {}", r.exit_status);
        }
        TasksCmd::Rm { force, ids, .. } => {
            for id in ids {
                let req = DeleteTaskRequest {
                    container_id: id.clone(),
                    force,
                    ..Default::default()
                };
                let r = client.tasks.delete(client.ctx(), &req).await?;
                println!("{id} {}", r.exit_status);
            }
        }
        TasksCmd::Ps { id } => {
            let r = client
                .tasks
                .list_pids(
                    client.ctx(),
                    &ListPidsRequest {
                        container_id: id,
                        ..Default::default()
                    },
                )
                .await?;
            let rows: Vec<Vec<String>> = r
                .processes
                .iter()
                .map(|p| vec![p.pid.to_string(), p.exec_id.clone()])
                .collect();
            table(&["PID", "EXEC ID"], &rows);
        }
        TasksCmd::Pause { id } => {
            let req = PauseTaskRequest {
                container_id: id,
                ..Default::default()
            };
            client.tasks.pause(client.ctx(), &req).await?;
        }
        TasksCmd::Resume { id } => {
            let req = ResumeTaskRequest {
                container_id: id,
                ..Default::default()
            };
            client.tasks.resume(client.ctx(), &req).await?;
        }
        TasksCmd::Update { limits, id } => {
            let resources = limits.resources()?;
            if resources.as_object().is_some_and(serde_json::Map::is_empty) {
                bail!("nothing to update: give --memory-limit, --cpus or --pids-limit");
            }
            let req = UpdateTaskRequest {
                container_id: id,
                resources: MessageField::some(json_any(
                    LINUX_RESOURCES_TYPE_URL,
                    serde_json::to_vec(&resources)?,
                )),
                ..Default::default()
            };
            client.tasks.update(client.ctx(), &req).await?;
        }
        TasksCmd::Checkpoint {
            exit,
            image_path,
            criu,
            id,
        } => super::checkpoint::checkpoint(client, &id, exit, image_path, &criu).await?,
        TasksCmd::Metrics { format, id } => {
            let req = MetricsRequest {
                filters: vec![format!("id=={id}")],
                ..Default::default()
            };
            let r = client.tasks.metrics(client.ctx(), &req).await?;
            let Some(m) = r.metrics.iter().find(|m| m.id == id) else {
                return Err(
                    Error::NotFound(format!("task {id} has no metrics (is it running?)")).into(),
                );
            };
            let u = CgroupUsage::decode(m.data.get_or_default())?;
            match format {
                Format::Json => println!("{}", serde_json::to_string(&u)?),
                Format::Table => table(
                    &[
                        "TASK",
                        "MEMORY",
                        "MEMORY LIMIT",
                        "CPU (ns)",
                        "PIDS",
                        "PIDS LIMIT",
                    ],
                    &[vec![
                        id,
                        u.memory_usage_bytes.to_string(),
                        u.memory_limit_bytes.to_string(),
                        u.cpu_usage_ns.to_string(),
                        u.pids_current.to_string(),
                        u.pids_limit.to_string(),
                    ]],
                ),
            }
        }
        TasksCmd::Logs { id } => {
            let r = client
                .tasks
                .get(
                    client.ctx(),
                    &GetRequest {
                        container_id: id.clone(),
                        ..Default::default()
                    },
                )
                .await?;
            let Some(path) = r.process.stdout.strip_prefix("file://") else {
                return Err(Error::FailedPrecondition(format!(
                    "task {id} is not detached; it has no log file"
                ))
                .into());
            };
            let mut f = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("open {path}"))?;
            tokio::io::copy(&mut f, &mut tokio::io::stdout()).await?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("SIGKILL").unwrap(), 9);
        assert_eq!(parse_signal("term").unwrap(), 15);
        assert!(parse_signal("NOPE").is_err());
    }
}
