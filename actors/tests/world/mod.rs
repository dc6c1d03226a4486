//! A keeld's worth of actors on a temporary root, with the fake shim as runtime.

#![allow(dead_code)]

use std::time::{Duration, SystemTime};

use keel_actors::events::{EventOptions, EventSink};
use keel_actors::monitor::MonitorHandle;
use keel_actors::supervision::{Intensity, Strategy, SupervisionStats, Supervisor};
use keel_actors::task::{CreateTask, TaskEnv, TaskHandle, Tasks};
use keel_storage::meta::{nanos, ContainerRecord};
use keel_storage::Meta;
use tokio::sync::mpsc;

pub const NS: &str = "fake";
const RUNTIME: &str = "io.containerd.fake.v1";

/// The fake shim's directory first on PATH, where runtime names are resolved.
fn fake_shim_on_path() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let shim = std::path::Path::new(env!("CARGO_BIN_EXE_containerd-shim-fake-v1"));
        let dir = shim.parent().expect("bin dir");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        // Set once, before any task is created (and so before any lookup).
        std::env::set_var("PATH", std::env::join_paths(dirs).expect("PATH"));
    });
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub meta: Meta,
    pub events: EventSink,
    pub tasks: Tasks,
    pub stats: SupervisionStats,
    pub escalations: mpsc::UnboundedReceiver<keel_actors::supervision::Escalation>,
}

impl World {
    pub async fn new() -> Self {
        fake_shim_on_path();
        // Short paths: unix sockets live in the bundles.
        let dir = tempfile::Builder::new()
            .prefix("kf")
            .tempdir_in("/tmp")
            .unwrap();
        let root = dir.path().join("r");
        let db = keel_storage::open_db(&root).unwrap();
        let meta = Meta::open(db.clone()).unwrap();
        let events = EventSink::open(&root.join("events"), db, EventOptions::default()).unwrap();
        let (deaths, _) = mpsc::unbounded_channel();
        let monitor = MonitorHandle::start(meta.clone(), events.clone(), deaths);
        let tasks = Tasks::new(
            TaskEnv {
                meta: meta.clone(),
                monitor,
                events: events.clone(),
                state_dir: dir.path().join("s"),
                keel_socket: dir.path().join("keel.sock"),
                scratch_dir: root.join("scratch"),
                limits: keel_protocol::limits::Limits::default(),
            },
            actix::Arbiter::current(),
        );
        let stats = SupervisionStats::default();
        let (escalate, escalations) = mpsc::unbounded_channel();
        tasks.supervise(
            Supervisor::new(
                "tasks",
                Strategy::OneForOne,
                Intensity {
                    max: 3,
                    within: Duration::from_secs(60),
                },
                &stats,
            ),
            escalate,
        );
        Self {
            dir,
            meta,
            events,
            tasks,
            stats,
            escalations,
        }
    }

    /// A container and its task (Created), the fake shim playing `script`.
    pub async fn create(&self, id: &str, script: &str) -> TaskHandle {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["fake"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "annotations": {"keel.test/fake": script},
        });
        let now = nanos(SystemTime::now());
        let container = ContainerRecord {
            id: id.to_string(),
            labels: Default::default(),
            runtime: RUNTIME.to_string(),
            runtime_options: None,
            spec: serde_json::to_vec(&spec).unwrap(),
            rootfs: Vec::new(),
            created_ns: now,
            updated_ns: now,
        };
        self.meta.create_container(NS, &container).unwrap();
        let reservation = self.tasks.reserve(NS, id).unwrap();
        self.tasks
            .create(
                reservation,
                CreateTask {
                    namespace: NS.to_string(),
                    container,
                    stdin: String::new(),
                    stdout: String::new(),
                    stderr: String::new(),
                    terminal: false,
                    log_to_file: false,
                    checkpoint: None,
                    options: None,
                    rootfs: None,
                    runtime_path: None,
                },
            )
            .await
            .unwrap()
    }

    /// The topics of the task events logged about `id`, in order.
    pub fn lifecycle(&self, id: &str) -> Vec<String> {
        let (_, retained) = self.events.retained();
        retained
            .iter()
            .filter(|e| e.topic.starts_with("/tasks/"))
            .filter(|e| {
                e.event.as_ref().is_some_and(|a| {
                    keel_protocol::types::event_field(a, "container_id").as_deref() == Some(id)
                })
            })
            .map(|e| e.topic.clone())
            .collect()
    }

    /// Asserts the task events logged about `id`, waiting a moment for the last.
    pub fn assert_lifecycle(&self, id: &str, want: &[&str]) {
        for _ in 0..100 {
            if self.lifecycle(id) == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(self.lifecycle(id), want, "events of {id}");
    }
}

impl Drop for World {
    /// Ends the fake shims left running (a test that failed, or left a task).
    fn drop(&mut self) {
        let tasks = self.dir.path().join("s").join("tasks");
        for ns in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            for t in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let pid = std::fs::read_to_string(t.path().join("fake.pid")).unwrap_or_default();
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}
