//! Restart benchmark (see `bench/restore.sh`): with keeld's tasks already running,
//! kills keeld with SIGKILL, starts it again and measures the time from the new
//! process's start to (1) the API answering Version and (2) `Tasks.List` being fully
//! correct: exactly the expected tasks listed, RUNNING, each with the pid it had
//! before the first kill.
//!
//! usage: restore_bench KEELD_COMMAND… -- ADDRESS NAMESPACE ROUNDS TRUTH COUNT
//!
//! KEELD_COMMAND is how to start keeld (binary and flags); it is started ROUNDS
//! times. TRUTH is `keelctl tasks ls --format json` taken before keeld was first
//! killed; COUNT is how many tasks it must hold.
//!
//! After the rounds, with keeld stopped, it times the floor the shims set: asking
//! every task's shim directly (16 at a time, as keeld does) for its Connect and
//! State, which is the least a restore must do to know each task.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_protocol::api::tasks::{ListTasksRequest, Status};
use keel_protocol::containerd::api;
use keel_protocol::shim::ShimClient;
use keel_protocol::Client;
use sha2::Digest;

/// How often `Tasks.List` is asked while waiting for it to be correct (the
/// figure's resolution).
const LIST_EVERY: Duration = Duration::from_millis(5);

async fn listing(client: &Client) -> anyhow::Result<BTreeMap<String, (Status, u32)>> {
    let r = client
        .tasks
        .list(client.ctx(), &ListTasksRequest::default())
        .await?;
    Ok(r.tasks
        .iter()
        .map(|t| {
            (
                t.container_id.clone(),
                (t.status.enum_value_or_default(), t.pid),
            )
        })
        .collect())
}

fn spawn(cmd: &[String]) -> anyhow::Result<Child> {
    Ok(Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args.iter().position(|a| a == "--").ok_or_else(|| {
        anyhow::anyhow!("usage: restore_bench KEELD… -- ADDRESS NAMESPACE ROUNDS")
    })?;
    let (keeld, rest) = (&args[..split], &args[split + 1..]);
    anyhow::ensure!(
        rest.len() == 5,
        "usage: restore_bench KEELD… -- ADDRESS NAMESPACE ROUNDS TRUTH COUNT"
    );
    let (address, namespace) = (&rest[0], &rest[1]);
    let rounds: usize = rest[2].parse()?;
    // What is true: the tasks listed before the first kill, running, with these pids.
    let truth: BTreeMap<String, (Status, u32)> = std::fs::read_to_string(&rest[3])?
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            anyhow::ensure!(v["status"] == "RUNNING", "not running before the kill: {v}");
            let pid = u32::try_from(v["pid"].as_u64().unwrap_or_default())?;
            anyhow::ensure!(pid > 0, "no pid: {v}");
            Ok((
                v["id"].as_str().unwrap_or_default().to_string(),
                (Status::RUNNING, pid),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let count: usize = rest[4].parse()?;
    anyhow::ensure!(
        truth.len() == count,
        "{} tasks listed before the kill, {count} expected",
        truth.len()
    );

    eprintln!("{} tasks running", truth.len());
    let mut child: Option<Child> = None;
    for round in 0..rounds {
        if let Some(mut c) = child.take() {
            c.kill()?;
            c.wait()?;
        }
        let t0 = Instant::now();
        child = Some(spawn(keeld)?);
        let client = loop {
            if let Ok(c) = Client::connect(address, Some(namespace)).await {
                if c.daemon_version().await.is_ok() {
                    break c;
                }
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        };
        let api = t0.elapsed();
        loop {
            if listing(&client).await? == truth {
                break;
            }
            // A listing of 1,000 tasks costs keeld about 2 ms of CPU: asked back
            // to back, it would take one of two cores from the restore it measures.
            tokio::time::sleep(LIST_EVERY).await;
        }
        let correct = t0.elapsed();
        println!(
            "{}",
            serde_json::json!({
                "round": round,
                "tasks": truth.len(),
                "api_ms": api.as_secs_f64() * 1000.0,
                "correct_ms": correct.as_secs_f64() * 1000.0,
            })
        );
    }
    if let Some(mut c) = child {
        c.kill()?;
        c.wait()?;
    }
    let floor = shims_floor(address, namespace, truth.keys()).await?;
    println!(
        "{}",
        serde_json::json!({"tasks": truth.len(), "shims_floor_ms": floor.as_secs_f64() * 1000.0})
    );
    Ok(())
}

/// Asks every task's shim, 16 at a time, what keeld's probe asks; the time taken.
async fn shims_floor<'a>(
    address: &str,
    namespace: &str,
    ids: impl Iterator<Item = &'a String>,
) -> anyhow::Result<Duration> {
    let socket = std::fs::canonicalize(address.strip_prefix("unix://").unwrap_or(address))
        .or_else(|_| std::path::absolute(address))?;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let t0 = Instant::now();
    let mut asks = tokio::task::JoinSet::new();
    for id in ids {
        // Where a containerd 1.6 shim started for this keeld listens.
        let hash = sha2::Sha256::digest(format!("{}/{namespace}/{id}", socket.display()));
        let path = format!("unix:///run/containerd/s/{}", hex::encode(hash));
        let (gate, ns, id) = (gate.clone(), namespace.to_string(), id.clone());
        asks.spawn(async move {
            let _slot = gate.acquire().await?;
            let shim = ShimClient::connect(&path, &ns).await?;
            let connect = api::ConnectRequest {
                id: id.clone(),
                ..Default::default()
            };
            let state = api::StateRequest {
                id,
                ..Default::default()
            };
            let (c, s) = tokio::join!(shim.connect_shim(&connect, None), shim.state(&state, None));
            c?;
            anyhow::ensure!(s?.status.enum_value_or_default() == api::Status::RUNNING);
            anyhow::Ok(())
        });
    }
    while let Some(done) = asks.join_next().await {
        done??;
    }
    Ok(t0.elapsed())
}
