//! Hostile requests from allowed clients, against a real keeld with real containers:
//! each gets a clear error, keeld keeps answering Version (timed from a connection
//! of its own) throughout, and no task, exit, event or blob is lost, also across a
//! kill -9 and restart right after the hostile request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keel_protocol::api::containers::{Container, CreateContainerRequest};
use keel_protocol::api::events::{Envelope, ForwardRequest, PublishRequest, SubscribeRequest};
use keel_protocol::api::tasks::{CreateTaskRequest, ExecProcessRequest, GetRequest, Status};
use keel_protocol::types::{json_any, PROCESS_TYPE_URL};
use keel_protocol::{Client, Error};
use keel_tests::{
    busybox_rootfs, describe, require_runtime, runtime, topics_about, Keeld, VersionWatch,
};
use protobuf::MessageField;
use serde_json::Value;

/// A keeld running one sleeping task, `victim`; its settled (status, pid).
fn victim() -> (Keeld, tokio::runtime::Runtime, (Status, u32)) {
    require_runtime();
    let k = Keeld::start();
    k.run_detached("victim");
    let rt = runtime();
    let before = rt.block_on(async { settled(&k.client(None).await, "victim").await });
    (k, rt, before)
}

/// kill -9 and restart keeld; asserts `victim` comes back as it was, and returns
/// the event log.
fn restart_unharmed(
    k: &mut Keeld,
    rt: &tokio::runtime::Runtime,
    before: (Status, u32),
) -> Vec<Envelope> {
    k.kill9();
    k.spawn();
    rt.block_on(async {
        let c = k.client(None).await;
        assert_eq!(settled(&c, "victim").await, before, "after a restart");
    });
    rt.block_on(k.replay())
}

/// (status, pid) of task `id`.
async fn task(c: &Client, id: &str) -> Result<(Status, u32), Error> {
    let p = c
        .tasks
        .get(
            c.ctx(),
            &GetRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .map_err(Error::from)?
        .process
        .into_option()
        .expect("process");
    Ok((p.status.enum_value_or_default(), p.pid))
}

/// Waits until task `id` is no longer UNKNOWN (a restart probes its shim).
async fn settled(c: &Client, id: &str) -> (Status, u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = task(c, id).await.expect("task");
        if t.0 != Status::UNKNOWN {
            return t;
        }
        assert!(Instant::now() < deadline, "task {id} stays unknown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, ttrpc::Error>) -> Error {
    Error::from(r.expect_err("the request must fail"))
}

#[test]
fn an_exec_of_the_wrong_shape_is_refused_and_the_task_lives_on() {
    let (mut k, rt, before) = victim();
    let watch = VersionWatch::start(&k);
    rt.block_on(async {
        let c = k.client(None).await;
        // Valid JSON, each of a shape an OCI Process is not. serde reads the first
        // (its 16 fields in order) as a Process with args ["sh"]: it once aborted
        // keeld.
        for (json, want) in [
            (
                r#"[false, null, {"uid":0,"gid":0}, ["sh"], null, null, "/", null, null, null, null, null, null, null, null, null]"#,
                "not an array",
            ),
            (r#"[["sh"],{"uid":0,"gid":0},"/"]"#, "not an array"),
            ("[]", "not an array"),
            ("null", "not null"),
            ("42", "not a number"),
            (r#"{"args":"sh","cwd":"/"}"#, "not a valid OCI Process"),
            (r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#, "name a program"),
        ] {
            let req = ExecProcessRequest {
                container_id: "victim".into(),
                exec_id: "x1".into(),
                spec: MessageField::some(json_any(PROCESS_TYPE_URL, json.as_bytes().to_vec())),
                ..Default::default()
            };
            let e = expect_err(c.tasks.exec(c.ctx(), &req).await);
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.starts_with("spec") && m.contains(want)),
                "{json}: {e:?}"
            );
        }
        assert_eq!(settled(&c, "victim").await, before, "the task is untouched");
    });
    watch
        .finish()
        .assert_responsive("exec of the wrong shape", 1);
    let events = restart_unharmed(&mut k, &rt, before);
    assert!(
        !topics_about(&events, "victim")
            .iter()
            .any(|t| t == "/tasks/exit"),
        "no exit was published"
    );
    k.ctl_ok(&["tasks", "rm", "-f", "victim"]);
}

#[test]
fn filters_are_bounded_and_compiled_where_they_hold_up_no_one() {
    let k = Keeld::start();
    let rt = runtime();
    // Heavy selectors: alternations under counted repetition.
    let heavy = |i: usize| format!("topic~=\"(a{i}|b+|c*d|[e-z]{{2,9}}){{1,20}}x\"");
    let watch = VersionWatch::start(&k);
    rt.block_on(async {
        let c = k.client(None).await;
        let subscribe = |filters: Vec<String>| {
            let c = c.clone();
            async move {
                let req = SubscribeRequest {
                    filters,
                    ..Default::default()
                };
                let mut s = c.events.subscribe(c.ctx(), &req).await?;
                // A bad filter fails the stream at once; a good one stays open.
                match tokio::time::timeout(Duration::from_millis(300), s.recv()).await {
                    Ok(r) => r.map(|_| ()),
                    Err(_) => Ok(()),
                }
            }
        };
        // What the issue tried: a few hundred heavy selectors in one filter.
        let three_hundred: Vec<String> = (0..300).map(heavy).collect();
        let e = Error::from(subscribe(vec![three_hundred.join(",")]).await.unwrap_err());
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("filter") && m.contains("limit is 1024")),
            "{e:?}"
        );
        let cases: Vec<(Vec<String>, &str)> = vec![
            ((0..17).map(|_| "topic==/a".to_string()).collect(), "17 filters given, the limit is 16"),
            (vec![(0..33).map(|i| format!("t{i}")).collect::<Vec<_>>().join(",")], "more than 32 selectors"),
            (vec!["topic~=((a{100}){100}){100}".into()], "invalid regular expression"),
        ];
        for (filters, want) in cases {
            let e = Error::from(subscribe(filters.clone()).await.unwrap_err());
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.contains(want)),
                "{filters:?}: {e:?}"
            );
        }
        // The largest filters allowed, sixteen subscribers at once: compiled on the
        // blocking pool, matched there when heavy; each still gets its events.
        let maximal: Vec<String> = (0..16)
            .map(|f| {
                let mut filter = String::new();
                for i in 0..31 {
                    let sel = format!("topic~=\"(a{f}_{i}|b+|c*d|[e-z]{{2,4}}){{1,3}}\",");
                    if filter.len() + sel.len() + "namespace".len() > 1024 {
                        break;
                    }
                    filter.push_str(&sel);
                }
                filter.push_str("namespace");
                filter
            })
            .collect();
        let mut streams = Vec::new();
        for _ in 0..16 {
            let mut filters = maximal.clone();
            filters[15] = "topic==\"/app/seen\"".into();
            let req = SubscribeRequest {
                filters,
                ..Default::default()
            };
            streams.push(c.events.subscribe(c.ctx(), &req).await.expect("subscribe"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.events
            .publish(
                c.ctx(),
                &PublishRequest {
                    topic: "/app/seen".into(),
                    event: MessageField::some(json_any("google.protobuf.Struct", vec![])),
                    ..Default::default()
                },
            )
            .await
            .expect("publish");
        for s in &mut streams {
            let e = tokio::time::timeout(Duration::from_secs(10), s.recv())
                .await
                .expect("delivered")
                .expect("event")
                .expect("the stream goes on");
            assert_eq!(e.topic, "/app/seen");
        }
    });
    watch.finish().assert_responsive("maximal filters", 10);
}

#[test]
fn only_keel_writes_the_lifecycle_and_a_restart_trusts_nothing_else() {
    let (mut k, rt, before) = victim();
    let watch = VersionWatch::start(&k);
    rt.block_on(async {
        let c = k.client(None).await;
        let ns = k.namespace.clone();
        let forged = |topic: &str| -> protobuf::well_known_types::any::Any {
            use keel_protocol::containerd::events::{container as cev, task as tev};
            let pack = |r: Result<protobuf::well_known_types::any::Any, Error>| r.expect("pack");
            match topic {
                "/tasks/exit" => pack(keel_protocol::types::pack(&tev::TaskExit {
                    container_id: "victim".into(),
                    id: "victim".into(),
                    pid: before.1,
                    exit_status: 137,
                    ..Default::default()
                })),
                "/tasks/delete" => pack(keel_protocol::types::pack(&tev::TaskDelete {
                    container_id: "victim".into(),
                    id: "victim".into(),
                    ..Default::default()
                })),
                _ => pack(keel_protocol::types::pack(&cev::ContainerDelete {
                    id: "victim".into(),
                    ..Default::default()
                })),
            }
        };
        for topic in [
            "/tasks/delete",
            "/tasks/exit",
            "/containers/delete",
            "/keel/events/gap",
        ] {
            // keel's Publish…
            let e = expect_err(
                c.events
                    .publish(
                        c.ctx(),
                        &PublishRequest {
                            topic: topic.into(),
                            event: MessageField::some(forged(topic)),
                            ..Default::default()
                        },
                    )
                    .await,
            );
            assert!(
                matches!(&e, Error::PermissionDenied(m) if m.contains(topic)),
                "{e:?}"
            );
            // …its Forward…
            let env = Envelope {
                namespace: ns.clone(),
                topic: topic.into(),
                event: MessageField::some(forged(topic)),
                ..Default::default()
            };
            let e = expect_err(
                c.events
                    .forward(
                        c.ctx(),
                        &ForwardRequest {
                            envelope: MessageField::some(env),
                            ..Default::default()
                        },
                    )
                    .await,
            );
            assert!(matches!(&e, Error::PermissionDenied(_)), "{e:?}");
        }
        // …and the shims' Forward, from a process that is not the task's shim.
        let raw = ttrpc::asynchronous::Client::connect(&format!("unix://{}", k.socket.display()))
            .await
            .expect("connect");
        let shim_events = keel_protocol::containerd::shim_async::EventsClient::new(raw);
        for topic in ["/tasks/exit", "/tasks/delete", "/tasks/oom"] {
            let req = keel_protocol::containerd::api::ForwardRequest {
                envelope: MessageField::some(keel_protocol::containerd::shim::event::Envelope {
                    namespace: ns.clone(),
                    topic: topic.into(),
                    event: MessageField::some(forged(if topic == "/tasks/oom" {
                        "/tasks/exit"
                    } else {
                        topic
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let e = expect_err(shim_events.forward(c.ctx(), &req).await);
            assert!(
                matches!(&e, Error::PermissionDenied(m) if m.contains("only from its shim")),
                "{topic}: {e:?}"
            );
        }
        // keelctl says so too.
        let out = k.ctl_with_stdin(
            &["events", "publish", "--topic", "/tasks/delete"],
            b"{\"container_id\": \"victim\"}\n",
        );
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("permission denied"),
            "{}",
            describe(&out)
        );
        assert_eq!(settled(&c, "victim").await, before);
    });
    watch
        .finish()
        .assert_responsive("forged lifecycle events", 1);
    // A restart right after trusts only what keel recorded: the task is there, with
    // its process, and nothing about it was published.
    let events = restart_unharmed(&mut k, &rt, before);
    let topics = topics_about(&events, "victim");
    assert_eq!(
        topics,
        vec!["/containers/create", "/tasks/create", "/tasks/start"],
        "the log holds keel's own events only"
    );
    assert!(
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(before.1).unwrap()),
            None
        )
        .is_ok(),
        "the container's process lives"
    );
    // The task's own shim was never refused, not even while keel's create was
    // still under way when it sent its `/tasks/create`.
    let log = k.log();
    assert!(
        !log.contains("msg=\"post event\"") && !log.contains("msg=\"forward event\""),
        "a shim's event refused: {log}"
    );
    let out = k.ctl(&["tasks", "kill", "-s", "KILL", "victim"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(k.ctl(&["tasks", "wait", "victim"]).status.code(), Some(137));
    k.ctl_ok(&["tasks", "rm", "victim"]);
    k.ctl_ok(&["containers", "rm", "victim"]);
}

/// Of two concurrent creates, the one that succeeded; the other must have got
/// AlreadyExists.
fn one_wins<T: std::fmt::Debug>(a: ttrpc::Result<T>, b: ttrpc::Result<T>) -> T {
    match (a, b) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => {
            let lost = Error::from(lost);
            assert!(matches!(lost, Error::AlreadyExists(_)), "{lost:?}");
            won
        }
        other => panic!("want one success and one AlreadyExists: {other:?}"),
    }
}

#[test]
fn concurrent_creates_of_one_id_give_one_winner_and_already_exists() {
    require_runtime();
    let k = Keeld::start();
    let rootfs = busybox_rootfs();
    let rt = runtime();
    let watch = VersionWatch::start(&k);
    for round in 0..4 {
        let id = format!("twin{round}");
        k.ctl_ok(&[
            "containers",
            "create",
            "--rootfs",
            rootfs.to_str().unwrap(),
            &id,
            "sleep",
            "100000",
        ]);
        rt.block_on(async {
            let (a, b) = (k.client(None).await, k.client(None).await);
            let req = CreateTaskRequest {
                container_id: id.clone(),
                log_to_file: true,
                ..Default::default()
            };
            let (ra, rb) =
                tokio::join!(a.tasks.create(a.ctx(), &req), b.tasks.create(b.ctx(), &req));
            let won = one_wins(ra, rb);
            assert!(won.pid > 0);
            // The winner is untouched: it starts and runs.
            a.tasks
                .start(
                    a.ctx(),
                    &keel_protocol::api::tasks::StartRequest {
                        container_id: id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .expect("the winner starts");
            assert_eq!(task(&a, &id).await.unwrap().0, Status::RUNNING);
            // A container of the same id, created twice at once: one each way.
            let spec = a
                .containers
                .get(
                    a.ctx(),
                    &keel_protocol::api::containers::GetContainerRequest {
                        id: id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .expect("get")
                .container
                .into_option()
                .expect("container");
            let twin = format!("{id}-c");
            let creq = CreateContainerRequest {
                container: MessageField::some(Container {
                    id: twin.clone(),
                    ..spec
                }),
                ..Default::default()
            };
            let (ca, cb) = tokio::join!(
                a.containers.create(a.ctx(), &creq),
                b.containers.create(b.ctx(), &creq)
            );
            one_wins(ca, cb);
            // Two execs of one exec id: one runs, one gets AlreadyExists.
            let exec = ExecProcessRequest {
                container_id: id.clone(),
                exec_id: "e".into(),
                spec: MessageField::some(json_any(
                    PROCESS_TYPE_URL,
                    br#"{"args":["sleep","100"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
                )),
                ..Default::default()
            };
            let (ea, eb) = tokio::join!(a.tasks.exec(a.ctx(), &exec), b.tasks.exec(b.ctx(), &exec));
            one_wins(ea, eb);
            k.ctl_ok(&["containers", "rm", &twin]);
        });
        k.ctl_ok(&["tasks", "rm", "-f", &id]);
        k.ctl_ok(&["containers", "rm", &id]);
    }
    // Four rounds take a few hundred milliseconds on a fast machine: a handful of
    // answers is all the watch can see, and none may be slow.
    watch.finish().assert_responsive("concurrent creates", 3);
}

#[test]
fn event_memory_is_bounded_by_bytes_also_across_a_restart() {
    let budget: u64 = 24 << 20;
    let limit = 3_840 << 10;
    let mut k = Keeld::start_with_config(&format!(
        "[events]\nretain_bytes = {budget}\n[limits]\nevent_bytes = {limit}\n"
    ));
    let rt = runtime();
    let payload = 3_584 << 10; // 3.5 MiB
    let watch = VersionWatch::start(&k);
    rt.block_on(async {
        let c = k.client(None).await;
        let event = |n: u8, size: usize| PublishRequest {
            topic: "/app/blob".into(),
            event: MessageField::some(json_any("example.Blob", vec![n; size])),
            ..Default::default()
        };
        let e = expect_err(c.events.publish(c.ctx(), &event(0, limit)).await);
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.starts_with("event:") && m.contains(&format!("limit is {limit}"))),
            "{e:?}"
        );
        for n in 0..60u8 {
            c.events
                .publish(c.ctx(), &event(n, payload))
                .await
                .expect("publish");
        }
    });
    watch.finish().assert_responsive("large events", 10);
    let retained = |k: &Keeld| {
        let events = rt.block_on(k.replay());
        let blobs: Vec<&Envelope> = events.iter().filter(|e| e.topic == "/app/blob").collect();
        let bytes: u64 = blobs
            .iter()
            .map(|e| e.event.as_ref().map_or(0, |a| a.value.len() as u64))
            .sum();
        let last = blobs.last().map(|e| e.event.as_ref().unwrap().value[0]);
        (blobs.len(), bytes, last)
    };
    let (n, bytes, last) = retained(&k);
    assert!(bytes <= budget, "{n} events, {bytes} bytes retained");
    assert!(n >= 5, "the newest that fit are kept: {n}");
    assert_eq!(last, Some(59), "the newest is kept");
    let rss_before = k.rss_kib();
    k.kill9();
    k.spawn();
    let (n2, bytes2, last2) = retained(&k);
    assert_eq!((n2, last2), (n, last), "the same events come back");
    assert!(bytes2 <= budget);
    let rss_after = k.rss_kib();
    eprintln!(
        "60 × 3.5 MiB published, {n} retained ({bytes} bytes); RSS {rss_before} KiB, after a restart {rss_after} KiB"
    );
    // 210 MiB were published: without a byte budget the ring alone would hold them.
    assert!(
        rss_after < (budget >> 10) * 3 + 64 * 1024,
        "RSS after a restart {rss_after} KiB"
    );
}

#[test]
fn ingests_are_bounded() {
    let k = Keeld::start_with_config("[limits]\nwriters = 2\nwriter_buffer_bytes = 1048576\n");
    let rt = runtime();
    let watch = VersionWatch::start(&k);
    rt.block_on(async {
        use keel_protocol::api::content::{WriteAction, WriteContentRequest};
        // Each writer on a connection of its own: a stream ends with its connection.
        let open = |r: &str| {
            let r = r.to_string();
            let k = &k;
            async move {
                let c = k.client(None).await;
                let s = c.content.write(c.ctx()).await.map_err(Error::from)?;
                s.send(&WriteContentRequest {
                    action: WriteAction::STAT.into(),
                    ref_: r,
                    ..Default::default()
                })
                .await
                .map_err(Error::from)?;
                let mut s = s;
                s.recv().await.map_err(Error::from)?;
                Ok::<_, Error>((c, s))
            }
        };
        let w1 = open("a").await.expect("first writer");
        let w2 = open("b").await.expect("second writer");
        let e = open("c").await.expect_err("third writer");
        assert!(
            matches!(&e, Error::ResourceExhausted(m) if m.contains("limits.writers")),
            "{e:?}"
        );
        drop(w1);
        drop(w2);
        // The permits come back once those streams end.
        let mut ok = None;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(s) = open("d").await {
                ok = Some(s);
                break;
            }
        }
        let (_c, w) = ok.expect("a writer once the others are gone");
        // Writes far ahead of the offset, more than the buffer holds: the second
        // overflows it. No more after it: ttrpc answers a message for a stream
        // the handler has ended with a status of its own ("Stream is no longer
        // active"), which may reach the client before keeld's refusal.
        for i in 1..=2u64 {
            let _ = w
                .send(&WriteContentRequest {
                    action: WriteAction::WRITE.into(),
                    offset: i64::try_from(i * (600 << 10)).unwrap(),
                    data: vec![1; 600 << 10],
                    ..Default::default()
                })
                .await;
        }
        let mut w = w;
        let e = Error::from(
            tokio::time::timeout(Duration::from_secs(10), w.recv())
                .await
                .expect("an answer")
                .expect_err("refused"),
        );
        assert!(
            matches!(&e, Error::ResourceExhausted(m) if m.contains("limits.writer_buffer_bytes")),
            "{e:?}"
        );
    });
    watch.finish().assert_responsive("bounded ingests", 5);
    // An ordinary ingest still works.
    let dir = tempfile::tempdir().unwrap();
    let (path, digest) = keel_tests::random_file(dir.path(), "blob", 3 << 20, 7);
    let out = k.ctl_with_stdin(&["content", "ingest", "ok"], &std::fs::read(path).unwrap());
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
}

#[test]
fn a_reader_reads_and_does_nothing_else() {
    use std::os::unix::process::CommandExt;
    keel_tests::require_root("running keelctl as another uid");
    let nobody = 65534;
    let k = Keeld::start_with_config(&format!(
        "[[access]]\nuid = {nobody}\nrole = \"reader\"\nnamespaces = [\"seen\"]\n"
    ));
    let keelctl = k.open_to_all_uids();
    let as_nobody = |args: &[&str]| {
        std::process::Command::new(&keelctl)
            .arg("--address")
            .arg(&k.socket)
            .args(args)
            .uid(nobody)
            .gid(nobody)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("keelctl as nobody")
    };
    for args in [
        &["version"][..],
        &["-n", "seen", "containers", "ls"],
        &["-n", "seen", "tasks", "ls"],
        &["-n", "seen", "content", "ls"],
    ] {
        let out = as_nobody(args);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
    }
    for (args, want) in [
        (
            &[
                "-n",
                "seen",
                "content",
                "rm",
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            ][..],
            "needs the admin role",
        ),
        (
            &["-n", "seen", "containers", "rm", "x"][..],
            "needs the admin role",
        ),
        (
            &["-n", "other", "containers", "ls"][..],
            "may not use namespace other",
        ),
        (&["containers", "ls"][..], "may not use namespace default"),
    ] {
        let out = as_nobody(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("permission denied") && err.contains(want),
            "{args:?}: {}",
            describe(&out)
        );
    }
    // Its subscription sees its namespace's events only.
    let mut sub = std::process::Command::new(&keelctl)
        .arg("--address")
        .arg(&k.socket)
        .args(["-n", "seen", "events", "--format", "json", "topic~=^/app/"])
        .uid(nobody)
        .gid(nobody)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for ns in ["other", "seen"] {
        let out = k.ctl_cmd(&["-n", ns, "events", "publish", "--topic", "/app/x"]);
        let mut out = out;
        let res = out
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut ch| {
                use std::io::Write;
                ch.stdin.take().unwrap().write_all(b"{\"ns\": 1}\n")?;
                ch.wait_with_output()
            })
            .unwrap();
        assert!(res.status.success(), "{}", describe(&res));
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = sub.kill();
    let out = sub.wait_with_output().unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["namespace"], "seen");
    k.assert_serving();
}

/// A ttrpc frame: header (length, stream id, type, flags), then the payload.
fn frame(stream_id: u32, kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(10 + payload.len());
    f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    f.extend_from_slice(&stream_id.to_be_bytes());
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(payload);
    f
}

/// A Version request frame.
fn version_frame(stream_id: u32) -> Vec<u8> {
    use protobuf::Message;
    let req = ttrpc::Request {
        service: "keel.services.version.v1.Version".into(),
        method: "Version".into(),
        ..Default::default()
    };
    frame(stream_id, 1, 0, &req.write_to_bytes().unwrap())
}

#[test]
fn a_wire_level_hostile_client_hurts_no_one() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let k = Keeld::start_with_config("[limits]\nconnections = 64\nrequests_per_connection = 16\n");
    let watch = VersionWatch::start(&k);
    let connect = || UnixStream::connect(&k.socket).expect("connect");
    // The frame a well-behaved client sends, answered.
    {
        let mut s = connect();
        s.write_all(&version_frame(1)).unwrap();
        let mut head = [0u8; 10];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[8], 2, "a response frame");
    }
    // Garbage, and frames claiming more than ttrpc accepts.
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..200 {
        let mut s = connect();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let bytes: Vec<u8> = match round % 4 {
            0 => (0..(next() % 4096))
                .map(|_| next().to_le_bytes()[0])
                .collect(),
            1 => frame(1, 1, 0, &[]).into_iter().chain([0xff; 16]).collect(),
            2 => {
                let mut f = frame(3, 1, 0, &[]);
                f[..4].copy_from_slice(&u32::MAX.to_be_bytes());
                f
            }
            _ => {
                // A real request with a few bytes flipped.
                let mut f = version_frame(u32::try_from(next() % 1000).unwrap() | 1);
                for _ in 0..3 {
                    let i = usize::try_from(next()).unwrap() % f.len();
                    f[i] ^= next().to_le_bytes()[0];
                }
                f
            }
        };
        let _ = s.write_all(&bytes);
        let mut sink = [0u8; 4096];
        let _ = s.read(&mut sink);
    }
    // Half-open connections that never finish a frame, up to the connection cap.
    let mut idle = Vec::new();
    for _ in 0..40 {
        let mut s = connect();
        let _ = s.write_all(&version_frame(1)[..5]);
        idle.push(s);
    }
    k.assert_serving();
    // Connections past the cap are refused, and come back once others close.
    let mut extra = Vec::new();
    for _ in 0..40 {
        extra.push(connect());
    }
    let refused = extra
        .iter()
        .filter(|s| {
            let mut s: &UnixStream = s;
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.write_all(&version_frame(1));
            let mut b = [0u8; 10];
            matches!(s.read(&mut b), Ok(0) | Err(_))
        })
        .count();
    assert!(
        refused >= 10,
        "only {refused} of 40 connections over the cap refused"
    );
    drop(extra);
    drop(idle);
    std::thread::sleep(Duration::from_millis(500));
    k.assert_serving();
    // A slow reader: requests sent as fast as possible, answers never read.
    let mut s = connect();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut sent = 0u32;
    let closed = loop {
        let f = version_frame(2 * sent + 1);
        match s.write_all(&f) {
            Ok(()) => sent += 1,
            Err(_) => break true,
        }
        if sent >= 200_000 {
            break false;
        }
    };
    // Its connection is closed by keeld (a write fails, or the reader sees the end).
    let ended = closed || {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break true,
                Ok(_) if Instant::now() > deadline => break false,
                Ok(_) => {}
            }
        }
    };
    assert!(
        ended,
        "a client that never reads its answers is cut off ({sent} sent)"
    );
    assert!(
        k.log().contains("does not read its answers"),
        "the cut-off is logged"
    );
    watch
        .finish()
        .assert_responsive("wire-level hostile client", 20);
    k.assert_serving();
}

#[test]
fn labels_and_paths_are_bounded_with_errors_naming_the_field() {
    require_runtime();
    let k = Keeld::start();
    let rootfs = busybox_rootfs();
    let long = "v".repeat(5000);
    k.ctl_err(
        &[
            "containers",
            "create",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--label",
            &format!("k={long}"),
            "lab",
            "true",
        ],
        "container.labels",
    );
    let rt = runtime();
    rt.block_on(async {
        let c = k.client(None).await;
        let labels: HashMap<String, String> =
            (0..300).map(|i| (format!("k{i}"), String::new())).collect();
        let req = keel_protocol::api::content::UpdateRequest {
            info: MessageField::some(keel_protocol::api::content::Info {
                digest: format!("sha256:{}", "0".repeat(64)),
                labels,
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = expect_err(c.content.update(c.ctx(), &req).await);
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("info.labels: 300 given")),
            "{e:?}"
        );
        let req = CreateTaskRequest {
            container_id: "nope".into(),
            stdout: "/".repeat(5000),
            ..Default::default()
        };
        let e = expect_err(c.tasks.create(c.ctx(), &req).await);
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.starts_with("stdout: 5000 bytes")),
            "{e:?}"
        );
        let req = keel_protocol::api::tasks::ResizePtyRequest {
            container_id: "nope".into(),
            width: 70_000,
            height: 10,
            ..Default::default()
        };
        let e = expect_err(c.tasks.resize_pty(c.ctx(), &req).await);
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("larger than a terminal")),
            "{e:?}"
        );
    });
    k.assert_serving();
}
