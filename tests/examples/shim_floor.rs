//! The floor under `keelctl run --rm` (see `bench/task-start.sh`): drives
//! containerd-shim-runc-v2 directly, with nothing recorded and no events, through the
//! same steps keel takes for one task (bundle, log FIFO, `start`, Connect, Create,
//! Start, Wait, Delete, Shutdown, bundle removal), and prints each run's time in µs.
//!
//! usage: shim_floor CONFIG_JSON ROOTFS STATE_DIR RUNS
//!
//! CONFIG_JSON is a task's `config.json` as keel writes it; its cgroupsPath is made
//! unique per run.

use std::path::Path;
use std::time::Instant;

use keel_protocol::containerd::api;
use keel_protocol::containerd::shim::oci::Options;
use keel_protocol::protobuf::{well_known_types::any::Any, Message, MessageField};
use keel_protocol::shim::ShimClient;

const NAMESPACE: &str = "floor";

async fn one(
    config: &serde_json::Value,
    rootfs: &str,
    state: &Path,
    id: &str,
) -> anyhow::Result<()> {
    let bundle = state.join(id);
    std::fs::create_dir_all(bundle.join("rootfs"))?;
    let mut spec = config.clone();
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("/keel/{NAMESPACE}/{id}"));
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    let fifo = bundle.join("log");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let log = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&fifo)?;
    let drain = tokio::spawn(async move {
        let mut log = log;
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut log, &mut sink).await;
    });

    let events = state.join("events.sock");
    let out = tokio::process::Command::new("containerd-shim-runc-v2")
        .args(["-namespace", NAMESPACE, "-address"])
        .arg(&events)
        .args(["-publish-binary", "/bin/true", "-id", id, "start"])
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", &events)
        .env("GOMAXPROCS", "2")
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "shim start: {out:?}");
    let address = String::from_utf8(out.stdout)?.trim().to_string();
    let shim = ShimClient::connect(&address, NAMESPACE).await?;
    let t = Some(std::time::Duration::from_secs(10));
    shim.connect_shim(
        &api::ConnectRequest {
            id: id.into(),
            ..Default::default()
        },
        t,
    )
    .await?;
    let options = Options {
        root: state.join("runc").display().to_string(),
        ..Default::default()
    };
    let options = Any {
        type_url: "containerd.runc.v1.Options".into(),
        value: options.write_to_bytes()?,
        ..Default::default()
    };
    let create = api::CreateTaskRequest {
        id: id.into(),
        bundle: bundle.display().to_string(),
        rootfs: vec![api::Mount {
            type_: "bind".into(),
            source: rootfs.into(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        }],
        options: MessageField::some(options),
        ..Default::default()
    };
    shim.create(&create, t).await?;
    shim.start(
        &api::StartRequest {
            id: id.into(),
            ..Default::default()
        },
        t,
    )
    .await?;
    let w = shim
        .wait(
            &api::WaitRequest {
                id: id.into(),
                ..Default::default()
            },
            None,
        )
        .await?;
    anyhow::ensure!(w.exit_status == 0, "exit status {}", w.exit_status);
    shim.delete(
        &api::DeleteRequest {
            id: id.into(),
            ..Default::default()
        },
        t,
    )
    .await?;
    let _ = shim
        .shutdown(
            &api::ShutdownRequest {
                id: id.into(),
                ..Default::default()
            },
            t,
        )
        .await;
    drain.abort();
    std::fs::remove_dir(bundle.join("rootfs"))?;
    std::fs::remove_dir_all(&bundle)?;
    remove_cgroup(id);
    if let Some(p) = address.strip_prefix("unix://") {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Removes `/keel/floor/<id>` (or `/keel/floor` itself, for "") from the unified
/// hierarchy or from each v1 controller.
fn remove_cgroup(id: &str) {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/keel/{NAMESPACE}/{id}"));
    for h in hierarchies.flatten() {
        let _ = std::fs::remove_dir(h.path().join(format!("keel/{NAMESPACE}/{id}")));
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() == 4,
        "usage: shim_floor CONFIG_JSON ROOTFS STATE_DIR RUNS"
    );
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&args[0])?)?;
    let state = Path::new(&args[2]);
    std::fs::create_dir_all(state)?;
    let runs: usize = args[3].parse()?;
    let tag = std::process::id();
    for i in 0..runs {
        let id = format!("f{tag}-{i}");
        let start = Instant::now();
        one(&config, &args[1], state, &id).await?;
        println!("{}", start.elapsed().as_micros());
    }
    remove_cgroup("");
    Ok(())
}
