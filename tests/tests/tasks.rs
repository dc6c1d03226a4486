//! Containers and tasks through keelctl, real runc and the real
//! containerd-shim-runc-v2, on a busybox rootfs.

use std::process::Stdio;
use std::time::{Duration, Instant};

use keel_protocol::containerd::shim::oci::Options;
use keel_protocol::protobuf::well_known_types::any::Any;
use keel_protocol::protobuf::Message;
use keel_tests::{
    busybox_rootfs, describe, eventually, require_runtime, shim_binary, CtlOnTerminal, Keeld,
    Subscriber,
};

fn run(k: &Keeld, args: &[&str]) -> std::process::Output {
    let rootfs = busybox_rootfs();
    let mut a = vec!["run", "--rootfs", rootfs.to_str().unwrap()];
    a.extend_from_slice(args);
    k.ctl(&a)
}

/// Asserts nothing of task `id` is left: shim, socket, mount, bundle, runc state, cgroup.
fn assert_no_leaks(k: &Keeld, ns: &str, id: &str) {
    let shims = std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!(
                "{} -namespace {ns} -id {id} -address {}",
                shim_binary(),
                k.socket.display()
            ),
        ])
        .output()
        .unwrap();
    assert!(
        shims.stdout.is_empty(),
        "shim of {id} still running: {}",
        String::from_utf8_lossy(&shims.stdout)
    );
    assert!(
        !k.shim_socket_in(ns, id).exists(),
        "shim socket of {id} left behind"
    );
    let bundle = k.state.join("tasks").join(ns).join(id);
    assert!(!bundle.exists(), "bundle {} left behind", bundle.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(bundle.to_str().unwrap()),
        "mount under {} left behind",
        bundle.display()
    );
    let runc = std::process::Command::new("runc")
        .arg("--root")
        .arg(k.state.join("runc").join(ns))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&runc.stdout)
            .lines()
            .any(|l| l == id),
        "runc still knows {id}"
    );
    let left = task_cgroups(ns, id);
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

/// The cgroup directories of task `id` that exist, whatever the hierarchy: each
/// v1 controller's and the hybrid layout's `unified`, or the cgroup v2 root.
fn task_cgroups(ns: &str, id: &str) -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut candidates = vec![root.join("keel").join(ns).join(id)];
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        for h in hierarchies.flatten() {
            candidates.push(h.path().join("keel").join(ns).join(id));
        }
    }
    candidates.into_iter().filter(|p| p.is_dir()).collect()
}

#[test]
fn run_prints_output_and_exits_with_the_task_status() {
    require_runtime();
    let k = Keeld::start();
    let out = run(&k, &["--rm", "rt-echo", "/bin/busybox", "echo", "hello"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");

    let out = run(
        &k,
        &["--rm", "rt-exit7", "sh", "-c", "echo to-stderr >&2; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");

    // A task killed with SIGKILL reports 137.
    let out = run(&k, &["-d", "rt-kill", "sleep", "300"]);
    assert!(out.status.success(), "{}", describe(&out));
    k.ctl_ok(&["tasks", "kill", "-s", "SIGKILL", "rt-kill"]);
    let w = k.ctl(&["tasks", "wait", "rt-kill"]);
    assert_eq!(w.status.code(), Some(137), "{}", describe(&w));
    k.ctl_ok(&["tasks", "rm", "rt-kill"]);
    k.ctl_ok(&["containers", "rm", "rt-kill"]);
    for id in ["rt-echo", "rt-exit7", "rt-kill"] {
        assert_no_leaks(&k, &k.namespace, id);
    }
    assert!(
        k.ctl_ok(&["containers", "ls", "--format", "json"])
            .trim()
            .is_empty(),
        "--rm removed the containers"
    );
}

#[test]
fn stdin_is_forwarded_with_dash_i() {
    require_runtime();
    let k = Keeld::start();
    let rootfs = busybox_rootfs();
    let out = k.ctl_with_stdin(
        &[
            "run",
            "--rm",
            "-i",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "rt-cat",
            "cat",
        ],
        b"through the fifo\n",
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through the fifo\n");
}

#[test]
fn fifty_detached_tasks_listed_with_real_pids_then_removed_without_leaks() {
    require_runtime();
    let _g = keel_tests::heavy();
    let k = Keeld::start();
    let ids: Vec<String> = (0..50).map(|i| format!("many-{i}")).collect();
    for id in &ids {
        let out = run(
            &k,
            &["-d", id, "sh", "-c", &format!("echo {id}; sleep 600")],
        );
        assert!(
            out.status.success(),
            "{id}: {}\nlog:\n{}",
            describe(&out),
            k.log()
        );
    }
    let ls = k.ctl_ok(&["tasks", "ls", "--format", "json"]);
    let rows: Vec<serde_json::Value> = ls
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 50, "{ls}");
    for r in &rows {
        assert_eq!(r["status"], "RUNNING", "{r}");
        let pid = r["pid"].as_u64().unwrap();
        // The listed pid is the container's process: it lives in the task's cgroup.
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let want = format!("/keel/{}/{}", k.namespace, r["id"].as_str().unwrap());
        assert!(
            cgroup.lines().any(|l| l.ends_with(&want)),
            "pid {pid} of {} is not in {want}: {cgroup}",
            r["id"]
        );
        // Where assert_no_leaks looks for them after the delete: the cgroups
        // are found there while the task runs, so "none left" is not vacuous.
        let id = r["id"].as_str().unwrap();
        assert!(
            !task_cgroups(&k.namespace, id).is_empty(),
            "no cgroup directory of {id} found while it runs: {cgroup}"
        );
    }
    // Detached output went to the log file.
    assert_eq!(k.ctl_ok(&["tasks", "logs", "many-7"]), "many-7\n");
    for id in &ids {
        k.ctl_ok(&["tasks", "kill", "-s", "KILL", id]);
    }
    for id in &ids {
        let w = k.ctl(&["tasks", "wait", id]);
        assert_eq!(w.status.code(), Some(137), "{id}: {}", describe(&w));
        k.ctl_ok(&["tasks", "rm", id]);
        k.ctl_ok(&["containers", "rm", id]);
    }
    for id in &ids {
        assert_no_leaks(&k, &k.namespace, id);
    }
    assert!(k
        .ctl_ok(&["tasks", "ls", "--format", "json"])
        .trim()
        .is_empty());
}

#[test]
fn memory_limit_exceeded_exits_137() {
    require_runtime();
    let k = Keeld::start();
    // 16 MiB limit; the shell builds a string far larger than that.
    let out = run(
        &k,
        &[
            "--rm",
            "--memory-limit",
            "16777216",
            "rt-oom",
            "sh",
            "-c",
            "x=y; while true; do x=$x$x; done",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}\nlog:\n{}",
        describe(&out),
        k.log()
    );
    assert_no_leaks(&k, &k.namespace, "rt-oom");
}

/// Shuts down, in process `pid`, every socket connected to the unix socket `path`
/// (each duplicated with pidfd_getfd: shutdown acts on the connection, which both
/// descriptors share). Returns how many.
fn shut_down_connections(pid: u32, path: &std::path::Path) -> usize {
    use nix::sys::socket::{getpeername, shutdown, Shutdown, UnixAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: pidfd_open takes a pid and flags; a new descriptor or -1 comes back.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the descriptor was just returned to us and is owned here alone.
    let pidfd = unsafe { OwnedFd::from_raw_fd(i32::try_from(pidfd).unwrap()) };
    let mut n = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(target) = entry
            .file_name()
            .to_str()
            .and_then(|f| f.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process and
        // flags; a new descriptor of ours or -1 comes back.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        if fd < 0 {
            continue;
        }
        // SAFETY: as above, a fresh descriptor owned here alone.
        let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) };
        let peer = getpeername::<UnixAddr>(fd.as_raw_fd()).ok();
        if peer.as_ref().and_then(UnixAddr::path) == Some(path) {
            shutdown(fd.as_raw_fd(), Shutdown::Both).unwrap();
            n += 1;
        }
    }
    n
}

#[test]
fn a_broken_connection_to_a_live_shim_is_dialled_again() {
    require_runtime();
    let k = Keeld::start();
    let mut sub = subscribe(
        &k,
        &["topic==\"/tasks/exit\"", "topic==\"/containers/delete\""],
    );
    assert!(run(&k, &["-d", "rt-redial", "sleep", "600"])
        .status
        .success());
    let keeld = k.pid().expect("keeld runs");
    let broken = shut_down_connections(keeld, &k.shim_socket("rt-redial"));
    assert_eq!(broken, 1, "keeld's one connection to the shim");
    // The task keeps running and its shim answers through a new connection.
    eventually(Duration::from_secs(20), "the shim to answer again", || {
        k.ctl(&["tasks", "ps", "rt-redial"])
            .status
            .success()
            .then_some(())
    });
    let info = k.ctl_ok(&["tasks", "ls", "--format", "json"]);
    assert!(info.contains("\"RUNNING\""), "{info}");
    k.ctl_ok(&["tasks", "kill", "-s", "KILL", "rt-redial"]);
    let w = k.ctl(&["tasks", "wait", "rt-redial"]);
    assert_eq!(w.status.code(), Some(137), "{}", describe(&w));
    let exits = sub
        .until(Duration::from_secs(10), |e| {
            e["topic"] == "/tasks/exit" && e["event"]["containerId"] == "rt-redial"
        })
        .expect("exit event of rt-redial");
    let mut exits: Vec<_> = exits
        .into_iter()
        .filter(|e| e["event"]["containerId"] == "rt-redial")
        .collect();
    exits.extend(
        sub.take(16, Duration::from_secs(2))
            .into_iter()
            .filter(|e| e["event"]["containerId"] == "rt-redial"),
    );
    assert_eq!(exits.len(), 1, "one exit: {exits:#?}");
    assert_eq!(exits[0]["event"]["exitStatus"], 137);
    k.ctl_ok(&["tasks", "rm", "rt-redial"]);
    k.ctl_ok(&["containers", "rm", "rt-redial"]);
    assert_no_leaks(&k, &k.namespace, "rt-redial");
}

#[test]
fn sigkill_of_the_shim_stops_the_task_with_137_and_cleans_up() {
    require_runtime();
    let k = Keeld::start();
    let mut sub = subscribe(
        &k,
        &["topic==\"/tasks/exit\"", "topic==\"/containers/delete\""],
    );
    assert!(run(&k, &["-d", "rt-shim", "sleep", "600"]).status.success());
    let ls = k.ctl_ok(&["tasks", "ls", "--format", "json"]);
    let pid = serde_json::from_str::<serde_json::Value>(ls.trim()).unwrap()["pid"]
        .as_u64()
        .unwrap();
    let shim_pid = k.shim_pid("rt-shim");
    // An exec process, running when the shim dies, is reported too.
    let mut exec = k
        .ctl_cmd(&[
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            "rt-shim",
            "sleep",
            "600",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(20), "the exec process to run", || {
        let out = k.ctl(&["tasks", "info", "--exec-id", "e1", "rt-shim"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("\"RUNNING\"")
            .then_some(())
    });
    nix::sys::signal::kill(shim_pid, nix::sys::signal::Signal::SIGKILL).unwrap();

    let w = k.ctl(&["tasks", "wait", "rt-shim"]);
    assert_eq!(w.status.code(), Some(137), "{}", describe(&w));
    // Its exit is published exactly once, however many ways keel learned of it.
    let mut exits = sub
        .until(Duration::from_secs(10), |e| {
            e["topic"] == "/tasks/exit" && e["event"]["containerId"] == "rt-shim"
        })
        .expect("exit event of rt-shim");
    // Past a tick of the 10 s reconciler too, which checks every shim's process:
    // it must not publish the exit a second time.
    exits.extend(sub.take(64, Duration::from_secs(11)));
    let ids: Vec<_> = exits
        .iter()
        .filter(|e| e["topic"] == "/tasks/exit" && e["event"]["containerId"] == "rt-shim")
        .map(|e| {
            let status = e["event"]["exitStatus"].as_u64().unwrap_or(0);
            (e["event"]["id"].as_str().unwrap(), status)
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(ids, [("e1", 137), ("rt-shim", 137)], "{exits:#?}");
    let n = exits
        .iter()
        .filter(|e| e["topic"] == "/tasks/exit" && e["event"]["containerId"] == "rt-shim")
        .count();
    assert_eq!(n, 2, "one exit each: {exits:#?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let exec_status = loop {
        if let Some(st) = exec.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "keelctl tasks exec never returned"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exec_status.code(), Some(137));
    let ls = k.ctl_ok(&["tasks", "ls", "--format", "json"]);
    assert!(ls.contains("\"STOPPED\""), "{ls}");
    // The container's process went with its shim (the shim's delete kills it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if st.contains(") Z") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "container process {pid} survived its shim"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !k.shim_socket("rt-shim").exists(),
        "dead shim's socket removed"
    );
    k.ctl_ok(&["tasks", "rm", "rt-shim"]);
    k.ctl_ok(&["containers", "rm", "rt-shim"]);
    assert_no_leaks(&k, &k.namespace, "rt-shim");
}

#[test]
fn bad_input_gets_clear_errors_and_keeld_keeps_serving() {
    require_runtime();
    let k = Keeld::start();
    let long = "x".repeat(300);
    for (bad, why) in [
        ("", "must not be empty"),
        ("../x", "not a valid identifier"),
        (long.as_str(), "300 characters"),
        ("héllo", "not a valid identifier"),
    ] {
        let e = String::from_utf8_lossy(&run(&k, &[bad, "true"]).stderr).to_string();
        assert!(
            e.contains("invalid argument") && e.contains(why),
            "id {bad:?}: {e}"
        );
        k.assert_serving();
    }
    k.ctl_err(
        &[
            "run",
            "--rootfs",
            "/nonexistent/rootfs",
            "bad-rootfs",
            "true",
        ],
        "rootfs",
    );
    k.ctl_err(
        &[
            "run",
            "--rootfs",
            busybox_rootfs().to_str().unwrap(),
            "--runtime",
            "io.containerd.nope.v9",
            "bad-rt",
            "true",
        ],
        "not found: runtime",
    );

    // A spec that is not valid, through the API.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use keel_protocol::api::containers::*;
        let c = keel_protocol::Client::connect(k.socket.to_str().unwrap(), None)
            .await
            .unwrap();
        let container = Container {
            id: "bad-spec".into(),
            spec: protobuf::MessageField::some(keel_protocol::types::json_any(
                keel_protocol::types::SPEC_TYPE_URL,
                br#"{"ociVersion": 7}"#.to_vec(),
            )),
            rootfs: vec![keel_protocol::api::types::Mount {
                type_: "bind".into(),
                source: busybox_rootfs().display().to_string(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let req = CreateContainerRequest {
            container: protobuf::MessageField::some(container),
            ..Default::default()
        };
        let err = keel_protocol::Error::from(c.containers.create(c.ctx(), &req).await.unwrap_err());
        assert!(
            matches!(&err, keel_protocol::Error::InvalidArgument(m) if m.contains("spec")),
            "{err:?}"
        );
    });

    // Starting a running task; deleting a running task without force.
    assert!(run(&k, &["-d", "busy", "sleep", "600"]).status.success());
    let out = k.ctl(&["tasks", "start", "busy"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("already exists"),
        "{}",
        describe(&out)
    );
    // The Start call itself on a running task names the state.
    rt.block_on(async {
        use keel_protocol::api::tasks::StartRequest;
        let c = keel_protocol::Client::connect(k.socket.to_str().unwrap(), Some(&k.namespace))
            .await
            .unwrap();
        let req = StartRequest { container_id: "busy".into(), ..Default::default() };
        let err = keel_protocol::Error::from(c.tasks.start(c.ctx(), &req).await.unwrap_err());
        assert!(
            matches!(&err, keel_protocol::Error::FailedPrecondition(m) if m.contains("it is running")),
            "{err:?}"
        );
    });
    k.ctl_err(
        &["tasks", "rm", "busy"],
        "failed precondition: cannot delete task busy: it is running",
    );
    k.ctl_err(&["containers", "rm", "busy"], "failed precondition");
    k.assert_serving();
    k.ctl_ok(&["tasks", "rm", "-f", "busy"]);
    k.ctl_ok(&["containers", "rm", "busy"]);
    assert_no_leaks(&k, &k.namespace, "busy");
    for id in ["bad-rootfs", "bad-rt", "bad-spec"] {
        k.ctl_err(&["containers", "info", id], "not found");
    }
}

/// Subscribes, and returns once the subscription provably receives events (a
/// sentinel container's create and delete came through).
fn subscribe(k: &Keeld, filters: &[&str]) -> Subscriber {
    let mut s = Subscriber::spawn(k, filters);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("sentinel-{n}");
        k.ctl_ok(&[
            "containers",
            "create",
            "--rootfs",
            busybox_rootfs().to_str().unwrap(),
            &id,
            "true",
        ]);
        k.ctl_ok(&["containers", "rm", &id]);
        if s.until(Duration::from_millis(500), |e| {
            e["topic"] == "/containers/delete" && e["event"]["id"] == id.as_str()
        })
        .is_some()
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "subscriber never received events"
        );
    }
}

fn task_topics(events: &[serde_json::Value], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| {
            e["topic"].as_str().unwrap_or("").starts_with("/tasks/")
                && e["event"]["containerId"] == id
        })
        .map(|e| e["topic"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn each_task_event_arrives_once_and_in_order() {
    require_runtime();
    let k = Keeld::start();
    let ns_filter = format!("namespace=={}", k.namespace);
    let mut sub = subscribe(&k, &[&ns_filter]);
    for id in ["ev-a", "ev-b", "ev-c"] {
        let out = run(&k, &["--rm", id, "sh", "-c", "echo hi"]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    let events = sub
        .until(Duration::from_secs(20), |e| {
            e["topic"] == "/tasks/delete" && e["event"]["containerId"] == "ev-c"
        })
        .expect("events of ev-c's delete");
    for id in ["ev-a", "ev-b", "ev-c"] {
        assert_eq!(
            task_topics(&events, id),
            [
                "/tasks/create",
                "/tasks/start",
                "/tasks/exit",
                "/tasks/delete"
            ],
            "{id}: {events:#?}"
        );
    }
    // Sequence numbers strictly increase.
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // A short grace period: no task event arrives late (ev-c's container delete
    // may).
    let late = sub.take(64, Duration::from_millis(500));
    assert!(
        late.iter()
            .all(|e| !e["topic"].as_str().unwrap_or("").starts_with("/tasks/")),
        "late events: {late:#?}"
    );
}

#[test]
fn memory_limit_gives_an_oom_event_and_exit_137() {
    require_runtime();
    let k = Keeld::start();
    let mut sub = subscribe(
        &k,
        &[
            "topic==\"/tasks/oom\"",
            "topic==\"/tasks/exit\"",
            "topic==\"/containers/delete\"",
        ],
    );
    let out = run(
        &k,
        &[
            "--rm",
            "--memory-limit",
            "16777216",
            "oom-1",
            "sh",
            "-c",
            "x=y; while true; do x=$x$x; done",
        ],
    );
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    let events = sub
        .until(Duration::from_secs(20), |e| {
            e["topic"] == "/tasks/exit" && e["event"]["containerId"] == "oom-1"
        })
        .expect("exit event");
    let oom = sub.until(Duration::from_secs(2), |e| e["topic"] == "/tasks/oom");
    let all: Vec<_> = events.into_iter().chain(oom.unwrap_or_default()).collect();
    assert!(
        all.iter()
            .any(|e| e["topic"] == "/tasks/oom" && e["event"]["containerId"] == "oom-1"),
        "no /tasks/oom for oom-1: {all:#?}"
    );
    assert!(
        all.iter()
            .any(|e| e["topic"] == "/tasks/exit" && e["event"]["exitStatus"] == 137),
        "{all:#?}"
    );
}

#[test]
fn an_invalid_filter_is_rejected_at_subscribe_time() {
    let k = Keeld::start();
    k.ctl_err(&["events", "topic=="], "invalid argument: filter");
    k.ctl_err(&["events", "topic~=["], "invalid regular expression");
    k.assert_serving();
}

#[test]
fn delete_is_idempotent_and_a_failed_one_can_be_retried() {
    require_runtime();
    let k = Keeld::start();
    let out = run(&k, &["-d", "del-1", "sleep", "600"]);
    assert!(out.status.success(), "{}", describe(&out));
    k.ctl_err(&["tasks", "rm", "del-1"], "delete with force");
    // Still whole after the refused delete.
    let ls = k.ctl_ok(&["tasks", "ls"]);
    assert!(ls.contains("RUNNING"), "{ls}");
    k.ctl_ok(&["tasks", "rm", "-f", "del-1"]);
    k.ctl_err(&["tasks", "rm", "-f", "del-1"], "not found");
    k.ctl_ok(&["containers", "rm", "del-1"]);
    k.ctl_err(&["containers", "rm", "del-1"], "not found");
    assert_no_leaks(&k, &k.namespace, "del-1");

    // A delete cut short by a crash: its shim already shut down, the task record
    // still there. After the restart the task is STOPPED and a retried delete
    // finishes the job.
    let mut k = k;
    let out = run(&k, &["-d", "del-2", "sleep", "600"]);
    assert!(out.status.success(), "{}", describe(&out));
    let shim_pid = k.shim_pid("del-2");
    k.kill9();
    nix::sys::signal::kill(shim_pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    k.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !k.ctl_ok(&["tasks", "ls"]).contains("STOPPED") {
        assert!(Instant::now() < deadline, "del-2 not reported stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    k.ctl_ok(&["tasks", "rm", "del-2"]);
    k.ctl_ok(&["containers", "rm", "del-2"]);
    assert_no_leaks(&k, &k.namespace, "del-2");
}

/// The last number a counter task wrote to its log.
fn last_count(k: &Keeld, id: &str) -> u64 {
    k.ctl_ok(&["tasks", "logs", id])
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

#[test]
fn pause_stops_a_counter_and_resume_continues_it() {
    require_runtime();
    let k = Keeld::start();
    let mut sub = subscribe(
        &k,
        &[
            "topic~=^/tasks/(paused|resumed)",
            "topic==\"/containers/delete\"",
        ],
    );
    let counter = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done";
    let out = run(&k, &["-d", "count", "sh", "-c", counter]);
    assert!(out.status.success(), "{}", describe(&out));
    eventually(Duration::from_secs(10), "the counter to count", || {
        (last_count(&k, "count") >= 5).then_some(())
    });

    k.ctl_ok(&["tasks", "pause", "count"]);
    let ls = k.ctl_ok(&["tasks", "ls"]);
    assert!(ls.contains("PAUSED"), "{ls}");
    let frozen = last_count(&k, "count");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(last_count(&k, "count"), frozen, "a paused counter counted");
    k.ctl_err(&["tasks", "pause", "count"], "it is paused");

    k.ctl_ok(&["tasks", "resume", "count"]);
    eventually(Duration::from_secs(10), "the counter to go on", || {
        (last_count(&k, "count") > frozen + 5).then_some(())
    });
    let ls = k.ctl_ok(&["tasks", "ls"]);
    assert!(ls.contains("RUNNING"), "{ls}");
    k.ctl_err(&["tasks", "resume", "count"], "it is running");

    let events: Vec<_> = sub
        .take(2, Duration::from_secs(10))
        .into_iter()
        .filter(|e| e["topic"] != "/containers/delete")
        .collect();
    let topics: Vec<_> = events.iter().map(|e| e["topic"].clone()).collect();
    assert_eq!(topics, ["/tasks/paused", "/tasks/resumed"], "{events:#?}");
    assert!(events.iter().all(|e| e["event"]["containerId"] == "count"));

    // A paused task can still be killed and removed, leaving nothing behind.
    k.ctl_ok(&["tasks", "pause", "count"]);
    k.ctl_ok(&["tasks", "rm", "-f", "count"]);
    k.ctl_ok(&["containers", "rm", "count"]);
    assert_no_leaks(&k, &k.namespace, "count");
}

fn metrics(k: &Keeld, id: &str) -> serde_json::Value {
    let out = k.ctl_ok(&["tasks", "metrics", "--format", "json", id]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn metrics_follow_what_the_container_does() {
    require_runtime();
    let k = Keeld::start();
    // Idle until told (SIGUSR1), then busy: a CPU burner, one more process and
    // ~24 MB more memory. The idle sample is taken before the signal, so the
    // order does not depend on how fast the machine is.
    let script = "trap 'yes > /dev/null & x=$(head -c 24000000 /dev/zero | busybox tr \"\\0\" a); \
                  echo busy' USR1; echo ready; while true; do sleep 1; done";
    let out = run(
        &k,
        &[
            "-d",
            "--pids-limit",
            "50",
            "--memory-limit",
            "268435456",
            "busy-m",
            "sh",
            "-c",
            script,
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    eventually(Duration::from_secs(30), "the container to be ready", || {
        k.ctl_ok(&["tasks", "logs", "busy-m"])
            .contains("ready")
            .then_some(())
    });
    let idle = metrics(&k, "busy-m");
    assert_eq!(idle["pids_limit"], 50, "{idle}");
    assert_eq!(idle["memory_limit_bytes"], 268_435_456u64, "{idle}");
    assert!(idle["pids_current"].as_u64().unwrap() >= 1, "{idle}");
    k.ctl_ok(&["tasks", "kill", "-s", "SIGUSR1", "busy-m"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let busy = loop {
        let m = metrics(&k, "busy-m");
        let grew = |f: &str, by: u64| m[f].as_u64().unwrap() >= idle[f].as_u64().unwrap() + by;
        if grew("memory_usage_bytes", 20_000_000)
            && grew("cpu_usage_ns", 200_000_000)
            && grew("pids_current", 1)
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the work\nidle {idle}\nlast {m}\nlogs {}",
            k.ctl_ok(&["tasks", "logs", "busy-m"])
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("idle {idle}\nbusy {busy}");
    // The table form names the task.
    let table = k.ctl_ok(&["tasks", "metrics", "busy-m"]);
    assert!(
        table.contains("busy-m") && table.contains("MEMORY"),
        "{table}"
    );
    k.ctl_ok(&["tasks", "rm", "-f", "busy-m"]);
    k.ctl_err(&["tasks", "metrics", "busy-m"], "not found");
    k.ctl_ok(&["containers", "rm", "busy-m"]);
}

#[test]
fn lowering_the_memory_limit_makes_a_growing_container_oom() {
    require_runtime();
    let k = Keeld::start();
    let mut sub = subscribe(
        &k,
        &["topic==\"/tasks/oom\"", "topic==\"/containers/delete\""],
    );
    // ~8 MB at once; ~56 MB when told to grow (SIGUSR1), which happens only
    // after the update, so the order does not depend on timing.
    let script = "x=$(head -c 8000000 /dev/zero | busybox tr '\\0' a); \
                  trap 'y=$x$x$x$x$x$x; echo grown' USR1; echo ready; \
                  while true; do sleep 1; done";
    for id in ["grow-kept", "grow-cut"] {
        let out = run(
            &k,
            &["-d", "--memory-limit", "268435456", id, "sh", "-c", script],
        );
        assert!(out.status.success(), "{}", describe(&out));
    }
    for id in ["grow-kept", "grow-cut"] {
        eventually(Duration::from_secs(60), "the container to be ready", || {
            k.ctl_ok(&["tasks", "logs", id])
                .contains("ready")
                .then_some(())
        });
    }
    // Metrics' filters choose the tasks (the CLI asks for one and would take
    // whatever came first): asked through the API, with two tasks running.
    let metric_ids = |filters: &[&str]| -> Vec<String> {
        use keel_protocol::api::tasks::MetricsRequest;
        keel_tests::runtime().block_on(async {
            let c = k.client(None).await;
            let req = MetricsRequest {
                filters: filters.iter().map(|f| f.to_string()).collect(),
                ..Default::default()
            };
            let mut ids: Vec<String> = c
                .tasks
                .metrics(c.ctx(), &req)
                .await
                .expect("metrics")
                .metrics
                .iter()
                .map(|m| m.id.clone())
                .collect();
            ids.sort();
            ids
        })
    };
    assert_eq!(metric_ids(&[]), ["grow-cut", "grow-kept"]);
    assert_eq!(metric_ids(&["id==grow-cut"]), ["grow-cut"]);
    assert_eq!(
        metric_ids(&["id==grow-kept", "id==grow-cut"]),
        ["grow-cut", "grow-kept"]
    );
    assert_eq!(metric_ids(&["id~=^grow-k"]), ["grow-kept"]);
    assert!(metric_ids(&["id==none"]).is_empty());
    k.ctl_ok(&["tasks", "update", "--memory-limit", "33554432", "grow-cut"]);
    let cut = metrics(&k, "grow-cut");
    assert_eq!(cut["memory_limit_bytes"], 33_554_432u64, "{cut}");
    for id in ["grow-kept", "grow-cut"] {
        k.ctl_ok(&["tasks", "kill", "-s", "SIGUSR1", id]);
    }
    let waited = k.ctl(&["tasks", "wait", "grow-cut"]);
    assert_eq!(waited.status.code(), Some(137), "{}", describe(&waited));
    let oom = sub
        .until(Duration::from_secs(20), |e| {
            e["event"]["containerId"] == "grow-cut"
        })
        .expect("/tasks/oom for grow-cut");
    assert_eq!(oom.last().unwrap()["topic"], "/tasks/oom");
    assert!(!k.ctl_ok(&["tasks", "logs", "grow-cut"]).contains("grown"));
    // The same container without the update grows and keeps running.
    eventually(Duration::from_secs(60), "grow-kept to grow", || {
        k.ctl_ok(&["tasks", "logs", "grow-kept"])
            .contains("grown")
            .then_some(())
    });
    let kept = metrics(&k, "grow-kept");
    assert!(
        kept["memory_usage_bytes"].as_u64().unwrap() > 40_000_000,
        "{kept}"
    );
    let ls = k.ctl_ok(&["tasks", "ls"]);
    let kept = ls.lines().find(|l| l.starts_with("grow-kept")).unwrap();
    assert!(kept.contains("RUNNING"), "{ls}");

    // Bad input.
    k.ctl_err(&["tasks", "update", "grow-kept"], "nothing to update");
    k.ctl_err(
        &["tasks", "update", "--memory-limit=0", "grow-kept"],
        "positive",
    );
    k.ctl_err(
        &["tasks", "update", "--pids-limit", "9", "grow-cut"],
        "it is stopped",
    );
    k.ctl_err(
        &["tasks", "update", "--pids-limit", "9", "nope"],
        "not found",
    );
    k.ctl_err(&["tasks", "pause", "../x"], "invalid argument");
    k.ctl_err(&["tasks", "pause", "grow-cut"], "it is stopped");
    for id in ["grow-kept", "grow-cut"] {
        k.ctl_ok(&["tasks", "rm", "-f", id]);
        k.ctl_ok(&["containers", "rm", id]);
        assert_no_leaks(&k, &k.namespace, id);
    }
}

#[test]
fn exec_runs_a_process_in_a_running_task_with_its_own_exit() {
    require_runtime();
    let k = Keeld::start();
    let mut sub = subscribe(
        &k,
        &[
            "topic~=^/tasks/exec-.+",
            "topic==\"/tasks/exit\"",
            "topic==\"/containers/delete\"",
        ],
    );
    let out = run(&k, &["-d", "--env", "GREETING=hi", "ex", "sleep", "600"]);
    assert!(out.status.success(), "{}", describe(&out));

    // Output, exit status and the container's environment, as `ctr task exec`.
    let script = "echo $GREETING-from-exec; echo to-stderr >&2; exit 3";
    let out = k.ctl(&["tasks", "exec", "--exec-id", "e1", "ex", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi-from-exec\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");

    let events: Vec<_> = sub
        .until(Duration::from_secs(10), |e| e["topic"] == "/tasks/exit")
        .expect("the exec's exit event")
        .into_iter()
        .filter(|e| e["topic"] != "/containers/delete")
        .collect();
    let topics: Vec<_> = events
        .iter()
        .map(|e| e["topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        topics,
        ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"],
        "{events:#?}"
    );
    assert!(events.iter().all(|e| e["event"]["containerId"] == "ex"));
    assert_eq!(events[0]["event"]["execId"], "e1");
    assert_eq!(events[1]["event"]["execId"], "e1");
    let pid = &events[1]["event"]["pid"];
    assert!(pid.as_u64().unwrap() > 0, "{events:#?}");
    assert_eq!(
        events[2]["event"]["id"], "e1",
        "the exit carries the exec id"
    );
    assert_eq!(events[2]["event"]["pid"], *pid);
    assert_eq!(events[2]["event"]["exitStatus"], 3);

    // stdin is forwarded with -i; a deleted exec's id can be used again.
    let out = k.ctl_with_stdin(
        &["tasks", "exec", "-i", "--exec-id", "e1", "ex", "cat"],
        b"through stdin\n",
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through stdin\n");

    // A running exec: its id is taken, a signal reaches it, and its exit is its own.
    let long = k
        .ctl_cmd(&["tasks", "exec", "--exec-id", "long", "ex", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the long exec to start", || {
        sub.until(Duration::from_millis(100), |e| {
            e["topic"] == "/tasks/exec-started" && e["event"]["execId"] == "long"
        })
    });
    k.ctl_err(
        &["tasks", "exec", "--exec-id", "long", "ex", "true"],
        "already exists",
    );
    let info: serde_json::Value =
        serde_json::from_str(&k.ctl_ok(&["tasks", "info", "--exec-id", "long", "ex"])).unwrap();
    assert_eq!(info["exec_id"], "long", "{info}");
    assert_eq!(info["status"], "RUNNING", "{info}");
    assert!(info["pid"].as_u64().unwrap() > 0, "{info}");
    k.ctl_err(&["tasks", "info", "--exec-id", "nope", "ex"], "not found");
    k.ctl_err(&["tasks", "exec", "--exec-id", "", "ex", "true"], "exec_id");
    k.ctl_err(
        &["tasks", "exec", "--exec-id", "../x", "ex", "true"],
        "exec_id",
    );
    k.ctl_err(
        &["tasks", "kill", "-s", "KILL", "--exec-id", "nope", "ex"],
        "not found",
    );
    k.ctl_ok(&["tasks", "kill", "-s", "KILL", "--exec-id", "long", "ex"]);
    let out = long.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    let ls = k.ctl_ok(&["tasks", "ls"]);
    let line = ls.lines().find(|l| l.starts_with("ex ")).unwrap();
    assert!(line.contains("RUNNING"), "the task outlives its exec: {ls}");

    // Not in a task that is not running.
    k.ctl_ok(&["tasks", "kill", "-s", "KILL", "ex"]);
    let waited = k.ctl(&["tasks", "wait", "ex"]);
    assert_eq!(waited.status.code(), Some(137), "{}", describe(&waited));
    k.ctl_err(
        &["tasks", "exec", "--exec-id", "late", "ex", "true"],
        "it is stopped",
    );
    k.ctl_ok(&["tasks", "rm", "ex"]);
    k.ctl_ok(&["containers", "rm", "ex"]);
    assert_no_leaks(&k, &k.namespace, "ex");
}

/// Runs keelctl on a fresh terminal of `cols` x `rows`; returns its exit code and
/// everything the terminal showed.
fn ctl_on_terminal(k: &Keeld, args: &[&str], cols: u16, rows: u16) -> (Option<i32>, String) {
    CtlOnTerminal::spawn(k, args, cols, rows).finish()
}

#[test]
fn a_terminal_follows_the_size_of_keelctls_own() {
    require_runtime();
    let k = Keeld::start();
    let rootfs = busybox_rootfs();
    // Waits for keelctl's resize (busybox stty prints no size for a 0x0 terminal),
    // then reports the size and that it has a terminal.
    let script = "while [ -z \"$(busybox stty size 2>/dev/null)\" ]; do sleep 0.1; done; \
                  busybox stty size; busybox tty; exit 5";
    let (code, shown) = ctl_on_terminal(
        &k,
        &[
            "run",
            "--rm",
            "-t",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "tty-1",
            "sh",
            "-c",
            script,
        ],
        100,
        30,
    );
    assert_eq!(code, Some(5), "{shown}");
    assert!(shown.contains("30 100"), "{shown:?}");
    assert!(shown.contains("/dev/pts/"), "{shown:?}");

    // An exec process gets a terminal of its own.
    let out = run(&k, &["-d", "tty-2", "sleep", "600"]);
    assert!(out.status.success(), "{}", describe(&out));
    let (code, shown) = ctl_on_terminal(
        &k,
        &[
            "tasks",
            "exec",
            "-t",
            "--exec-id",
            "sh1",
            "tty-2",
            "sh",
            "-c",
            script,
        ],
        120,
        40,
    );
    assert_eq!(code, Some(5), "{shown}");
    assert!(shown.contains("40 120"), "{shown:?}");
    assert!(shown.contains("/dev/pts/"), "{shown:?}");

    // The terminal resized while the process runs: keelctl passes the new size on
    // and the process hears of it (SIGWINCH), as on a terminal of its own. Ready
    // once keelctl's first resize arrived (so keelctl follows SIGWINCH by then).
    let script = "while [ -z \"$(busybox stty size 2>/dev/null)\" ]; do sleep 0.1; done; \
                  trap 'echo size $(busybox stty size)' WINCH; echo ready; \
                  while true; do sleep 1; done";
    let term = CtlOnTerminal::spawn(
        &k,
        &[
            "tasks",
            "exec",
            "-t",
            "--exec-id",
            "sh2",
            "tty-2",
            "sh",
            "-c",
            script,
        ],
        80,
        24,
    );
    term.wait_for("ready");
    term.resize(100, 37);
    term.wait_for("size 37 100");
    k.ctl_ok(&["tasks", "kill", "-s", "9", "--exec-id", "sh2", "tty-2"]);
    let (code, shown) = term.finish();
    assert_eq!(code, Some(137), "{shown}");

    // A detached task has nowhere to show a terminal.
    k.ctl_err(
        &[
            "run",
            "-d",
            "-t",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "tty-3",
            "true",
        ],
        "cannot be used with",
    );
    k.ctl_ok(&["tasks", "rm", "-f", "tty-2"]);
    k.ctl_ok(&["containers", "rm", "tty-2"]);
    for id in ["tty-1", "tty-2"] {
        assert_no_leaks(&k, &k.namespace, id);
    }
}

const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done";

/// `tasks wait ID`: the exit status it printed, which is also its own exit
/// code; panics when it answered with an error instead.
fn waited(k: &Keeld, id: &str) -> u32 {
    let out = k.ctl(&["tasks", "wait", id]);
    let status: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("tasks wait {id} gave no status: {}", describe(&out)));
    assert_eq!(
        out.status.code(),
        Some(i32::try_from(status.min(255)).unwrap())
    );
    status
}

/// The first number a counter task wrote to its log.
fn first_count(k: &Keeld, id: &str) -> Option<u64> {
    k.ctl_ok(&["tasks", "logs", id])
        .lines()
        .find_map(|l| l.trim().parse().ok())
}

#[test]
fn checkpoint_and_restore_continue_a_counter_from_its_saved_value() {
    require_runtime();
    if !keel_tests::criu_or_skip("checkpoint_and_restore_continue_a_counter_from_its_saved_value") {
        return;
    }
    let k = Keeld::start();
    let mut sub = subscribe(
        &k,
        &[
            "topic==\"/tasks/checkpointed\"",
            "topic==\"/containers/delete\"",
        ],
    );
    // With a runtime option, which the checkpoint carries to the restore.
    let out = run(
        &k,
        &[
            "-d",
            "--no-new-keyring",
            "--memory-limit",
            "67108864",
            "cp-count",
            "sh",
            "-c",
            COUNTER,
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    eventually(Duration::from_secs(30), "the counter to count", || {
        (last_count(&k, "cp-count") >= 20).then_some(())
    });

    // Its processes are in a cgroup of their own in every hierarchy, so CRIU
    // dumps that cgroup only.
    assert_own_cgroups(&k, "cp-count");
    // A checkpoint that leaves the task running.
    let digest = k
        .ctl_ok(&["tasks", "checkpoint", "cp-count"])
        .trim()
        .to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let ls = k.ctl_ok(&["tasks", "ls"]);
    assert!(ls.contains("RUNNING"), "{ls}");
    let now = last_count(&k, "cp-count");
    eventually(Duration::from_secs(20), "the counter to go on", || {
        (last_count(&k, "cp-count") > now + 5).then_some(())
    });
    let event = sub
        .until(Duration::from_secs(20), |e| {
            e["event"]["containerId"] == "cp-count"
        })
        .expect("/tasks/checkpointed");
    assert_eq!(
        event.last().unwrap()["event"]["checkpoint"],
        digest.as_str()
    );

    // The index and every blob it references verify by digest; the index is a
    // collection root that references them all.
    let index: serde_json::Value = serde_json::from_slice(&k.verified_blob(&digest)).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    let manifests = index["manifests"].as_array().unwrap();
    let media: Vec<&str> = manifests
        .iter()
        .map(|m| m["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(
        media,
        [
            "application/vnd.containerd.container.criu.checkpoint.criu.tar",
            "application/vnd.containerd.container.checkpoint.config.v1+proto",
            "application/vnd.containerd.container.checkpoint.runtime.options+proto",
        ]
    );
    let info: serde_json::Value =
        serde_json::from_str(&k.ctl_ok(&["content", "info", &digest])).unwrap();
    assert!(
        info["labels"]["containerd.io/gc.root"].is_string(),
        "{info}"
    );
    // The options blob: the task's options as given (keel's own runc root is not
    // among them).
    let options = k.verified_blob(manifests[2]["digest"].as_str().unwrap());
    let options = <Any as Message>::parse_from_bytes(&options).unwrap();
    assert_eq!(options.type_url, "containerd.runc.v1.Options");
    let options = <Options as Message>::parse_from_bytes(&options.value).unwrap();
    assert!(
        options.no_new_keyring && options.root.is_empty(),
        "{options:?}"
    );
    for (i, m) in manifests.iter().enumerate() {
        let d = m["digest"].as_str().unwrap();
        let blob = k.verified_blob(d);
        assert_eq!(blob.len() as u64, m["size"].as_u64().unwrap());
        assert_eq!(
            info["labels"][format!("containerd.io/gc.ref.content.m.{i}")],
            d,
            "{info}"
        );
    }

    // A checkpoint that lets the task exit; the restore continues from it.
    let before = last_count(&k, "cp-count");
    let digest = k
        .ctl_ok(&["tasks", "checkpoint", "--exit", "cp-count"])
        .trim()
        .to_string();
    // The dump ended the process: Wait answers with its status (CRIU's kill).
    let status = waited(&k, "cp-count");
    assert_eq!(status, 137, "a task ended by its checkpoint");
    let ls = k.ctl_ok(&["tasks", "ls"]);
    assert!(ls.contains("STOPPED"), "{ls}");
    let last = last_count(&k, "cp-count");
    k.ctl_ok(&["tasks", "rm", "cp-count"]);
    k.ctl_ok(&["containers", "rm", "cp-count"]);
    assert_no_leaks(&k, &k.namespace, "cp-count");

    k.ctl_ok(&["run", "-d", "--checkpoint", &digest, "cp-restored"]);
    let first = eventually(Duration::from_secs(30), "the restored counter", || {
        first_count(&k, "cp-restored")
    });
    assert!(
        first > before && first <= last + 1,
        "the restored count starts at {first}, not after {before}..={last}"
    );
    eventually(
        Duration::from_secs(20),
        "the restored counter to go on",
        || (last_count(&k, "cp-restored") > first + 5).then_some(()),
    );
    // Its cgroup has the spec's limits.
    let (v1, v2) = (
        format!(
            "/sys/fs/cgroup/memory/keel/{}/cp-restored/memory.limit_in_bytes",
            k.namespace
        ),
        format!("/sys/fs/cgroup/keel/{}/cp-restored/memory.max", k.namespace),
    );
    let limit = std::fs::read_to_string(&v1)
        .or_else(|_| std::fs::read_to_string(&v2))
        .unwrap_or_default();
    assert_eq!(limit.trim(), "67108864", "the restored task's memory limit");
    // Its processes are in the new task's own cgroup, where ps finds them.
    assert_own_cgroups(&k, "cp-restored");
    if keel_tests::keel_shim() {
        // Its network namespace, made anew (runc's and keel's shims dump none),
        // has its loopback interface up, as a new container's has.
        let info: serde_json::Value =
            serde_json::from_str(&k.ctl_ok(&["tasks", "info", "cp-restored"])).unwrap();
        let pid = info["pid"].as_u64().unwrap().to_string();
        let out = std::process::Command::new("nsenter")
            .args(["-t", &pid, "-n", "ip", "-o", "link", "show", "lo"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(
            shown.contains(",UP"),
            "lo of the restored task: {}",
            describe(&out)
        );
    }

    // --image-path leaves the raw CRIU image in a directory instead; only in an
    // empty one, whose contents a refused checkpoint leaves alone.
    let used = k.dir.path().join("used-image-dir");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("mine"), b"kept").unwrap();
    let err = k.ctl_err(
        &[
            "tasks",
            "checkpoint",
            "--image-path",
            used.to_str().unwrap(),
            "cp-restored",
        ],
        "invalid argument",
    );
    assert!(err.contains("is not empty"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&used)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["mine"]);
    assert_eq!(std::fs::read(used.join("mine")).unwrap(), b"kept");
    let dir = k.dir.path().join("raw-image");
    let at = last_count(&k, "cp-restored");
    let printed = k.ctl_ok(&[
        "tasks",
        "checkpoint",
        "--image-path",
        dir.to_str().unwrap(),
        "cp-restored",
    ]);
    assert_eq!(printed, "");
    assert!(dir.join("descriptors.json").is_file());
    let ls = k.ctl_ok(&["tasks", "ls"]);
    assert!(ls.contains("RUNNING"), "{ls}");

    // That directory restores (the task's options name it, as containerd's
    // criu_image_path), into a container like the one checkpointed; CRIU works
    // in the given work path and the image stays where it was.
    let work = k.dir.path().join("criu-work");
    let from_dir = |id: &str, image: &std::path::Path| {
        k.run_from_image(
            id,
            image,
            &["--criu-work-path", work.to_str().unwrap()],
            &["sh", "-c", COUNTER],
        )
    };
    let out = from_dir("cp-raw", &dir);
    assert!(out.status.success(), "{}", describe(&out));
    let first = eventually(
        Duration::from_secs(30),
        "the counter restored from a directory",
        || first_count(&k, "cp-raw"),
    );
    assert!(
        first > at,
        "restored from a directory, it starts at {first}, not after {at}"
    );
    eventually(Duration::from_secs(20), "it to go on", || {
        (last_count(&k, "cp-raw") > first + 5).then_some(())
    });
    assert!(
        work.join("restore.log").is_file(),
        "CRIU did not work in --criu-work-path"
    );
    assert!(
        dir.join("inventory.img").is_file(),
        "the image directory was touched"
    );
    k.ctl_ok(&["tasks", "rm", "-f", "cp-raw"]);
    k.ctl_ok(&["containers", "rm", "cp-raw"]);
    assert_no_leaks(&k, &k.namespace, "cp-raw");
    let err = from_dir("cp-raw", &work);
    let err = String::from_utf8_lossy(&err.stderr).to_string();
    assert!(err.contains("holds no CRIU image"), "{err}");
    assert!(!k.ctl_ok(&["containers", "ls"]).contains("cp-raw"));

    k.ctl_ok(&["tasks", "rm", "-f", "cp-restored"]);
    k.ctl_ok(&["containers", "rm", "cp-restored"]);
    assert_no_leaks(&k, &k.namespace, "cp-restored");
    assert!(
        std::fs::read_dir(k.state.join("checkpoints").join(&k.namespace))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "checkpoint work directories left behind"
    );
}

/// keeld's PATH without any directory holding a `criu`.
fn path_without_criu() -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let kept: Vec<_> = std::env::split_paths(&path)
        .filter(|d| !d.join("criu").exists())
        .collect();
    for bin in ["runc", "containerd-shim-runc-v2"] {
        assert!(
            kept.iter().any(|d| d.join(bin).is_file()),
            "{bin} shares a directory with criu; cannot hide criu from keeld"
        );
    }
    std::env::join_paths(kept).unwrap().into_string().unwrap()
}

#[test]
fn checkpoint_without_criu_fails_clearly_and_the_task_keeps_running() {
    require_runtime();
    let path = path_without_criu();
    let k = Keeld::start_with_env(&[("PATH", &path)]);
    let out = run(&k, &["-d", "no-criu", "sh", "-c", COUNTER]);
    assert!(out.status.success(), "{}", describe(&out));
    eventually(Duration::from_secs(30), "the counter to count", || {
        (last_count(&k, "no-criu") >= 5).then_some(())
    });
    let err = k.ctl_err(&["tasks", "checkpoint", "no-criu"], "failed precondition");
    assert!(
        err.contains("CRIU >= 4.1") && err.contains("no criu"),
        "{err}"
    );
    // Running, not paused: it goes on counting.
    let ls = k.ctl_ok(&["tasks", "ls"]);
    assert!(ls.contains("RUNNING"), "{ls}");
    let now = last_count(&k, "no-criu");
    eventually(Duration::from_secs(20), "the counter to go on", || {
        (last_count(&k, "no-criu") > now + 5).then_some(())
    });

    // Bad input.
    k.ctl_err(&["tasks", "checkpoint", "nope"], "not found");
    k.ctl_err(&["tasks", "checkpoint", "../x"], "invalid argument");
    let rt = keel_tests::runtime();
    let e = rt.block_on(async {
        let c = k.client(None).await;
        let req = keel_protocol::api::tasks::CheckpointTaskRequest {
            container_id: "no-criu".into(),
            image_path: "relative/dir".into(),
            ..Default::default()
        };
        c.tasks.checkpoint(c.ctx(), &req).await.unwrap_err()
    });
    assert!(
        matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::INVALID_ARGUMENT
            && s.message().contains("image_path") && s.message().contains("absolute")),
        "{e:?}"
    );
    // A task with a terminal is refused for that, before CRIU is looked for.
    let term = run_on_terminal(&k, "cp-tty", "echo ready; sleep 600");
    term.wait_for("ready");
    let err = k.ctl_err(&["tasks", "checkpoint", "cp-tty"], "failed precondition");
    assert!(err.contains("it has a terminal"), "{err}");
    k.ctl_ok(&["tasks", "kill", "-s", "KILL", "cp-tty"]);
    let (code, shown) = term.finish();
    assert_eq!(code, Some(137), "{shown}");
    k.ctl_ok(&["tasks", "rm", "cp-tty"]);
    k.ctl_ok(&["containers", "rm", "cp-tty"]);
    k.ctl_ok(&["tasks", "kill", "-s", "KILL", "no-criu"]);
    assert_eq!(waited(&k, "no-criu"), 137);
    k.ctl_err(&["tasks", "checkpoint", "no-criu"], "it is stopped");
    let not_index = k.ctl_with_stdin(&["content", "ingest", "not-index"], b"hello\n");
    assert!(not_index.status.success(), "{}", describe(&not_index));
    let not_index = String::from_utf8(not_index.stdout)
        .unwrap()
        .trim()
        .to_string();
    let err = k.ctl_err(
        &["run", "-d", "--checkpoint", &not_index, "rs-bad"],
        "invalid argument",
    );
    assert!(err.contains("not a checkpoint index"), "{err}");
    let missing = format!("sha256:{}", "0".repeat(64));
    k.ctl_err(
        &["run", "-d", "--checkpoint", &missing, "rs-bad"],
        "not found",
    );
    k.ctl_err(
        &["run", "-d", "--checkpoint", "sha256:abc", "rs-bad"],
        "invalid argument",
    );
    k.ctl_err(
        &["run", "-d", "--checkpoint", &not_index, "rs-bad", "sh"],
        "give no command",
    );
    // Nothing was created by the refused restores.
    let ls = k.ctl_ok(&["containers", "ls"]);
    assert!(!ls.lines().any(|l| l.starts_with("rs-bad")), "{ls}");

    k.ctl_ok(&["tasks", "rm", "no-criu"]);
    k.ctl_ok(&["containers", "rm", "no-criu"]);
    assert_no_leaks(&k, &k.namespace, "no-criu");
}

/// `keelctl run -t` of `script` in container `id`, on a terminal of its own.
fn run_on_terminal(k: &Keeld, id: &str, script: &str) -> CtlOnTerminal {
    let rootfs = busybox_rootfs();
    let args = [
        "run",
        "-t",
        "--rootfs",
        rootfs.to_str().unwrap(),
        id,
        "sh",
        "-c",
        script,
    ];
    CtlOnTerminal::spawn(k, &args, 80, 24)
}

#[test]
fn established_tcp_connections_are_dumped_only_with_tcp_established() {
    require_runtime();
    if !keel_tests::criu_or_skip("established_tcp_connections_are_dumped_only_with_tcp_established")
    {
        return;
    }
    let k = Keeld::start();
    // A counter sent over TCP inside the container (the listener runs it with its
    // output on the connection); the client prints it.
    let script =
        "nc -l -p 5000 -e sh -c 'i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done' & \
                  sleep 0.5; nc 127.0.0.1 5000";
    let out = run(&k, &["-d", "tcp", "sh", "-c", script]);
    assert!(out.status.success(), "{}", describe(&out));
    eventually(Duration::from_secs(30), "numbers over TCP", || {
        (last_count(&k, "tcp") >= 10).then_some(())
    });
    // Without the option CRIU refuses the connection (and says which option it
    // lacks); the task runs on.
    let dump_log =
        |dir: &std::path::Path| std::fs::read_to_string(dir.join("dump.log")).unwrap_or_default();
    let work0 = k.dir.path().join("tcp-work-0");
    k.ctl_err(
        &[
            "tasks",
            "checkpoint",
            "--work-path",
            work0.to_str().unwrap(),
            "tcp",
        ],
        "checkpoint",
    );
    const HINT: &str = "Connected TCP socket, consider using --tcp-established";
    assert!(dump_log(&work0).contains(HINT), "{}", dump_log(&work0));
    assert!(k.ctl_ok(&["tasks", "ls"]).contains("RUNNING"));
    let now = last_count(&k, "tcp");
    eventually(Duration::from_secs(20), "the counter to go on", || {
        (last_count(&k, "tcp") > now + 5).then_some(())
    });
    // With it, CRIU dumps the connection (working in the given work path) and
    // the restore brings it back, so the numbers go on over it.
    let work = k.dir.path().join("tcp-work");
    let out = k.ctl(&[
        "tasks",
        "checkpoint",
        "--exit",
        "--tcp-established",
        "--work-path",
        work.to_str().unwrap(),
        "tcp",
    ]);
    let log = dump_log(&work);
    assert!(!log.is_empty(), "CRIU did not work in --work-path");
    assert!(!log.contains(HINT), "the option did not reach CRIU: {log}");
    if !out.status.success() {
        // Kernels from 6.x refuse SO_PASSCRED/SO_PASSSEC on inet sockets, which
        // CRIU 4.1 reads from every socket it dumps: the dump of a TCP
        // connection cannot succeed there, whatever keel passes.
        assert!(
            log.contains("sockets: Can't get 1:16 opt: Operation not supported"),
            "{}\n{log}",
            describe(&out)
        );
        eprintln!(
            "NOTE: this kernel refuses CRIU's getsockopt(SO_PASSCRED) on a TCP socket; \
             the option reached CRIU, the restore of a connection is not exercised here"
        );
        assert!(k.ctl_ok(&["tasks", "ls"]).contains("RUNNING"));
        k.ctl_ok(&["tasks", "rm", "-f", "tcp"]);
        k.ctl_ok(&["containers", "rm", "tcp"]);
    } else {
        let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(waited(&k, "tcp"), 137);
        assert_eq!(k.criu_restore_annotation(&digest), "tcp-established");
        let last = last_count(&k, "tcp");
        k.ctl_ok(&["tasks", "rm", "tcp"]);
        k.ctl_ok(&["containers", "rm", "tcp"]);
        k.ctl_ok(&["run", "-d", "--checkpoint", &digest, "tcp-restored"]);
        let first = eventually(Duration::from_secs(30), "numbers after the restore", || {
            first_count(&k, "tcp-restored")
        });
        assert!(
            first > last.saturating_sub(50),
            "restored at {first}, dumped at {last}"
        );
        eventually(Duration::from_secs(20), "them to go on", || {
            (last_count(&k, "tcp-restored") > first + 10).then_some(())
        });
        k.ctl_ok(&["tasks", "rm", "-f", "tcp-restored"]);
        k.ctl_ok(&["containers", "rm", "tcp-restored"]);
    }
    // Options keel cannot honour are refused, naming them. CRIU's cgroup mode
    // reaches CRIU through keel's shim; the runc shim drops it.
    k.run_detached("cg");
    if keel_tests::keel_shim() {
        // CRIU dumps the task's cgroup properties in its default mode (soft),
        // and none in mode ignore; the image's restore is in the same mode
        // (CRIU prepares cgroups in soft mode, in ignore it leaves them alone).
        const CGROUPS: &str = "Dumping value ";
        const RESTORED: &str = "Preparing cgroups yard";
        for (mode, managed) in [("soft", true), ("ignore", false)] {
            let (image, work, rwork) = (
                k.dir.path().join(format!("cg-{mode}")),
                k.dir.path().join(format!("cg-{mode}-work")),
                k.dir.path().join(format!("cg-{mode}-restore")),
            );
            k.ctl_ok(&[
                "tasks",
                "checkpoint",
                "--cgroups-mode",
                mode,
                "--image-path",
                image.to_str().unwrap(),
                "--work-path",
                work.to_str().unwrap(),
                "cg",
            ]);
            let log = dump_log(&work);
            assert_eq!(log.contains(CGROUPS), managed, "mode {mode}: {log}");
            let id = format!("cg-{mode}");
            let out = k.run_from_image(
                &id,
                &image,
                &["--criu-work-path", rwork.to_str().unwrap()],
                &["sleep", "100000"],
            );
            assert!(out.status.success(), "{}", describe(&out));
            let log = std::fs::read_to_string(rwork.join("restore.log")).unwrap_or_default();
            assert_eq!(
                log.contains(RESTORED),
                managed,
                "restore, mode {mode}: {log}"
            );
            // Either way its processes are in its own cgroups.
            assert_own_cgroups(&k, &id);
            k.ctl_ok(&["tasks", "rm", "-f", &id]);
            k.ctl_ok(&["containers", "rm", &id]);
            assert_no_leaks(&k, &k.namespace, &id);
        }
    } else {
        let err = k.ctl_err(
            &["tasks", "checkpoint", "--cgroups-mode", "soft", "cg"],
            "invalid argument",
        );
        assert!(err.contains("options.cgroups_mode"), "{err}");
    }
    let err = k.ctl_err(
        &["tasks", "checkpoint", "--cgroups-mode", "loose", "cg"],
        "invalid argument",
    );
    assert!(err.contains("options.cgroups_mode"), "{err}");
    let err = k.ctl_err(
        &["tasks", "checkpoint", "--empty-ns", "pid", "cg"],
        "invalid argument",
    );
    assert!(err.contains("options.empty_namespaces"), "{err}");
    k.ctl_ok(&["tasks", "rm", "-f", "cg"]);
}

#[test]
fn a_task_with_a_terminal_is_checkpointed_with_terminal_and_restored_on_a_new_one() {
    require_runtime();
    if !keel_tests::criu_or_skip(
        "a_task_with_a_terminal_is_checkpointed_with_terminal_and_restored_on_a_new_one",
    ) {
        return;
    }
    let k = Keeld::start();
    let term = run_on_terminal(&k, "cp-tty", COUNTER);
    term.wait_for("\n20");
    let err = k.ctl_err(&["tasks", "checkpoint", "cp-tty"], "failed precondition");
    assert!(err.contains("--terminal"), "{err}");
    let digest = k
        .ctl_ok(&["tasks", "checkpoint", "--exit", "--terminal", "cp-tty"])
        .trim()
        .to_string();
    let (code, shown) = term.finish();
    assert_eq!(code, Some(137), "{shown}");
    let last: u64 = shown
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .expect("numbers on the terminal");
    k.ctl_ok(&["tasks", "rm", "cp-tty"]);
    k.ctl_ok(&["containers", "rm", "cp-tty"]);
    // Restored on a terminal of its own, it counts on from where it was.
    let restored = CtlOnTerminal::spawn(
        &k,
        &["run", "-t", "--checkpoint", &digest, "cp-tty-2"],
        80,
        24,
    );
    restored.wait_for(&format!("\n{}", last + 20));
    let first: u64 = restored
        .shown()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next()
        .expect("numbers on the new terminal");
    assert!(
        first > last.saturating_sub(5),
        "restored at {first}, dumped at {last}"
    );
    k.ctl_ok(&["tasks", "kill", "-s", "9", "cp-tty-2"]);
    let (code, shown) = restored.finish();
    assert_eq!(code, Some(137), "{shown}");
    k.ctl_ok(&["tasks", "rm", "cp-tty-2"]);
    k.ctl_ok(&["containers", "rm", "cp-tty-2"]);
}

#[test]
fn a_checkpoint_restores_on_the_other_shim_where_criu_allows() {
    require_runtime();
    if !keel_tests::criu_or_skip("a_checkpoint_restores_on_the_other_shim_where_criu_allows") {
        return;
    }
    let (runc, keel) = ("io.containerd.runc.v2", "io.containerd.keel.v1");
    let k = Keeld::start();
    let checkpointed = |runtime: &str, id: &str| {
        let out = run(&k, &["-d", "--runtime", runtime, id, "sh", "-c", COUNTER]);
        assert!(out.status.success(), "{}", describe(&out));
        eventually(Duration::from_secs(30), "the counter to count", || {
            (last_count(&k, id) >= 20).then_some(())
        });
        let digest = k
            .ctl_ok(&["tasks", "checkpoint", "--exit", id])
            .trim()
            .to_string();
        assert_eq!(waited(&k, id), 137);
        let last = last_count(&k, id);
        k.ctl_ok(&["tasks", "rm", id]);
        k.ctl_ok(&["containers", "rm", id]);
        (digest, last)
    };
    let restores_on = |runtime: &str, digest: &str, id: &str, last: u64| {
        k.ctl_ok(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            "--checkpoint",
            digest,
            id,
        ]);
        let shim =
            format!("containerd-shim-{}", &runtime["io.containerd.".len()..]).replace('.', "-");
        assert!(
            shim_running(&k, &shim, id),
            "{id} is not restored on {runtime} ({shim})"
        );
        let first = eventually(Duration::from_secs(30), "the restored counter", || {
            first_count(&k, id)
        });
        assert!(
            first <= last + 1 && first + 10 > last,
            "{id} starts at {first}, dumped at {last}"
        );
        eventually(Duration::from_secs(20), "it to go on", || {
            (last_count(&k, id) > first + 5).then_some(())
        });
        k.ctl_ok(&["tasks", "rm", "-f", id]);
        k.ctl_ok(&["containers", "rm", id]);
        assert_no_leaks(&k, &k.namespace, id);
    };

    // runc's image (the Go shim gives its process pipes) restores on keel's
    // shim, which hands the new process's stdio to CRIU for those pipes.
    let (digest, last) = checkpointed(runc, "by-runc");
    restores_on(keel, &digest, "runc-on-keel", last);

    // keel's shim hands its process files, which CRIU dumps as external; runc
    // cannot give them back, so keel refuses that restore, saying why.
    let (digest, last) = checkpointed(keel, "by-keel");
    let err = k.ctl_err(
        &[
            "run",
            "-d",
            "--runtime",
            runc,
            "--checkpoint",
            &digest,
            "keel-on-runc",
        ],
        "failed precondition",
    );
    assert!(err.contains("external file") && err.contains(keel), "{err}");
    let _ = k.ctl(&["containers", "rm", "keel-on-runc"]);
    // The image itself is sound: keel's shim restores it.
    restores_on(keel, &digest, "keel-on-keel", last);
}

/// Whether a `shim` binary (a file name) serves task `id` of keeld `k`.
fn shim_running(k: &Keeld, shim: &str, id: &str) -> bool {
    std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!(
                "{shim} -namespace {} -id {id} -address {}",
                k.namespace,
                k.socket.display()
            ),
        ])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn a_restore_runs_the_prestart_hooks_for_the_restored_process() {
    require_runtime();
    if !keel_tests::criu_or_skip("a_restore_runs_the_prestart_hooks_for_the_restored_process") {
        return;
    }
    let k = Keeld::start();
    // A prestart hook that appends the state it is given, one line per run.
    let states = k.dir.path().join("hook-states");
    let spec =
        keel_client::ContainerSpec::new("hooked", busybox_rootfs()).args(["sh", "-c", COUNTER]);
    let mut v: serde_json::Value = serde_json::from_slice(&spec.spec_json().unwrap()).unwrap();
    let script = format!("cat >>{0} && echo >>{0}", states.display());
    v["hooks"] = serde_json::json!({
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", script]}]
    });
    let spec = spec.oci_spec(serde_json::to_vec(&v).unwrap());
    keel_tests::runtime().block_on(async {
        let c = keel_client::ClientBuilder::new(k.socket.to_str().unwrap())
            .namespace(k.namespace.as_str())
            .connect()
            .await
            .unwrap();
        let container = c.containers().create(spec).await.unwrap();
        let task = container
            .new_task(keel_client::io::Io::keel_log())
            .await
            .unwrap();
        task.start().await.unwrap();
    });
    eventually(Duration::from_secs(30), "the counter to count", || {
        (last_count(&k, "hooked") >= 10).then_some(())
    });
    let digest = k
        .ctl_ok(&["tasks", "checkpoint", "--exit", "hooked"])
        .trim()
        .to_string();
    assert_eq!(waited(&k, "hooked"), 137);
    k.ctl_ok(&["tasks", "rm", "hooked"]);
    k.ctl_ok(&["containers", "rm", "hooked"]);
    k.ctl_ok(&["run", "-d", "--checkpoint", &digest, "hooked-2"]);
    let info: serde_json::Value =
        serde_json::from_str(&k.ctl_ok(&["tasks", "info", "hooked-2"])).unwrap();
    let pid = info["pid"].as_u64().expect("the restored task's pid");
    let ran: Vec<serde_json::Value> = std::fs::read_to_string(&states)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        ran.len(),
        2,
        "the hook ran at create and at restore: {ran:?}"
    );
    assert_eq!(ran[1]["id"], "hooked-2", "{ran:?}");
    assert_eq!(ran[1]["pid"].as_u64(), Some(pid), "{ran:?}");
    k.ctl_ok(&["tasks", "rm", "-f", "hooked-2"]);
    k.ctl_ok(&["containers", "rm", "hooked-2"]);
}

/// Asserts that task `id` has processes (ListPids) and that each is in the
/// task's own cgroup, `…/<id>`, in every cgroup hierarchy.
fn assert_own_cgroups(k: &Keeld, id: &str) {
    let pids: Vec<u32> = k
        .ctl_ok(&["tasks", "ps", id])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(!pids.is_empty(), "ps shows no process of {id}");
    for pid in &pids {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(
            cg.lines().all(|l| l.ends_with(&format!("/{id}"))),
            "process {pid} of {id}: {cg}"
        );
    }
}
