//! Restart benchmark (see `bench/restore.sh`): with keeld's tasks already running,
//! kills keeld with SIGKILL, starts it again and measures the time from the new
//! process's start to (1) the API answering Version and (2) `Tasks.List` being fully
//! correct: every expected task listed RUNNING with the pid it had before.
//!
//! usage: restore_bench KEELD_COMMAND… -- ADDRESS NAMESPACE ROUNDS
//!
//! KEELD_COMMAND is how to start keeld (binary and flags); it is started ROUNDS times.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_protocol::api::tasks::{ListTasksRequest, Status};
use keel_protocol::Client;

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
        rest.len() == 3,
        "usage: restore_bench KEELD… -- ADDRESS NAMESPACE ROUNDS"
    );
    let (address, namespace) = (&rest[0], &rest[1]);
    let rounds: usize = rest[2].parse()?;

    let mut child = spawn(keeld)?;
    let client = loop {
        if let Ok(c) = Client::connect(address, Some(namespace)).await {
            if c.daemon_version().await.is_ok() {
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // What is true: every task running, with these pids.
    let truth = loop {
        let l = listing(&client).await?;
        if l.values().all(|(s, _)| *s == Status::RUNNING) {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(client);
    eprintln!("{} tasks running", truth.len());

    for round in 0..rounds {
        child.kill()?;
        child.wait()?;
        let t0 = Instant::now();
        child = spawn(keeld)?;
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
            tokio::time::sleep(Duration::from_micros(500)).await;
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
    child.kill()?;
    child.wait()?;
    Ok(())
}
