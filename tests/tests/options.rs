//! Runtime options (`containerd.runc.v1.Options`) on a real container: each has
//! the effect runc and the shim give it, a task's own options win over its
//! container's, and what keel cannot honour is refused, naming the option.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_protocol::api::tasks::CreateTaskRequest;
use keel_protocol::containerd::shim::oci::Options;
use keel_protocol::protobuf::well_known_types::any::Any;
use keel_protocol::protobuf::{Message, MessageField};
use keel_tests::{busybox_rootfs, describe, require_runc, Keeld};

use keel_protocol::types::RUNC_OPTIONS_TYPE_URL as RUNC_OPTIONS;

/// A keeld whose containers run on containerd's runc shim: these tests are
/// about runc's options (keel's shim refuses those it cannot honour by name,
/// in its own unit tests).
fn on_runc() -> Keeld {
    Keeld::start_with_config("default_runtime = \"io.containerd.runc.v2\"")
}

/// An OCI runtime binary that writes each command line it is given to `log`,
/// then runs runc with it.
fn logging_runtime(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let runc = keel_tests::on_path("runc").expect("runc on PATH");
    let (bin, log) = (dir.join(name), dir.join(format!("{name}.log")));
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexec {} \"$@\"\n",
            log.display(),
            runc.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    (bin, log)
}

fn calls(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The runc command of `log` whose subcommand is `sub`.
fn call<'a>(calls: &'a [String], sub: &str) -> &'a str {
    calls
        .iter()
        .find(|c| c.split_whitespace().any(|w| w == sub))
        .unwrap_or_else(|| panic!("runc was never run with {sub}: {calls:#?}"))
}

fn wait_for_log(k: &Keeld, id: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = k.ctl_ok(&["tasks", "logs", id]);
        if logs.contains(want) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never printed {want:?}: {logs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runtime_options_reach_runc_and_the_shim() {
    require_runc();
    let k = on_runc();
    let rootfs = busybox_rootfs();
    let (wrapper, log) = logging_runtime(k.dir.path(), "logging-runc");
    let root = k.dir.path().join("runc-root");
    let script = "stat -L -c 'io %u:%g' /proc/self/fd/1; echo ready; sleep 600";
    let out = k.ctl(&[
        "run",
        "-d",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--runc-binary",
        wrapper.to_str().unwrap(),
        "--runc-root",
        root.to_str().unwrap(),
        "--no-pivot",
        "--no-new-keyring",
        "--io-uid",
        "1234",
        "--io-gid",
        "1235",
        "o1",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    // IoUid/IoGid: the shim makes the pipes carrying the process's stdio theirs;
    // runc then gives the pipes' owner to the process's own user (root here, as
    // its fixStdioPermissions does) and leaves the group.
    let logs = wait_for_log(&k, "o1", "ready");
    assert!(logs.contains("io 0:1235"), "{logs}");
    // BinaryName runs every runc command; Root, NoPivotRoot, NoNewKeyring are its
    // flags.
    let seen = calls(&log);
    let create = call(&seen, "create");
    let ns_root = root.join(&k.namespace);
    assert!(
        create.contains(&format!("--root {}", ns_root.display())),
        "{create}"
    );
    assert!(create.contains("--no-pivot"), "{create}");
    assert!(create.contains("--no-new-keyring"), "{create}");
    assert!(
        ns_root.join("o1").join("state.json").is_file(),
        "runc's state is not under the given root"
    );
    k.ctl_ok(&["tasks", "kill", "-s", "9", "o1"]);
    let w = k.ctl(&["tasks", "wait", "o1"]);
    assert_eq!(w.status.code(), Some(137), "{}", describe(&w));
    assert!(call(&calls(&log), "kill").contains("o1"));
    k.ctl_ok(&["tasks", "rm", "o1"]);
    assert!(call(&calls(&log), "delete").contains("o1"));
    assert!(!ns_root.join("o1").exists(), "runc's state left behind");

    // The same container without options: runc from PATH, keel's own root.
    let before = calls(&log).len();
    k.ctl_ok(&[
        "run",
        "-d",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "o2",
        "sh",
        "-c",
        script,
    ]);
    let logs = wait_for_log(&k, "o2", "ready");
    assert!(logs.contains("io 0:0"), "{logs}");
    assert_eq!(
        calls(&log).len(),
        before,
        "the wrapper ran for a task without options"
    );
    k.ctl_ok(&["tasks", "rm", "-f", "o2"]);
    for id in ["o1", "o2"] {
        k.ctl_ok(&["containers", "rm", id]);
    }
}

#[test]
fn a_task_s_own_options_win_over_its_container_s() {
    require_runc();
    let k = on_runc();
    let rootfs = busybox_rootfs();
    let (container_rt, container_log) = logging_runtime(k.dir.path(), "container-runc");
    let (task_rt, task_log) = logging_runtime(k.dir.path(), "task-runc");
    k.ctl_ok(&[
        "containers",
        "create",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--runc-binary",
        container_rt.to_str().unwrap(),
        "ov",
        "sleep",
        "600",
    ]);
    let options = |binary: &Path| Any {
        type_url: RUNC_OPTIONS.into(),
        value: Options {
            binary_name: binary.display().to_string(),
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap(),
        ..Default::default()
    };
    let rt = keel_tests::runtime();
    rt.block_on(async {
        let c = k.client(None).await;
        let req = CreateTaskRequest {
            container_id: "ov".into(),
            log_to_file: true,
            options: MessageField::some(options(&task_rt)),
            ..Default::default()
        };
        c.tasks.create(c.ctx(), &req).await.expect("create");
    });
    call(&calls(&task_log), "create");
    assert!(
        calls(&container_log).is_empty(),
        "{:?}",
        calls(&container_log)
    );
    k.ctl_ok(&["tasks", "rm", "-f", "ov"]);
    // Without options of its own, the container's apply.
    rt.block_on(async {
        let c = k.client(None).await;
        let req = CreateTaskRequest {
            container_id: "ov".into(),
            log_to_file: true,
            ..Default::default()
        };
        c.tasks.create(c.ctx(), &req).await.expect("create");
    });
    call(&calls(&container_log), "create");
    k.ctl_ok(&["tasks", "rm", "-f", "ov"]);
    k.ctl_ok(&["containers", "rm", "ov"]);
}

/// Makes cgroup `path` in every v1 hierarchy (a cpuset one with its parent's cpus
/// and memory nodes) and in the unified one; returns the directories made.
fn make_cgroup(path: &str) -> Vec<PathBuf> {
    let mut made = Vec::new();
    for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap() {
        let hierarchy = entry.unwrap().path();
        let dir = hierarchy.join(path.trim_start_matches('/'));
        if std::fs::create_dir_all(&dir).is_err() {
            continue;
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(hierarchy.join(file)) {
                let _ = std::fs::write(dir.join(file), v.trim());
            }
        }
        made.push(dir);
    }
    made
}

#[test]
fn shim_cgroup_places_the_task_s_shim() {
    require_runc();
    let k = on_runc();
    let rootfs = busybox_rootfs();
    let cgroup = format!("/keel-test-shim-{}", std::process::id());
    let made = make_cgroup(&cgroup);
    assert!(!made.is_empty(), "no cgroup hierarchy to make {cgroup} in");
    let out = k.ctl(&[
        "run",
        "-d",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--shim-cgroup",
        &cgroup,
        "sc",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let shim = k.shim_pid("sc");
    let placed = std::fs::read_to_string(format!("/proc/{shim}/cgroup")).unwrap();
    assert!(
        placed.lines().any(|l| l.ends_with(&format!(":{cgroup}"))),
        "the shim is not in {cgroup}: {placed}"
    );
    k.ctl_ok(&["tasks", "rm", "-f", "sc"]);
    k.ctl_ok(&["containers", "rm", "sc"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    for dir in made.iter().rev() {
        while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn options_keel_cannot_honour_are_refused_naming_them() {
    require_runc();
    let k = on_runc();
    let rootfs = busybox_rootfs();
    let create = |extra: &[&str], want: &str| {
        let mut args = vec!["containers", "create", "--rootfs", rootfs.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["refused", "true"]);
        let err = k.ctl_err(&args, "invalid argument");
        assert!(err.contains(want), "{err}");
    };
    create(
        &["--runc-systemd-cgroup"],
        "container.runtime.options.systemd_cgroup",
    );
    create(
        &["--runc-root", "relative"],
        "container.runtime.options.root",
    );
    create(
        &["--runc-binary", "no-such-oci-runtime"],
        "container.runtime.options.binary_name",
    );
    // Nothing was created by the refusals.
    let ls = k.ctl_ok(&["containers", "ls"]);
    assert!(!ls.contains("refused"), "{ls}");

    k.ctl_ok(&[
        "containers",
        "create",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "plain",
        "true",
    ]);
    let rt = keel_tests::runtime();
    let refused = |options: Any, want: &str| {
        rt.block_on(async {
            let c = k.client(None).await;
            let req = CreateTaskRequest {
                container_id: "plain".into(),
                options: MessageField::some(options),
                ..Default::default()
            };
            match c.tasks.create(c.ctx(), &req).await {
                Err(ttrpc::Error::RpcStatus(s)) => {
                    assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{s:?}");
                    assert!(s.message().contains(want), "{s:?}");
                }
                other => panic!("{other:?}, wanted InvalidArgument naming {want}"),
            }
        })
    };
    // Another runtime's options type; a field this Options does not have (a
    // newer containerd's, or the criu_path 1.6 still sends).
    refused(
        Any {
            type_url: "containerd.linux.runc.RuncOptions".into(),
            ..Default::default()
        },
        "options.type_url",
    );
    refused(
        Any {
            type_url: RUNC_OPTIONS.into(),
            value: b"\x42\x04criu".to_vec(),
            ..Default::default()
        },
        "criu_path",
    );
    refused(
        Any {
            type_url: RUNC_OPTIONS.into(),
            value: Options {
                task_api_address: "/run/sandbox.sock".into(),
                ..Default::default()
            }
            .write_to_bytes()
            .unwrap(),
            ..Default::default()
        },
        "options.task_api_address",
    );
    // No task was left behind by any of them.
    assert!(!k.ctl_ok(&["tasks", "ls"]).contains("plain"));
    // Only a task's own options name an image to restore from.
    rt.block_on(async {
        use keel_protocol::api::containers::{
            container::Runtime, Container, CreateContainerRequest, GetContainerRequest,
        };
        let c = k.client(None).await;
        let get = GetContainerRequest {
            id: "plain".into(),
            ..Default::default()
        };
        let plain = c.containers.get(c.ctx(), &get).await.expect("get");
        let image = Options {
            criu_image_path: "/var/tmp/image".into(),
            ..Default::default()
        };
        let req = CreateContainerRequest {
            container: MessageField::some(Container {
                id: "with-image".into(),
                runtime: MessageField::some(Runtime {
                    name: "io.containerd.runc.v2".into(),
                    options: MessageField::some(Any {
                        type_url: RUNC_OPTIONS.into(),
                        value: image.write_to_bytes().unwrap(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..plain.container.unwrap()
            }),
            ..Default::default()
        };
        match c.containers.create(c.ctx(), &req).await {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{s:?}");
                assert!(
                    s.message()
                        .contains("container.runtime.options.criu_image_path"),
                    "{s:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    });
    k.ctl_ok(&["containers", "rm", "plain"]);
    k.assert_serving();
}

#[test]
fn a_runtime_named_by_its_shim_s_path_runs() {
    require_runc();
    let k = on_runc();
    let rootfs = busybox_rootfs();
    let shim = keel_tests::on_path("containerd-shim-runc-v2").expect("the shim on PATH");
    let out = k.ctl(&[
        "run",
        "-d",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--runtime",
        shim.to_str().unwrap(),
        "by-path",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(k.ctl_ok(&["tasks", "ls"]).contains("RUNNING"));
    k.ctl_ok(&["tasks", "rm", "-f", "by-path"]);
    k.ctl_ok(&["containers", "rm", "by-path"]);
    let missing = format!("{}.missing", shim.display());
    let err = k.ctl_err(
        &[
            "containers",
            "create",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--runtime",
            &missing,
            "x",
            "true",
        ],
        "not found",
    );
    assert!(err.contains("no such shim binary"), "{err}");
}
