//! containerd-shim-fake-v1: a shim for keel's tests, with no container behind it.
//!
//! It keeps the shim v2 contract keel drives (the `start` and `delete`
//! subcommands, the `containerd.task.v2.Task` service on the socket `start`
//! prints), and plays a task whose timing a test scripts through the container's
//! spec (the `keel.test/fake` annotation, as JSON), so that the task
//! actor's races can be run without root, runc or a container:
//!
//! ```json
//! {"start_ms": 300, "exit_after_ms": 50, "exit_status": 3, "pause_ms": 200,
//!  "die_in": "Pause"}
//! ```
//!
//! - `start_ms`, `pause_ms`: how long Start and Pause take;
//! - `exit_after_ms`: the task exits on its own this long after Start, with
//!   `exit_status`;
//! - `die_in`: the shim process exits, unanswered, in this method (a shim dying
//!   in the middle of a request).
//!
//! Kill ends the task with 128 + the signal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use keel_protocol::containerd::api::{self, Status};
use keel_protocol::containerd::shim_async::{create_task, Task};
use keel_protocol::protobuf::well_known_types::empty::Empty;
use keel_protocol::protobuf::{Message, MessageField};
use keel_protocol::shim::TASK_SERVICE_V2;
use keel_protocol::types::timestamp;
use ttrpc::asynchronous::TtrpcContext;

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Script {
    start_ms: u64,
    exit_after_ms: Option<u64>,
    exit_status: u32,
    pause_ms: u64,
    die_in: Option<String>,
}

#[derive(Debug)]
struct Play {
    status: Status,
    exit: Option<(u32, SystemTime)>,
}

#[derive(Debug)]
struct Fake {
    bundle: PathBuf,
    pid: u32,
    script: Mutex<Script>,
    play: Mutex<Play>,
    exited: tokio::sync::watch::Sender<bool>,
}

fn failed<T>(code: ttrpc::Code, m: &str) -> ttrpc::Result<T> {
    Err(ttrpc::Error::RpcStatus(ttrpc::get_status(code, m)))
}

impl Fake {
    fn play(&self) -> std::sync::MutexGuard<'_, Play> {
        self.play.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scripted death, if this method is where the shim dies.
    fn maybe_die(&self, method: &str) {
        let die = self.script.lock().unwrap().die_in.as_deref() == Some(method);
        if die {
            std::process::exit(1);
        }
    }

    fn exit(&self, status: u32) {
        let mut p = self.play();
        if p.exit.is_none() {
            p.exit = Some((status, SystemTime::now()));
            p.status = Status::STOPPED;
            self.exited.send_replace(true);
        }
    }
}

/// The service: a shared [`Fake`].
#[derive(Debug, Clone)]
struct Shim(Arc<Fake>);

impl std::ops::Deref for Shim {
    type Target = Fake;

    fn deref(&self) -> &Fake {
        &self.0
    }
}

#[async_trait::async_trait]
impl Task for Shim {
    async fn connect(
        &self,
        _: &TtrpcContext,
        _: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        self.maybe_die("Connect");
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pid,
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _: &TtrpcContext,
        _: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        self.maybe_die("Create");
        let spec: serde_json::Value = std::fs::read(self.bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(script) = spec["annotations"]["keel.test/fake"].as_str() {
            *self.script.lock().unwrap() = serde_json::from_str(script).unwrap_or_default();
        }
        self.play().status = Status::CREATED;
        Ok(api::CreateTaskResponse {
            pid: self.pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _: &TtrpcContext,
        _: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        self.maybe_die("Start");
        let (start_ms, exit_after, status) = {
            let s = self.script.lock().unwrap();
            (s.start_ms, s.exit_after_ms, s.exit_status)
        };
        tokio::time::sleep(Duration::from_millis(start_ms)).await;
        self.play().status = Status::RUNNING;
        if let Some(ms) = exit_after {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                me.exit(status);
            });
        }
        Ok(api::StartResponse {
            pid: self.pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _: &TtrpcContext,
        _: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        self.maybe_die("State");
        let p = self.play();
        Ok(api::StateResponse {
            pid: self.pid,
            status: p.status.into(),
            exit_status: p.exit.map_or(0, |e| e.0),
            exited_at: p.exit.map(|e| timestamp(e.1)).into(),
            bundle: self.bundle.display().to_string(),
            ..Default::default()
        })
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        _: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        self.maybe_die("Wait");
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
        let (status, at) = self.play().exit.expect("exited");
        Ok(api::WaitResponse {
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        self.maybe_die("Kill");
        if self.play().exit.is_some() {
            return failed(ttrpc::Code::NOT_FOUND, "process already finished");
        }
        self.exit(128 + req.signal);
        Ok(Empty::new())
    }

    async fn pause(&self, _: &TtrpcContext, _: api::PauseRequest) -> ttrpc::Result<Empty> {
        self.maybe_die("Pause");
        let ms = self.script.lock().unwrap().pause_ms;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let mut p = self.play();
        if p.exit.is_some() {
            return failed(ttrpc::Code::FAILED_PRECONDITION, "container not running");
        }
        p.status = Status::PAUSED;
        Ok(Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, _: api::ResumeRequest) -> ttrpc::Result<Empty> {
        self.maybe_die("Resume");
        let mut p = self.play();
        if p.exit.is_some() {
            return failed(ttrpc::Code::FAILED_PRECONDITION, "container not running");
        }
        p.status = Status::RUNNING;
        Ok(Empty::new())
    }

    async fn pids(
        &self,
        _: &TtrpcContext,
        _: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        self.maybe_die("Pids");
        Ok(api::PidsResponse {
            processes: vec![api::ProcessInfo {
                pid: self.pid,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _: &TtrpcContext,
        _: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        self.maybe_die("Delete");
        let p = self.play();
        match p.exit {
            Some((status, at)) => Ok(api::DeleteResponse {
                pid: self.pid,
                exit_status: status,
                exited_at: MessageField::some(timestamp(at)),
                ..Default::default()
            }),
            None if p.status == Status::CREATED => Ok(api::DeleteResponse {
                pid: self.pid,
                ..Default::default()
            }),
            None => failed(
                ttrpc::Code::FAILED_PRECONDITION,
                "cannot delete a running task",
            ),
        }
    }

    async fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> ttrpc::Result<Empty> {
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            std::process::exit(0);
        });
        Ok(Empty::new())
    }
}

/// `-flag value` from the command line.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone())
}

fn serve(socket: &Path, bundle: &Path) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (exited, _) = tokio::sync::watch::channel(false);
        let fake = Arc::new(Fake {
            bundle: bundle.to_path_buf(),
            // A pid nothing else has: the task's process is made up.
            pid: 4_000_000 + std::process::id() % 100_000,
            script: Mutex::default(),
            play: Mutex::new(Play {
                status: Status::UNKNOWN,
                exit: None,
            }),
            exited,
        });
        let mut services = create_task(Arc::new(Shim(fake)));
        let service = services
            .drain()
            .map(|(_, s)| s)
            .next()
            .expect("one task service");
        let _ = std::fs::remove_file(socket);
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .register_service(std::collections::HashMap::from([(
                TASK_SERVICE_V2.to_string(),
                service,
            )]));
        server
            .start()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        std::fs::write(bundle.join("fake.pid"), std::process::id().to_string())?;
        std::future::pending::<()>().await;
        Ok(())
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bundle = std::env::current_dir().expect("working directory: the bundle");
    let socket = bundle.join("fake.sock");
    match args.last().map(String::as_str) {
        Some("start") => {
            let exe = std::env::current_exe().expect("own path");
            let mut c = std::process::Command::new(exe);
            c.arg("serve")
                .arg(&socket)
                .current_dir(&bundle)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            // SAFETY: setsid in the child before exec: async-signal-safe, no memory.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                    libc::setsid();
                    Ok(())
                });
            }
            c.spawn().expect("spawn the serving shim");
            for _ in 0..500 {
                if bundle.join("fake.pid").exists() {
                    print!("unix://{}", socket.display());
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            eprintln!("the fake shim did not start serving");
            std::process::exit(1);
        }
        Some("delete") => {
            if let Ok(pid) = std::fs::read_to_string(bundle.join("fake.pid")) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: a signal to a pid; no memory involved.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let r = api::DeleteResponse {
                pid: 0,
                exit_status: 137,
                exited_at: MessageField::some(timestamp(SystemTime::now())),
                ..Default::default()
            };
            use std::io::Write;
            let _ = std::io::stdout().write_all(&r.write_to_bytes().expect("encode"));
            let _ = flag(&args, "-id");
        }
        _ if args.get(1).map(String::as_str) == Some("serve") => {
            if let Err(e) = serve(Path::new(&args[2]), &bundle) {
                eprintln!("fake shim: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: containerd-shim-fake-v1 [flags] start|delete");
            std::process::exit(2);
        }
    }
}
