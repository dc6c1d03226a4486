//! Harness for keel's integration tests: real keeld and keelctl binaries on temporary
//! roots, killed for real.
//!
//! The binaries come from the same target directory as the test executable (build
//! them first with `cargo build --bins`, as `deploy/test.sh` does) or from
//! `KEEL_BIN_DIR`.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod powerloss;

/// Serialises tests that move gigabytes, so two of them never compete for the disk.
pub static HEAVY: Mutex<()> = Mutex::new(());

/// Takes [`HEAVY`], surviving a poisoned lock (a failed heavy test must not fail others).
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Directory holding keeld and keelctl.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KEEL_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-exe> → target/<profile>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in ["keeld", "keelctl"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the binaries first (cargo build --bins) or set KEEL_BIN_DIR",
            dir.join(b).display()
        );
    }
    dir
}

/// Fails loudly when the tests cannot do what they claim without root.
pub fn require_root(what: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what} needs root (run the tests as root, as CI does)"
    );
}

/// One keeld on its own root, state and socket.
#[derive(Debug)]
pub struct Keeld {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// The namespace keelctl uses by default: unique per daemon, so cgroups
    /// (`/keel/<ns>/<id>`) never collide between tests or with leftovers.
    pub namespace: String,
    /// Environment keeld runs with, on top of the tests' own.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Keeld {
    /// Starts keeld with a fresh root and waits until it answers.
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// Starts keeld with extra environment variables (its shims inherit them).
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        Self::start_with("", env)
    }

    /// Starts keeld with extra TOML configuration.
    pub fn start_with_config(extra: &str) -> Self {
        Self::start_with(extra, &[])
    }

    fn start_with(extra: &str, env: &[(&str, &str)]) -> Self {
        let mut k = Self::prepare(extra, env);
        k.spawn();
        k
    }

    /// A keeld with its directories and config, not started: its `root` may be
    /// moved first (onto a filesystem of the test's), then `spawn`.
    pub fn unstarted(extra: &str) -> Self {
        Self::prepare(extra, &[])
    }

    fn prepare(extra: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("keel-it-")
            .tempdir_in(scratch_dir())
            .expect("tempdir");
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let socket = dir.path().join("run").join("keel.sock");
        let config = dir.path().join("keel.toml");
        let mut f = std::fs::File::create(&config).expect("config");
        // Let a non-root developer's uid in too; CI runs as root. Top-level keys
        // come before the tables `extra` may open.
        if !extra.contains("allowed_uids") {
            writeln!(f, "allowed_uids = [{}]", nix::unistd::getuid()).unwrap();
        }
        if !extra.contains("default_runtime") {
            writeln!(f, "default_runtime = \"{}\"", test_runtime()).unwrap();
        }
        writeln!(f, "{extra}").unwrap();
        Keeld {
            dir,
            root,
            state,
            socket,
            config,
            namespace: format!("it{}", rand::random::<u32>()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(bin_dir().join("keeld"));
        c.arg("--root")
            .arg(&self.root)
            .arg("--state")
            .arg(&self.state)
            .arg("--address")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .env("KEEL_LOG_LEVEL", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("keeld.log")
    }

    /// Sets (or, with `None`, removes) an environment variable of keeld's for its
    /// next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Waits for the daemon to exit on its own; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("keeld running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "keeld did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts (or restarts) the daemon and waits for it to answer Version.
    pub fn spawn(&mut self) {
        self.spawn_without_waiting();
        self.wait_ready();
    }

    /// Starts (or restarts) the daemon and returns at once.
    pub fn spawn_without_waiting(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn keeld");
        self.child = Some(child);
    }

    /// Runs a second keeld on the same root and socket, returning its output.
    pub fn run_second(&self) -> Output {
        self.command()
            .stdin(Stdio::null())
            .output()
            .expect("run second keeld")
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket.exists() && self.ctl(&["version"]).status.success() {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("keeld exited during startup ({st}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "keeld did not become ready; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// keeld's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("keeld running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "keeld ignored SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The socket containerd-shim-runc-v2 makes for task `id` of this keeld's
    /// namespace: a hash of keeld's socket path, the namespace and the id.
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        self.shim_socket_in(&self.namespace, id)
    }

    /// [`Keeld::shim_socket`] for another namespace.
    pub fn shim_socket_in(&self, ns: &str, id: &str) -> PathBuf {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!("{}/{ns}/{id}", self.socket.display()).as_bytes());
        Path::new("/run/containerd/s").join(hex::encode(h))
    }

    /// The pid of the shim this keeld launched for task `id` of its namespace
    /// (whichever shim: a test may pick the runtime).
    pub fn shim_pid(&self, id: &str) -> nix::unistd::Pid {
        let pattern = format!(
            "containerd-shim-[a-z0-9]+-v[0-9]+ -namespace {} -id {id} -address {}",
            self.namespace,
            self.socket.display()
        );
        let out = Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .expect("pgrep");
        let pid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not one shim for {id}: {}", describe(&out)));
        nix::unistd::Pid::from_raw(pid)
    }

    /// keelctl against this daemon.
    pub fn ctl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("keelctl"));
        c.arg("--address").arg(&self.socket).args(args);
        c.env("KEEL_NAMESPACE", &self.namespace);
        c
    }

    /// Runs keelctl to completion with no stdin (at most [`ctl_timeout`]).
    pub fn ctl(&self, args: &[&str]) -> Output {
        let child = self
            .ctl_cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keelctl");
        finish_within(child, args)
    }

    /// Runs keelctl with `input` on its stdin (written from a thread, so large input
    /// cannot deadlock against its output); returns its output.
    pub fn ctl_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .ctl_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keelctl");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = finish_within(child, args);
        // A process that exits without reading everything breaks the pipe; that is
        // its business, not a failure here.
        let _ = writer.join();
        out
    }

    /// Runs keelctl and asserts success; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "keelctl {args:?} failed: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Runs keelctl, asserts failure with stderr containing `want`; returns stderr.
    pub fn ctl_err(&self, args: &[&str], want: &str) -> String {
        let out = self.ctl(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "keelctl {args:?} should fail: {}",
            describe(&out)
        );
        assert!(
            err.contains(want),
            "keelctl {args:?}: stderr lacks {want:?}: {err}"
        );
        err
    }

    /// Asserts the daemon still answers.
    pub fn assert_serving(&self) {
        let out = self.ctl(&["version"]);
        assert!(
            out.status.success(),
            "keeld stopped serving: {}\nlog:\n{}",
            describe(&out),
            self.log()
        );
    }
}

impl Drop for Keeld {
    /// Kills the daemon, then everything it may have left running (a failed test
    /// leaves tasks behind): containers through runc, shims, mounts, cgroups.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let runc_root = self.state.join("runc");
        if let Ok(namespaces) = std::fs::read_dir(&runc_root) {
            for ns in namespaces.flatten() {
                let list = Command::new("runc")
                    .arg("--root")
                    .arg(ns.path())
                    .args(["list", "-q"])
                    .output();
                let ids = list
                    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                    .unwrap_or_default();
                for id in ids.lines() {
                    let _ = Command::new("runc")
                        .arg("--root")
                        .arg(ns.path())
                        .args(["delete", "--force", id])
                        .stderr(Stdio::null())
                        .output();
                }
            }
        }
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--"])
            .arg(format!("-address {}", self.socket.display()))
            .status();
        let prefix = self.dir.path().display().to_string();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            for target in mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|t| t.starts_with(&prefix))
            {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        // Whatever still runs in the tasks' cgroups (keel's shim keeps no runc
        // state, and a container outlives a killed shim): thawed, then killed.
        let ns_dir = |ctrl: &str| {
            Path::new("/sys/fs/cgroup")
                .join(ctrl)
                .join("keel")
                .join(&self.namespace)
        };
        if let Ok(ids) = std::fs::read_dir(ns_dir("freezer")) {
            for id in ids.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::write(id.path().join("freezer.state"), "THAWED");
            }
        }
        for _ in 0..50 {
            let mut left = false;
            if let Ok(ids) = std::fs::read_dir(ns_dir("pids")) {
                for id in ids.flatten().filter(|e| e.path().is_dir()) {
                    let procs =
                        std::fs::read_to_string(id.path().join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        left = true;
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(ctrls) = std::fs::read_dir("/sys/fs/cgroup") {
            for ctrl in ctrls.flatten() {
                let ns = ctrl.path().join("keel").join(&self.namespace);
                if let Ok(ids) = std::fs::read_dir(&ns) {
                    for id in ids.flatten().filter(|e| e.path().is_dir()) {
                        let _ = std::fs::remove_dir(id.path());
                    }
                }
                let _ = std::fs::remove_dir(&ns);
            }
        }
    }
}

/// How long one keelctl may run in a test before it fails the test:
/// `KEEL_TEST_CTL_TIMEOUT` seconds, 180 by default. A lost exit or a stalled
/// request then fails fast, naming the command that waited, instead of hanging
/// the suite.
pub fn ctl_timeout() -> Duration {
    let secs = std::env::var("KEEL_TEST_CTL_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    Duration::from_secs(secs)
}

/// Waits for a keelctl with piped output; past [`ctl_timeout`] kills it and
/// panics with what it was doing and what it had printed.
pub fn finish_within(child: Child, args: &[&str]) -> Output {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let limit = ctl_timeout();
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for keelctl"),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let out = rx.recv().ok().and_then(Result::ok);
            panic!(
                "keelctl {args:?} did not finish within {limit:?} (waiting for keeld: a lost exit or a stalled request?); it printed: {}",
                out.as_ref().map(describe).unwrap_or_default()
            );
        }
    }
}

/// A readable account of a finished command.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?} (signal {:?})\nstdout: {}\nstderr: {}",
        out.status.code(),
        out.status.signal(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where tests put daemons and data: on disk, not tmpfs (`KEEL_TEST_SCRATCH` overrides).
pub fn scratch_dir() -> PathBuf {
    let d = std::env::var_os("KEEL_TEST_SCRATCH")
        .map_or_else(|| PathBuf::from("/var/tmp/keel-tests"), PathBuf::from);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A file of `len` pseudo-random bytes and its sha256 digest (`sha256:<hex>`), as the
/// system's `sha256sum` computes it.
pub fn random_file(dir: &Path, name: &str, len: u64, seed: u64) -> (PathBuf, String) {
    use rand::{RngCore, SeedableRng};
    let path = dir.join(name);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut f =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).expect("create"));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap();
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    drop(f);
    (path.clone(), sha256sum(&path))
}

/// `sha256:<hex>` of a file, computed by the system's sha256sum.
pub fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum: {}", describe(&out));
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    format!("sha256:{hex}")
}

/// A busybox root filesystem (from Debian's busybox-static), built once per test run.
pub fn busybox_rootfs() -> PathBuf {
    static ROOTFS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let busybox = Path::new("/bin/busybox");
            assert!(
                busybox.exists(),
                "/bin/busybox is missing: run deploy/install-deps.sh (busybox-static)"
            );
            // Built aside and renamed into place, so runs share one and never see
            // a half-built one.
            let dir = scratch_dir().join("rootfs");
            if dir.join("bin/busybox").exists() {
                return dir;
            }
            // One without busybox is broken (emptied by hand): built again.
            let _ = std::fs::remove_dir_all(&dir);
            let tmp = scratch_dir().join(format!("rootfs.tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
                std::fs::create_dir_all(tmp.join(d)).unwrap();
            }
            std::fs::copy(busybox, tmp.join("bin/busybox")).unwrap();
            for applet in [
                "sh", "echo", "sleep", "true", "cat", "ls", "head", "dd", "yes",
            ] {
                std::os::unix::fs::symlink("busybox", tmp.join("bin").join(applet)).unwrap();
            }
            if std::fs::rename(&tmp, &dir).is_err() {
                // Another run put one in place first.
                std::fs::remove_dir_all(&tmp).unwrap();
            }
            dir
        })
        .clone()
}

/// A private copy of the busybox rootfs at `dir` (for containers that write into
/// their rootfs, or get more in it).
pub fn private_rootfs(dir: &Path) -> PathBuf {
    let cp = Command::new("cp")
        .arg("-a")
        .arg(busybox_rootfs())
        .arg(dir)
        .output()
        .expect("cp");
    assert!(cp.status.success(), "{}", describe(&cp));
    dir.to_path_buf()
}

/// The runtime the suite runs its containers with: `KEEL_TEST_RUNTIME`, by
/// default keel's own shim, `io.containerd.keel.v1` (keeld's default);
/// `io.containerd.runc.v2` is containerd's shim with runc. Written into every
/// test keeld's configuration as its `default_runtime`.
pub fn test_runtime() -> String {
    std::env::var("KEEL_TEST_RUNTIME").unwrap_or_else(|_| "io.containerd.keel.v1".into())
}

/// Whether the suite runs on keel's own shim.
pub fn keel_shim() -> bool {
    test_runtime() == "io.containerd.keel.v1"
}

/// The shim binary of [`test_runtime`]: `containerd-shim-<name>-<version>`.
pub fn shim_binary() -> String {
    let rt = test_runtime();
    let mut parts = rt.rsplit('.');
    let version = parts.next().unwrap_or_default();
    let name = parts.next().unwrap_or_default();
    format!("containerd-shim-{name}-{version}")
}

/// Fails loudly when the runtime's parts are missing.
pub fn require_runtime() {
    require_root("running containers");
    if keel_shim() {
        let shim = bin_dir().join(shim_binary());
        assert!(
            shim.is_file(),
            "{} is not built: cargo build --workspace --bins",
            shim.display()
        );
        return;
    }
    require_runc();
}

/// Fails loudly when runc or containerd's runc shim is missing.
pub fn require_runc() {
    require_root("running containers");
    for bin in ["runc", "containerd-shim-runc-v2"] {
        assert!(
            on_path(bin).is_some(),
            "{bin} is not on PATH: run deploy/install-deps.sh"
        );
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where `bin` is on PATH, if it is.
pub fn on_path(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// A keeld for a test of containers that checkpoints, or `None` (the test
/// skipped loudly, see [`criu_or_skip`]) when CRIU does not work here.
pub fn keeld_for_checkpoints(test: &str) -> Option<Keeld> {
    require_runtime();
    criu_or_skip(test).then(Keeld::start)
}

/// Whether CRIU works on this machine (`criu check` passes). When it does not, the
/// test is skipped loudly: a banner on stderr and a line in `$KEEL_SKIP_LOG`, which
/// `deploy/test.sh` counts and prints in the run's summary. Callers return at once
/// on `false`.
pub fn criu_or_skip(test: &str) -> bool {
    let why = match Command::new("criu").arg("check").output() {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("criu check failed")
            .to_string(),
        Err(e) => format!("criu: {e}"),
    };
    eprintln!(
        "\n*** SKIPPED {test}: CRIU is not usable here ({why}); deploy/install-deps.sh provides one ***\n"
    );
    if let Some(log) = std::env::var_os("KEEL_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
    false
}

/// A `keelctl events --format json …` process whose events arrive on a channel.
#[derive(Debug)]
pub struct Subscriber {
    child: Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Subscriber {
    /// Starts `keelctl events --format json ARGS…` (filters, `--since`) against `k`.
    /// Without `--since`, it starts from keeld's newest event now (Events.Head),
    /// so an event published after this returns reaches it however soon: a live
    /// subscription would race its own start.
    pub fn spawn(k: &Keeld, args: &[&str]) -> Self {
        let mut all = vec!["events", "--format", "json"];
        let head;
        if !args.contains(&"--since") {
            head = k.head().to_string();
            all.extend_from_slice(&["--since", &head]);
        }
        all.extend_from_slice(args);
        let mut child = k
            .ctl_cmd(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keelctl events");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON event line ({e}): {line}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    /// Collects events until `done` matches one (returned last), or the timeout.
    pub fn until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> Option<Vec<serde_json::Value>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(e) => {
                    let stop = done(&e);
                    seen.push(e);
                    if stop {
                        return Some(seen);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Collects `n` events, or fewer if `timeout` passes first.
    pub fn take(&mut self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::with_capacity(n);
        while seen.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.lines.recv_timeout(left) {
                Ok(e) => seen.push(e),
                Err(_) => break,
            }
        }
        seen
    }

    /// Waits for the process to end on its own; returns the events it printed that
    /// were not taken yet, its exit status and its stderr.
    pub fn finish(mut self, timeout: Duration) -> (Vec<serde_json::Value>, ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            assert!(Instant::now() < deadline, "subscriber did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        let mut rest = Vec::new();
        while let Ok(e) = self.lines.recv_timeout(Duration::from_secs(2)) {
            rest.push(e);
        }
        (rest, status, err)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sequence numbers of JSON event lines.
/// The topics of one `run --rm` from beginning to end, in order.
pub const A_RUN_FROM_CREATE_TO_DELETE: [&str; 6] = [
    "/containers/create",
    "/tasks/create",
    "/tasks/start",
    "/tasks/exit",
    "/tasks/delete",
    "/containers/delete",
];

pub fn seqs(events: &[serde_json::Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

/// A one-thread tokio runtime for a test's own ttrpc calls.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

impl Keeld {
    /// Reads blob `digest` with keelctl and checks it hashes to its digest.
    pub fn verified_blob(&self, digest: &str) -> Vec<u8> {
        let out = self.ctl(&["content", "get", digest]);
        assert!(out.status.success(), "{}", describe(&out));
        let file = self.dir.path().join("blob");
        std::fs::write(&file, &out.stdout).expect("write the blob");
        assert_eq!(sha256sum(&file), digest, "blob does not verify");
        out.stdout
    }

    /// The CRIU options checkpoint `digest`'s index records for its restore.
    pub fn criu_restore_annotation(&self, digest: &str) -> String {
        let index: serde_json::Value =
            serde_json::from_slice(&self.verified_blob(digest)).expect("a checkpoint index");
        index["annotations"]["io.keel.checkpoint.criu-restore"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// `keelctl run -d --image-path IMAGE`: task `id` restored from the CRIU
    /// image directory `image` into a busybox container running `cmd` (what
    /// the container is; its process is the image's), with further keelctl
    /// `flags` (`--criu-work-path DIR`, `--runtime NAME`).
    pub fn run_from_image(&self, id: &str, image: &Path, flags: &[&str], cmd: &[&str]) -> Output {
        let rootfs = busybox_rootfs();
        let mut args = vec![
            "run",
            "-d",
            "--rootfs",
            rootfs.to_str().expect("rootfs path"),
            "--image-path",
            image.to_str().expect("image path"),
        ];
        args.extend_from_slice(flags);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctl(&args)
    }

    /// `keelctl run -d` of a task that sleeps for a day.
    pub fn run_detached(&self, id: &str) {
        let rootfs = busybox_rootfs();
        self.ctl_ok(&[
            "run",
            "-d",
            "--rootfs",
            rootfs.to_str().expect("rootfs path"),
            id,
            "sleep",
            "100000",
        ]);
    }

    /// Opens the socket's file modes to every uid, so that the peer-credential
    /// check is what decides, and returns a keelctl every uid can run: a copy next
    /// to the socket (the build's own may sit in a 0700 checkout).
    pub fn open_to_all_uids(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
        };
        mode(self.socket.parent().expect("socket dir"), 0o755);
        mode(&self.socket, 0o666);
        let keelctl = self.dir.path().join("keelctl");
        std::fs::copy(bin_dir().join("keelctl"), &keelctl).expect("copy keelctl");
        mode(&keelctl, 0o755);
        keelctl
    }

    /// The sequence number of the newest event keeld has delivered.
    pub fn head(&self) -> u64 {
        // On a thread of its own: callers may be inside a runtime already.
        std::thread::scope(|s| {
            s.spawn(|| {
                runtime().block_on(async {
                    let c = self.client(None).await;
                    c.events
                        .head(c.ctx(), &Default::default())
                        .await
                        .expect("Events.Head")
                        .sequence
                })
            })
            .join()
            .expect("head thread")
        })
    }

    /// A ttrpc client of this daemon in namespace `ns` (this daemon's own when `None`).
    pub async fn client(&self, ns: Option<&str>) -> keel_protocol::Client {
        keel_protocol::Client::connect(
            self.socket.to_str().expect("socket path"),
            Some(ns.unwrap_or(&self.namespace)),
        )
        .await
        .expect("connect to keeld")
    }

    /// Every event the daemon retains, replayed from the start through a
    /// subscription (up to a marker published for the purpose, left out).
    pub async fn replay(&self) -> Vec<keel_protocol::api::events::Envelope> {
        use keel_protocol::api::events::{PublishRequest, SubscribeRequest};
        let c = self.client(None).await;
        let marker = format!("/test/marker/{}", rand::random::<u64>());
        c.events
            .publish(
                c.ctx(),
                &PublishRequest {
                    topic: marker.clone(),
                    event: protobuf::MessageField::some(keel_protocol::types::json_any(
                        "google.protobuf.Struct",
                        vec![],
                    )),
                    ..Default::default()
                },
            )
            .await
            .expect("publish marker");
        let mut stream = c
            .events
            .subscribe(
                c.ctx(),
                &SubscribeRequest {
                    since: Some(0),
                    ..Default::default()
                },
            )
            .await
            .expect("subscribe");
        let mut out = Vec::new();
        loop {
            let e = tokio::time::timeout(Duration::from_secs(30), stream.recv())
                .await
                .expect("replay stalled")
                .expect("replay")
                .expect("the replay goes on");
            if e.topic == marker {
                return out;
            }
            out.push(e);
        }
    }

    /// VmRSS of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid().expect("keeld running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

/// Asks keeld for its Version every 20 ms from a connection of its own while a test
/// does something hostile, timing each answer: the daemon must keep serving
/// everyone else.
#[derive(Debug)]
pub struct VersionWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Duration>>>,
}

/// What a [`VersionWatch`] saw.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Every answer's time, sorted; a call that failed counts as 60 s.
    pub sorted: Vec<Duration>,
}

impl Latencies {
    pub fn quantile(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        // Indices of a few thousand samples are exact in a double.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((self.sorted.len() - 1) as f64 * q).round() as usize;
        self.sorted[i]
    }

    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }

    /// Asserts keeld answered throughout: at least `min` answers, none slower
    /// than a second (a daemon whose serving thread is held up stalls for
    /// longer). The percentiles are printed, not asserted: how fast keeld answers
    /// under this load is measured by `bench/limits.sh`, not in tests.
    pub fn assert_responsive(&self, what: &str, min: usize) {
        eprintln!(
            "{what}: Version answered {} times, p50 {:?}, p99 {:?}, max {:?}",
            self.sorted.len(),
            self.quantile(0.5),
            self.quantile(0.99),
            self.max()
        );
        assert!(
            self.sorted.len() >= min,
            "{what}: only {} Version answers",
            self.sorted.len()
        );
        assert!(
            self.max() <= Duration::from_secs(1),
            "{what}: a Version took {:?}",
            self.max()
        );
    }
}

impl VersionWatch {
    pub fn start(k: &Keeld) -> Self {
        let socket = k.socket.to_str().expect("socket path").to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = runtime();
            rt.block_on(async move {
                let mut seen = Vec::new();
                let mut client = None;
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    let t0 = Instant::now();
                    if client.is_none() {
                        client = keel_protocol::Client::connect(&socket, None).await.ok();
                    }
                    let answered = match &client {
                        Some(c) => {
                            tokio::time::timeout(Duration::from_secs(60), c.daemon_version())
                                .await
                                .is_ok_and(|r| r.is_ok())
                        }
                        None => false,
                    };
                    if answered {
                        seen.push(t0.elapsed());
                    } else {
                        seen.push(Duration::from_secs(60));
                        client = None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen
            })
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Latencies {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut sorted = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("watch thread");
        sorted.sort();
        Latencies { sorted }
    }
}

/// Topics of the events about task (or container) `id`, in order.
pub fn topics_about(events: &[keel_protocol::api::events::Envelope], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| {
            e.event.as_ref().is_some_and(|a| {
                keel_protocol::types::event_field(a, "container_id").as_deref() == Some(id)
                    || keel_protocol::types::event_field(a, "id").as_deref() == Some(id)
            })
        })
        .map(|e| e.topic.clone())
        .collect()
}

/// A keelctl on a terminal of its own (its stdin, stdout and stderr), with
/// everything the terminal shows collected as it arrives.
#[derive(Debug)]
pub struct CtlOnTerminal {
    child: Child,
    master: std::os::fd::OwnedFd,
    shown: std::sync::Arc<Mutex<Vec<u8>>>,
    reader: std::thread::JoinHandle<()>,
    args: Vec<String>,
}

fn winsize(cols: u16, rows: u16) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, nix::pty::Winsize);

impl CtlOnTerminal {
    /// Starts keelctl `args` against `k` on a fresh terminal of `cols` x `rows`.
    pub fn spawn(k: &Keeld, args: &[&str], cols: u16, rows: u16) -> Self {
        use std::io::Read;
        let pty = nix::pty::openpty(Some(&winsize(cols, rows)), None).expect("openpty");
        let slave = pty.slave;
        // The Command, and with it the parent's copies of the terminal, ends here.
        let child = k
            .ctl_cmd(args)
            .stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave))
            .spawn()
            .expect("spawn keelctl");
        let shown = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut master = std::fs::File::from(pty.master.try_clone().expect("dup"));
        let out = shown.clone();
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            // EIO once keelctl, the terminal's last user, is gone.
            while let Ok(n @ 1..) = master.read(&mut chunk) {
                out.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Self {
            child,
            master: pty.master,
            shown,
            reader,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// What the terminal has shown so far.
    pub fn shown(&self) -> String {
        String::from_utf8_lossy(&self.shown.lock().unwrap()).to_string()
    }

    /// Waits (at most 20 s) until the terminal shows `text`.
    pub fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.shown().contains(text) {
            assert!(
                Instant::now() < deadline,
                "keelctl {:?}: the terminal never showed {text:?}; it showed {:?}",
                self.args,
                self.shown()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resizes the terminal and tells keelctl, as a terminal emulator tells the
    /// terminal's foreground process (SIGWINCH).
    pub fn resize(&self, cols: u16, rows: u16) {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is the open master of a terminal and the pointer a
        // valid winsize that outlives the call.
        unsafe { set_winsize(self.master.as_raw_fd(), &winsize(cols, rows)) }.expect("TIOCSWINSZ");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGWINCH).expect("SIGWINCH");
    }

    /// Waits (at most [`ctl_timeout`]) for keelctl to exit; returns its exit code and
    /// everything the terminal showed.
    pub fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + ctl_timeout();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait for keelctl") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "keelctl {:?} on a terminal did not finish; it showed {:?}",
                    self.args,
                    self.shown()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        drop(self.master);
        self.reader.join().expect("the terminal's reader");
        let shown = String::from_utf8_lossy(&self.shown.lock().unwrap()).to_string();
        (status.code(), shown)
    }
}
