//! Restarts of a failed task actor, against the fake shim, with a fault injected
//! (the `faults` feature; `deploy/test.sh` builds with it).

#![cfg(feature = "faults")]

mod world;

use keel_actors::state::TaskState;
use keel_actors::Error;
use world::World;

/// The faults of this test binary; set before anything reads them.
fn arm() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var(
            "KEEL_FAULTS",
            "task:r1:Kill=panic,task:r2:Pids=panic-always",
        );
    });
}

#[actix_rt::test]
async fn a_failed_actor_comes_back_from_its_record_and_its_shim() {
    arm();
    let w = World::new().await;
    let t = w.create("r1", r#"{}"#).await;
    let pid = t.start().await.unwrap();
    // A wait from before the failure outlives it.
    let waiting = {
        let t = t.clone();
        tokio::spawn(async move { t.wait("").await })
    };
    let e = t.kill("", 15, false).await.unwrap_err();
    assert!(matches!(e, Error::Internal(_)), "{e:?}");
    // The handle reaches the actor that comes back; it found the task running.
    let info = t.info().await.unwrap();
    assert_eq!((info.state, info.pid), (TaskState::Running, pid));
    assert_eq!(w.stats.snapshot()["tasks"].restarts, 1);
    t.kill("", 9, false).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().exit_status, 137);
    t.delete(false).await.unwrap();
    w.assert_lifecycle(
        "r1",
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
}

#[actix_rt::test]
async fn an_actor_that_keeps_failing_is_escalated() {
    arm();
    let mut w = World::new().await;
    let t = w.create("r2", r#"{}"#).await;
    t.start().await.unwrap();
    for _ in 0..3 {
        assert!(matches!(t.pids().await, Err(Error::Internal(_))));
        assert_eq!(t.info().await.unwrap().state, TaskState::Running);
    }
    assert!(t.pids().await.is_err());
    let e = tokio::time::timeout(std::time::Duration::from_secs(10), w.escalations.recv())
        .await
        .expect("escalated")
        .expect("an escalation");
    assert!(e.cause.contains("r2 keeps failing"), "{e:?}");
    assert_eq!(w.stats.snapshot()["tasks"].restarts, 3);
    // Past the limit the actor stays down: the root ends keeld, and the restore
    // after brings the task back (tests/tests/supervision.rs shows that part).
}
