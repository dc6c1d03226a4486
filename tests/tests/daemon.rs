//! keeld's lifecycle as a user meets it: version, the root lock, socket permissions,
//! SIGTERM and kill -9, and the peer-credential check.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use keel_tests::{describe, require_root, Keeld};

#[test]
fn version_prints_client_and_daemon() {
    let k = Keeld::start();
    let out = k.ctl_ok(&["version"]);
    assert!(out.contains("Client:") && out.contains("Server:"), "{out}");
    assert_eq!(
        out.matches(concat!("Version:  ", env!("CARGO_PKG_VERSION")))
            .count(),
        2,
        "{out}"
    );
    assert_eq!(out.matches("Revision: ").count(), 2, "{out}");
    assert!(
        !out.contains("Revision: \n"),
        "revision is not empty: {out}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let k = Keeld::start();
    // A pipe whose reader is already gone, as after `keelctl … | head -1`.
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    let out = k
        .ctl_cmd(&["version"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("keelctl");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGPIPE),
        "{}",
        describe(&out)
    );
    assert!(out.stderr.is_empty(), "{}", describe(&out));
}

#[test]
fn second_daemon_on_same_root_refuses_naming_the_lock() {
    let k = Keeld::start();
    let out = k.run_second();
    assert!(
        !out.status.success(),
        "second keeld must fail: {}",
        describe(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keeld.lock") && err.contains("another keeld"),
        "{err}"
    );
    k.assert_serving();
}

#[test]
fn socket_is_private_and_removed_on_sigterm() {
    let mut k = Keeld::start();
    let sock_mode = std::fs::metadata(&k.socket).unwrap().permissions().mode() & 0o777;
    let dir_mode = std::fs::metadata(k.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(sock_mode, 0o600, "socket mode");
    assert_eq!(dir_mode, 0o700, "socket directory mode");
    let st = k.terminate();
    assert!(st.success(), "keeld exits 0 on SIGTERM: {st}\n{}", k.log());
    assert!(!k.socket.exists(), "socket removed after SIGTERM");
    assert!(k.log().contains("keeld stopped"), "{}", k.log());
}

#[test]
fn stale_socket_after_kill9_is_replaced() {
    let mut k = Keeld::start();
    k.kill9();
    assert!(k.socket.exists(), "kill -9 leaves the socket behind");
    k.spawn();
    k.assert_serving();
    assert!(k.log().contains("removed a stale socket"), "{}", k.log());
}

#[test]
fn uids_not_allowed_get_permission_denied() {
    require_root("running keelctl as another uid");
    let nobody = 65534;
    for (config, allowed) in [
        ("allowed_uids = []", false),
        ("allowed_uids = [65534]", true),
    ] {
        let k = Keeld::start_with_config(config);
        let keelctl = k.open_to_all_uids();
        let out = std::process::Command::new(&keelctl)
            .arg("--address")
            .arg(&k.socket)
            .arg("version")
            .uid(nobody)
            .gid(nobody)
            .stdin(Stdio::null())
            .output()
            .expect("keelctl as nobody");
        if allowed {
            assert!(out.status.success(), "allowed uid: {}", describe(&out));
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("permission denied"),
                "{}",
                describe(&out)
            );
            assert!(err.contains("uid 65534"), "{err}");
            let log = k.log();
            assert!(
                log.contains("refused a caller")
                    && log.contains("uid=65534")
                    && log.contains("pid="),
                "{log}"
            );
        }
        k.assert_serving();
    }
}

#[test]
fn bad_namespace_is_invalid_argument() {
    let k = Keeld::start();
    k.ctl_err(
        &["--namespace", "../x", "content", "ls"],
        "invalid argument: namespace",
    );
    k.assert_serving();
}
