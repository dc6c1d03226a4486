//! Root filesystems: a task's own rootfs mounts (an overlay whose writes land in
//! its upper directory), keelctl's writable rootfs unless `--read-only`, and
//! `--mount`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_protocol::api::tasks::{CreateTaskRequest, StartRequest};
use keel_protocol::api::types::Mount;
use keel_tests::{busybox_rootfs, describe, require_runtime, Keeld};

/// A tmpfs at `dir` (an overlay's upper and work directories need a filesystem
/// that can hold them, which the scratch directory's may not be), unmounted when
/// dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a tmpfs");
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mounted_below(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| m.starts_with(&dir))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn a_task_s_own_overlay_rootfs_keeps_its_writes_in_the_upper_dir() {
    require_runtime();
    let k = Keeld::start();
    let lower = busybox_rootfs();
    let scratch = Tmpfs::mount(k.dir.path().join("overlay"));
    let (upper, work) = (scratch.0.join("upper"), scratch.0.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir(d).unwrap();
    }
    // The container's rootfs is the busybox tree itself; the task's own is an
    // overlay on it.
    k.ctl_ok(&[
        "containers",
        "create",
        "--rootfs",
        lower.to_str().unwrap(),
        "ovl",
        "sh",
        "-c",
        "echo written > /made-by-task && cat /made-by-task",
    ]);
    let overlay = Mount {
        type_: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            format!("lowerdir={}", lower.display()),
            format!("upperdir={}", upper.display()),
            format!("workdir={}", work.display()),
        ],
        ..Default::default()
    };
    let rt = keel_tests::runtime();
    rt.block_on(async {
        let c = k.client(None).await;
        let req = CreateTaskRequest {
            container_id: "ovl".into(),
            rootfs: vec![overlay.clone()],
            log_to_file: true,
            ..Default::default()
        };
        c.tasks
            .create(c.ctx(), &req)
            .await
            .expect("create with an overlay rootfs");
        let start = StartRequest {
            container_id: "ovl".into(),
            ..Default::default()
        };
        c.tasks.start(c.ctx(), &start).await.expect("start");
    });
    let w = k.ctl(&["tasks", "wait", "ovl"]);
    assert_eq!(w.status.code(), Some(0), "{}", describe(&w));
    assert!(k.ctl_ok(&["tasks", "logs", "ovl"]).contains("written"));
    assert_eq!(
        std::fs::read_to_string(upper.join("made-by-task")).unwrap(),
        "written\n"
    );
    assert!(
        !lower.join("made-by-task").exists(),
        "the lower tree was written"
    );
    let bundle = k.state.join("tasks");
    assert!(
        !mounted_below(&bundle).is_empty(),
        "the overlay is not mounted"
    );
    k.ctl_ok(&["tasks", "rm", "ovl"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mounted_below(&bundle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left mounted: {:?}",
            mounted_below(&bundle)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Refused, naming the field: a bind rootfs that is not a directory.
    let e = rt.block_on(async {
        let c = k.client(None).await;
        let req = CreateTaskRequest {
            container_id: "ovl".into(),
            rootfs: vec![Mount {
                type_: "bind".into(),
                source: "/no/such/dir".into(),
                options: vec!["rbind".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        c.tasks.create(c.ctx(), &req).await.unwrap_err()
    });
    assert!(
        matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::INVALID_ARGUMENT
            && s.message().contains("rootfs[0].source")),
        "{e:?}"
    );
    k.ctl_ok(&["containers", "rm", "ovl"]);
}

#[test]
fn keelctl_s_rootfs_is_writable_unless_read_only_and_mount_adds_mounts() {
    require_runtime();
    let k = Keeld::start();
    // A private copy: these containers write into their rootfs.
    let rootfs = k.dir.path().join("rootfs");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(busybox_rootfs())
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(cp.status.success(), "{}", describe(&cp));
    let run = |extra: &[&str], id: &str, script: &str| {
        let mut args = vec!["run", "--rm", "--rootfs", rootfs.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[id, "sh", "-c", script]);
        k.ctl(&args)
    };
    let out = run(&[], "rw", "echo x > /made-here");
    assert!(out.status.success(), "{}", describe(&out));
    assert!(rootfs.join("made-here").is_file());
    let out = run(&["--read-only"], "ro", "echo x > /not-made");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        describe(&out)
    );
    assert!(!rootfs.join("not-made").exists());
    let data = k.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        data.display()
    );
    let out = run(&["--mount", &mount], "mnt", "echo hi > /data/x");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read_to_string(data.join("x")).unwrap(), "hi\n");
    let err = k.ctl_err(
        &[
            "run",
            "--rm",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--mount",
            "dst=relative",
            "bad",
            "true",
        ],
        "--mount",
    );
    assert!(err.contains("absolute path"), "{err}");
}
