//! keel's shim, `containerd-shim-keel-v1`, on its own terms: under an unmodified
//! containerd 1.6 (a private one: its own root, state and socket, CRI plugin
//! disabled, started by the test and driven with `ctr --runtime
//! io.containerd.keel.v1`; if containerd can drive the shim, it speaks the
//! protocol), and its guard against a container rewriting its binary. The rest
//! of the integration suite runs on it too (`KEEL_TEST_RUNTIME`, deploy/test.sh).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_tests::{bin_dir, busybox_rootfs, describe, on_path, require_root, scratch_dir, Keeld};

const RUNTIME: &str = "io.containerd.keel.v1";

/// A containerd of the test's own.
struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    socket: PathBuf,
}

impl Containerd {
    fn start() -> Self {
        Self::start_with_path(&[])
    }

    /// A containerd whose PATH has `dirs` first (shims found there win).
    fn start_with_path(dirs: &[&Path]) -> Self {
        require_root("a private containerd");
        for bin in ["containerd", "ctr"] {
            assert!(
                on_path(bin).is_some(),
                "{bin} is not on PATH: run deploy/install-deps.sh"
            );
        }
        let shim = bin_dir().join("containerd-shim-keel-v1");
        assert!(shim.is_file(), "{} is not built", shim.display());
        let dir = tempfile::Builder::new()
            .prefix("keel-ctd-")
            .tempdir_in(scratch_dir())
            .unwrap();
        let config = dir.path().join("containerd.toml");
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .unwrap();
        let socket = dir.path().join("ctd.sock");
        // containerd finds containerd-shim-keel-v1 on its PATH.
        let mut path: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
        path.push(bin_dir());
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let path = std::env::join_paths(path).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--address")
            .arg(&socket)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd");
        let c = Self { dir, child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.ctr(&["version"]).status.code() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket).args(args);
        c.stdin(Stdio::null());
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("ctr")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\ncontainerd log:\n{}",
            describe(&out),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run` on the busybox rootfs with the keel shim.
    fn run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        self.run_on(RUNTIME, flags, id, cmd)
    }

    /// `ctr run` on the busybox rootfs with `runtime`.
    fn run_on(&self, runtime: &str, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        let rootfs = busybox_rootfs();
        // `--rootfs` is a switch: the rootfs is then the first argument.
        let mut args = vec!["run", "--runtime", runtime];
        args.extend_from_slice(flags);
        args.push("--rootfs");
        args.push(rootfs.to_str().unwrap());
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    fn task_status(&self, id: &str) -> String {
        self.ok(&["task", "ls"])
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks first, so no shim outlives the test.
        if let Ok(out) = self.ctr_cmd(&["task", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self
                    .ctr_cmd(&["task", "kill", "-s", "SIGKILL", id])
                    .output();
                let _ = self.ctr_cmd(&["task", "delete", "-f", id]).output();
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn shim_processes(id: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-af", &format!("containerd-shim-keel-v1 .*-id {id} ")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Nothing of task `id` is left: shim, its socket, a mount, a cgroup.
fn assert_nothing_left(c: &Containerd, id: &str) {
    assert_eq!(shim_processes(id), "", "shim of {id} still running");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.lines().any(|l| l.contains(&format!("/{id}/"))),
        "a mount of {id} is left"
    );
    for controller in ["memory", "pids", "cpu", "freezer"] {
        let dir = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("default")
            .join(id);
        assert!(!dir.exists(), "cgroup {} is left", dir.display());
    }
    let socket = {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!("{}/default/{id}", c.socket.display()).as_bytes());
        Path::new("/run/containerd/s").join(hex::encode(h))
    };
    assert!(!socket.exists(), "shim socket {} is left", socket.display());
    let state = c
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task/default")
        .join(id);
    assert!(!state.exists(), "bundle {} is left", state.display());
}

#[test]
fn containerd_runs_and_removes_tasks_on_the_keel_shim() {
    let c = Containerd::start();
    // run --rm: output and exit code passed through.
    for code in [0, 3, 255] {
        let id = format!("rm{code}");
        let cmd = format!("echo out; exit {code}");
        let out = c.run(&["--rm"], &id, &["/bin/sh", "-c", &cmd]);
        assert_eq!(out.status.code(), Some(code), "{id}: {}", describe(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n", "{id}");
        assert_nothing_left(&c, &id);
    }

    // run -d, exec, ps, pause/resume, metrics, kill, delete.
    let out = c.run(&["-d"], "d1", &["sleep", "1000"]);
    assert!(out.status.success(), "{}\n{}", describe(&out), c.log());
    assert_eq!(c.task_status("d1"), "RUNNING");
    let out = c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "d1",
        "/bin/sh",
        "-c",
        "echo from-exec",
    ]);
    assert_eq!(out, "from-exec\n");
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "d1",
        "/bin/sh",
        "-c",
        "exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let ps = c.ok(&["task", "ps", "d1"]);
    assert!(ps.lines().count() >= 2, "ps lists the init: {ps}");
    c.ok(&["task", "pause", "d1"]);
    assert_eq!(c.task_status("d1"), "PAUSED");
    c.ok(&["task", "resume", "d1"]);
    assert_eq!(c.task_status("d1"), "RUNNING");
    let metrics = c.ok(&["task", "metrics", "d1"]);
    assert!(
        metrics.contains("memory.usage_in_bytes") && metrics.contains("pids.current"),
        "metrics: {metrics}"
    );
    c.ok(&["task", "kill", "-s", "SIGKILL", "d1"]);
    eventually("d1 to stop", || {
        (c.task_status("d1") == "STOPPED").then_some(())
    });
    c.ok(&["task", "delete", "d1"]);
    c.ok(&["container", "delete", "d1"]);
    eventually("d1's shim to go", || {
        shim_processes("d1").is_empty().then_some(())
    });
    assert_nothing_left(&c, "d1");
}

#[test]
fn containerd_runs_a_terminal_task_on_the_keel_shim() {
    let c = Containerd::start();
    // ctr run -t needs a terminal of its own: script(1) gives it one.
    let rootfs = busybox_rootfs();
    let line = format!(
        "ctr --address {} run -t --rm --runtime {RUNTIME} --rootfs {} t1 /bin/sh -c 'tty; stty size; exit 5'",
        c.socket.display(),
        rootfs.display()
    );
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}\n{}",
        describe(&out),
        c.log()
    );
    assert!(
        text.contains("/dev/pts/"),
        "the task has a terminal: {text}"
    );
    assert_nothing_left(&c, "t1");
}

/// `ctr task checkpoint --image-path` under containerd, of a task on keel's
/// shim: containerd pauses the task and has the shim dump it into the directory.
/// That image is a CRIU image keel's shim restores: a keeld given the directory
/// restores the process, which counts on from where it was.
///
/// ctr 1.6 passes `--image-path`, `--work-path` and `--exit` on only for a
/// runtime named `io.containerd.runc.v1` or `.v2` (its `withCheckpointOpts`), so
/// here keel's shim is that runtime: this containerd finds it as
/// `containerd-shim-runc-v2`, first on its PATH.
#[test]
fn a_checkpoint_containerd_takes_on_the_keel_shim_restores() {
    if !keel_tests::criu_or_skip("a_checkpoint_containerd_takes_on_the_keel_shim_restores") {
        return;
    }
    let alias = tempfile::Builder::new()
        .prefix("keel-alias-")
        .tempdir_in(scratch_dir())
        .unwrap();
    std::os::unix::fs::symlink(
        bin_dir().join("containerd-shim-keel-v1"),
        alias.path().join("containerd-shim-runc-v2"),
    )
    .unwrap();
    let c = Containerd::start_with_path(&[alias.path()]);
    // The count goes to stdout and to the container's /dev/shm, where the host
    // reads it.
    let counter =
        "i=0; while true; do i=$((i+1)); echo $i; echo $i >/dev/shm/count; sleep 0.05; done";
    // Its output to a file (stdin /dev/null): what keeld gives the restored task.
    let log = format!("file://{}", c.dir.path().join("cp1.log").display());
    let out = c.run_on(
        "io.containerd.runc.v2",
        &["-d", "--log-uri", &log],
        "cp1",
        &["/bin/sh", "-c", counter],
    );
    assert!(out.status.success(), "{}\n{}", describe(&out), c.log());
    assert_ne!(shim_processes("cp1"), "", "cp1 does not run on keel's shim");
    let pid: u32 = c
        .ok(&["task", "ls"])
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cp1"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .expect("cp1's pid");
    let count = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/root/dev/shm/count"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    eventually("cp1 to count", || (count() >= 20).then_some(()));
    let before = count();
    let image = c.dir.path().join("image");
    let work = c.dir.path().join("work");
    c.ok(&[
        "task",
        "checkpoint",
        "--exit",
        "--image-path",
        image.to_str().unwrap(),
        "--work-path",
        work.to_str().unwrap(),
        "cp1",
    ]);
    assert!(
        image.join("inventory.img").is_file(),
        "no CRIU image: {:?} {:?}",
        std::fs::read_dir(&image).map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>()),
        std::fs::read_dir(&work).map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>())
    );
    assert!(
        work.join("dump.log").is_file(),
        "CRIU did not work in --work-path"
    );
    eventually("cp1 to stop", || {
        (c.task_status("cp1") == "STOPPED").then_some(())
    });
    c.ok(&["task", "delete", "cp1"]);
    c.ok(&["container", "delete", "cp1"]);
    assert_nothing_left(&c, "cp1");

    let k = Keeld::start();
    let out = k.run_from_image(
        "restored",
        &image,
        &["--runtime", RUNTIME],
        &["sh", "-c", counter],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let numbers = |k: &Keeld| -> Vec<u64> {
        k.ctl_ok(&["tasks", "logs", "restored"])
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let first = eventually("the restored count", || numbers(&k).first().copied());
    assert!(
        first > before && first < before + 40,
        "the restored process counts from {first}, checkpointed after {before}"
    );
    eventually("it to go on", || {
        (numbers(&k).last().copied() > Some(first + 5)).then_some(())
    });
    k.ctl_ok(&["tasks", "rm", "-f", "restored"]);
    k.ctl_ok(&["containers", "rm", "restored"]);
}

/// CVE-2019-5736: every process that enters a container is forked from the shim,
/// so until it executes the container's program (and for good, if that program's
/// `#!` line names `/proc/self/exe`) its `/proc/<pid>/exe` leads to the shim's
/// binary. A process in the container that gets hold of it (an `O_PATH` open
/// needs no more than seeing the pid) must not be able to write through it once
/// nothing executes the binary any more. The shim and the processes it forks run
/// their binary from a read-only bind mount, so that write fails with EROFS.
///
/// The shim here is a private copy of the binary, so that once its shim is gone
/// nothing else executes it (a write to an executing binary fails with ETXTBSY
/// whatever the guard): without the guard the write goes through.
#[test]
fn the_shims_binary_cannot_be_rewritten_through_proc_exe() {
    require_root("running containers");
    let dir = tempfile::Builder::new()
        .prefix("keel-guard-")
        .tempdir_in(scratch_dir())
        .unwrap();
    let copy = dir.path().join("containerd-shim-keel-v1");
    std::fs::copy(bin_dir().join("containerd-shim-keel-v1"), &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let k = Keeld::start_with_config(&format!("default_runtime = \"{}\"", copy.display()));
    let rootfs = busybox_rootfs();
    k.ctl_ok(&[
        "run",
        "-d",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "g1",
        "sleep",
        "600",
    ]);
    let pattern = format!("^{} -namespace {} -id g1 ", copy.display(), k.namespace);
    let out = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .unwrap();
    let shim: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("one shim for g1: {}", describe(&out)));
    // What a process that can see the shim's pid gets: a handle on its binary.
    let exe = nix::fcntl::open(
        format!("/proc/{shim}/exe").as_str(),
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .expect("open /proc/<shim>/exe");
    // The shim goes (and with it the task); nothing executes the copy any more.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the shim to be gone", || {
        (!Path::new(&format!("/proc/{shim}")).exists()).then_some(())
    });
    let waited = k.ctl(&["tasks", "wait", "g1"]);
    assert_eq!(waited.status.code(), Some(137), "{}", describe(&waited));
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{exe}"));
    match write {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "refused, but not for being read-only: {e}"
        ),
        Ok(mut f) => {
            use std::io::Write;
            let _ = f.write_all(b"#!/bin/sh\n");
            panic!("the shim's binary was opened for writing through /proc/<pid>/exe");
        }
    }
    assert_eq!(std::fs::read(&copy).unwrap(), before, "the binary changed");
    let _ = nix::unistd::close(exe);
}

/// A task created from a checkpoint has no process until Start restores it:
/// a signal then must not reach anything (the shim leads its own process
/// group; signalling "pid 0" would hit the shim itself). SIGKILL ends the task
/// as it would a created one; another signal is refused.
#[test]
fn a_task_awaiting_its_restore_is_killed_without_its_shim() {
    if !keel_tests::criu_or_skip("a_task_awaiting_its_restore_is_killed_without_its_shim") {
        return;
    }
    let k = Keeld::start_with_config(&format!("default_runtime = \"{RUNTIME}\""));
    k.run_detached("before");
    let digest = k
        .ctl_ok(&["tasks", "checkpoint", "--exit", "before"])
        .trim()
        .to_string();
    k.ctl_ok(&["tasks", "rm", "-f", "before"]);
    keel_tests::runtime().block_on(async {
        let c = keel_client::ClientBuilder::new(k.socket.to_str().unwrap())
            .namespace(k.namespace.as_str())
            .connect()
            .await
            .unwrap();
        let container = c
            .containers()
            .create(
                keel_client::ContainerSpec::new("pending", busybox_rootfs())
                    .args(["sleep", "100000"]),
            )
            .await
            .unwrap();
        let options = keel_client::task::TaskOptions {
            checkpoint: Some(keel_client::protocol::api::types::Descriptor {
                media_type: "application/vnd.oci.image.index.v1+json".into(),
                digest: digest.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let task = container
            .new_task_with(keel_client::io::Io::keel_log(), options)
            .await
            .unwrap();
        let shim = k.shim_pid("pending");
        let e = task.kill(15).await.unwrap_err();
        assert!(e.to_string().contains("no process yet"), "{e}");
        assert!(
            nix::sys::signal::kill(shim, None).is_ok(),
            "the shim died of a signal meant for its task"
        );
        task.kill(9).await.unwrap();
        let exit = task.wait().await.unwrap();
        assert_eq!(exit.code, 137);
        assert!(
            nix::sys::signal::kill(shim, None).is_ok(),
            "the shim died of a signal meant for its task"
        );
        task.delete(false).await.unwrap();
        c.containers().delete("pending").await.unwrap();
    });
}
