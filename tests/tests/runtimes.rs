//! Runtime selection as containerd 1.7 and 2.0 do it, on real containers: a task
//! run by the shim binary its Create names (`runtime_path`), and a shim that
//! answers `start` with bootstrap JSON naming task API v3, spoken to in v3. Both
//! are recorded with the task: a keeld killed with -9 finds the task again.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_tests::{bin_dir, busybox_rootfs, describe, require_runc, Keeld};

/// The binary the process `pid` runs.
fn exe(pid: nix::unistd::Pid) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("its executable")
}

fn wait_until_running(k: &Keeld, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = k.ctl_ok(&["tasks", "ls"]);
        if ls
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never ran again: {ls}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills keeld with -9 and starts it again; then the task `id` is still
/// running, and stops with SIGKILL through its shim.
fn survives_a_crash_and_stops(k: &mut Keeld, id: &str) {
    k.kill9();
    k.spawn();
    wait_until_running(k, id);
    let out = k.ctl(&["tasks", "kill", "-s", "KILL", id]);
    assert!(out.status.success(), "{}", describe(&out));
    let waited = k.ctl(&["tasks", "wait", id]);
    assert_eq!(waited.status.code(), Some(137), "{}", describe(&waited));
    k.ctl_ok(&["tasks", "rm", id]);
    k.ctl_ok(&["containers", "rm", id]);
}

#[test]
fn a_task_runs_on_the_shim_its_create_names() {
    require_runc();
    let mut k = Keeld::start();
    let rootfs = busybox_rootfs();
    // containerd's runc shim under another name, off PATH: only runtime_path
    // can lead keeld to it.
    let dir = tempfile::tempdir().unwrap();
    let shim = dir.path().join("containerd-shim-elsewhere-v2");
    std::fs::copy(
        keel_tests::on_path("containerd-shim-runc-v2").unwrap(),
        &shim,
    )
    .unwrap();
    let out = k.ctl(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.keel.v1",
        "--runtime-path",
        shim.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "by-path",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(exe(k.shim_pid("by-path")), shim);
    // The container keeps its own runtime; the task ran elsewhere.
    let c = k.ctl_ok(&["containers", "info", "by-path"]);
    assert!(c.contains("io.containerd.keel.v1"), "{c}");
    survives_a_crash_and_stops(&mut k, "by-path");

    // A runtime_path that is not an absolute path to a shim is refused by name.
    for (path, want) in [
        ("containerd-shim-runc-v2", "invalid argument"),
        ("/nonexistent/containerd-shim-runc-v2", "not found"),
        ("/usr/../bin/containerd-shim-runc-v2", "invalid argument"),
    ] {
        let err = k.ctl_err(
            &[
                "run",
                "-d",
                "--runtime-path",
                path,
                "--rootfs",
                rootfs.to_str().unwrap(),
                "refused",
                "true",
            ],
            want,
        );
        assert!(err.contains("runtime_path"), "{path}: {err}");
    }
    k.assert_serving();
}

/// A shim that answers `start` as containerd 2.0's shims do, with bootstrap
/// JSON naming task API version 3: keel's shim (which serves v2 and v3) with
/// its printed address wrapped.
fn v3_shim(dir: &Path) -> PathBuf {
    let real = bin_dir().join("containerd-shim-keel-v1");
    assert!(real.is_file(), "{} is not built", real.display());
    let wrapper = dir.join("containerd-shim-keelthree-v1");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             for a in \"$@\"; do [ \"$a\" = start ] && s=1; done\n\
             [ -z \"$s\" ] && exec {real} \"$@\"\n\
             addr=$({real} \"$@\") || exit $?\n\
             printf '{{\"version\":3,\"address\":\"%s\",\"protocol\":\"ttrpc\"}}' \"$addr\"\n",
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

#[test]
fn a_shim_announcing_task_api_v3_is_spoken_to_in_v3() {
    keel_tests::require_root("running containers");
    let mut k = Keeld::start();
    let rootfs = busybox_rootfs();
    let dir = tempfile::tempdir().unwrap();
    let shim = v3_shim(dir.path());
    let out = k.ctl(&[
        "run",
        "-d",
        "--runtime",
        shim.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "three",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    wait_until_running(&k, "three");
    // Requests beyond Create reach it: an exec and its output.
    let out = k.ctl(&["tasks", "exec", "--exec-id", "e1", "three", "echo", "v3"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v3");
    survives_a_crash_and_stops(&mut k, "three");
    k.assert_serving();
}
