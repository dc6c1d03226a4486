//! keeld's ttrpc endpoint: socket setup, peer credentials and per-request context.
//!
//! Every accepted connection's SO_PEERCRED is read once by the accept hook and
//! attached to the connection. Each handler starts with [`Auth::request`], which
//! refuses peers whose uid is neither 0 nor allowed by the configuration
//! (PermissionDenied, logged with the peer's pid and uid) and yields the request's
//! validated namespace.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use keel_protocol::{identifiers, Error, DEFAULT_NAMESPACE, NAMESPACE_KEY};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use ttrpc::asynchronous::TtrpcContext;
use ttrpc::{AcceptHook, ConnectionDataExt, HookError, HookOutput};

const PEER_KEY: &str = "keel.peer";
const WATCH_KEY: &str = "keel.watch";

/// How often a long-lived stream handler checks whether its client hung up.
const HANGUP_POLL: Duration = Duration::from_millis(200);

/// A duplicate of a connection's socket, used only to see the peer hang up.
///
/// ttrpc 0.10 never tells a stream handler that its connection closed (it waits for
/// the handler before tearing the connection down), so a handler blocked in `recv`
/// would wait forever, holding whatever it holds (a content ref lock, a subscription).
/// Polling this descriptor for POLLRDHUP tells it; nothing is ever read from it.
#[derive(Debug)]
pub struct HangupWatch {
    fd: OwnedFd,
}

impl HangupWatch {
    /// Whether the peer has closed its end.
    pub fn hung_up(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, a descriptor this struct owns, and a
        // zero timeout: poll only writes `revents`.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n < 0 || (n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
    }
}

/// Resolves once the request's client has hung up (never, if unknown).
pub async fn client_gone(ctx: &TtrpcContext) {
    let Some(watch) = ctx.connection_data.get_typed::<HangupWatch>(WATCH_KEY) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(HANGUP_POLL).await;
        if watch.hung_up() {
            return;
        }
    }
}

/// The credentials of a connected client, from SO_PEERCRED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Accept hook: records the peer's credentials on the connection.
#[derive(Debug)]
pub struct PeerCredHook;

impl AcceptHook for PeerCredHook {
    fn on_accept(&self, fd: RawFd) -> Result<HookOutput, HookError> {
        // SAFETY: ttrpc hands the hook the accepted socket's fd and keeps it open for
        // the duration of this call; we only borrow it for one getsockopt.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let cred = getsockopt(&fd, PeerCredentials)
            .map_err(|e| HookError::Other(format!("SO_PEERCRED: {e}")))?;
        let peer = Peer {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        };
        let dup = fd.try_clone_to_owned().map_err(HookError::Io)?;
        let mut data = ttrpc::ConnectionData::new();
        data.insert(PEER_KEY.to_string(), Box::new(peer));
        data.insert(WATCH_KEY.to_string(), Box::new(HangupWatch { fd: dup }));
        Ok(HookOutput {
            data,
            payload_transform: None,
        })
    }
}

/// Who may call the API.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    allowed_uids: HashSet<u32>,
}

/// What a handler knows about the request after [`Auth::request`].
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub namespace: String,
    pub peer: Peer,
}

impl Auth {
    pub fn new(allowed_uids: &[u32]) -> Self {
        Self {
            allowed_uids: allowed_uids.iter().copied().collect(),
        }
    }

    fn allowed(&self, uid: u32) -> bool {
        uid == 0 || self.allowed_uids.contains(&uid)
    }

    /// Checks the caller and extracts its namespace (default `default`).
    pub fn request(&self, ctx: &TtrpcContext, method: &str) -> Result<RequestContext, Error> {
        let Some(peer) = ctx.connection_data.get_typed::<Peer>(PEER_KEY).copied() else {
            return Err(Error::PermissionDenied("peer credentials unknown".into()));
        };
        if !self.allowed(peer.uid) {
            tracing::warn!(
                pid = peer.pid,
                uid = peer.uid,
                gid = peer.gid,
                method,
                "refused a caller whose uid is not allowed"
            );
            return Err(Error::PermissionDenied(format!(
                "uid {} may not use keeld; allow it with allowed_uids in keel.toml",
                peer.uid
            )));
        }
        let namespace = match ctx.metadata.get(NAMESPACE_KEY).and_then(|v| v.first()) {
            Some(ns) => {
                identifiers::validate("namespace", ns)?;
                ns.clone()
            }
            None => DEFAULT_NAMESPACE.to_string(),
        };
        Ok(RequestContext { namespace, peer })
    }
}

/// Prepares the socket path: its directory 0700, a stale socket from a crashed keeld
/// removed. Refuses if a live daemon answers on it.
pub fn prepare_socket(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().context("socket path has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "socket {} is in use by another process; is another keeld running?",
                path.display()
            );
        }
        fs::remove_file(path).with_context(|| format!("remove stale socket {}", path.display()))?;
        tracing::info!(socket = %path.display(), "removed a stale socket");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ctx(peer: Option<Peer>, ns: Option<&str>) -> TtrpcContext {
        let mut data = ttrpc::ConnectionData::new();
        if let Some(p) = peer {
            data.insert(PEER_KEY.to_string(), Box::new(p));
        }
        let mut c = TtrpcContext {
            connection_data: Arc::new(data),
            ..Default::default()
        };
        if let Some(ns) = ns {
            c.metadata
                .insert(NAMESPACE_KEY.to_string(), vec![ns.to_string()]);
        }
        c
    }

    #[test]
    fn root_and_allowed_uids_pass_others_are_denied() {
        let auth = Auth::new(&[1000]);
        let root = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let user = Peer {
            pid: 2,
            uid: 1000,
            gid: 1000,
        };
        let other = Peer {
            pid: 3,
            uid: 65534,
            gid: 65534,
        };
        assert_eq!(
            auth.request(&ctx(Some(root), None), "m").unwrap().namespace,
            "default"
        );
        assert_eq!(
            auth.request(&ctx(Some(user), Some("prod")), "m")
                .unwrap()
                .namespace,
            "prod"
        );
        assert!(matches!(
            auth.request(&ctx(Some(other), None), "m"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            auth.request(&ctx(None, None), "m"),
            Err(Error::PermissionDenied(_))
        ));
    }

    #[test]
    fn hangup_watch_sees_the_peer_close() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let watch = HangupWatch {
            fd: OwnedFd::from(a),
        };
        assert!(!watch.hung_up());
        drop(b);
        assert!(watch.hung_up());
    }

    #[test]
    fn bad_namespace_is_invalid_argument() {
        let root = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let err = Auth::default()
            .request(&ctx(Some(root), Some("../etc")), "m")
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("namespace")),
            "{err:?}"
        );
    }

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/keel.sock");
        {
            fs::create_dir_all(sock.parent().unwrap()).unwrap();
            let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            assert!(prepare_socket(&sock)
                .unwrap_err()
                .to_string()
                .contains("in use"));
        }
        // The listener is gone, its file remains: stale.
        assert!(sock.exists());
        prepare_socket(&sock).unwrap();
        assert!(!sock.exists());
        let mode = fs::metadata(sock.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }
}
