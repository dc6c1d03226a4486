//! keel-client against a real keeld and the real shim: run and wait, exec with a
//! stdio round trip, a wait that outlives a keeld crash, an event subscription that
//! stays exact across five kill -9 restarts, re-attaching to a running task's
//! output from a new client, and calls that wait for keeld while it is down.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use keel_client::io::{Fifos, Io};
use keel_client::{Client, ClientBuilder, ContainerSpec, Error, Event, Status, Task};
use keel_tests::{busybox_rootfs, require_runtime, Keeld};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Two workers: a spawned wait or subscription goes on while the test's own
/// thread kills and restarts keeld.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn client(k: &Keeld) -> Client {
    ClientBuilder::new(k.socket.to_str().expect("socket path"))
        .namespace(k.namespace.as_str())
        .connect()
        .await
        .expect("connect to keeld")
}

/// `what`, failing the test if it takes longer than `secs` seconds.
async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {secs}s"))
}

fn busybox(id: &str, script: &str) -> ContainerSpec {
    ContainerSpec::new(id, busybox_rootfs()).args(["sh", "-c", script])
}

/// Deletes the task (forced) and the container.
async fn remove(c: &Client, id: &str) {
    c.task(id).delete(true).await.expect("delete task");
    c.containers().delete(id).await.expect("delete container");
}

#[test]
fn run_and_wait_gives_the_exit_status_and_time() {
    require_runtime();
    let k = Keeld::start();
    runtime().block_on(async {
        let c = client(&k).await;
        let before = std::time::SystemTime::now();
        let container = c
            .containers()
            .create(busybox("rw", "exit 7").label("app", "client"))
            .await
            .unwrap();
        assert_eq!(container.labels()["app"], "client");
        let task = container.new_task(Io::null()).await.unwrap();
        assert!(task.pid() > 0, "a created task has its pid");
        let exit = within(60, "wait", task.wait_after_start()).await.unwrap();
        assert_eq!(exit.code, 7);
        assert!(
            exit.exited_at >= before,
            "{:?} before {before:?}",
            exit.exited_at
        );
        let state = task.status().await.unwrap();
        assert_eq!((state.status, state.exit), (Status::Stopped, Some(exit)));
        // Waiting again answers the same recorded exit.
        assert_eq!(task.wait().await.unwrap(), exit);
        assert_eq!(task.delete(false).await.unwrap().code, 7);
        // Gone, and said so with the code.
        let e = task.status().await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        container.delete().await.unwrap();
        assert!(c.containers().list(&[]).await.unwrap().is_empty());
    });
}

#[test]
fn exec_round_trips_stdin_to_stdout_and_stderr() {
    require_runtime();
    let k = Keeld::start();
    runtime().block_on(async {
        let c = client(&k).await;
        let container = c
            .containers()
            .create(busybox("ex", "sleep 100000"))
            .await
            .unwrap();
        let task = container.new_task(Io::keel_log()).await.unwrap();
        task.start().await.unwrap();

        let (io, mut s) = Io::streams(Fifos::new().stdin(true)).unwrap();
        let process = task
            .exec(
                "rt",
                &[
                    "sh",
                    "-c",
                    "while read l; do echo \"out:$l\"; echo \"err:$l\" >&2; done",
                ],
                io,
            )
            .await
            .unwrap();
        process.start().await.unwrap();
        let pids = task.pids().await.unwrap();
        assert!(
            pids.iter().any(|p| p.exec_id == "rt"),
            "the exec process is listed with its id: {pids:?}"
        );
        let mut stdin = s.stdin.take().unwrap();
        stdin.write_all(b"one\ntwo\n").await.unwrap();
        drop(stdin);
        process.close_stdin().await.unwrap();
        let mut out = String::new();
        let mut err = String::new();
        let mut stderr = s.stderr.take().unwrap();
        within(30, "exec output", async {
            let (a, b) = tokio::join!(
                s.stdout.read_to_string(&mut out),
                stderr.read_to_string(&mut err)
            );
            a.unwrap();
            b.unwrap();
        })
        .await;
        assert_eq!(out, "out:one\nout:two\n");
        assert_eq!(err, "err:one\nerr:two\n");
        let exit = within(30, "exec wait", process.wait()).await.unwrap();
        assert_eq!(exit.code, 0);
        assert_eq!(process.delete().await.unwrap().code, 0);

        // Output copied into the caller's own writer.
        let (tx, rx) = tokio::io::duplex(1 << 16);
        let io = Io::copy(
            Fifos::new(),
            None,
            Box::new(tx),
            Box::new(tokio::io::sink()),
        )
        .unwrap();
        let p = task
            .exec("cp", &["sh", "-c", "echo copied"], io)
            .await
            .unwrap();
        p.start().await.unwrap();
        assert_eq!(within(30, "wait", p.wait()).await.unwrap().code, 0);
        p.wait_output().await;
        let mut copied = String::new();
        BufReader::new(rx).read_line(&mut copied).await.unwrap();
        assert_eq!(copied, "copied\n");
        p.delete().await.unwrap();
        remove(&c, "ex").await;
    });
}

#[test]
fn a_wait_begun_before_keeld_is_killed_resolves_after_its_restarts() {
    require_runtime();
    let mut k = Keeld::start();
    let rt = runtime();
    // Each outage gets the whole reconnect deadline, however long the wait ran
    // before it: two restarts further apart than the deadline.
    let deadline = Duration::from_secs(3);
    let (task, waiting) = rt.block_on(async {
        let c = ClientBuilder::new(k.socket.to_str().unwrap())
            .namespace(k.namespace.as_str())
            .reconnect_timeout(deadline)
            .connect()
            .await
            .unwrap();
        let container = c
            .containers()
            .create(busybox("wk", "sleep 6; exit 5"))
            .await
            .unwrap();
        let task = container.new_task(Io::null()).await.unwrap();
        task.start().await.unwrap();
        let waiter = c.task("wk");
        let waiting = tokio::spawn(async move { waiter.wait().await });
        // The wait is with keeld before it dies.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished());
        (task, waiting)
    });
    k.kill9();
    std::thread::sleep(Duration::from_secs(1));
    k.spawn();
    std::thread::sleep(deadline + Duration::from_secs(1));
    assert!(!waiting.is_finished(), "the wait ended before the task did");
    let killed = Instant::now();
    k.kill9();
    // The task exits while keeld is down the second time.
    std::thread::sleep(Duration::from_secs(2));
    k.spawn();
    rt.block_on(async {
        let exit = within(60, "wait across the restarts", waiting)
            .await
            .expect("wait task")
            .expect("wait after the restarts");
        assert_eq!(exit.code, 5);
        let down_at = std::time::SystemTime::now() - killed.elapsed();
        assert!(
            exit.exited_at > down_at,
            "the exit keeld recorded is the one that happened while it was down"
        );
        task.delete(false).await.unwrap();
        task.wait().await.unwrap_err();
    });
}

#[test]
fn a_subscription_sees_every_event_once_in_order_across_five_keeld_crashes() {
    require_runtime();
    let mut k = Keeld::start();
    let rt = runtime();
    let filters = ["topic~=\"^/(tasks|containers)/\""];
    let (mut sub, c) = rt.block_on(async {
        let c = client(&k).await;
        let sub = c.subscribe(&filters, None).await.unwrap();
        (sub, c)
    });
    let start = sub.last_sequence();
    let collector = rt.spawn(async move {
        let mut got = Vec::new();
        while let Some(item) = sub.next().await {
            let env = item.expect("subscription item");
            let done = matches!(&env.event, Event::ContainerDelete(d) if d.id == "end");
            got.push(env);
            if done {
                break;
            }
        }
        got
    });
    for round in 0..5 {
        let id = format!("churn{round}");
        rt.block_on(async {
            let container = c
                .containers()
                .create(busybox(&id, "sleep 1; exit 3"))
                .await
                .unwrap();
            let task = container.new_task(Io::null()).await.unwrap();
            task.start().await.unwrap();
            // One task exits and is removed while keeld runs.
            let quick = format!("{id}q");
            let q = c
                .containers()
                .create(busybox(&quick, "exit 1"))
                .await
                .unwrap();
            let qt = q.new_task(Io::null()).await.unwrap();
            assert_eq!(qt.wait_after_start().await.unwrap().code, 1);
            qt.delete(false).await.unwrap();
            q.delete().await.unwrap();
        });
        // The other exits while keeld is down.
        k.kill9();
        std::thread::sleep(Duration::from_millis(1500));
        k.spawn();
        rt.block_on(async {
            let task = c.task(&id);
            assert_eq!(within(60, "wait", task.wait()).await.unwrap().code, 3);
            task.delete(false).await.unwrap();
            c.containers().delete(&id).await.unwrap();
        });
    }
    let (got, log) = rt.block_on(async {
        c.containers().create(busybox("end", "true")).await.unwrap();
        c.containers().delete("end").await.unwrap();
        let got = within(120, "the subscriber reaching the end marker", collector)
            .await
            .unwrap();
        // keeld's own record, replayed from the start.
        let mut log = c.subscribe(&filters, Some(start)).await.unwrap();
        let mut all = Vec::new();
        while let Some(env) = within(30, "replay", log.next()).await {
            let env = env.unwrap();
            let done = matches!(&env.event, Event::ContainerDelete(d) if d.id == "end");
            all.push(env);
            if done {
                break;
            }
        }
        (got, all)
    });
    let seqs: Vec<u64> = got.iter().map(|e| e.sequence).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {seqs:?}"
    );
    assert!(
        !got.iter().any(|e| matches!(e.event, Event::Gap(_))),
        "no gap in lifecycle events"
    );
    let logged: Vec<u64> = log.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, logged, "every event keeld recorded, none it did not");
    // Each round's events, the exits keeld found at restart included.
    let exits: BTreeSet<String> = got
        .iter()
        .filter_map(|e| match &e.event {
            Event::TaskExit(x) => Some(x.container_id.clone()),
            _ => None,
        })
        .collect();
    for round in 0..5 {
        assert!(exits.contains(&format!("churn{round}")), "{exits:?}");
        assert!(exits.contains(&format!("churn{round}q")), "{exits:?}");
    }
    let topics: BTreeSet<&str> = got.iter().map(|e| e.topic.as_str()).collect();
    for t in [
        "/containers/create",
        "/containers/delete",
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(topics.contains(t), "{t} missing from {topics:?}");
    }
}

#[test]
fn a_new_client_reattaches_to_a_running_task_s_output() {
    require_runtime();
    let k = Keeld::start();
    let fifo_dir = k.dir.path().join("fifos");
    let rt = runtime();
    let last = rt.block_on(async {
        let c = client(&k).await;
        let container = c
            .containers()
            .create(busybox(
                "att",
                "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done",
            ))
            .await
            .unwrap();
        let (io, s) = Io::streams(Fifos::new().dir(&fifo_dir)).unwrap();
        let task = container.new_task(io).await.unwrap();
        task.start().await.unwrap();
        let mut lines = BufReader::new(s.stdout).lines();
        let mut last = 0u64;
        for want in 0..5u64 {
            let l = within(30, "output", lines.next_line())
                .await
                .unwrap()
                .unwrap();
            last = l.parse().unwrap();
            assert_eq!(last, want);
        }
        last
        // The first client, its streams and its runtime end here.
    });
    drop(rt);
    std::thread::sleep(Duration::from_millis(500));
    runtime().block_on(async {
        let c = client(&k).await;
        let task: Task = c.load_task("att").await.unwrap();
        let s = task.attach().await.unwrap();
        assert!(s.stdin.is_none());
        let mut lines = BufReader::new(s.stdout).lines();
        // What the task wrote while no one read waited in the FIFO: the count
        // goes on from where the first client stopped, nothing lost.
        let next: u64 = within(30, "output after re-attaching", lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(next, last + 1);
        let e = c.task("nope").attach().await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        // A filter keeld refuses is the subscription's one and last item.
        let mut bad = c.subscribe(&["topic=="], None).await.unwrap();
        let e = within(30, "a refused subscription", bad.next())
            .await
            .expect("an item")
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(bad.next().await.is_none());
        remove(&c, "att").await;
    });
}

#[test]
fn calls_wait_for_keeld_while_it_is_down_then_fail_with_unavailable() {
    let mut k = Keeld::start();
    let rt = runtime();
    let patient = rt.block_on(client(&k));
    let hasty = rt.block_on(async {
        ClientBuilder::new(k.socket.to_str().unwrap())
            .reconnect_timeout(Duration::from_millis(500))
            .connect()
            .await
            .unwrap()
    });
    k.kill9();
    // Down for longer than the hasty client waits.
    let t = Instant::now();
    let e = rt.block_on(hasty.version()).unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // A call made while keeld is down waits for it to come back.
    let waiting = rt.spawn(async move { patient.containers().list(&[]).await });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!waiting.is_finished());
    k.spawn();
    let listed = rt
        .block_on(async { within(30, "a call across the restart", waiting).await })
        .unwrap();
    assert!(listed.unwrap().is_empty());
    rt.block_on(hasty.version())
        .expect("the hasty client reconnects too");
}
