//! CRIU's checkpoint options on real containers: a task holding a file lock, and
//! one whose unix socket's peer is outside the container, cannot be dumped
//! without `--file-locks` and `--external-unix-sockets`; with them they are,
//! the checkpoint records what its restore needs, and the restored process has
//! its lock and its connection again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keel_tests::{describe, eventually, Keeld};

/// A private copy of the busybox rootfs with host `binaries` and the shared
/// libraries they load (busybox has neither `flock` nor a unix socket client).
fn rootfs_with(dir: &Path, binaries: &[&Path]) -> PathBuf {
    let rootfs = keel_tests::private_rootfs(&dir.join("rootfs"));
    let copy = |from: &Path| {
        let to = rootfs.join(from.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    for bin in binaries {
        copy(bin);
        let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            copy(Path::new(lib));
        }
    }
    rootfs
}

/// The dump's log in CRIU's work directory `dir`.
fn dump_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("dump.log")).unwrap_or_default()
}

/// Checkpoints `id` without `option` (refused by CRIU, which names the option
/// it lacks; the task runs on), then with it and `--exit`; returns the digest.
fn refused_then_dumped(k: &Keeld, id: &str, option: &str, hint: &str) -> String {
    let work = k.dir.path().join(format!("{id}-without"));
    let w = work.to_str().unwrap();
    k.ctl_err(&["tasks", "checkpoint", "--work-path", w, id], "checkpoint");
    assert!(dump_log(&work).contains(hint), "{}", dump_log(&work));
    assert!(k.ctl_ok(&["tasks", "ls"]).contains("RUNNING"));
    let work = k.dir.path().join(format!("{id}-with"));
    let w = work.to_str().unwrap();
    let out = k.ctl(&[
        "tasks",
        "checkpoint",
        "--exit",
        option,
        "--work-path",
        w,
        id,
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        dump_log(&work)
    );
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let w = k.ctl(&["tasks", "wait", id]);
    assert_eq!(w.status.code(), Some(137), "{}", describe(&w));
    k.ctl_ok(&["tasks", "rm", id]);
    k.ctl_ok(&["containers", "rm", id]);
    digest
}

#[test]
fn a_file_lock_is_dumped_only_with_file_locks_and_held_again_after_restore() {
    let Some(k) = keel_tests::keeld_for_checkpoints(
        "a_file_lock_is_dumped_only_with_file_locks_and_held_again_after_restore",
    ) else {
        return;
    };
    let flock = keel_tests::on_path("flock").expect("flock (util-linux) on PATH");
    let rootfs = rootfs_with(k.dir.path(), &[&flock]);
    let r = rootfs.to_str().unwrap();
    // The process takes the lock on a file of its rootfs and keeps it.
    let out = k.ctl(&[
        "run",
        "-d",
        "--rootfs",
        r,
        "locker",
        "sh",
        "-c",
        "exec 3>/lock; flock 3; echo locked; while true; do sleep 1; done",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    eventually(Duration::from_secs(20), "the lock", || {
        k.ctl_ok(&["tasks", "logs", "locker"])
            .contains("locked")
            .then_some(())
    });
    let digest = refused_then_dumped(
        &k,
        "locker",
        "--file-locks",
        "Some file locks are hold by dumping tasks",
    );
    assert_eq!(k.criu_restore_annotation(&digest), "file-locks");

    k.ctl_ok(&[
        "run",
        "-d",
        "--rootfs",
        r,
        "--checkpoint",
        &digest,
        "relocked",
    ]);
    // Another process of the container cannot take the lock: the restored one
    // holds it again.
    let probe = k.ctl(&[
        "tasks",
        "exec",
        "--exec-id",
        "probe",
        "relocked",
        "sh",
        "-c",
        "flock -n /lock true && echo free || echo held",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "held",
        "{}",
        describe(&probe)
    );
    k.ctl_ok(&["tasks", "rm", "-f", "relocked"]);
    // With the lock's holder gone, it is free.
    k.ctl_ok(&["containers", "rm", "relocked"]);
    let flock_host = Command::new(&flock)
        .args(["-n", rootfs.join("lock").to_str().unwrap(), "true"])
        .status()
        .unwrap();
    assert!(flock_host.success(), "the lock outlived its holder");
}

#[test]
fn an_external_unix_socket_is_dumped_only_with_external_unix_sockets_and_reconnected() {
    let Some(k) = keel_tests::keeld_for_checkpoints(
        "an_external_unix_socket_is_dumped_only_with_external_unix_sockets_and_reconnected",
    ) else {
        return;
    };
    let sender = keel_tests::bin_dir().join("examples/dgram_sender");
    assert!(
        sender.is_file(),
        "{} is not built (cargo build --examples -p keel-tests)",
        sender.display()
    );
    let rootfs = rootfs_with(k.dir.path(), &[&sender]);
    // The receiving end is outside the container, in a directory the container
    // sees at the same path (CRIU connects back to the name it dumped). CRIU
    // finds a socket's peer in the container's network namespace only, so the
    // receiver is made there, by this process: the container waits for it.
    let dir = k.dir.path().join("ext");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("sock");
    let mount = format!(
        "type=bind,src={d},dst={d},options=rbind:rw",
        d = dir.display()
    );
    let script = format!(
        "while [ ! -S {p} ]; do sleep 0.1; done; exec {s} {p}",
        p = path.display(),
        s = sender.display()
    );
    let out = k.ctl(&[
        "run",
        "-d",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--mount",
        &mount,
        "sender",
        "sh",
        "-c",
        &script,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let info: serde_json::Value =
        serde_json::from_str(&k.ctl_ok(&["tasks", "info", "sender"])).unwrap();
    let pid = info["pid"].as_u64().expect("the task's pid");
    let receiver = {
        let (netns, path) = (format!("/proc/{pid}/ns/net"), path.clone());
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(netns).unwrap();
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            std::os::unix::net::UnixDatagram::bind(&path).unwrap()
        })
        .join()
        .unwrap()
    };
    receiver
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 32];
        let n = receiver
            .recv(&mut buf)
            .expect("a number from the container");
        String::from_utf8_lossy(&buf[..n]).parse::<u64>().unwrap()
    };
    let before = (0..3).fold(0, |_, _| next());
    let digest = refused_then_dumped(
        &k,
        "sender",
        "--external-unix-sockets",
        "External socket is used",
    );
    assert_eq!(k.criu_restore_annotation(&digest), "ext-unix-sk");
    // Whatever the old process sent before it died is read away.
    while receiver
        .set_nonblocking(true)
        .and_then(|()| receiver.recv(&mut [0u8; 32]))
        .is_ok()
    {}
    receiver.set_nonblocking(false).unwrap();

    k.ctl_ok(&[
        "run",
        "-d",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--mount",
        &mount,
        "--checkpoint",
        &digest,
        "resent",
    ]);
    // The restored process goes on counting through its restored socket.
    let after = next();
    assert!(
        after > before && after < before + 100,
        "restored at {after}, dumped after {before}"
    );
    assert!(next() > after);
    k.ctl_ok(&["tasks", "rm", "-f", "resent"]);
    k.ctl_ok(&["containers", "rm", "resent"]);
}
