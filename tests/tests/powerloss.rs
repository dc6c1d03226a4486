//! Power loss, simulated: keeld's root on keel-powercut, which keeps every byte
//! and directory entry no fsync has made durable, and drops them at the cut (see
//! `powercut/`). kill -9 alone keeps the page cache, so a missing or misplaced
//! fsync is invisible to every other test; here it loses an acknowledged write.

use std::time::Duration;

use keel_tests::powerloss::Node;
use rand::Rng;

/// Cuts at random moments of a mixed workload (ingests, publishes, `run --rm`,
/// detached runs waited for, removals), two clients at once: after each, keeld
/// starts, and every blob, task, exit and event it acknowledged is there.
#[test]
fn nothing_acknowledged_is_lost_at_a_power_cut_at_random_moments() {
    let mut node = Node::start();
    let mut rng = rand::thread_rng();
    for cut in 0..6 {
        let run_for = Duration::from_millis(rng.gen_range(300..1500));
        let c = node.random_cut(run_for, 2, cut);
        if let Err(losses) = node.power_on_and_check() {
            panic!(
                "power cut {cut} (after {}; {}) lost:\n{}\nkeeld's log:\n{}",
                c.after,
                c.dropped,
                losses.join("\n"),
                node.k.log()
            );
        }
    }
    let acked = node.acked.lock().unwrap();
    assert!(
        acked.blobs.len() >= 3 && !acked.tasks.is_empty() && !acked.events.is_empty(),
        "the workload acknowledged too little to prove anything: {acked:?}"
    );
}

/// A commit cut right after each of its fsyncs in turn (its data, its intent in
/// sled, the rename's directory, the record): every earlier blob survives, the
/// store opens with nothing corrupt, and the interrupted blob is either whole
/// or absent.
#[test]
fn a_commit_cut_after_any_of_its_fsyncs_loses_nothing_acknowledged() {
    let mut node = Node::start();
    let len = 200_000;
    let per_commit = node.fsyncs_per_commit(len);
    assert!(
        per_commit >= 3,
        "a commit took {per_commit} fsyncs: data, sled and the blobs directory at least"
    );
    let mut hits = 0;
    for nth in 1..=per_commit {
        // sled may merge a flush into another, so a commit can take one fsync
        // fewer than the first did; it is then acknowledged before the cut.
        let (cut, hit) = node.cut_in_commit(nth, len, nth);
        hits += usize::from(hit);
        if let Err(losses) = node.power_on_and_check() {
            panic!(
                "a cut after fsync {nth} of a commit ({}; {}) lost:\n{}\nkeeld's log:\n{}",
                cut.after,
                cut.dropped,
                losses.join("\n"),
                node.k.log()
            );
        }
    }
    assert!(
        hits + 1 >= usize::try_from(per_commit).unwrap(),
        "only {hits} of {per_commit} cuts landed inside the commit"
    );
}
