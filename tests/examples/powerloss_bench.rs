//! Power-cut benchmark (see `bench/powerloss.sh`): CUTS power cuts at random
//! moments of a mixed workload on two clients, then one cut right after each
//! fsync of a content commit, ROUNDS times over; after every cut keeld starts
//! again and everything it ever acknowledged is checked (`keel_tests::powerloss`).
//!
//! usage: powerloss_bench CUTS ROUNDS   (run as root; KEEL_BIN_DIR names the binaries)
//!
//! Prints one JSON object per cut, then a summary; exits 1 on any loss.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_tests::powerloss::{Checked, Cut, Node};
use rand::{Rng, SeedableRng};

#[derive(Default)]
struct Totals {
    cuts: usize,
    checked: Checked,
    losses: Vec<String>,
    /// What the last durable fsync before a cut was (file or directory, and
    /// where), and how many cuts followed it.
    after: BTreeMap<String, usize>,
}

/// `fsync 12 file root/content/ingest/<ref>/data` → `file content/ingest/*/data`.
fn kind_of(after: &str) -> String {
    let words: Vec<&str> = after.split_whitespace().collect();
    let (what, path) = match words.as_slice() {
        ["fsync", _, what, path] => (*what, *path),
        ["cut", "after", "fsync", _, what, path] => (*what, *path),
        _ => return after.to_string(),
    };
    let path: Vec<&str> = path
        .split('/')
        .map(|p| if p.len() >= 32 { "*" } else { p })
        .collect();
    format!("{what} {}", path.join("/"))
}

fn record(t: &mut Totals, node: &mut Node, kind: &str, n: u64, cut: &Cut) {
    t.cuts += 1;
    *t.after.entry(kind_of(&cut.after)).or_default() += 1;
    let started = Instant::now();
    let result = node.power_on_and_check();
    let check_ms = started.elapsed().as_secs_f64() * 1e3;
    let (ok, c) = match result {
        Ok(c) => (true, c),
        Err(losses) => {
            for l in &losses {
                eprintln!("LOSS {kind} cut {n} (after {}): {l}", cut.after);
            }
            t.losses
                .extend(losses.iter().map(|l| format!("{kind} cut {n}: {l}")));
            (false, Checked::default())
        }
    };
    t.checked.blobs += c.blobs;
    t.checked.tasks += c.tasks;
    t.checked.events += c.events;
    t.checked.events_in_gaps += c.events_in_gaps;
    println!(
        "{}",
        serde_json::json!({
            "cut": t.cuts, "kind": kind, "after": cut.after, "dropped": cut.dropped,
            "ok": ok, "blobs": c.blobs, "tasks": c.tasks, "events": c.events,
            "events_in_gaps": c.events_in_gaps, "restart_and_check_ms": check_ms,
        })
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("usage: powerloss_bench CUTS ROUNDS"))
        .collect();
    let [cuts, rounds] = args[..] else {
        panic!("usage: powerloss_bench CUTS ROUNDS");
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut node = Node::start();
    let mut t = Totals::default();
    let started = Instant::now();
    for n in 0..cuts {
        let run_for = Duration::from_millis(rng.gen_range(200..1500));
        let cut = node.random_cut(run_for, 2, n as u64);
        record(&mut t, &mut node, "random", n as u64, &cut);
    }
    let len = 200_000;
    let per_commit = node.fsyncs_per_commit(len);
    for round in 0..rounds {
        for nth in 1..=per_commit {
            let (cut, _hit) = node.cut_in_commit(nth, len, (round as u64) << 32 | nth);
            record(&mut t, &mut node, "in-commit", nth, &cut);
        }
    }
    let acked = node.acked.lock().unwrap();
    println!(
        "{}",
        serde_json::json!({
            "summary": {
                "cuts": t.cuts,
                "fsyncs_per_commit": per_commit,
                "acknowledged_at_the_end": {
                    "blobs": acked.blobs.len(), "tasks": acked.tasks.len(), "events": acked.events.len()
                },
                "checks_passed": {
                    "blobs": t.checked.blobs, "tasks": t.checked.tasks,
                    "events": t.checked.events, "events_in_gap_notices": t.checked.events_in_gaps
                },
                "losses": t.losses.len(),
                "cut_after": t.after,
                "seconds": started.elapsed().as_secs_f64(),
            }
        })
    );
    if !t.losses.is_empty() {
        std::process::exit(1);
    }
}
