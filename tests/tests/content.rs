//! The content store through keelctl and a real keeld: gigabyte ingests, kill -9 in the
//! middle of them, and every kind of bad input.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_tests::{describe, heavy, random_file, sha256sum, Keeld};
use rand::{Rng, SeedableRng};

const GIB: u64 = 1 << 30;

fn ingest(
    k: &Keeld,
    reference: &str,
    file: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec!["content", "ingest"];
    args.extend_from_slice(extra);
    args.push(reference);
    k.ctl_cmd(&args)
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .expect("keelctl content ingest")
}

fn get_digest(k: &Keeld, digest: &str, dir: &std::path::Path) -> String {
    let out = dir.join("got");
    let status = k
        .ctl_cmd(&["content", "get", digest])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "content get {digest}");
    let d = sha256sum(&out);
    std::fs::remove_file(out).unwrap();
    d
}

#[test]
fn one_gib_ingest_matches_sha256sum_and_reads_back() {
    let _g = heavy();
    let k = Keeld::start();
    let (file, digest) = random_file(k.dir.path(), "data", GIB, 1);
    let out = ingest(&k, "big", &file, &["--label", "kind=test"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    std::fs::remove_file(&file).unwrap();

    let ls = k.ctl_ok(&["content", "ls", "--format", "json", "labels.kind==test"]);
    let v: serde_json::Value = serde_json::from_str(ls.trim()).unwrap();
    assert_eq!(v["digest"], digest.as_str());
    assert_eq!(v["size"], GIB);
    assert_eq!(
        get_digest(&k, &digest, k.dir.path()),
        digest,
        "content get returns identical bytes"
    );
    assert!(
        k.ctl_ok(&["content", "active"]).lines().count() == 1,
        "no ingest left behind"
    );
}

#[test]
fn kill9_during_ingest_never_commits_bad_bytes_and_resumes() {
    let _g = heavy();
    let mut k = Keeld::start();
    let (file, digest) = random_file(k.dir.path(), "data", GIB, 2);
    let seed: u64 = rand::random();
    eprintln!("kill loop seed {seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let (mut kills, mut committed, mut resumed_partials) = (0, 0, 0);
    while kills < 20 {
        let child = k
            .ctl_cmd(&["content", "ingest", "--expected-digest", &digest, "big"])
            .stdin(std::fs::File::open(&file).unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..2000)));
        k.kill9();
        kills += 1;
        let out = child.wait_with_output().unwrap();
        k.spawn();

        // Never a committed blob whose bytes differ from its digest.
        let fsck = k.ctl(&["content", "fsck"]);
        assert!(
            fsck.status.success(),
            "after kill {kills}: {}\nlog:\n{}",
            describe(&fsck),
            k.log()
        );

        let info = k.ctl(&["content", "info", &digest]);
        if info.status.success() {
            // Committed (before the kill, or finished by the startup check).
            committed += 1;
            assert_eq!(get_digest(&k, &digest, k.dir.path()), digest);
            k.ctl_ok(&["content", "rm", &digest]);
        } else {
            assert!(
                !out.status.success(),
                "ingest claims success but nothing is committed: {}",
                describe(&out)
            );
            let active = k.ctl_ok(&["content", "active", "--format", "json"]);
            let st: serde_json::Value =
                serde_json::from_str(active.lines().next().unwrap_or("null")).unwrap();
            assert_eq!(
                st["ref"], "big",
                "after kill {kills}, content active shows the partial: {active}"
            );
            if st["offset"].as_u64().unwrap() > 0 {
                resumed_partials += 1;
            }
        }
    }
    eprintln!("kills {kills}, committed {committed}, partials with data {resumed_partials}");
    assert!(
        resumed_partials > 0,
        "no kill landed mid-ingest; the loop tested nothing"
    );

    // Re-running the same ingest finishes with the right digest.
    let out = ingest(&k, "big", &file, &["--expected-digest", &digest]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
    assert_eq!(get_digest(&k, &digest, k.dir.path()), digest);
    k.ctl_ok(&["content", "fsck"]);
}

#[test]
fn resume_sends_only_the_missing_bytes() {
    let k = Keeld::start();
    let (file, digest) = random_file(k.dir.path(), "data", 8 << 20, 3);
    // The first 3 MiB arrive, then the client goes away.
    let head = k.dir.path().join("head");
    std::fs::write(&head, &std::fs::read(&file).unwrap()[..3 << 20]).unwrap();
    let mut child = k
        .ctl_cmd(&["content", "ingest", "r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&std::fs::read(&head).unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let a = k.ctl_ok(&["content", "active", "--format", "json"]);
            if a.contains("\"offset\":3145728") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "partial never reached 3 MiB: {a}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
    }
    let _ = child.wait();
    // keeld notices the writer's client hung up and releases the ref promptly; a new
    // writer then resumes at 3 MiB.
    let deadline = Instant::now() + Duration::from_secs(5);
    let size = (8u64 << 20).to_string();
    let out = loop {
        let out = ingest(&k, "r", &file, &["--expected-size", &size]);
        let locked = String::from_utf8_lossy(&out.stderr).contains("is locked since");
        if !locked || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(out.status.success(), "{}", describe(&out));
    assert!(k.log().contains("ref unlocked"), "{}", k.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
}

#[test]
fn wrong_expectations_are_failed_precondition_and_commit_nothing() {
    let k = Keeld::start();
    let (file, digest) = random_file(k.dir.path(), "data", 1 << 20, 4);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = k
        .ctl_cmd(&["content", "ingest", "--expected-digest", &wrong, "r1"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && e.contains("failed precondition"),
        "{}",
        describe(&err)
    );
    assert!(
        e.contains(&wrong) && e.contains(&digest),
        "names expected and actual: {e}"
    );

    let out = ingest(&k, "r2", &file, &["--expected-size", "12345"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("failed precondition"),
        "{}",
        describe(&out)
    );
    assert!(e.contains("12345"), "{e}");

    assert_eq!(
        k.ctl_ok(&["content", "ls"]).lines().count(),
        1,
        "nothing committed (header only)"
    );
    k.assert_serving();
    // The right expectations still work afterwards.
    let out = ingest(
        &k,
        "r3",
        &file,
        &[
            "--expected-digest",
            &digest,
            "--expected-size",
            &(1u64 << 20).to_string(),
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn committing_an_existing_digest_is_already_exists() {
    let k = Keeld::start();
    let (file, digest) = random_file(k.dir.path(), "data", 4096, 5);
    assert!(ingest(&k, "a", &file, &[]).status.success());
    let before = k.ctl_ok(&["content", "info", &digest]);
    let out = ingest(&k, "b", &file, &[]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("already exists"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        k.ctl_ok(&["content", "info", &digest]),
        before,
        "blob untouched"
    );
}

#[test]
fn refs_and_digests_that_leave_the_root_are_invalid_argument() {
    let k = Keeld::start();
    let (file, _) = random_file(k.dir.path(), "data", 10, 6);
    for bad_ref in [
        "../escape",
        "/etc/passwd",
        "a/../../b",
        "has space",
        "nul\u{1}ctl",
    ] {
        let out = ingest(&k, bad_ref, &file, &[]);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && e.contains("invalid argument") && e.contains("ref"),
            "{bad_ref:?}: {}",
            describe(&out)
        );
    }
    let hex = "a".repeat(64);
    for bad in [
        format!("sha256:../../{}", &hex[..58]),
        format!("/{hex}"),
        format!("sha512:{hex}"),
        format!("sha256:{}", &hex[..63]),
        format!("sha256:{}", hex.to_uppercase()),
        "sha256:".to_string(),
    ] {
        for cmd in ["info", "get", "rm"] {
            k.ctl_err(&["content", cmd, &bad], "invalid argument: digest");
        }
    }
    // A NUL cannot even be put in an argv; send it through the API.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = keel_protocol::Client::connect(k.socket.to_str().unwrap(), None)
            .await
            .unwrap();
        let req = keel_protocol::api::content::InfoRequest {
            digest: format!("sha256:{}\0", &hex[..63]),
            ..Default::default()
        };
        let err = keel_protocol::Error::from(c.content.info(c.ctx(), &req).await.unwrap_err());
        assert!(
            matches!(err, keel_protocol::Error::InvalidArgument(_)),
            "{err:?}"
        );
        let req = keel_protocol::api::content::StatusRequest {
            ref_: "a\0b".into(),
            ..Default::default()
        };
        let err = keel_protocol::Error::from(c.content.status(c.ctx(), &req).await.unwrap_err());
        assert!(
            matches!(err, keel_protocol::Error::InvalidArgument(_)),
            "{err:?}"
        );
    });
    // Nothing escaped: the root holds only keel's own files.
    assert!(!k.dir.path().join("escape").exists());
    k.assert_serving();
}

#[test]
fn second_writer_on_a_locked_ref_is_unavailable() {
    let k = Keeld::start();
    let (file, digest) = random_file(k.dir.path(), "data", 1 << 20, 7);
    let mut first = k
        .ctl_cmd(&["content", "ingest", "locked"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first writer holds the ref.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !k.ctl_ok(&["content", "active"]).contains("locked") {
        assert!(
            Instant::now() < deadline,
            "first writer never opened the ref"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = ingest(&k, "locked", &file, &[]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && e.contains("unavailable")
            && e.contains("ref locked is locked since"),
        "{}",
        describe(&out)
    );
    k.ctl_err(&["content", "abort", "locked"], "unavailable");
    k.assert_serving();

    // The first writer finishes normally.
    {
        use std::io::Write;
        let mut stdin = first.stdin.take().unwrap();
        stdin.write_all(&std::fs::read(&file).unwrap()).unwrap();
    }
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
}

#[test]
fn labels_delete_and_active_listing() {
    let k = Keeld::start();
    let (file, digest) = random_file(k.dir.path(), "data", 1000, 8);
    assert!(ingest(&k, "l", &file, &["--label", "app=web"])
        .status
        .success());
    k.ctl_ok(&["content", "label", &digest, "tier=gold", "app="]);
    let info: serde_json::Value =
        serde_json::from_str(&k.ctl_ok(&["content", "info", &digest])).unwrap();
    assert_eq!(info["labels"], serde_json::json!({"tier": "gold"}));
    assert_eq!(
        k.ctl_ok(&["content", "ls", "labels.app==web"])
            .lines()
            .count(),
        1
    );
    assert_eq!(
        k.ctl_ok(&["content", "ls", "labels.tier==gold"])
            .lines()
            .count(),
        2
    );
    k.ctl_err(
        &["content", "ls", "labels.tier=="],
        "invalid argument: filter",
    );
    k.ctl_ok(&["content", "rm", &digest]);
    k.ctl_err(&["content", "info", &digest], "not found");
    // Namespaces do not see each other's content.
    assert!(ingest(&k, "l", &file, &[]).status.success());
    k.ctl_err(
        &["--namespace", "other", "content", "info", &digest],
        "not found",
    );
}

#[test]
fn fsck_reports_a_corrupted_blob() {
    let k = Keeld::start();
    let (file, digest) = random_file(k.dir.path(), "data", 5000, 9);
    assert!(ingest(&k, "f", &file, &[]).status.success());
    k.ctl_ok(&["content", "fsck"]);
    let blob = k
        .root
        .join("content/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let out = k.ctl(&["content", "fsck"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("corrupt: {digest}")),
        "{}",
        describe(&out)
    );
}

#[test]
fn ingest_from_a_pipe_works_too() {
    let k = Keeld::start();
    let (file, digest) = random_file(k.dir.path(), "data", 3 << 20, 10);
    let mut cat = Command::new("cat")
        .arg(&file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = k
        .ctl_cmd(&["content", "ingest", "piped"])
        .stdin(cat.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(cat.wait().unwrap().success());
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
}
