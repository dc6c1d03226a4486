//! keeld killed with -9 and restarted: every task comes back with its true state,
//! exits that happened meanwhile are published exactly once, nothing leaks. Real
//! runc containers through the real shim.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use keel_tests::{busybox_rootfs, describe, require_runtime, seqs, shim_binary, Keeld, Subscriber};
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// `keelctl tasks ls --format json`, by id.
fn tasks(k: &Keeld) -> BTreeMap<String, Value> {
    k.ctl_ok(&["tasks", "ls", "--format", "json"])
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json task line");
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

fn status(t: &Value) -> &str {
    t["status"].as_str().unwrap_or_default()
}

/// Waits until no task is UNKNOWN; returns the listing.
fn settled(k: &Keeld, within: Duration) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + within;
    loop {
        let t = tasks(k);
        if t.values().all(|t| status(t) != "UNKNOWN") {
            return t;
        }
        assert!(Instant::now() < deadline, "tasks stay unknown: {t:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The event log after sequence `since`, up to a marker published now (a container
/// created and removed), in order.
fn log_to_marker(k: &Keeld, since: u64) -> Vec<Value> {
    let marker = format!("marker-{}", rand::random::<u32>());
    k.ctl_ok(&[
        "containers",
        "create",
        "--rootfs",
        busybox_rootfs().to_str().unwrap(),
        &marker,
        "true",
    ]);
    k.ctl_ok(&["containers", "rm", &marker]);
    let mut sub = Subscriber::spawn(k, &["--since", &since.to_string()]);
    let all = sub
        .until(Duration::from_secs(30), |e| {
            e["topic"] == "/containers/delete" && e["event"]["id"] == marker.as_str()
        })
        .expect("the log up to the marker");
    let s = seqs(&all);
    assert!(s.windows(2).all(|w| w[0] < w[1]), "log order");
    all
}

/// Every /tasks/exit in the log, by container id.
fn exits(k: &Keeld, since: u64) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in log_to_marker(k, since)
        .into_iter()
        .filter(|e| e["topic"] == "/tasks/exit")
    {
        out.entry(e["event"]["containerId"].as_str().unwrap().to_string())
            .or_default()
            .push(e);
    }
    out
}

/// Shim processes serving this keeld.
fn shims(k: &Keeld) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args([
            "-af",
            &format!("{} -namespace {} ", shim_binary(), k.namespace),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&k.socket.display().to_string()))
        .map(str::to_string)
        .collect()
}

/// Mounts under this keeld's state directory.
fn mounts(k: &Keeld) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(k.state.to_str().unwrap()))
        .map(str::to_string)
        .collect()
}

/// Bundles under this keeld's state directory.
fn bundles(k: &Keeld) -> BTreeSet<String> {
    std::fs::read_dir(k.state.join("tasks").join(&k.namespace))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The ids of the containers keeld lists.
fn containers(k: &Keeld) -> BTreeSet<String> {
    k.ctl_ok(&["containers", "ls", "--format", "json"])
        .lines()
        .map(|l| {
            let c: Value = serde_json::from_str(l).expect("json container line");
            c["id"].as_str().expect("container id").to_string()
        })
        .collect()
}

/// Removes every task and container, then asserts nothing of tasks `ids` is left:
/// no shim, mount, bundle or shim socket.
fn remove_all_and_check_leaks(k: &Keeld, ids: &[String]) {
    for id in tasks(k).keys() {
        k.ctl_ok(&["tasks", "rm", "-f", id]);
    }
    for id in containers(k) {
        k.ctl_ok(&["containers", "rm", &id]);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, m, b) = (shims(k), mounts(k), bundles(k));
        let sockets: Vec<_> = ids
            .iter()
            .map(|id| k.shim_socket(id))
            .filter(|p| p.exists())
            .collect();
        if s.is_empty() && m.is_empty() && b.is_empty() && sockets.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: shims {s:#?} mounts {m:#?} bundles {b:?} sockets {sockets:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pid_of(t: &Value) -> i32 {
    i32::try_from(t["pid"].as_u64().expect("pid")).unwrap()
}

#[test]
fn exits_during_a_30s_outage_are_published_once_and_running_tasks_come_back() {
    require_runtime();
    let mut k = Keeld::start();
    let ids: Vec<String> = (0..100).map(|i| format!("r{i:03}")).collect();
    for id in &ids {
        k.run_detached(id);
    }
    let before = tasks(&k);
    assert!(before.values().all(|t| status(t) == "RUNNING"));
    let since = k.head();

    k.kill9();
    let victims: Vec<&String> = ids.iter().step_by(10).collect();
    for id in &victims {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid_of(&before[id.as_str()])),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    // Longer than the shims keep re-sending their exit events (~15 s).
    std::thread::sleep(Duration::from_secs(30));
    k.spawn();

    let after = settled(&k, Duration::from_secs(30));
    assert_eq!(after.len(), 100, "every task is listed");
    for id in &ids {
        let t = &after[id.as_str()];
        if victims.contains(&id) {
            assert_eq!(status(t), "STOPPED", "{id}: {t}");
            assert_eq!(t["exit_status"], 137, "{id}: {t}");
        } else {
            assert_eq!(status(t), "RUNNING", "{id}: {t}");
            assert_eq!(t["pid"], before[id.as_str()]["pid"], "{id}: same process");
        }
    }
    let exits = exits(&k, since);
    for id in &ids {
        let n = exits.get(id.as_str()).map_or(0, Vec::len);
        let want = usize::from(victims.contains(&id));
        assert_eq!(
            n,
            want,
            "/tasks/exit events of {id}: {:?}",
            exits.get(id.as_str())
        );
    }
    remove_all_and_check_leaks(&k, &ids);
}

#[test]
fn a_stopped_shim_leaves_its_task_unknown_without_delaying_the_others() {
    require_runtime();
    let mut k = Keeld::start();
    for id in ["s1", "s2", "s3", "s4"] {
        k.run_detached(id);
    }
    let shim_of = |id: &str| {
        let line = shims(&k)
            .into_iter()
            .find(|l| l.contains(&format!(" -id {id} ")))
            .expect("shim");
        nix::unistd::Pid::from_raw(line.split_whitespace().next().unwrap().parse().unwrap())
    };
    let (shim_pid, hung) = (shim_of("s2"), shim_of("s4"));
    k.kill9();
    for p in [shim_pid, hung] {
        nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGSTOP).unwrap();
    }
    let started = Instant::now();
    k.spawn();
    // The others are reconciled while s2's shim does not answer; the API answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let t = tasks(&k);
        if status(&t["s1"]) == "RUNNING" && status(&t["s3"]) == "RUNNING" {
            break t;
        }
        assert!(Instant::now() < deadline, "s1 and s3 not restored: {t:#?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "s1 and s3 restored {:?} after the restart",
        started.elapsed()
    );
    assert_eq!(status(&listed["s2"]), "UNKNOWN", "{listed:#?}");
    assert_eq!(status(&listed["s4"]), "UNKNOWN", "{listed:#?}");
    k.ctl_err(&["tasks", "kill", "s2"], "unknown");
    k.ctl_err(&["tasks", "rm", "s2"], "delete with force");
    // A task whose shim never answers can still be removed by force: its shim is
    // killed and cleaned up like a dead one's.
    k.ctl_ok(&["tasks", "rm", "-f", "s4"]);
    assert!(!tasks(&k).contains_key("s4"));
    assert!(
        !std::path::Path::new(&format!("/proc/{hung}")).exists()
            || std::fs::read_to_string(format!("/proc/{hung}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "the hung shim was ended"
    );
    // Still unknown a few probes later, never a guess.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(status(&tasks(&k)["s2"]), "UNKNOWN");

    nix::sys::signal::kill(shim_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&tasks(&k)["s2"]) != "RUNNING" {
        assert!(Instant::now() < deadline, "s2 not restored after SIGCONT");
        std::thread::sleep(Duration::from_millis(200));
    }
    remove_all_and_check_leaks(&k, &["s1".into(), "s2".into(), "s3".into(), "s4".into()]);
}

#[test]
fn kill_9_at_random_points_under_churn_leaves_every_task_consistent() {
    require_runtime();
    let mut k = Keeld::start();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(u64::from(std::process::id()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    // What keeld acknowledged (a create answered; a task's removal answered),
    // and how many creates a kill cut short.
    let created = std::sync::Mutex::new(BTreeSet::new());
    let removed = std::sync::Mutex::new(BTreeSet::new());
    // Removals asked for: one keeld died under may have happened or not.
    let removing = std::sync::Mutex::new(BTreeSet::new());
    let cut_short = std::sync::atomic::AtomicUsize::new(0);
    for round in 0..20 {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                let (k, stop, next) = (&k, &stop, &next);
                let (created, removed, cut_short) = (&created, &removed, &cut_short);
                let removing = &removing;
                s.spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let id = format!("c{n:04}");
                        let rootfs = busybox_rootfs();
                        // Failures are expected: keeld dies under these calls.
                        let ran = k.ctl(&[
                            "run",
                            "-d",
                            "--rootfs",
                            rootfs.to_str().unwrap(),
                            &id,
                            "sleep",
                            "100000",
                        ]);
                        if ran.status.success() {
                            created.lock().unwrap().insert(id.clone());
                        } else {
                            cut_short.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        if n % 3 != 0 {
                            removing.lock().unwrap().insert(id.clone());
                            if k.ctl(&["tasks", "rm", "-f", &id]).status.success() {
                                removed.lock().unwrap().insert(id.clone());
                                let _ = k.ctl(&["containers", "rm", &id]);
                            }
                        }
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(50..800)));
            let pid = i32::try_from(k.pid().expect("keeld runs")).unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        // Reaps the killed daemon.
        k.kill9();
        k.spawn();
        // Sometimes die again while restoring.
        if round % 4 == 3 {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..100)));
            k.kill9();
            k.spawn();
        }
    }

    let listed = settled(&k, Duration::from_secs(60));
    // The churn did what it is for: tasks were created, and kills landed in
    // the middle of calls. Whatever was acknowledged holds.
    let (created, removed) = (created.into_inner().unwrap(), removed.into_inner().unwrap());
    let cut_short = cut_short.into_inner();
    let orphans = k.log().matches("orphan removed").count();
    eprintln!(
        "churn: {} creates acknowledged, {} removals acknowledged, {cut_short} calls cut short by a kill, {orphans} orphans removed",
        created.len(),
        removed.len()
    );
    assert!(
        created.len() >= 10,
        "only {} creates acknowledged",
        created.len()
    );
    assert!(cut_short > 0, "no kill landed in the middle of a create");
    // A kill between a shim's start and the task's record leaves an orphan,
    // which a restart removes (typically a dozen or more over 20 rounds).
    assert!(orphans > 0, "no orphan was ever cleaned up");
    let removing = removing.into_inner().unwrap();
    for id in created.difference(&removing) {
        assert!(
            listed.contains_key(id),
            "{id}'s create was acknowledged and no removal asked for, but it is gone"
        );
    }
    for id in &removed {
        assert!(
            !listed.contains_key(id),
            "{id}'s removal was acknowledged, but it is listed"
        );
    }
    // Orphan cleanup runs in the background after the restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (b, s) = (bundles(&k), shims(&k));
        let known: BTreeSet<String> = listed.keys().cloned().collect();
        let stray_shims: Vec<&String> = s
            .iter()
            .filter(|l| !known.iter().any(|id| l.contains(&format!(" -id {id} "))))
            .collect();
        if b.is_subset(&known) && stray_shims.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let unknown: Vec<&String> = b.difference(&known).collect();
            let log = k.log();
            let about: Vec<&str> = log
                .lines()
                .filter(|l| {
                    unknown.iter().any(|id| l.contains(id.as_str()))
                        || stray_shims.iter().any(|s| {
                            s.split(" -id ")
                                .nth(1)
                                .and_then(|r| r.split(' ').next())
                                .is_some_and(|id| l.contains(id))
                        })
                })
                .collect();
            panic!(
                "bundles {unknown:?} or shims {stray_shims:#?} without a task; keeld said:\n{}",
                about.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (id, t) in &listed {
        match status(t) {
            "RUNNING" => {
                let pid = pid_of(t);
                assert!(
                    std::path::Path::new(&format!("/proc/{pid}")).exists(),
                    "{id} is RUNNING with a dead pid {pid}"
                );
            }
            "CREATED" | "STOPPED" => {}
            other => panic!("{id} is {other}"),
        }
    }
    // Every started task that is not running any more has exactly one exit event;
    // no task has more than one.
    let exits = exits(&k, 0);
    for (id, e) in &exits {
        assert_eq!(e.len(), 1, "{id} exited {} times: {e:#?}", e.len());
    }
    for (id, t) in &listed {
        if status(t) == "STOPPED" {
            assert!(
                exits.contains_key(id),
                "{id} is STOPPED without an exit event"
            );
        }
    }
    // Every listed task's `/tasks/create` is in the log once, and every running
    // one's `/tasks/start`: those a crash kept from the log are published at the
    // restore. No task has either twice.
    let log = log_to_marker(&k, 0);
    let mut lifecycle: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in &log {
        let topic = e["topic"].as_str().unwrap_or_default();
        if topic == "/tasks/create" || topic == "/tasks/start" {
            let id = e["event"]["containerId"].as_str().unwrap_or_default();
            *lifecycle
                .entry((id.to_string(), topic.to_string()))
                .or_default() += 1;
        }
    }
    let count = |id: &str, topic: &str| {
        lifecycle
            .get(&(id.to_string(), topic.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let keeld_log = k.log();
    let about = |id: &str| -> String {
        let tag = format!("task_id={id}");
        keeld_log
            .lines()
            .filter(|l| l.contains(&tag) && !l.contains("keel::shim"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for (id, t) in &listed {
        assert_eq!(
            count(id, "/tasks/create"),
            1,
            "{id} ({}); keeld said:\n{}",
            status(t),
            about(id)
        );
        if status(t) == "RUNNING" {
            assert_eq!(count(id, "/tasks/start"), 1, "{id} ({})", status(t));
        }
    }
    assert!(
        lifecycle.values().all(|n| *n == 1),
        "published twice: {:?}",
        lifecycle
            .iter()
            .filter(|(_, n)| **n > 1)
            .collect::<Vec<_>>()
    );
    // Every task and container the log shows created has its delete logged once if
    // it is gone (a crash between removing its records and logging the delete has
    // it published at the restore), and none if it is still there.
    let containers = containers(&k);
    let mut deletes: BTreeMap<(&str, String), (usize, usize)> = BTreeMap::new();
    for e in &log {
        let (kind, id) = match e["topic"].as_str().unwrap_or_default() {
            "/tasks/create" | "/tasks/delete" => ("task", &e["event"]["containerId"]),
            "/containers/create" | "/containers/delete" => ("container", &e["event"]["id"]),
            _ => continue,
        };
        let id = id.as_str().unwrap_or_default();
        if !id.starts_with('c') {
            continue;
        }
        let n = deletes.entry((kind, id.to_string())).or_default();
        if e["topic"].as_str().unwrap_or_default().ends_with("/create") {
            n.0 += 1;
        } else {
            n.1 += 1;
        }
    }
    for ((kind, id), (created, deleted)) in &deletes {
        let there = if *kind == "task" {
            listed.contains_key(id)
        } else {
            containers.contains(id)
        };
        if *created > 0 {
            assert_eq!(
                *deleted,
                usize::from(!there),
                "{kind} {id} (there: {there}) has {deleted} deletes logged; keeld said:\n{}",
                about(id)
            );
        }
    }
    eprintln!(
        "{} tasks left: {:?}",
        listed.len(),
        listed.values().map(status).collect::<Vec<_>>()
    );
    let all: Vec<String> = (0..next.load(std::sync::atomic::Ordering::Relaxed))
        .map(|n| format!("c{n:04}"))
        .collect();
    remove_all_and_check_leaks(&k, &all);
    let out = k.ctl(&["tasks", "ls"]);
    assert!(out.status.success(), "{}", describe(&out));
}

/// The status of an exec process, if keeld knows it.
fn exec_status(k: &Keeld, id: &str, exec_id: &str) -> Option<String> {
    let out = k.ctl(&["tasks", "info", "--exec-id", exec_id, id]);
    out.status.success().then(|| {
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v["status"].as_str().unwrap_or_default().to_string()
    })
}

/// `keelctl tasks info --exec-id` of a task, as JSON.
fn exec_info(k: &Keeld, id: &str, exec_id: &str) -> Value {
    let out = k.ctl_ok(&["tasks", "info", "--exec-id", exec_id, id]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn exec_processes_are_watched_again_after_a_restart_and_their_exits_published_once() {
    require_runtime();
    let mut k = Keeld::start();
    k.run_detached("ex");
    // One exec ends while keeld is down, one outlives the outage.
    let mut clients: Vec<_> = [("short", "sleep 3; exit 5"), ("long", "sleep 100000")]
        .into_iter()
        .map(|(exec_id, script)| {
            k.ctl_cmd(&[
                "tasks",
                "exec",
                "--exec-id",
                exec_id,
                "ex",
                "sh",
                "-c",
                script,
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    for exec_id in ["short", "long"] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while exec_status(&k, "ex", exec_id).as_deref() != Some("RUNNING") {
            assert!(Instant::now() < deadline, "exec {exec_id} never ran");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let since = k.head();

    k.kill9();
    for c in &mut clients {
        // Their connection went with keeld.
        let _ = c.wait();
    }
    std::thread::sleep(Duration::from_secs(5));
    k.spawn();
    settled(&k, Duration::from_secs(30));

    let deadline = Instant::now() + Duration::from_secs(20);
    let short = loop {
        let e = exec_info(&k, "ex", "short");
        if e["status"] == "STOPPED" {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "the exit during the outage was lost: {e}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(short["exit_status"], 5, "{short}");
    assert_eq!(exec_info(&k, "ex", "long")["status"], "RUNNING");
    let waited = k.ctl(&["tasks", "wait", "--exec-id", "short", "ex"]);
    assert_eq!(waited.status.code(), Some(5), "{}", describe(&waited));

    // The one still running is watched again: its exit is seen and published.
    k.ctl_ok(&["tasks", "kill", "-s", "SIGKILL", "--exec-id", "long", "ex"]);
    let waited = k.ctl(&["tasks", "wait", "--exec-id", "long", "ex"]);
    assert_eq!(waited.status.code(), Some(137), "{}", describe(&waited));

    let exec_exits: BTreeMap<String, Vec<u64>> = log_to_marker(&k, since)
        .into_iter()
        .filter(|e| e["topic"] == "/tasks/exit" && e["event"]["containerId"] == "ex")
        .fold(BTreeMap::new(), |mut m, e| {
            m.entry(e["event"]["id"].as_str().unwrap().to_string())
                .or_default()
                .push(e["event"]["exitStatus"].as_u64().unwrap_or(0));
            m
        });
    assert_eq!(
        exec_exits,
        BTreeMap::from([
            ("long".to_string(), vec![137]),
            ("short".to_string(), vec![5])
        ]),
        "each exec's exit once, and none of the task's"
    );
    // Deleted, an exec process stays gone across another restart, and its id is
    // free again; one not deleted comes back with its exit.
    k.ctl_ok(&["tasks", "rm", "--exec-id", "short", "ex"]);
    k.ctl_err(&["tasks", "info", "--exec-id", "short", "ex"], "not found");
    k.kill9();
    k.spawn();
    settled(&k, Duration::from_secs(30));
    k.ctl_err(&["tasks", "info", "--exec-id", "short", "ex"], "not found");
    let long = exec_info(&k, "ex", "long");
    assert_eq!(
        (&long["status"], &long["exit_status"]),
        (&"STOPPED".into(), &137.into()),
        "{long}"
    );
    let again = k.ctl(&[
        "tasks",
        "exec",
        "--exec-id",
        "short",
        "ex",
        "sh",
        "-c",
        "exit 4",
    ]);
    assert_eq!(again.status.code(), Some(4), "{}", describe(&again));
    remove_all_and_check_leaks(&k, &["ex".to_string()]);
}

#[test]
fn kill_9_during_a_checkpoint_leaves_no_half_written_content_and_the_task_running() {
    require_runtime();
    if !keel_tests::criu_or_skip(
        "kill_9_during_a_checkpoint_leaves_no_half_written_content_and_the_task_running",
    ) {
        return;
    }
    let mut k = Keeld::start();
    // ~100 MB of memory makes an image big enough to catch its ingest under way.
    let script = "x=$(head -c 100000000 /dev/zero | busybox tr '\\0' a); echo ready; \
                  while true; do sleep 1; done";
    k.ctl_ok(&[
        "run",
        "-d",
        "--rootfs",
        busybox_rootfs().to_str().unwrap(),
        "big",
        "sh",
        "-c",
        script,
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !k.ctl_ok(&["tasks", "logs", "big"]).contains("ready") {
        assert!(Instant::now() < deadline, "the container never got ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut checkpoint = k
        .ctl_cmd(&["tasks", "checkpoint", "big"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !k.ctl_ok(&["content", "active"]).contains("checkpoint-") {
        assert!(
            checkpoint.try_wait().unwrap().is_none(),
            "the checkpoint ended before its ingest was seen"
        );
        assert!(Instant::now() < deadline, "no checkpoint ingest appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    k.kill9();
    let _ = checkpoint.wait();
    k.spawn();

    let t = settled(&k, Duration::from_secs(30));
    assert_eq!(status(&t["big"]), "RUNNING", "{t:#?}");
    let active = k.ctl_ok(&["content", "active"]);
    assert!(
        !active.contains("checkpoint-"),
        "left half written: {active}"
    );
    assert!(
        k.log().contains("aborted a checkpoint's ingest"),
        "{}",
        k.log()
    );
    let work = k.state.join("checkpoints");
    assert!(!work.exists(), "{} left behind", work.display());
    remove_all_and_check_leaks(&k, &["big".to_string()]);
}

#[test]
fn a_create_right_after_a_restart_is_not_taken_for_an_orphan_of_its_id() {
    require_runtime();
    let mut k = Keeld::start();
    k.ctl_ok(&[
        "containers",
        "create",
        "--rootfs",
        busybox_rootfs().to_str().unwrap(),
        "again",
        "sleep",
        "100000",
    ]);
    // What a crash during a create leaves: a bundle with no task record. keeld
    // cleans it up in the background after the restart.
    k.kill9();
    let bundle = k.state.join("tasks").join(&k.namespace).join("again");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    std::fs::write(bundle.join("config.json"), "{}").unwrap();
    // Many files make its cleanup take long enough for the create to come during it.
    for i in 0..20_000 {
        std::fs::write(bundle.join(format!("junk{i}")), "").unwrap();
    }
    k.spawn_without_waiting();
    // A task for that id as soon as keeld answers, while the orphan's cleanup may
    // still run: the task must not be cleaned up as the orphan was.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !k.ctl(&["version"]).status.success() {
        assert!(Instant::now() < deadline, "keeld never answered");
        std::thread::sleep(Duration::from_millis(2));
    }
    k.ctl_ok(&["tasks", "start", "again"]);
    std::thread::sleep(Duration::from_secs(2));
    let t = tasks(&k);
    assert_eq!(status(&t["again"]), "RUNNING", "{t:#?}");
    let pid = pid_of(&t["again"]);
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the task's process {pid} is gone"
    );
    assert_eq!(shims(&k).len(), 1, "{:#?}", shims(&k));
    assert!(bundle.join("config.json").exists());
    remove_all_and_check_leaks(&k, &["again".to_string()]);
}

#[test]
fn an_orphan_is_cleaned_up_by_the_shim_its_bundle_names() {
    use std::os::unix::fs::PermissionsExt;
    require_runtime();
    let mut k = Keeld::start();
    // A shim that logs how it is run, then is keel's own.
    let real = keel_tests::bin_dir().join("containerd-shim-keel-v1");
    let (shim, log) = (
        k.dir.path().join("containerd-shim-logged-v1"),
        k.dir.path().join("shim.log"),
    );
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexec {} \"$@\"\n",
            log.display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    // What a crash between a shim's start and the task's record leaves: a bundle
    // that names its shim, and no task.
    k.kill9();
    let bundle = k.state.join("tasks").join(&k.namespace).join("lost");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    std::fs::write(bundle.join("config.json"), "{}").unwrap();
    std::fs::write(bundle.join("shim-binary-path"), shim.to_str().unwrap()).unwrap();
    k.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while bundle.exists() {
        assert!(Instant::now() < deadline, "the orphan's bundle stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        calls.contains("-id lost") && calls.trim_end().ends_with("delete"),
        "the orphan's own shim was not run for it: {calls:?}"
    );
}
