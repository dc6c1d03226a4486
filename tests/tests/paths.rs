//! Paths of the API that only a request shaped by hand reaches: field masks,
//! reads at the edges of a blob, signals out of range and to every process,
//! forwarded events, a task's process list.

use std::time::{Duration, Instant};

use keel_protocol::api::containers::{container, Container, UpdateContainerRequest};
use keel_protocol::api::content::ReadContentRequest;
use keel_protocol::api::events::{Envelope, ForwardRequest};
use keel_protocol::api::tasks::KillRequest;
use keel_protocol::protobuf::well_known_types::field_mask::FieldMask;
use keel_protocol::protobuf::MessageField;
use keel_tests::{busybox_rootfs, describe, require_runtime, Keeld, Subscriber};

fn labels(k: &Keeld, id: &str) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_str(&k.ctl_ok(&["containers", "info", id])).expect("container JSON");
    info["labels"].clone()
}

fn code(e: ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("not a status: {other:?}"),
    }
}

#[test]
fn containers_update_follows_its_field_mask() {
    let k = Keeld::start();
    let rootfs = busybox_rootfs();
    let rootfs = rootfs.to_str().unwrap();
    k.ctl_ok(&[
        "containers",
        "create",
        "--rootfs",
        rootfs,
        "--label",
        "a=1",
        "--label",
        "b=2",
        "c",
        "true",
    ]);
    let spec_before = k.ctl_ok(&["containers", "info", "c"]);
    let rt = keel_tests::runtime();
    let update = |labels: &[(&str, &str)], paths: &[&str]| {
        rt.block_on(async {
            let c = k.client(None).await;
            let req = UpdateContainerRequest {
                container: MessageField::some(Container {
                    id: "c".into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    runtime: MessageField::some(container::Runtime {
                        name: "io.containerd.runc.v2".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                update_mask: MessageField::some(FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            c.containers.update(c.ctx(), &req).await
        })
    };
    // One label by its path: the other stays.
    update(&[("a", "9"), ("b", "ignored")], &["labels.a"]).expect("update labels.a");
    assert_eq!(labels(&k, "c"), serde_json::json!({"a": "9", "b": "2"}));
    // A label path whose key the request leaves out removes that label.
    update(&[], &["labels.b"]).expect("update labels.b");
    assert_eq!(labels(&k, "c"), serde_json::json!({"a": "9"}));
    // `labels` replaces them all.
    update(&[("z", "1")], &["labels"]).expect("update labels");
    assert_eq!(labels(&k, "c"), serde_json::json!({"z": "1"}));
    // A path keel cannot update is refused, naming it, and changes nothing.
    let (status, msg) = code(update(&[("y", "2")], &["labels", "runtime"]).unwrap_err());
    assert_eq!(status, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.contains("update_mask") && msg.contains("runtime"),
        "{msg}"
    );
    assert_eq!(labels(&k, "c"), serde_json::json!({"z": "1"}));
    // Only labels were ever named: the spec is the one created.
    let after = k.ctl_ok(&["containers", "info", "c"]);
    let spec = |j: &str| serde_json::from_str::<serde_json::Value>(j).unwrap()["spec"].clone();
    assert_eq!(spec(&spec_before), spec(&after));
}

#[test]
fn content_reads_at_the_edges_of_a_blob() {
    let k = Keeld::start();
    let out = k.ctl_with_stdin(&["content", "ingest", "ten"], b"0123456789");
    assert!(out.status.success(), "{}", describe(&out));
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let rt = keel_tests::runtime();
    let read = |offset: i64, size: i64| -> Result<Vec<u8>, ttrpc::Error> {
        rt.block_on(async {
            let c = k.client(None).await;
            let req = ReadContentRequest {
                digest: digest.clone(),
                offset,
                size,
                ..Default::default()
            };
            let mut stream = c.content.read(c.ctx(), &req).await?;
            let mut bytes = Vec::new();
            while let Some(r) = stream.recv().await? {
                assert_eq!(r.offset, offset + i64::try_from(bytes.len()).unwrap());
                bytes.extend_from_slice(&r.data);
            }
            Ok(bytes)
        })
    };
    assert_eq!(
        read(0, 0).unwrap(),
        b"0123456789",
        "size 0 reads to the end"
    );
    assert_eq!(read(4, 3).unwrap(), b"456");
    assert_eq!(
        read(8, 100).unwrap(),
        b"89",
        "a size past the end stops at it"
    );
    assert_eq!(read(10, 0).unwrap(), b"", "at the end: nothing");
    let (status, msg) = code(read(11, 0).unwrap_err());
    assert_eq!(status, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("past the end"), "{msg}");
    let (status, msg) = code(read(-1, 0).unwrap_err());
    assert_eq!(status, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("offset"), "{msg}");
}

#[test]
fn kill_checks_its_signal_and_all_reaches_every_process() {
    require_runtime();
    let k = Keeld::start();
    let rootfs = busybox_rootfs();
    // Its init handles SIGUSR1; its two long sleeps do not (the default ends
    // them). The init's own loop goes on either way.
    let script = "trap 'echo usr1' USR1; sleep 600 & sleep 601 & echo ready; \
                  while true; do sleep 1; done";
    let out = k.ctl(&[
        "run",
        "-d",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "k",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !k.ctl_ok(&["tasks", "logs", "k"]).contains("ready") {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The task's processes (host pids, from ListPids) that are the long sleeps.
    let sleepers = |k: &Keeld| -> Vec<u32> {
        k.ctl_ok(&["tasks", "ps", "k"])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                cmd.starts_with(b"sleep\x0060")
            })
            .collect()
    };
    assert_eq!(sleepers(&k).len(), 2, "{}", k.ctl_ok(&["tasks", "ps", "k"]));
    let rt = keel_tests::runtime();
    let kill = |signal: u32, all: bool| {
        rt.block_on(async {
            let c = k.client(None).await;
            let req = KillRequest {
                container_id: "k".into(),
                signal,
                all,
                ..Default::default()
            };
            c.tasks.kill(c.ctx(), &req).await
        })
    };
    for bad in [65, 1000] {
        let (status, msg) = code(kill(bad, false).unwrap_err());
        assert_eq!(status, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
        assert!(msg.contains("signal"), "{msg}");
    }
    // Signal 0 only asks whether the process is there.
    kill(0, false).expect("signal 0 to a running task");
    // SIGUSR1 to the init alone: handled; the sleeps never see it.
    kill(10, false).expect("kill");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !k.ctl_ok(&["tasks", "logs", "k"]).contains("usr1") {
        assert!(Instant::now() < deadline, "the init never got SIGUSR1");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        sleepers(&k).len(),
        2,
        "a signal to the init reached its children"
    );
    // SIGUSR1 to every process: the sleeps end, the init runs on.
    kill(10, true).expect("kill --all");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sleepers(&k).is_empty() {
        assert!(
            Instant::now() < deadline,
            "--all never reached the children"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(k.ctl_ok(&["tasks", "ls"]).contains("RUNNING"));
    k.ctl_ok(&["tasks", "rm", "-f", "k"]);
    k.ctl_ok(&["containers", "rm", "k"]);
}

#[test]
fn a_forwarded_event_reaches_subscribers_with_its_namespace_and_topic() {
    let k = Keeld::start();
    // From sequence 0: the first event reaches it however late it subscribes.
    let mut sub = Subscriber::spawn(&k, &["--since", "0", "topic~=^/app/"]);
    let out = k.ctl_with_stdin(&["events", "publish", "--topic", "/app/ready"], b"{}");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(sub.take(1, Duration::from_secs(20)).len(), 1);
    let rt = keel_tests::runtime();
    rt.block_on(async {
        let c = k.client(None).await;
        let req = ForwardRequest {
            envelope: MessageField::some(Envelope {
                namespace: k.namespace.clone(),
                topic: "/app/forwarded".into(),
                event: MessageField::some(keel_protocol::types::json_any(
                    "google.protobuf.Struct",
                    Vec::new(),
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.events.forward(c.ctx(), &req).await.expect("forward");
    });
    let got = sub.take(1, Duration::from_secs(20));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["topic"], "/app/forwarded", "{}", got[0]);
    assert_eq!(got[0]["namespace"], k.namespace.as_str(), "{}", got[0]);
    assert!(got[0]["seq"].as_u64().unwrap() > 0, "{}", got[0]);
}

#[test]
fn content_write_protocol_errors_name_what_is_wrong_and_commit_nothing() {
    use keel_protocol::api::content::{WriteAction, WriteContentRequest};
    use keel_protocol::Error;
    let k = Keeld::start();
    let rt = keel_tests::runtime();
    let req = |action: WriteAction, r: &str, offset: i64, data: &[u8]| WriteContentRequest {
        action: action.into(),
        ref_: r.into(),
        offset,
        data: data.to_vec(),
        ..Default::default()
    };
    // Sends the requests on a stream of their own; the error it ends with.
    let ends_with = |reqs: Vec<WriteContentRequest>| -> Error {
        rt.block_on(async {
            let c = k.client(None).await;
            let mut s = c.content.write(c.ctx()).await.expect("write stream");
            for r in reqs {
                if s.send(&r).await.is_err() {
                    break;
                }
            }
            s.close_send().await.ok();
            loop {
                match s.recv().await {
                    Ok(_) => continue,
                    Err(e) => return Error::from(e),
                }
            }
        })
    };
    let stat = req(WriteAction::STAT, "w", 0, b"");
    let cases = [
        (
            vec![req(WriteAction::STAT, "w", 0, b"data")],
            "a STAT request carries no data",
        ),
        (
            vec![stat.clone(), req(WriteAction::WRITE, "w", 0, b"")],
            "a WRITE request needs data",
        ),
        (
            vec![stat.clone(), req(WriteAction::WRITE, "other", 0, b"x")],
            "differs from the stream's ref",
        ),
        (
            vec![stat.clone(), req(WriteAction::WRITE, "w", -1, b"x")],
            "offset",
        ),
        (
            vec![
                stat.clone(),
                req(WriteAction::WRITE, "w", 0, b"12345"),
                req(WriteAction::WRITE, "w", 2, b"x"),
            ],
            "write at offset 2, but ref \"w\" has 5 bytes",
        ),
        (
            vec![
                stat.clone(),
                req(WriteAction::WRITE, "w", 9, b"x"),
                req(WriteAction::WRITE, "w", 9, b"y"),
            ],
            "two WRITE requests at offset 9",
        ),
    ];
    for (reqs, want) in cases {
        let e = ends_with(reqs);
        let text = e.to_string();
        assert!(
            matches!(e, Error::InvalidArgument(_) | Error::FailedPrecondition(_)),
            "{want}: {e:?}"
        );
        assert!(text.contains(want), "{want}: {text}");
    }
    // Nothing was committed.
    let ls = k.ctl_ok(&["content", "ls", "--format", "json"]);
    assert!(ls.trim().is_empty(), "{ls}");
}

#[test]
fn update_checks_resources_and_annotations_and_applies_them() {
    use keel_protocol::api::tasks::UpdateTaskRequest;
    require_runtime();
    let k = Keeld::start();
    k.run_detached("u");
    let rt = keel_tests::runtime();
    let update = |resources: Option<&[u8]>, annotations: &[(String, String)]| {
        rt.block_on(async {
            let c = k.client(None).await;
            let req = UpdateTaskRequest {
                container_id: "u".into(),
                resources: resources
                    .map(|r| {
                        keel_protocol::types::json_any(
                            "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                            r.to_vec(),
                        )
                    })
                    .into(),
                annotations: annotations.iter().cloned().collect(),
                ..Default::default()
            };
            c.tasks.update(c.ctx(), &req).await
        })
    };
    let refused = |r: Result<_, ttrpc::Error>, want: &str| {
        let (status, msg) = code(r.unwrap_err());
        assert_eq!(status, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
        assert!(msg.contains(want), "{want}: {msg}");
    };
    refused(update(None, &[]), "nothing to update");
    refused(update(Some(b"[1, 2]"), &[]), "resources");
    refused(
        update(Some(br#"{"pids": {"limit": "many"}}"#), &[]),
        "resources",
    );
    let many: Vec<(String, String)> = (0..300).map(|i| (format!("k{i}"), "v".into())).collect();
    refused(update(None, &many), "annotations");
    // A valid update reaches the container's cgroup.
    update(
        Some(br#"{"pids": {"limit": 77}}"#),
        &[("note".into(), "x".into())],
    )
    .expect("update");
    let m: serde_json::Value =
        serde_json::from_str(&k.ctl_ok(&["tasks", "metrics", "--format", "json", "u"])).unwrap();
    assert_eq!(m["pids_limit"], 77, "{m}");
    k.ctl_ok(&["tasks", "rm", "-f", "u"]);
    k.ctl_ok(&["containers", "rm", "u"]);
}

/// Rows of `keelctl tasks ps`: (pid, exec id; empty for the init process).
fn ps(k: &Keeld, id: &str) -> Vec<(u32, String)> {
    k.ctl_ok(&["tasks", "ps", id])
        .lines()
        .skip(1)
        .map(|l| {
            let mut cols = l.split_whitespace();
            let pid = cols.next().and_then(|p| p.parse().ok()).expect("a pid");
            (pid, cols.next().unwrap_or_default().to_string())
        })
        .collect()
}

fn task_pid(k: &Keeld, id: &str) -> u32 {
    k.ctl_ok(&["tasks", "ls"])
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols[1].parse().expect("pid"))
        })
        .expect("the task is listed")
}

fn cmdline(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

#[test]
fn ps_lists_the_init_and_each_exec_process_by_its_exec_id() {
    require_runtime();
    let k = Keeld::start();
    let rootfs = busybox_rootfs();
    let run = [
        "run",
        "-d",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "p",
        "sleep",
        "600",
    ];
    let out = k.ctl(&run);
    assert!(out.status.success(), "{}", describe(&out));
    let init = task_pid(&k, "p");
    assert_eq!(ps(&k, "p"), vec![(init, String::new())]);
    // The init process is named by the task's id, as containerd names it.
    let rt = keel_tests::runtime();
    let got = rt.block_on(async {
        let c = k.client(None).await;
        let req = keel_protocol::api::tasks::GetRequest {
            container_id: "p".into(),
            ..Default::default()
        };
        c.tasks.get(c.ctx(), &req).await.expect("get")
    });
    assert_eq!(got.process.id, "p");
    let args = ["tasks", "exec", "--exec-id", "e1", "p", "sleep", "601"];
    let exec = k
        .ctl_cmd(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn keelctl");
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = ps(&k, "p");
        if rows.len() == 2 {
            break rows;
        }
        assert!(Instant::now() < deadline, "the exec never listed: {rows:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(rows.contains(&(init, String::new())), "{rows:?}");
    let (exec_pid, _) = rows
        .iter()
        .find(|(_, e)| e == "e1")
        .unwrap_or_else(|| panic!("no row for exec e1: {rows:?}"));
    assert!(cmdline(*exec_pid).starts_with(b"sleep\x00601"), "{rows:?}");
    k.ctl_ok(&["tasks", "kill", "-s", "9", "--exec-id", "e1", "p"]);
    let out = keel_tests::finish_within(exec, &args);
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    assert_eq!(ps(&k, "p"), vec![(init, String::new())]);
    k.ctl_ok(&["tasks", "rm", "-f", "p"]);
    k.ctl_ok(&["containers", "rm", "p"]);
}

#[test]
fn list_applies_its_filter() {
    require_runtime();
    let k = Keeld::start();
    let rootfs = busybox_rootfs();
    for id in ["la", "lb"] {
        let out = k.ctl(&[
            "run",
            "-d",
            "--rootfs",
            rootfs.to_str().unwrap(),
            id,
            "sleep",
            "600",
        ]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    k.ctl_ok(&["tasks", "kill", "-s", "9", "lb"]);
    let w = k.ctl(&["tasks", "wait", "lb"]);
    assert_eq!(w.status.code(), Some(137), "{}", describe(&w));
    let pid_a = task_pid(&k, "la");
    let rt = keel_tests::runtime();
    let list = |filter: &str| {
        rt.block_on(async {
            let c = k.client(None).await;
            let req = keel_protocol::api::tasks::ListTasksRequest {
                filter: filter.into(),
                ..Default::default()
            };
            c.tasks.list(c.ctx(), &req).await.map(|r| {
                let mut ids: Vec<String> = r.tasks.iter().map(|t| t.container_id.clone()).collect();
                ids.sort();
                ids
            })
        })
    };
    assert_eq!(list("").unwrap(), ["la", "lb"]);
    assert_eq!(list("status==stopped").unwrap(), ["lb"]);
    assert_eq!(list("status==running").unwrap(), ["la"]);
    assert_eq!(list(&format!("pid=={pid_a}")).unwrap(), ["la"]);
    assert_eq!(list("id~=^l,status!=running").unwrap(), ["lb"]);
    assert!(list("namespace==elsewhere").unwrap().is_empty());
    let (status, msg) = code(list("id==").unwrap_err());
    assert_eq!(status, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    k.ctl_ok(&["tasks", "rm", "-f", "la"]);
    k.ctl_ok(&["tasks", "rm", "lb"]);
    for id in ["la", "lb"] {
        k.ctl_ok(&["containers", "rm", id]);
    }
}
