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
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
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
        let rootfs = busybox_rootfs();
        // `--rootfs` is a switch: the rootfs is then the first argument.
        let mut args = vec!["run", "--runtime", RUNTIME];
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
