//! Power cuts without a reboot: keeld's root on `keel-powercut` (a FUSE
//! filesystem that drops every byte and directory entry no fsync made durable
//! when it is unmounted), a workload that records what keeld acknowledged, and
//! a check, after each cut and restart, that all of it is there.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};
use serde_json::Value;

use crate::{bin_dir, describe, Keeld};

/// A mounted `keel-powercut`.
#[derive(Debug)]
pub struct PowerCut {
    child: Option<Child>,
    stdout: Option<BufReader<ChildStdout>>,
    pub mountpoint: PathBuf,
}

impl PowerCut {
    /// Mounts STORE's tree at `mountpoint` ("power on"), logging fsyncs to `log`.
    pub fn mount(store: &Path, mountpoint: &Path, log: &Path) -> Self {
        std::fs::create_dir_all(mountpoint).expect("mountpoint");
        let bin = bin_dir().join("keel-powercut");
        assert!(
            bin.exists(),
            "{} is missing: cargo build --workspace --bins",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .arg(store)
            .arg(mountpoint)
            .arg(log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn keel-powercut");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("keel-powercut's first line");
        assert_eq!(
            line.trim(),
            "mounted",
            "keel-powercut did not mount (is /dev/fuse there?)"
        );
        Self {
            child: Some(child),
            stdout: Some(stdout),
            mountpoint: mountpoint.to_path_buf(),
        }
    }

    fn control(&self) -> PathBuf {
        self.mountpoint.join(".powercut")
    }

    /// Cut the power right after the `n`-th fsync from now (killing its caller).
    pub fn arm(&self, n: u64) {
        std::fs::write(self.control(), format!("arm {n}")).expect("arm");
    }

    /// fsyncs made durable since this mount.
    pub fn fsyncs(&self) -> u64 {
        let status = std::fs::read_to_string(self.control()).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("fsyncs "))
            .and_then(|n| n.parse().ok())
            .expect("fsync count")
    }

    /// Whether an armed cut has happened.
    pub fn is_cut(&self) -> bool {
        std::fs::read_to_string(self.control())
            .map(|s| s.contains("cut true"))
            .unwrap_or(true)
    }

    /// Unmounts: everything not durable is dropped. Returns keel-powercut's
    /// account of what it dropped.
    pub fn power_off(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match nix::mount::umount(&self.mountpoint) {
                Ok(()) => break,
                Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("unmount {}: {e}", self.mountpoint.display()),
            }
        }
        let mut rest = String::new();
        let _ = self
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut rest);
        let status = self.child.take().expect("child").wait().expect("wait");
        assert!(
            status.success(),
            "keel-powercut failed at power off: {rest}"
        );
        rest.trim().to_string()
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            let _ = c.wait();
        }
    }
}

/// What a task was acknowledged to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskAck {
    /// `run -d` answered: the task exists (running or, later, exited).
    Created,
    /// `tasks wait` answered with this exit status.
    Exited(u32),
    /// `tasks rm` answered: the task is gone, its container is not.
    TaskRemoved,
    /// `run --rm`, or `tasks rm` and `containers rm`, answered: both gone.
    Gone,
}

/// Everything keeld acknowledged, over every power cut so far.
#[derive(Debug, Default)]
pub struct Acked {
    /// Committed blobs: digest → size.
    pub blobs: BTreeMap<String, u64>,
    pub tasks: BTreeMap<String, TaskAck>,
    /// Events published on `/powerloss/N`: the Ns acknowledged.
    pub events: BTreeSet<u64>,
    /// Tasks a removal was asked of that never answered (keeld died under
    /// it): either outcome is right for them.
    pub indeterminate: BTreeSet<String>,
    next: u64,
}

/// What one check found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Checked {
    pub blobs: usize,
    pub tasks: usize,
    pub events: usize,
    /// Acknowledged events not in the log but inside a gap notice's range.
    pub events_in_gaps: usize,
}

impl Acked {
    fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// One step of the workload: an ingest, a publish, a `run --rm`, a detached
/// run waited for, or the removal of an exited task. Records what keeld
/// acknowledged; a failed request (keeld dying under it) acknowledges nothing.
pub fn step(k: &Keeld, rootfs: &Path, acked: &Mutex<Acked>, rng: &mut impl Rng) {
    let n = acked.lock().unwrap().next_id();
    match rng.gen_range(0..10) {
        0..=4 => {
            let len = rng.gen_range(1..=64 * 1024);
            let mut bytes = vec![0u8; len];
            rng.fill_bytes(&mut bytes);
            let out = k.ctl_with_stdin(&["content", "ingest", &format!("pl-{n}")], &bytes);
            if out.status.success() {
                let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
                acked.lock().unwrap().blobs.insert(digest, len as u64);
            }
        }
        5..=6 => {
            let topic = format!("/powerloss/{n}");
            let out = k.ctl_with_stdin(&["events", "publish", "--topic", &topic], b"{}");
            if out.status.success() {
                acked.lock().unwrap().events.insert(n);
            }
        }
        7 => {
            let id = format!("rm{n}");
            let rootfs = rootfs.to_str().unwrap();
            let out = k.ctl(&[
                "run",
                "--rm",
                "--rootfs",
                rootfs,
                &id,
                "/bin/busybox",
                "true",
            ]);
            if out.status.success() {
                acked.lock().unwrap().tasks.insert(id, TaskAck::Gone);
            }
        }
        8 => {
            let id = format!("d{n}");
            let code = n % 100;
            let rootfs = rootfs.to_str().unwrap();
            let cmd = format!("exit {code}");
            let out = k.ctl(&[
                "run",
                "-d",
                "--rootfs",
                rootfs,
                &id,
                "/bin/busybox",
                "sh",
                "-c",
                &cmd,
            ]);
            if !out.status.success() {
                return;
            }
            acked
                .lock()
                .unwrap()
                .tasks
                .insert(id.clone(), TaskAck::Created);
            // `tasks wait` prints the exit status and exits with it; on an error
            // it prints nothing on stdout.
            let out = k.ctl(&["tasks", "wait", &id]);
            if let Ok(status) = String::from_utf8_lossy(&out.stdout).trim().parse::<u32>() {
                assert_eq!(u64::from(status), code, "{id}'s exit status");
                acked
                    .lock()
                    .unwrap()
                    .tasks
                    .insert(id, TaskAck::Exited(status));
            }
        }
        _ => {
            let exited = {
                let a = acked.lock().unwrap();
                a.tasks
                    .iter()
                    .find(|(id, t)| {
                        matches!(t, TaskAck::Exited(_)) && !a.indeterminate.contains(*id)
                    })
                    .map(|(id, _)| id.clone())
            };
            if let Some(id) = exited {
                if !k.ctl(&["tasks", "rm", &id]).status.success() {
                    acked.lock().unwrap().indeterminate.insert(id);
                    return;
                }
                acked
                    .lock()
                    .unwrap()
                    .tasks
                    .insert(id.clone(), TaskAck::TaskRemoved);
                if k.ctl(&["containers", "rm", &id]).status.success() {
                    acked.lock().unwrap().tasks.insert(id, TaskAck::Gone);
                } else {
                    acked.lock().unwrap().indeterminate.insert(id);
                }
            }
        }
    }
}

/// Runs steps until `stop` is set or keeld stops answering.
pub fn workload(k: &Keeld, rootfs: &Path, acked: &Mutex<Acked>, stop: &AtomicBool, seed: u64) {
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
    while !stop.load(Ordering::SeqCst) {
        step(k, rootfs, acked, &mut rng);
    }
}

/// After a power cut and a restart: every acknowledged blob is listed with its
/// size and intact (keeld re-hashes every blob: `content fsck`), every
/// acknowledged task is as acknowledged, every acknowledged event is in the log
/// (or, for events of other topics than keel's own, inside the range of a gap
/// notice), and the log agrees with the records: each listed task has its
/// `/tasks/create` and `/tasks/start`, each exited one its `/tasks/exit`, each
/// removed one its `/tasks/delete` and `/containers/delete`. Returns what was
/// checked, or every loss found.
pub fn check(k: &Keeld, acked: &Acked) -> Result<Checked, Vec<String>> {
    let mut losses = Vec::new();
    let mut checked = Checked::default();

    let fsck = k.ctl(&["content", "fsck"]);
    if !fsck.status.success() {
        losses.push(format!("content fsck: {}", describe(&fsck)));
    }
    let listed: BTreeMap<String, u64> =
        json_lines(&k.ctl_ok(&["content", "ls", "--format", "json"]))
            .iter()
            .map(|b| {
                (
                    b["digest"].as_str().unwrap().to_string(),
                    b["size"].as_u64().unwrap(),
                )
            })
            .collect();
    for (digest, size) in &acked.blobs {
        match listed.get(digest) {
            Some(s) if s == size => checked.blobs += 1,
            Some(s) => losses.push(format!("blob {digest}: size {s}, acknowledged {size}")),
            None => losses.push(format!("blob {digest} ({size} bytes) lost")),
        }
    }

    let tasks: BTreeMap<String, Value> =
        json_lines(&k.ctl_ok(&["tasks", "ls", "--format", "json"]))
            .into_iter()
            .map(|t| (t["id"].as_str().unwrap_or_default().to_string(), t))
            .collect();
    let containers: BTreeSet<String> =
        json_lines(&k.ctl_ok(&["containers", "ls", "--format", "json"]))
            .iter()
            .map(|c| c["id"].as_str().unwrap_or_default().to_string())
            .collect();
    let log = crate::runtime().block_on(k.replay());
    // Each event's payload decoded once: the topics about each id, in order.
    let mut about: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in &log {
        let Some(a) = e.event.as_ref() else { continue };
        let ids: BTreeSet<String> = ["container_id", "id"]
            .iter()
            .filter_map(|f| keel_protocol::types::event_field(a, f))
            .collect();
        for id in ids {
            about.entry(id).or_default().push(e.topic.clone());
        }
    }
    for (id, ack) in &acked.tasks {
        let t = tasks.get(id);
        let seen = about.get(id).cloned().unwrap_or_default();
        let has = |topic: &str| seen.iter().any(|s| s == topic);
        let maybe = acked.indeterminate.contains(id);
        let removed = t.is_none() && has("/tasks/exit") && has("/tasks/delete");
        let ok = match ack {
            TaskAck::Created => t.is_some() && has("/tasks/create") && has("/tasks/start"),
            TaskAck::Exited(code) => {
                (t.is_some_and(|t| {
                    t["status"] == "STOPPED" && t["exit_status"].as_u64() == Some(u64::from(*code))
                }) && has("/tasks/exit"))
                    || (maybe && removed)
            }
            TaskAck::TaskRemoved => {
                removed && (containers.contains(id) || (maybe && has("/containers/delete")))
            }
            TaskAck::Gone => {
                t.is_none()
                    && !containers.contains(id)
                    && has("/tasks/exit")
                    && has("/tasks/delete")
                    && has("/containers/delete")
            }
        };
        if ok {
            checked.tasks += 1;
        } else {
            losses.push(format!(
                "task {id}: acknowledged {ack:?}; listed {t:?}, container listed {}, in the log {seen:?}",
                containers.contains(id)
            ));
        }
    }

    let mut present: BTreeMap<u64, u64> = BTreeMap::new();
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    for e in &log {
        if let Some(n) = e
            .topic
            .strip_prefix("/powerloss/")
            .and_then(|n| n.parse().ok())
        {
            present.insert(n, e.sequence);
        }
        if e.topic == "/keel/events/gap" {
            let field = |f: &str| {
                e.event
                    .as_ref()
                    .and_then(|a| keel_protocol::types::event_field(a, f))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if let (Some(after), Some(before)) = (field("lost_after"), field("lost_before")) {
                gaps.push((after, before));
            }
        }
    }
    for n in &acked.events {
        if present.contains_key(n) {
            checked.events += 1;
            continue;
        }
        // Lost with a crash: its neighbours in the log bound its sequence number,
        // and a gap notice must name a range inside those bounds.
        let below = present.range(..n).next_back().map_or(0, |(_, s)| *s);
        let above = present.range(n..).next().map_or(u64::MAX, |(_, s)| *s);
        if gaps
            .iter()
            .any(|(after, before)| *before > below && *after < above)
        {
            checked.events_in_gaps += 1;
        } else {
            losses.push(format!(
                "event /powerloss/{n} lost with no gap notice between sequence numbers {below} and {above}"
            ));
        }
    }
    if losses.is_empty() {
        Ok(checked)
    } else {
        Err(losses)
    }
}

/// What one power cut did.
#[derive(Debug, Clone)]
pub struct Cut {
    /// The last fsync made durable before the cut, as keel-powercut logged it.
    pub after: String,
    /// What keel-powercut dropped.
    pub dropped: String,
}

/// A keeld whose root is on keel-powercut, its power cut again and again, and
/// everything it acknowledged over all of them.
#[derive(Debug)]
pub struct Node {
    pub k: Keeld,
    store: PathBuf,
    mountpoint: PathBuf,
    log: PathBuf,
    rootfs: PathBuf,
    fs: Option<PowerCut>,
    pub acked: Mutex<Acked>,
}

impl Node {
    /// Mounts a fresh store and starts keeld with its root there.
    pub fn start() -> Self {
        crate::require_root("a power cut (FUSE mount)");
        crate::require_runtime();
        let mut k = Keeld::unstarted("");
        let base = k.dir.path().join("power");
        let (store, mountpoint, log) =
            (base.join("store"), base.join("mnt"), base.join("fsync.log"));
        let fs = PowerCut::mount(&store, &mountpoint, &log);
        k.root = mountpoint.join("root");
        k.spawn();
        Self {
            k,
            store,
            mountpoint,
            log,
            rootfs: crate::busybox_rootfs(),
            fs: Some(fs),
            acked: Mutex::new(Acked::default()),
        }
    }

    fn fs(&self) -> &PowerCut {
        self.fs.as_ref().expect("powered on")
    }

    /// The fsync log's last line naming an fsync.
    fn last_fsync(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .rev()
            .find(|l| l.starts_with("fsync ") || l.starts_with("cut after"))
            .unwrap_or("none")
            .to_string()
    }

    fn power_off(&mut self) -> Cut {
        self.k.kill9();
        let after = self.last_fsync();
        let dropped = self.fs.take().expect("powered on").power_off();
        Cut { after, dropped }
    }

    /// Runs the workload on `threads` threads for `run_for`, then cuts the
    /// power: keeld killed with SIGKILL wherever it is, the filesystem
    /// unmounted.
    pub fn random_cut(&mut self, run_for: Duration, threads: u64, seed: u64) -> Cut {
        let stop = AtomicBool::new(false);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.k.pid().expect("keeld")).unwrap());
        std::thread::scope(|s| {
            for t in 0..threads {
                let (k, rootfs, acked, stop) = (&self.k, &self.rootfs, &self.acked, &stop);
                s.spawn(move || workload(k, rootfs, acked, stop, seed * 31 + t));
            }
            std::thread::sleep(run_for);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            stop.store(true, Ordering::SeqCst);
        });
        self.power_off()
    }

    /// How many fsyncs one content commit of `len` bytes takes on this node now.
    pub fn fsyncs_per_commit(&mut self, len: usize) -> u64 {
        let before = self.fs().fsyncs();
        self.commit(len, u64::MAX);
        self.fs().fsyncs() - before
    }

    fn commit(&self, len: usize, seed: u64) -> bool {
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        let n = self.acked.lock().unwrap().next_id();
        let out = self
            .k
            .ctl_with_stdin(&["content", "ingest", &format!("commit-{n}")], &bytes);
        if out.status.success() {
            let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
            self.acked.lock().unwrap().blobs.insert(digest, len as u64);
        }
        out.status.success()
    }

    /// Cuts the power right after the `nth` fsync of a content commit: that
    /// fsync is durable, its caller (keeld) is killed before it hears back.
    /// Returns the cut, or None when the commit took fewer fsyncs (it was
    /// acknowledged; the power is cut after it anyway).
    pub fn cut_in_commit(&mut self, nth: u64, len: usize, seed: u64) -> (Cut, bool) {
        self.fs().arm(nth);
        let acknowledged = self.commit(len, seed);
        let hit = self.fs().is_cut();
        assert!(
            !(hit && acknowledged),
            "a commit was acknowledged although keeld was killed in the middle of it"
        );
        (self.power_off(), hit)
    }

    /// Power on: mount the store again, start keeld (sled, the content store
    /// and the event log must open), and check everything acknowledged.
    pub fn power_on_and_check(&mut self) -> Result<Checked, Vec<String>> {
        self.fs = Some(PowerCut::mount(&self.store, &self.mountpoint, &self.log));
        self.k.spawn();
        check(&self.k, &self.acked.lock().unwrap())
    }
}
