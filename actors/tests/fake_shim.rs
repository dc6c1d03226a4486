//! The task actor's races, against `containerd-shim-fake-v1` (this package's test
//! shim, launched through the same `start` contract as a real one): no root, no
//! runc, no container, in the ordinary `cargo test`.

mod world;

use std::time::Duration;

use keel_actors::state::TaskState;
use keel_actors::Error;
use world::World;

#[actix_rt::test]
async fn an_exit_is_recorded_and_published_once() {
    let w = World::new().await;
    let t = w
        .create("e1", r#"{"exit_after_ms": 50, "exit_status": 3}"#)
        .await;
    t.start().await.unwrap();
    assert_eq!(t.wait("").await.unwrap().exit_status, 3);
    assert_eq!(t.info().await.unwrap().state, TaskState::Stopped);
    t.delete(false).await.unwrap();
    w.assert_lifecycle(
        "e1",
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
}

#[actix_rt::test]
async fn a_pause_racing_an_exit_leaves_the_task_stopped() {
    let w = World::new().await;
    // The exit comes while the shim is still pausing.
    let t = w
        .create(
            "p1",
            r#"{"exit_after_ms": 50, "exit_status": 7, "pause_ms": 300}"#,
        )
        .await;
    t.start().await.unwrap();
    let paused = t.pause().await;
    assert!(
        paused.is_err(),
        "the shim refuses to pause what exited: {paused:?}"
    );
    assert_eq!(t.wait("").await.unwrap().exit_status, 7);
    assert_eq!(
        t.info().await.unwrap().state,
        TaskState::Stopped,
        "the exit wins over the pause's outcome"
    );
    t.delete(false).await.unwrap();
    w.assert_lifecycle(
        "p1",
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
}

#[actix_rt::test]
async fn a_delete_during_start_waits_for_it() {
    let w = World::new().await;
    let t = w.create("d1", r#"{"start_ms": 300}"#).await;
    let starting = {
        let t = t.clone();
        tokio::spawn(async move { t.start().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Handled only once Start is done: the task is running, so a plain delete is
    // refused and nothing is torn down under the start.
    let e = t.delete(false).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    starting.await.unwrap().unwrap();
    assert_eq!(t.info().await.unwrap().state, TaskState::Running);
    let exit = t.delete(true).await.unwrap();
    assert_eq!(exit.exit_status, 137);
    w.assert_lifecycle(
        "d1",
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
}

#[actix_rt::test]
async fn a_shim_dying_in_the_middle_of_a_request_is_cleaned_up_with_137() {
    let w = World::new().await;
    let t = w.create("s1", r#"{"die_in": "Pause"}"#).await;
    t.start().await.unwrap();
    assert!(t.pause().await.is_err(), "the request dies with the shim");
    assert_eq!(t.wait("").await.unwrap().exit_status, 137);
    assert_eq!(t.info().await.unwrap().state, TaskState::Stopped);
    t.delete(false).await.unwrap();
    w.assert_lifecycle(
        "s1",
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
}
