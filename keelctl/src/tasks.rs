//! `keelctl run`, `keelctl containers …` and `keelctl tasks …`, shaped like ctr.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use keel_client::io::{Fifos, Io};
use keel_client::protocol::api::types::{Descriptor, Mount};
use keel_client::task::TaskOptions;
use keel_client::{Client, ContainerSpec, Process, Task};

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
    /// Runtime name (io.containerd.runc.v2, io.containerd.keel.v1) or shim path;
    /// keeld's default_runtime when not given.
    #[arg(long, default_value = "")]
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
    /// The limits as the library takes them.
    fn get(&self) -> keel_client::Limits {
        keel_client::Limits {
            memory_bytes: self.memory_limit,
            cpus: self.cpus,
            pids: self.pids_limit,
        }
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
    /// Run the task with this shim binary (an absolute path) instead of its
    /// container's runtime (containerd's runtime_path).
    #[arg(long, value_name = "PATH")]
    pub runtime_path: Option<String>,
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

/// The container the arguments describe.
fn container_spec(a: &ContainerArgs) -> anyhow::Result<ContainerSpec> {
    let Some(rootfs) = &a.rootfs else {
        bail!("--rootfs is required");
    };
    if a.command.is_empty() {
        bail!("a command to run is required");
    }
    let mut spec = ContainerSpec::new(&a.id, rootfs)
        .args(a.command.iter().cloned())
        .cwd(&a.cwd)
        .limits(a.limits.get())
        .runtime(&a.runtime);
    for (k, v) in kv(&a.env, "--env")? {
        spec = spec.env(k, v);
    }
    for (k, v) in kv(&a.labels, "--label")? {
        spec = spec.label(k, v);
    }
    if let Some(o) = a.runc.options()? {
        spec = spec.runtime_options(o);
    }
    a.fs.apply(spec)
}

/// A host directory as the container's rootfs: an rbind mount, read-only with
/// `--read-only`.
pub(super) fn rootfs_mount(
    dir: &std::path::Path,
    fs: &super::mounts::MountFlags,
) -> anyhow::Result<Mount> {
    Ok(keel_client::containers::bind_rootfs(dir, fs.read_only)?)
}

/// Deletes task and container `id`; the first error, if any (both are tried).
async fn delete_all(client: &Client, id: &str) -> anyhow::Result<()> {
    let task = client.task(id).delete(true).await;
    let container = client.containers().delete(id).await;
    task.with_context(|| format!("removing task {id}"))?;
    container.with_context(|| format!("removing container {id}"))?;
    Ok(())
}

/// With a terminal: gives the process's terminal keelctl's size now and whenever
/// it changes (SIGWINCH).
fn follow_size(process: Process) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut winch = signal(SignalKind::window_change())?;
    tokio::spawn(async move {
        loop {
            if let Some((width, height)) = terminal_size() {
                if process.resize(width, height).await.is_err() {
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

/// FIFOs for a foreground process, copied to and from keelctl's own stdio; stdin
/// only with `-i` (copied once the process starts, then closed).
fn foreground_io(interactive: bool, tty: bool) -> anyhow::Result<Io> {
    let stdin: Option<keel_client::io::Input> = if interactive {
        Some(Box::new(tokio::io::stdin()))
    } else {
        None
    };
    Ok(Io::copy(
        Fifos::new().terminal(tty),
        stdin,
        Box::new(tokio::io::stdout()),
        Box::new(tokio::io::stderr()),
    )?)
}

/// Starts a foreground process and waits for it, with the wait begun before the
/// start as ctr does: the exit is answered as soon as keel has it. The terminal
/// follows keelctl's size from the start on.
async fn start_and_wait(task: &Task, process: &Process, tty: bool) -> anyhow::Result<u32> {
    let waiting = process.wait();
    tokio::pin!(waiting);
    let started = async {
        process.start().await?;
        if tty {
            follow_size(task.process(process.exec_id()))?;
        }
        anyhow::Ok(())
    };
    let exit = tokio::select! {
        biased;
        exit = &mut waiting => exit?,
        started = started => {
            started?;
            waiting.await?
        }
    };
    Ok(exit.code)
}

pub async fn run(client: &Client, a: RunArgs) -> anyhow::Result<i32> {
    let id = a.container.id.clone();
    let checkpoint: Option<Descriptor> = match &a.checkpoint {
        Some(digest) => {
            Some(super::checkpoint::restore_container(client, &a.container, digest).await?)
        }
        None => {
            client
                .containers()
                .create(container_spec(&a.container)?)
                .await?;
            None
        }
    };

    // From an image directory: the task's own options say where (with the
    // container's flags, which task options replace as a whole).
    let runtime_options = match &a.image_path {
        Some(dir) => Some(a.container.runc.task_options(dir)?),
        None => None,
    };
    let options = TaskOptions {
        runtime_options,
        checkpoint,
        runtime_path: a.runtime_path.clone(),
        ..Default::default()
    };
    let create = |io| Task::create(client.clone(), &id, io, options.clone());
    if a.detach {
        let r = async {
            let task = create(Io::keel_log()).await?;
            task.start().await?;
            anyhow::Ok(())
        }
        .await;
        if r.is_err() {
            let _ = delete_all(client, &id).await;
        }
        r?;
        return Ok(0);
    }

    let io = foreground_io(a.interactive, a.tty)?;
    let raw = if a.tty { RawMode::enter()? } else { None };
    let mut task = None;
    let result = async {
        let t = task.insert(create(io).await?);
        start_and_wait(t, t, a.tty).await
    }
    .await;
    if let Some(t) = &task {
        t.wait_output().await;
    }
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
    let task = client.task(id);
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let process = task
        .exec(exec_id, &args, foreground_io(interactive, tty)?)
        .await?;
    let raw = if tty { RawMode::enter()? } else { None };
    let result = start_and_wait(&task, &process, tty).await;
    process.wait_output().await;
    drop(raw);
    if let Err(e) = process.delete().await {
        eprintln!("keelctl: delete exec {exec_id}: {e}");
    }
    Ok(i32::try_from(result?).unwrap_or(255))
}

pub async fn containers(client: &Client, cmd: ContainersCmd) -> anyhow::Result<i32> {
    match cmd {
        ContainersCmd::Create(a) => {
            client.containers().create(container_spec(&a)?).await?;
        }
        ContainersCmd::Ls { format, filters } => {
            let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
            let all = client.containers().list(&filters).await?;
            match format {
                Format::Json => {
                    for c in &all {
                        let c = c.info();
                        println!(
                            "{}",
                            serde_json::json!({"id": c.id, "runtime": c.runtime.name, "labels": c.labels})
                        );
                    }
                }
                Format::Table => {
                    let rows: Vec<Vec<String>> = all
                        .iter()
                        .map(|c| {
                            let c = c.info();
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
            let container = client.containers().get(&id).await?;
            let c = container.info();
            let spec: serde_json::Value = serde_json::from_slice(&c.spec.value).unwrap_or_default();
            let j = serde_json::json!({
                "id": c.id, "labels": c.labels, "runtime": c.runtime.name, "spec": spec,
                "rootfs": c.rootfs.iter().map(|m| serde_json::json!({"type": m.type_, "source": m.source, "options": m.options})).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&j)?);
        }
        ContainersCmd::Rm { ids } => {
            for id in ids {
                client.containers().delete(&id).await?;
                println!("{id}");
            }
        }
    }
    Ok(0)
}

pub async fn tasks(client: &Client, cmd: TasksCmd) -> anyhow::Result<i32> {
    match cmd {
        TasksCmd::Start { id } => {
            let task =
                Task::create(client.clone(), &id, Io::keel_log(), Default::default()).await?;
            task.start().await?;
        }
        TasksCmd::Ls { format } => {
            let all = client.tasks("").await?;
            match format {
                Format::Json => {
                    for t in &all {
                        println!(
                            "{}",
                            serde_json::json!({"id": t.id, "pid": t.pid, "status": t.status.name(), "exit_status": t.exit.map_or(0, |e| e.code)})
                        );
                    }
                }
                Format::Table => {
                    let rows: Vec<Vec<String>> = all
                        .iter()
                        .map(|t| vec![t.id.clone(), t.pid.to_string(), t.status.name().to_string()])
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
            let signal = parse_signal(&signal)?;
            let task = client.task(&id);
            if all {
                task.kill_all(signal).await?;
            } else {
                task.process(&exec_id).kill(signal).await?;
            }
        }
        TasksCmd::Info { exec_id, id } => {
            let p = client.task(&id).process(&exec_id).status().await?;
            println!(
                "{}",
                serde_json::json!({
                    "id": p.id,
                    "exec_id": exec_id,
                    "pid": p.pid,
                    "status": p.status.name(),
                    "exit_status": p.exit.map_or(0, |e| e.code),
                    "stdin": p.stdin,
                    "stdout": p.stdout,
                    "stderr": p.stderr,
                    "terminal": p.terminal,
                })
            );
        }
        TasksCmd::Wait { exec_id, id } => {
            let status = client.task(&id).process(&exec_id).wait().await?.code;
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
            let exit = client.task(id).process(&exec_id).delete().await?;
            println!("{exec_id} {}", exit.code);
        }
        TasksCmd::Rm { force, ids, .. } => {
            for id in ids {
                let exit = client.task(&id).delete(force).await?;
                println!("{id} {}", exit.code);
            }
        }
        TasksCmd::Ps { id } => {
            let rows: Vec<Vec<String>> = client
                .task(&id)
                .pids()
                .await?
                .into_iter()
                .map(|p| vec![p.pid.to_string(), p.exec_id])
                .collect();
            table(&["PID", "EXEC ID"], &rows);
        }
        TasksCmd::Pause { id } => client.task(&id).pause().await?,
        TasksCmd::Resume { id } => client.task(&id).resume().await?,
        TasksCmd::Update { limits, id } => {
            let limits = limits.get();
            if limits.is_empty() {
                bail!("nothing to update: give --memory-limit, --cpus or --pids-limit");
            }
            client.task(&id).update(&limits, &[]).await?;
        }
        TasksCmd::Checkpoint {
            exit,
            image_path,
            criu,
            id,
        } => super::checkpoint::checkpoint(client, &id, exit, image_path, &criu).await?,
        TasksCmd::Metrics { format, id } => {
            let u = client.task(&id).metrics().await?;
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
            let path = client.task(&id).log_path().await?;
            let mut f = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("open {}", path.display()))?;
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
