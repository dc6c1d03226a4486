//! Supervision inside a real keeld, with real containers and faults injected
//! (`KEEL_FAULTS`; `deploy/test.sh` builds the tests' keeld with the `faults`
//! feature): a failed part is restarted by its supervisor and nothing else notices;
//! past the restart limits keeld exits cleanly, and the restore brings every task
//! back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_tests::{
    describe, random_file, require_runtime, runtime, topics_about, Keeld, VersionWatch,
};
use serde_json::Value;

/// `keelctl debug supervision`, by supervisor name.
fn supervision(k: &Keeld) -> BTreeMap<String, Value> {
    k.ctl_ok(&["debug", "supervision", "--format", "json"])
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            (v["name"].as_str().expect("name").to_string(), v)
        })
        .collect()
}

fn count(s: &BTreeMap<String, Value>, who: &str, what: &str) -> u64 {
    s[who][what]
        .as_u64()
        .unwrap_or_else(|| panic!("{who}.{what}: {s:?}"))
}

/// `tasks info ID` as JSON.
fn info(k: &Keeld, id: &str) -> Value {
    serde_json::from_str(&k.ctl_ok(&["tasks", "info", id])).expect("task info JSON")
}

/// Waits until task `id` is back from UNKNOWN; returns (status, pid).
fn settled(k: &Keeld, id: &str) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = info(k, id);
        let status = t["status"].as_str().unwrap_or_default().to_string();
        if status != "UNKNOWN" {
            return (status, t["pid"].as_u64().unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "{id} stays UNKNOWN");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_task_actor_that_panics_is_restarted_and_no_one_else_notices() {
    require_runtime();
    let k = Keeld::start_with_env(&[("KEEL_FAULTS", "task:victim:Kill=panic")]);
    k.run_detached("victim");
    k.run_detached("bystander");
    let before = settled(&k, "victim");
    assert_eq!(before.0, "RUNNING");
    // A Wait begun before the failure outlives it.
    let waiter = k
        .ctl_cmd(&["tasks", "wait", "victim"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let watch = VersionWatch::start(&k);
    // The Kill that meets the fault fails alone, with Internal, before reaching the
    // shim: the task runs on.
    k.ctl_err(&["tasks", "kill", "-s", "TERM", "victim"], "internal");
    assert_eq!(
        settled(&k, "bystander").0,
        "RUNNING",
        "others answer meanwhile"
    );
    assert_eq!(settled(&k, "victim"), before, "back, running, the same pid");
    let s = supervision(&k);
    assert_eq!(count(&s, "tasks", "restarts"), 1, "{s:?}");
    assert!(
        s["tasks"]["last_cause"]
            .as_str()
            .unwrap()
            .contains("fault injected at task:victim:Kill"),
        "{s:?}"
    );
    // Its next Kill works (the fault fires once); the exit reaches the waiter from
    // before the failure, and is published exactly once.
    k.ctl_ok(&["tasks", "kill", "-s", "KILL", "victim"]);
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    watch
        .finish()
        .assert_responsive("a task actor's failure", 1);
    let rt = runtime();
    let exits = topics_about(&rt.block_on(k.replay()), "victim")
        .into_iter()
        .filter(|t| t == "/tasks/exit")
        .count();
    assert_eq!(exits, 1);
    k.ctl_ok(&["tasks", "rm", "victim"]);
    k.ctl_ok(&["tasks", "rm", "-f", "bystander"]);
    assert!(k.log().contains("restarting a failed child"), "logged");
}

#[test]
fn a_panicking_request_fails_alone() {
    let k = Keeld::start_with_env(&[("KEEL_FAULTS", "api:Containers.List=panic")]);
    k.ctl_err(&["containers", "ls"], "internal");
    k.ctl_ok(&["containers", "ls"]);
    let s = supervision(&k);
    assert_eq!(count(&s, "api", "restarts"), 1, "{s:?}");
    k.assert_serving();
}

#[test]
fn the_storage_actor_failing_mid_ingest_loses_no_blob_and_the_ingest_resumes() {
    let _heavy = keel_tests::heavy();
    // 8 writes of 1 MiB commit the first blob; the 40th write, in the middle of
    // the second blob, meets the fault.
    let k = Keeld::start_with_env(&[("KEEL_FAULTS", "storage:Write=panic@40")]);
    let dir = tempfile::tempdir().unwrap();
    let (a, da) = random_file(dir.path(), "a", 8 << 20, 1);
    let (b, db) = random_file(dir.path(), "b", 64 << 20, 2);
    let out = k.ctl_with_stdin(&["content", "ingest", "a"], &std::fs::read(&a).unwrap());
    assert!(out.status.success(), "{}", describe(&out));
    let bytes = std::fs::read(&b).unwrap();
    let out = k.ctl_with_stdin(&["content", "ingest", "b"], &bytes);
    assert!(
        !out.status.success(),
        "the ingest meets the failure: {}",
        describe(&out)
    );
    // What it wrote is on disk, to resume from.
    let active: Value = serde_json::from_str(
        k.ctl_ok(&["content", "active", "--format", "json"])
            .lines()
            .find(|l| l.contains("\"b\""))
            .expect("ref b is still an ingest"),
    )
    .unwrap();
    let offset = active["offset"].as_u64().expect("offset");
    assert!(offset > 0 && offset < 64 << 20, "{active}");
    let out = k.ctl_with_stdin(&["content", "ingest", "b"], &bytes);
    assert!(out.status.success(), "resumed: {}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), db);
    // Nothing committed was lost.
    for (d, path) in [(&da, &a), (&db, &b)] {
        let got = k.ctl_cmd(&["content", "get", d]).output().unwrap();
        assert!(got.status.success(), "{}", describe(&got));
        assert_eq!(got.stdout, std::fs::read(path).unwrap(), "{d}");
    }
    k.ctl_ok(&["content", "fsck"]);
    let s = supervision(&k);
    assert_eq!(count(&s, "storage", "escalations"), 1, "{s:?}");
    assert_eq!(count(&s, "root", "restarts"), 1, "{s:?}");
}

/// Runs `n` tasks to completion (`run --rm`), one after the other, with a
/// subscriber following from the start; returns what it saw.
fn churn_and_follow(k: &Keeld, n: usize) -> Vec<Value> {
    let rootfs = keel_tests::busybox_rootfs();
    let mut sub =
        keel_tests::Subscriber::spawn(k, &["--since", "0", "topic~=^/(tasks|containers)/"]);
    for i in 0..n {
        let id = format!("c{i}");
        let out = k.ctl(&[
            "run",
            "--rm",
            "--rootfs",
            rootfs.to_str().unwrap(),
            &id,
            "true",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    }
    let last = format!("c{}", n - 1);
    sub.until(Duration::from_secs(30), |e| {
        e["topic"] == "/containers/delete" && e["event"]["id"] == last.as_str()
    })
    .expect("the subscriber sees every event")
}

/// Every task of the churn logged and seen exactly once each, in order.
fn assert_every_event_once(k: &Keeld, seen: &[Value], n: usize) {
    let rt = runtime();
    let log = rt.block_on(k.replay());
    for i in 0..n {
        let id = format!("c{i}");
        assert_eq!(
            topics_about(&log, &id),
            keel_tests::A_RUN_FROM_CREATE_TO_DELETE,
            "{id} in the log"
        );
        let mine: Vec<&str> = seen
            .iter()
            .filter(|e| e["event"]["containerId"] == id.as_str() || e["event"]["id"] == id.as_str())
            .map(|e| e["topic"].as_str().unwrap())
            .collect();
        assert_eq!(mine.len(), 6, "{id} as the subscriber saw it: {mine:?}");
    }
    let seqs = keel_tests::seqs(seen);
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate"
    );
}

#[test]
fn the_monitor_failing_loses_no_event() {
    require_runtime();
    let k = Keeld::start_with_env(&[("KEEL_FAULTS", "monitor:Publish=panic@6")]);
    let seen = churn_and_follow(&k, 3);
    assert_every_event_once(&k, &seen, 3);
    let s = supervision(&k);
    assert_eq!(count(&s, "monitor", "restarts"), 1, "{s:?}");
}

#[test]
fn the_event_flusher_failing_loses_no_event_and_no_subscriber_hangs() {
    require_runtime();
    let k = Keeld::start_with_env(&[("KEEL_FAULTS", "exchange:flusher=panic@8")]);
    let seen = churn_and_follow(&k, 3);
    assert_every_event_once(&k, &seen, 3);
    let s = supervision(&k);
    assert_eq!(count(&s, "exchange", "escalations"), 1, "{s:?}");
    assert_eq!(count(&s, "root", "restarts"), 1, "{s:?}");
}

#[test]
fn past_the_restart_limit_keeld_exits_cleanly_and_the_restore_brings_every_task_back() {
    require_runtime();
    let mut k = Keeld::start_with_env(&[("KEEL_FAULTS", "task:victim:Pids=panic-always")]);
    k.run_detached("victim");
    k.run_detached("bystander");
    let before = [settled(&k, "victim"), settled(&k, "bystander")];
    // Three restarts in the window, then the fourth failure escalates to the root.
    for _ in 0..3 {
        k.ctl_err(&["tasks", "ps", "victim"], "internal");
        settled(&k, "victim");
    }
    let _ = k.ctl(&["tasks", "ps", "victim"]);
    let status = k.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(70), "exits for systemd: {}", k.log());
    let log = k.log();
    assert!(log.contains("escalating a failure"), "{log}");
    assert!(log.contains("exiting, for systemd"), "{log}");
    assert!(!k.socket.exists(), "a clean exit removes the socket");
    // As systemd would: start it again (without the fault).
    k.set_env("KEEL_FAULTS", None);
    k.spawn();
    assert_eq!(
        [settled(&k, "victim"), settled(&k, "bystander")],
        before,
        "every task back, with its process"
    );
    k.ctl_ok(&["tasks", "rm", "-f", "victim"]);
    k.ctl_ok(&["tasks", "rm", "-f", "bystander"]);
}

#[test]
fn the_reconciler_alone_finds_a_dead_shim_and_records_the_exit_once() {
    require_runtime();
    // The task's shim unwatched (no pidfd, no pending Wait): only the periodic
    // check of every shim's process can find it gone.
    let k = Keeld::start_with_env(&[("KEEL_FAULTS", "task:blind:Watch=fail")]);
    let mut sub = keel_tests::Subscriber::spawn(&k, &["--since", "0", "topic==\"/tasks/exit\""]);
    k.run_detached("blind");
    let (status, pid) = settled(&k, "blind");
    assert_eq!(status, "RUNNING");
    nix::sys::signal::kill(k.shim_pid("blind"), nix::sys::signal::Signal::SIGKILL).unwrap();
    // Within a tick or two of the 10 s reconciler (the deadline is keelctl's).
    let w = k.ctl(&["tasks", "wait", "blind"]);
    assert_eq!(w.status.code(), Some(137), "{}", describe(&w));
    let log = k.log();
    assert!(
        log.contains("fault injected"),
        "the fault never fired: {log}"
    );
    assert!(log.contains("reconciler: shim is gone"), "{log}");
    // The container went with its shim; its exit is published once, also past
    // the next tick.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(
        status.is_empty() || status.contains("State:\tZ"),
        "the container's process {pid} outlived its shim: {status}"
    );
    let mut exits = sub
        .until(Duration::from_secs(10), |e| {
            e["event"]["containerId"] == "blind"
        })
        .expect("an exit event");
    exits.extend(sub.take(16, Duration::from_secs(11)));
    let about: Vec<_> = exits
        .iter()
        .filter(|e| e["event"]["containerId"] == "blind")
        .map(|e| e["event"]["exitStatus"].as_u64())
        .collect();
    assert_eq!(about, [Some(137)], "{exits:#?}");
    k.ctl_ok(&["tasks", "rm", "blind"]);
    k.ctl_ok(&["containers", "rm", "blind"]);
}

#[test]
fn a_delete_keeld_died_in_after_the_shim_deleted_the_task_is_finished_at_start() {
    require_runtime();
    // keeld killed after the shim deleted the task, before the shim's shutdown
    // and the record's removal: the next start finds a shim without the task.
    let mut k = Keeld::start_with_env(&[("KEEL_FAULTS", "task:half:Shutdown=stall:120000")]);
    k.run_detached("half");
    assert_eq!(settled(&k, "half").0, "RUNNING");
    let shim = k.shim_pid("half");
    let rm = k
        .ctl_cmd(&["tasks", "rm", "-f", "half"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn keelctl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !k.log().contains("task:half:Shutdown") {
        assert!(
            Instant::now() < deadline,
            "the delete never reached the stall"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    k.kill9();
    keel_tests::finish_within(rm, &["tasks", "rm", "-f", "half"]);
    assert!(
        std::path::Path::new(&format!("/proc/{shim}")).exists(),
        "the shim was to outlive keeld"
    );
    k.set_env("KEEL_FAULTS", None);
    k.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while k.ctl_ok(&["tasks", "ls"]).contains("half") {
        assert!(Instant::now() < deadline, "the delete was never finished");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(k.log().contains("finishing the delete"), "{}", k.log());
    // As a delete that was never cut short: one exit, one delete, in that order;
    // the shim gone, the container free to be removed.
    let rt = runtime();
    let topics = topics_about(&rt.block_on(k.replay()), "half");
    let ends: Vec<_> = topics
        .iter()
        .filter(|t| *t == "/tasks/exit" || *t == "/tasks/delete")
        .collect();
    assert_eq!(ends, ["/tasks/exit", "/tasks/delete"], "{topics:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(format!("/proc/{shim}/status"))
        .is_ok_and(|s| !s.contains("State:\tZ"))
    {
        assert!(
            Instant::now() < deadline,
            "the shim of a finished delete lives on"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    k.ctl_ok(&["containers", "rm", "half"]);
}
