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
    let rootfs = keel_tests::private_rootfs(&k.dir.path().join("rootfs"));
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

/// An overlay on the busybox tree with its upper and work directories in `dir`.
fn overlay_on_busybox(dir: &Path) -> (Mount, PathBuf) {
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mount = Mount {
        type_: "overlay".into(),
        source: "overlay".into(),
        options: vec![
            format!("lowerdir={}", busybox_rootfs().display()),
            format!("upperdir={}", upper.display()),
            format!("workdir={}", work.display()),
        ],
        ..Default::default()
    };
    (mount, upper)
}

/// Creates and starts the task of container `id` on its own `rootfs`, restored
/// from `checkpoint` when given; the error of either step, as keeld answered.
fn create_and_start(
    k: &Keeld,
    id: &str,
    rootfs: Mount,
    checkpoint: Option<&str>,
) -> Result<(), ttrpc::Error> {
    keel_tests::runtime().block_on(async {
        let c = k.client(None).await;
        let req = CreateTaskRequest {
            container_id: id.into(),
            rootfs: vec![rootfs],
            log_to_file: true,
            checkpoint: checkpoint
                .map(|d| keel_protocol::api::types::Descriptor {
                    media_type: "application/vnd.oci.image.index.v1+json".into(),
                    digest: d.into(),
                    ..Default::default()
                })
                .into(),
            ..Default::default()
        };
        c.tasks.create(c.ctx(), &req).await?;
        let start = StartRequest {
            container_id: id.into(),
            ..Default::default()
        };
        c.tasks.start(c.ctx(), &start).await.map(drop)
    })
}

fn is_whiteout(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::symlink_metadata(path)
        .is_ok_and(|md| md.file_type().is_char_device() && md.rdev() == 0)
}

fn failed_precondition(e: &ttrpc::Error, naming: &str) -> bool {
    matches!(e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::FAILED_PRECONDITION
        && s.message().contains(naming))
}

#[test]
fn a_checkpoint_with_rw_carries_the_filesystem_changes_to_the_restored_overlay() {
    let Some(k) = keel_tests::keeld_for_checkpoints(
        "a_checkpoint_with_rw_carries_the_filesystem_changes_to_the_restored_overlay",
    ) else {
        return;
    };
    let scratch = Tmpfs::mount(k.dir.path().join("overlays"));
    let (first, first_upper) = overlay_on_busybox(&scratch.0.join("first"));
    // A file written, a lower file deleted (a whiteout), a directory made and
    // made opaque by replacing a lower one.
    k.ctl_ok(&[
        "containers",
        "create",
        "--rootfs",
        busybox_rootfs().to_str().unwrap(),
        "rw",
        "sh",
        "-c",
        "echo kept > /kept; rm /bin/ls; rm -r /etc; mkdir /etc; echo new > /etc/only; \
         touch /ready; while true; do sleep 1; done",
    ]);
    create_and_start(&k, "rw", first.clone(), None).expect("run on the first overlay");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !first_upper.join("ready").exists() {
        assert!(Instant::now() < deadline, "the task never wrote its files");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(is_whiteout(&first_upper.join("bin/ls")));

    // Without --exit: the task is paused for the copy and runs on after.
    let digest = k.ctl_ok(&["tasks", "checkpoint", "--rw", "rw"]);
    let digest = digest.trim();
    let ls = k.ctl_ok(&["tasks", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("rw") && l.contains("RUNNING")),
        "not running after its checkpoint: {ls}"
    );
    k.ctl_ok(&["tasks", "rm", "-f", "rw"]);

    // Onto a fresh overlay: the changes are back in its upper directory and the
    // restored process sees them.
    let (second, second_upper) = overlay_on_busybox(&scratch.0.join("second"));
    create_and_start(&k, "rw", second, Some(digest)).expect("restore onto a fresh overlay");
    assert_eq!(
        std::fs::read_to_string(second_upper.join("kept")).unwrap(),
        "kept\n"
    );
    assert!(
        is_whiteout(&second_upper.join("bin/ls")),
        "the deletion is lost"
    );
    assert_eq!(
        xattr_of(&second_upper.join("etc")).as_deref(),
        Some("y"),
        "the replaced directory is not opaque"
    );
    let seen = k.ctl(&[
        "tasks",
        "exec",
        "--exec-id",
        "look",
        "rw",
        "sh",
        "-c",
        "cat /kept; [ -e /bin/ls ] || echo ls-gone; [ -e /etc/passwd ] || echo etc-replaced; cat /etc/only",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&seen.stdout),
        "kept\nls-gone\netc-replaced\nnew\n",
        "{}",
        describe(&seen)
    );
    k.ctl_ok(&["tasks", "rm", "-f", "rw"]);

    // Its changes need an overlay to go to; a task on none has none to give.
    let bind = Mount {
        type_: "bind".into(),
        source: busybox_rootfs().display().to_string(),
        options: vec!["rbind".into(), "ro".into()],
        ..Default::default()
    };
    let e = create_and_start(&k, "rw", bind.clone(), Some(digest)).unwrap_err();
    assert!(failed_precondition(&e, "overlay"), "{e:?}");
    k.ctl_ok(&["containers", "rm", "rw"]);
    k.ctl_ok(&[
        "containers",
        "create",
        "--rootfs",
        busybox_rootfs().to_str().unwrap(),
        "plain",
        "sleep",
        "600",
    ]);
    create_and_start(&k, "plain", bind, None).expect("run on a bind rootfs");
    let err = k.ctl_err(
        &["tasks", "checkpoint", "--rw", "plain"],
        "failed precondition",
    );
    assert!(err.contains("rw:") && err.contains("upperdir"), "{err}");
    k.ctl_ok(&["tasks", "rm", "-f", "plain"]);
    k.ctl_ok(&["containers", "rm", "plain"]);
}

/// `trusted.overlay.opaque` of `dir`, if set.
fn xattr_of(dir: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut value = [0u8; 16];
    // SAFETY: both strings are NUL-terminated and the buffer's length is passed.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    Some(String::from_utf8_lossy(&value[..n]).into_owned())
}
