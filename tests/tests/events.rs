//! The event exchange through keelctl: filters, replay across kill -9, gaps and slow
//! subscribers. Task events come from real containers (runc, the real shim).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_tests::{busybox_rootfs, describe, require_runtime, seqs, Keeld, Subscriber};
use serde_json::Value;

/// Publishes JSON payloads on `topic` through `keelctl events publish`.
fn publish(k: &Keeld, topic: &str, payloads: &[Value]) {
    let body: String = payloads.iter().map(|p| format!("{p}\n")).collect();
    let out = k.ctl_with_stdin(&["events", "publish", "--topic", topic], body.as_bytes());
    assert!(out.status.success(), "events publish: {}", describe(&out));
}

/// `keelctl run --rm`, asserting the task's exit status.
fn run(k: &Keeld, id: &str, status: i32, cmd: &[&str]) {
    let rootfs = busybox_rootfs();
    let mut a = vec!["run", "--rm", "--rootfs", rootfs.to_str().unwrap(), id];
    a.extend_from_slice(cmd);
    let out = k.ctl(&a);
    assert_eq!(
        out.status.code(),
        Some(status),
        "run {id}: {}",
        describe(&out)
    );
}

/// The `i` of a published payload (a Struct: JSON numbers are doubles).
fn field_i(e: &Value) -> i64 {
    let f = e["event"]["i"].as_f64().expect("payload field i");
    // The values are small integers.
    #[allow(clippy::cast_possible_truncation)]
    let i = f as i64;
    i
}

fn topic(e: &Value) -> &str {
    e["topic"].as_str().unwrap_or_default()
}

/// A filter and the test's own reading of what it selects (payload fields in the
/// JSON lines use protobuf's JSON names and omit zero values).
type Case = (Vec<String>, Box<dyn Fn(&Value) -> bool>);

fn cases(ns: &str) -> Vec<Case> {
    let ns_ = ns.to_string();
    let ns2 = ns.to_string();
    let cid = |e: &Value| {
        e["event"]["containerId"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    vec![
        (
            vec!["topic==\"/tasks/exit\"".into()],
            Box::new(|e| topic(e) == "/tasks/exit"),
        ),
        (
            vec![format!("topic~=^/tasks/.+,namespace=={ns}")],
            Box::new(|e| topic(e).starts_with("/tasks/")),
        ),
        (
            vec!["topic~=^/containers/".into()],
            Box::new(|e| topic(e).starts_with("/containers/")),
        ),
        (
            vec![format!("namespace=={ns}")],
            Box::new(move |e| e["namespace"] == ns_.as_str()),
        ),
        (
            vec![format!("namespace!={ns}")],
            Box::new(move |e| e["namespace"] != ns2.as_str()),
        ),
        (
            vec![
                "topic==\"/tasks/start\"".into(),
                "topic==\"/tasks/create\"".into(),
            ],
            Box::new(|e| topic(e) == "/tasks/start" || topic(e) == "/tasks/create"),
        ),
        (
            vec!["event.container_id==churn-7".into()],
            Box::new(move |e| cid(e) == "churn-7"),
        ),
        (
            vec!["event.id==churn-7".into()],
            Box::new(|e| e["event"]["id"] == "churn-7"),
        ),
        (
            vec!["event.container_id~=^churn-1[0-9]$".into()],
            Box::new(move |e| {
                let c = cid(e);
                c.len() == 8 && c.starts_with("churn-1")
            }),
        ),
        (
            vec!["topic==\"/tasks/exit\",event.exit_status==3".into()],
            Box::new(|e| topic(e) == "/tasks/exit" && e["event"]["exitStatus"] == 3),
        ),
        (
            vec!["event.exit_status".into()],
            Box::new(|e| e["event"]["exitStatus"].as_u64().is_some_and(|s| s != 0)),
        ),
        (
            vec![format!("topic!=\"/tasks/exit\",namespace=={ns}")],
            Box::new(|e| topic(e) != "/tasks/exit"),
        ),
        (
            vec!["topic==\"/tasks/delete\"".into()],
            Box::new(|e| topic(e) == "/tasks/delete"),
        ),
        (
            vec![
                "event.container_id==churn-42,topic==\"/tasks/exit\"".into(),
                "event.id==churn-43".into(),
            ],
            Box::new(move |e| {
                (cid(e) == "churn-42" && topic(e) == "/tasks/exit")
                    || e["event"]["id"] == "churn-43"
            }),
        ),
        (
            vec!["topic~=^/tasks/(create|delete)".into()],
            Box::new(|e| topic(e) == "/tasks/create" || topic(e) == "/tasks/delete"),
        ),
        (
            vec!["event.pid".into()],
            Box::new(|e| e["event"]["pid"].as_u64().is_some_and(|p| p != 0)),
        ),
    ]
}

#[test]
fn sixteen_filtered_subscribers_each_get_exactly_their_events_during_churn() {
    require_runtime();
    let k = Keeld::start();
    let cases = cases(&k.namespace);
    assert_eq!(cases.len(), 16);
    // From sequence 0 of a fresh daemon: every subscriber sees the whole churn
    // whenever its subscription lands.
    let mut subs: Vec<Subscriber> = cases
        .iter()
        .map(|(f, _)| {
            let mut args = vec!["--since", "0"];
            args.extend(f.iter().map(String::as_str));
            Subscriber::spawn(&k, &args)
        })
        .collect();

    std::thread::scope(|s| {
        for w in 0..4 {
            let k = &k;
            s.spawn(move || {
                for i in (0..100).filter(|i| i % 4 == w) {
                    let status = format!("exit {}", i % 5);
                    run(k, &format!("churn-{i}"), i % 5, &["sh", "-c", &status]);
                }
            });
        }
    });

    // The whole log, read back after the churn: 100 containers, 6 events each.
    let mut all_sub = Subscriber::spawn(&k, &["--since", "0"]);
    let mut deleted = 0;
    let all = all_sub
        .until(Duration::from_secs(30), |e| {
            if topic(e) == "/containers/delete" {
                deleted += 1;
            }
            deleted == 100
        })
        .expect("the whole churn in the log");
    let per_topic = all.iter().fold(BTreeMap::<&str, usize>::new(), |mut m, e| {
        *m.entry(topic(e)).or_default() += 1;
        m
    });
    assert_eq!(all.len(), 600, "6 events per container: {per_topic:?}");
    let all_seqs = seqs(&all);
    assert!(all_seqs.windows(2).all(|w| w[0] < w[1]), "log order");
    for i in 0..100 {
        let id = format!("churn-{i}");
        let mine: Vec<&str> = all
            .iter()
            .filter(|e| e["event"]["containerId"] == id.as_str() || e["event"]["id"] == id.as_str())
            .map(topic)
            .collect();
        assert_eq!(mine, keel_tests::A_RUN_FROM_CREATE_TO_DELETE, "{id}");
    }

    for ((filters, wants), sub) in cases.iter().zip(subs.iter_mut()) {
        let want: Vec<u64> = seqs(&all.iter().filter(|e| wants(e)).cloned().collect::<Vec<_>>());
        let got = sub.take(want.len(), Duration::from_secs(30));
        // Anything beyond would be a duplicate or a stray.
        let extra = sub.take(1, Duration::from_millis(300));
        assert_eq!(seqs(&got), want, "filter {filters:?}");
        assert!(extra.is_empty(), "filter {filters:?} got more: {extra:?}");
    }
    let per_filter: BTreeMap<String, usize> = cases
        .iter()
        .map(|(f, w)| (f.join(" | "), all.iter().filter(|e| w(e)).count()))
        .collect();
    // The cases are not vacuous: most select something, one selects nothing.
    assert_eq!(
        per_filter.values().filter(|n| **n == 0).count(),
        1,
        "{per_filter:#?}"
    );
}

#[test]
fn a_subscriber_resuming_after_kill_9_gets_every_missed_task_event_once() {
    require_runtime();
    let mut k = Keeld::start();
    let ns_filter = format!("namespace=={}", k.namespace);
    run(&k, "before", 0, &["true"]);
    let mut sub = Subscriber::spawn(&k, &["--since", "0", &ns_filter]);
    let seen = sub
        .until(Duration::from_secs(20), |e| {
            topic(e) == "/containers/delete" && e["event"]["id"] == "before"
        })
        .expect("events of the first container");
    let resume_from = *seqs(&seen).last().unwrap();
    drop(sub);

    // Missed by the subscriber, then keeld crashes. A witness sees what was delivered.
    let mut witness = Subscriber::spawn(&k, &["--since", &resume_from.to_string(), &ns_filter]);
    run(&k, "missed-1", 4, &["sh", "-c", "exit 4"]);
    run(&k, "missed-2", 0, &["true"]);
    let delivered = witness
        .until(Duration::from_secs(20), |e| {
            topic(e) == "/containers/delete" && e["event"]["id"] == "missed-2"
        })
        .expect("the witness saw both runs");
    k.kill9();
    drop(witness);
    k.spawn();

    let mut again = Subscriber::spawn(&k, &["--since", &resume_from.to_string(), &ns_filter]);
    let replayed = again.take(delivered.len(), Duration::from_secs(20));
    assert_eq!(seqs(&replayed), seqs(&delivered), "replay after kill -9");
    assert_eq!(replayed, delivered, "same events, same payloads");
    let tasks: Vec<&str> = replayed
        .iter()
        .filter(|e| topic(e).starts_with("/tasks/"))
        .map(topic)
        .collect();
    assert_eq!(
        tasks.len(),
        8,
        "4 task events for each missed run: {tasks:?}"
    );
    assert!(
        replayed
            .iter()
            .any(|e| topic(e) == "/tasks/exit" && e["event"]["exitStatus"] == 4),
        "the exit status survived"
    );
    // Live events after the restart continue the sequence.
    run(&k, "after", 0, &["true"]);
    let live = again
        .until(Duration::from_secs(20), |e| {
            topic(e) == "/containers/delete" && e["event"]["id"] == "after"
        })
        .expect("live events after the restart");
    assert!(seqs(&live)[0] > *seqs(&replayed).last().unwrap());
    assert_eq!(
        live.len(),
        6,
        "no replayed event repeats at the seam: {live:#?}"
    );
}

#[test]
fn an_event_of_any_topic_survives_kill_9_a_moment_after_it_is_published() {
    let mut k = Keeld::start();
    // The first event takes a block of sequence numbers, which is flushed at once.
    publish(&k, "/app/first", &[serde_json::json!({ "i": 0 })]);
    std::thread::sleep(Duration::from_millis(200));
    // Not a task or container event: delivered at once, and written out by the
    // next flush, which nothing else asks for here: keeld writes such events out
    // within a second (keel_actors::events::LAZY_FLUSH).
    publish(&k, "/app/note", &[serde_json::json!({ "i": 1 })]);
    std::thread::sleep(Duration::from_secs(3));
    k.kill9();
    k.spawn();
    let mut sub = Subscriber::spawn(&k, &["--since", "0"]);
    let got = sub.until(Duration::from_secs(10), |e| topic(e) == "/app/note");
    let got = got.expect("the /app/note event is in the log after kill -9");
    assert_eq!(field_i(got.last().unwrap()), 1);
}

#[test]
fn replay_older_than_retention_starts_with_a_gap_notice() {
    let k = Keeld::start_with_config("[events]\nretain = 50\n");
    let payloads: Vec<Value> = (0..120).map(|i| serde_json::json!({ "i": i })).collect();
    publish(&k, "/app/tick", &payloads);
    let mut sub = Subscriber::spawn(&k, &["--since", "1"]);
    let got = sub.take(51, Duration::from_secs(20));
    assert_eq!(got.len(), 51, "{got:#?}");
    assert_eq!(topic(&got[0]), "/keel/events/gap");
    let first = got[1]["seq"].as_u64().unwrap();
    assert_eq!(
        got[0]["event"]["firstRetained"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok()),
        Some(first)
    );
    assert_eq!(
        got[0]["event"]["requestedSince"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok()),
        Some(1)
    );
    assert_eq!(
        got[0]["seq"].as_u64(),
        Some(first - 1),
        "resume point of the notice"
    );
    let is: Vec<i64> = got[1..].iter().map(field_i).collect();
    assert_eq!(is, (70..120).collect::<Vec<_>>(), "the 50 newest, in order");
    // Replay from inside retention has no notice.
    let mut inside = Subscriber::spawn(&k, &["--since", &first.to_string()]);
    let got = inside.take(49, Duration::from_secs(20));
    assert_eq!(Some(field_i(&got[0])), Some(71));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_stalled_subscriber_is_cut_off_with_a_resume_point_and_hurts_no_one() {
    // Small limits make the test quick: 2,000 events retained, 500 of slack per
    // subscriber. Each payload is 2 KiB, so a per-subscriber queue of everything
    // published would be tens of MiB.
    let k = Keeld::start_with_config("[events]\nretain = 2000\nsubscriber_buffer = 500\n");
    let pad = "x".repeat(2048);
    // From sequence 0, so both see the first event however late they subscribe.
    let mut stalled = Subscriber::spawn(&k, &["--since", "0", "topic==\"/app/load\""]);
    let mut healthy = Subscriber::spawn(&k, &["--since", "0", "topic==\"/app/load\""]);
    publish(
        &k,
        "/app/load",
        &[serde_json::json!({ "i": -1, "pad": pad })],
    );
    assert_eq!(stalled.take(1, Duration::from_secs(20)).len(), 1);
    assert_eq!(healthy.take(1, Duration::from_secs(20)).len(), 1);

    nix::sys::signal::kill(stalled.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let rss_before = rss_kib(k.pid().unwrap());
    let total = 12_000;
    let payloads: Vec<Value> = (0..total)
        .map(|i| serde_json::json!({ "i": i, "pad": pad }))
        .collect();
    let started = Instant::now();
    publish(&k, "/app/load", &payloads);
    // The healthy subscriber gets every event while the other one is stopped.
    let got = healthy.take(total, Duration::from_secs(60));
    assert_eq!(
        got.len(),
        total,
        "healthy subscriber got {} of {total}",
        got.len()
    );
    let is: Vec<i64> = got.iter().map(field_i).collect();
    assert_eq!(is, (0..total as i64).collect::<Vec<_>>());
    eprintln!(
        "published and delivered {total} events in {:?}",
        started.elapsed()
    );
    let grown = rss_kib(k.pid().unwrap()).saturating_sub(rss_before);
    assert!(
        grown < 16 * 1024,
        "keeld grew by {grown} KiB while a subscriber was stopped"
    );
    let log_last = *seqs(&got).last().unwrap();

    // Resumed, the stalled client reads what was in flight, then the cut-off.
    nix::sys::signal::kill(stalled.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    let (in_flight, status, err) = stalled.finish(Duration::from_secs(30));
    eprintln!("stalled subscriber: {err}");
    assert!(!status.success(), "the stalled subscriber is disconnected");
    // 12,000 published against a buffer of 500: cut off for falling behind,
    // while its send still waited, well before the 5 s a stalled send gets.
    assert!(
        err.contains("unavailable") && err.contains("fell more than 500 events behind"),
        "{err}"
    );
    let since: u64 = err
        .split("since=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resume point in {err:?}"));
    // The resume point is the last event the client got: the first one taken before
    // the stop, or the last one still in flight to it.
    let received = seqs(&in_flight).last().copied().unwrap_or(1);
    assert_eq!(
        since, received,
        "resume point names the last event received"
    );
    assert!(
        k.log().contains("subscriber disconnected"),
        "the cut-off is logged with its count"
    );

    // Resuming from there: a gap notice if retention moved past it, then every
    // retained event to the end, in order, once.
    let mut resumed =
        Subscriber::spawn(&k, &["--since", &since.to_string(), "topic==\"/app/load\""]);
    let head = resumed.take(1, Duration::from_secs(20));
    let first = if topic(&head[0]) == "/keel/events/gap" {
        head[0]["event"]["firstRetained"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    } else {
        head[0]["seq"].as_u64().unwrap()
    };
    if topic(&head[0]) != "/keel/events/gap" {
        assert_eq!(first, since + 1, "resumed right after the resume point");
    }
    let expect = log_last - first + 1;
    let mut rest = if topic(&head[0]) == "/keel/events/gap" {
        Vec::new()
    } else {
        head
    };
    rest.extend(resumed.take(
        usize::try_from(expect).unwrap() - rest.len(),
        Duration::from_secs(30),
    ));
    assert_eq!(seqs(&rest), (first..=log_last).collect::<Vec<_>>());
}

#[test]
fn a_subscriber_whose_client_stops_reading_is_cut_off_after_five_seconds() {
    // Few events, far from the buffer's limits, but each as large as allowed:
    // the client's socket fills, one send waits, and 5 s later the subscriber
    // is cut off as stalled, naming the event that waited as its resume point.
    let k = Keeld::start_with_config("[limits]\nevent_bytes = 1048576\n");
    let pad = "x".repeat(900_000);
    let mut stalled = Subscriber::spawn(&k, &["topic==\"/app/big\""]);
    publish(&k, "/app/big", &[serde_json::json!({ "i": -1 })]);
    assert_eq!(stalled.take(1, Duration::from_secs(20)).len(), 1);
    nix::sys::signal::kill(stalled.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let payloads: Vec<Value> = (0..20)
        .map(|i| serde_json::json!({ "i": i, "pad": pad }))
        .collect();
    let started = Instant::now();
    publish(&k, "/app/big", &payloads);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !k.log().contains("subscriber disconnected") {
        assert!(Instant::now() < deadline, "never cut off: {}", k.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = started.elapsed();
    nix::sys::signal::kill(stalled.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    let (_, status, err) = stalled.finish(Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        err.contains("subscriber stalled") && err.contains("resume with since="),
        "{err}"
    );
    assert!(after >= Duration::from_secs(5), "cut off after {after:?}");
}

#[test]
fn a_crash_is_told_to_subscribers_replaying_past_it_and_a_clean_stop_is_not() {
    use keel_protocol::api::events::Gap;
    let mut k = Keeld::start();
    publish(&k, "/app/before", &[serde_json::json!({ "i": 0 })]);
    // Written out by now (events of such topics within a second).
    std::thread::sleep(Duration::from_millis(1500));
    publish(&k, "/app/last", &[serde_json::json!({ "i": 1 })]);
    k.kill9();
    k.spawn();
    let rt = keel_tests::runtime();
    let gaps = |log: &[keel_protocol::api::events::Envelope]| -> Vec<(u64, Gap)> {
        log.iter()
            .filter(|e| e.topic == "/keel/events/gap")
            .map(|e| {
                let gap: Gap = keel_protocol::types::unpack(e.event.get_or_default()).unwrap();
                (e.sequence, gap)
            })
            .collect()
    };
    let log = rt.block_on(k.replay());
    let found = gaps(&log);
    assert_eq!(found.len(), 1, "one notice of the crash: {found:?}");
    let (at, gap) = &found[0];
    let before = log
        .iter()
        .find(|e| e.topic == "/app/before")
        .unwrap()
        .sequence;
    assert!(gap.lost_after >= before, "{gap:?}");
    assert!(
        gap.lost_before > gap.lost_after && *at >= gap.lost_before,
        "{gap:?} at {at}"
    );
    assert!(
        log.iter()
            .all(|e| e.sequence <= gap.lost_after || e.sequence >= gap.lost_before),
        "nothing logged inside the range the notice names"
    );
    // A clean stop loses nothing and says nothing.
    assert!(k.terminate().success());
    k.spawn();
    let log = rt.block_on(k.replay());
    assert_eq!(gaps(&log).len(), 1, "no second notice after a clean stop");
}
