//! keeld's ttrpc endpoint: socket setup, who may call, and the bounds on each
//! connection.
//!
//! Every accepted connection gets a [`Conn`]: its SO_PEERCRED, a duplicate of its
//! socket, and its accounting. ttrpc hands it to keel in two places:
//! - the connection data, which every handler sees: each handler starts with
//!   [`Auth::request`], which refuses callers whose uid has no role for the method
//!   or namespace (PermissionDenied, logged with pid and uid), refuses a request
//!   beyond the connection's `requests_per_connection` (ResourceExhausted), and yields
//!   the request's validated namespace;
//! - the connection's payload transform (`Accounting`), which ttrpc calls for every
//!   frame in wire order, on the thread that reads the connection, before any task is
//!   spawned for it. It passes payloads through untouched and counts: requests in
//!   flight (a REQUEST frame opens one, the RESPONSE frame or the close of its stream
//!   ends it) and stream bytes received but not yet consumed by their handler.
//!
//! ttrpc reads a connection as fast as frames arrive and spawns a task per frame, so
//! a client that sends requests without reading the answers would grow keeld's
//! memory without end. The transform sees that first: at twice
//! `requests_per_connection`, or more than `stream_bytes_per_connection` unconsumed,
//! it shuts the socket down (through the duplicate), which ends the connection and
//! every task waiting on it.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use keel_protocol::limits::Limits;
use keel_protocol::{identifiers, Error, DEFAULT_NAMESPACE, NAMESPACE_KEY};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use ttrpc::asynchronous::TtrpcContext;
use ttrpc::{AcceptHook, ConnectionDataExt, HookError, HookOutput};

use crate::config::{AccessEntry, Role};

const CONN_KEY: &str = "keel.conn";

/// How often a long-lived stream handler checks whether its client hung up.
const HANGUP_POLL: Duration = Duration::from_millis(200);

/// ttrpc frame types and flags (its wire format, `MESSAGE_TYPE_*`, `FLAG_*`).
const FRAME_REQUEST: u8 = 1;
const FRAME_RESPONSE: u8 = 2;
const FRAME_DATA: u8 = 3;
const FLAG_REMOTE_CLOSED: u8 = 1;

/// The credentials of a connected client, from SO_PEERCRED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// What one stream (a request and, for streaming calls, its messages) holds.
#[derive(Debug, Default)]
struct StreamUse {
    /// Its REQUEST frame arrived and it has not been answered.
    open: bool,
    /// Stream message bytes received and not consumed by the handler.
    bytes: usize,
}

#[derive(Debug, Default)]
struct Pending {
    streams: HashMap<u32, StreamUse>,
    requests: usize,
    bytes: usize,
}

/// One accepted connection: who is calling, and what it holds. Shared by the
/// connection's handlers and its payload transform; dropped when the connection
/// ends (and with it, its place among the open connections).
#[derive(Debug)]
pub struct Conn {
    pub peer: Peer,
    /// A duplicate of the connection's socket: polled for a hang-up, shut down to
    /// end a connection that breaks its bounds. Nothing is read or written on it.
    socket: OwnedFd,
    pending: Mutex<Pending>,
    requests_max: usize,
    bytes_max: usize,
    closed: AtomicBool,
    open_connections: Arc<AtomicUsize>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests in flight on this connection, the caller's own included.
    pub fn requests(&self) -> usize {
        self.pending().requests
    }

    /// Whether the peer has closed its end.
    pub fn hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, a descriptor this struct owns, and a
        // zero timeout: poll only writes `revents`.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n < 0 || (n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
    }

    /// The handler of stream `stream_id` consumed `n` bytes of its messages.
    pub fn consumed(&self, stream_id: u32, n: usize) {
        let mut p = self.pending();
        if let Some(s) = p.streams.get_mut(&stream_id) {
            let n = n.min(s.bytes);
            s.bytes -= n;
            p.bytes -= n;
        }
    }

    /// Ends the connection: every read and write on it fails from now on.
    fn close(&self, why: &str) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                pid = self.peer.pid,
                uid = self.peer.uid,
                why,
                "closing a client's connection"
            );
            // SAFETY: shutdown on a descriptor this struct owns; it touches no memory.
            unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    fn inbound(&self, header: &[u8], len: usize) {
        let Some((stream_id, kind, _)) = frame_header(header) else {
            return;
        };
        let mut p = self.pending();
        match kind {
            FRAME_REQUEST => {
                let s = p.streams.entry(stream_id).or_default();
                if !s.open {
                    s.open = true;
                    p.requests += 1;
                }
                if p.requests > 2 * self.requests_max {
                    let n = p.requests;
                    drop(p);
                    self.close(&format!(
                        "{n} requests in flight: it does not read its answers (limits.requests_per_connection is {})",
                        self.requests_max
                    ));
                }
            }
            FRAME_DATA => {
                p.streams.entry(stream_id).or_default().bytes += len;
                p.bytes += len;
                if p.bytes > self.bytes_max {
                    let n = p.bytes;
                    drop(p);
                    self.close(&format!(
                        "{n} bytes of stream messages not consumed (limits.stream_bytes_per_connection is {})",
                        self.bytes_max
                    ));
                }
            }
            _ => {}
        }
    }

    fn outbound(&self, header: &[u8]) {
        let Some((stream_id, kind, flags)) = frame_header(header) else {
            return;
        };
        let ends =
            kind == FRAME_RESPONSE || (kind == FRAME_DATA && flags & FLAG_REMOTE_CLOSED != 0);
        if !ends {
            return;
        }
        let mut p = self.pending();
        if let Some(s) = p.streams.remove(&stream_id) {
            if s.open {
                p.requests -= 1;
            }
            p.bytes -= s.bytes;
        }
    }
}

/// (stream id, frame type, flags) from ttrpc's authenticated header bytes
/// (`stream_id` big-endian, type, flags).
fn frame_header(h: &[u8]) -> Option<(u32, u8, u8)> {
    let id = u32::from_be_bytes(h.get(..4)?.try_into().ok()?);
    Some((id, *h.get(4)?, *h.get(5)?))
}

/// The connection's payload transform: counts, never changes a byte.
#[derive(Debug)]
struct Accounting(Arc<Conn>);

impl ttrpc::PayloadTransform for Accounting {
    fn transform_inbound(&self, data: Vec<u8>, aad: &[u8]) -> Result<Vec<u8>, String> {
        self.0.inbound(aad, data.len());
        Ok(data)
    }

    fn transform_outbound(&self, data: Vec<u8>, aad: &[u8]) -> Result<Vec<u8>, String> {
        self.0.outbound(aad);
        Ok(data)
    }

    fn max_overhead(&self) -> usize {
        0
    }
}

/// Resolves once the request's client has hung up (never, if unknown).
pub async fn client_gone(ctx: &TtrpcContext) {
    let Some(conn) = ctx
        .connection_data
        .get_typed::<Arc<Conn>>(CONN_KEY)
        .cloned()
    else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(HANGUP_POLL).await;
        if conn.hung_up() {
            return;
        }
    }
}

/// Accept hook: refuses connections beyond `limits.connections`, and gives each
/// accepted one its [`Conn`].
#[derive(Debug)]
pub struct ConnHook {
    open: Arc<AtomicUsize>,
    max: usize,
    requests_max: usize,
    bytes_max: usize,
}

impl ConnHook {
    pub fn new(limits: &Limits) -> Self {
        Self {
            open: Arc::default(),
            max: limits.connections,
            requests_max: limits.requests_per_connection,
            bytes_max: limits.stream_bytes_per_connection,
        }
    }
}

impl AcceptHook for ConnHook {
    fn on_accept(&self, fd: RawFd) -> Result<HookOutput, HookError> {
        // SAFETY: ttrpc hands the hook the accepted socket's fd and keeps it open for
        // the duration of this call; we only borrow it for one getsockopt and a dup.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let cred = getsockopt(&fd, PeerCredentials)
            .map_err(|e| HookError::Other(format!("SO_PEERCRED: {e}")))?;
        let peer = Peer {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        };
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(
                pid = peer.pid,
                uid = peer.uid,
                limit = self.max,
                "refused a connection: limits.connections reached"
            );
            return Err(HookError::Rejected(format!(
                "{} connections are open (limits.connections)",
                self.max
            )));
        }
        let socket = match fd.try_clone_to_owned() {
            Ok(s) => s,
            Err(e) => {
                self.open.fetch_sub(1, Ordering::Relaxed);
                return Err(HookError::Io(e));
            }
        };
        let conn = Arc::new(Conn {
            peer,
            socket,
            pending: Mutex::default(),
            requests_max: self.requests_max,
            bytes_max: self.bytes_max,
            closed: AtomicBool::new(false),
            open_connections: self.open.clone(),
        });
        let mut data = ttrpc::ConnectionData::new();
        data.insert(CONN_KEY.to_string(), Box::new(conn.clone()));
        Ok(HookOutput {
            data,
            payload_transform: Some(Box::new(Accounting(conn))),
        })
    }
}

/// What a method needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading: an admin or a reader.
    Read,
    /// Anything else: an admin.
    Admin,
}

/// The methods a reader may call; every other needs an admin.
fn access(method: &str) -> Access {
    match method {
        "Version.Version"
        | "Health.Check"
        | "Containers.Get"
        | "Containers.List"
        | "Tasks.Get"
        | "Tasks.List"
        | "Tasks.Wait"
        | "Tasks.Metrics"
        | "Tasks.ListPids"
        | "Events.Subscribe"
        | "Events.Head"
        | "Content.Info"
        | "Content.List"
        | "Content.Read"
        | "Content.Status"
        | "Content.ListStatuses" => Access::Read,
        _ => Access::Admin,
    }
}

/// A uid's grant: its role and the namespaces it may use (all when `None`).
#[derive(Debug, Clone)]
struct Grant {
    role: Role,
    namespaces: Option<Arc<HashSet<String>>>,
}

/// Who may call the API: root, and the uids of `[[access]]`.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    grants: HashMap<u32, Grant>,
}

/// What a handler knows about the request after [`Auth::request`].
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub namespace: String,
    pub peer: Peer,
    /// The namespaces the caller may see, when it may not see them all.
    pub scope: Option<Arc<HashSet<String>>>,
    pub conn: Arc<Conn>,
}

impl RequestContext {
    /// Whether the caller may see events and objects of namespace `ns`.
    pub fn sees(&self, ns: &str) -> bool {
        self.scope.as_ref().is_none_or(|s| s.contains(ns))
    }
}

impl Auth {
    pub fn new(access: &[AccessEntry]) -> Self {
        Self {
            grants: access
                .iter()
                .map(|a| {
                    let grant = Grant {
                        role: a.role,
                        namespaces: a
                            .namespaces
                            .as_ref()
                            .map(|n| Arc::new(n.iter().cloned().collect())),
                    };
                    (a.uid, grant)
                })
                .collect(),
        }
    }

    fn grant(&self, uid: u32) -> Option<Grant> {
        if uid == 0 {
            return Some(Grant {
                role: Role::Admin,
                namespaces: None,
            });
        }
        self.grants.get(&uid).cloned()
    }

    /// Checks the caller's role for `method` and the namespace it names (default
    /// `default`), and the connection's requests in flight.
    pub fn request(&self, ctx: &TtrpcContext, method: &str) -> Result<RequestContext, Error> {
        let Some(conn) = ctx
            .connection_data
            .get_typed::<Arc<Conn>>(CONN_KEY)
            .cloned()
        else {
            return Err(Error::PermissionDenied("peer credentials unknown".into()));
        };
        let peer = conn.peer;
        let deny = |why: String| {
            tracing::warn!(
                pid = peer.pid,
                uid = peer.uid,
                gid = peer.gid,
                method,
                why,
                "refused a caller"
            );
            Err(Error::PermissionDenied(why))
        };
        let Some(grant) = self.grant(peer.uid) else {
            return deny(format!(
                "uid {} may not use keeld; give it a role with [[access]] in keel.toml",
                peer.uid
            ));
        };
        if grant.role == Role::Reader && access(method) == Access::Admin {
            return deny(format!(
                "uid {} is a reader; {method} needs the admin role",
                peer.uid
            ));
        }
        let namespace = match ctx.metadata.get(NAMESPACE_KEY).and_then(|v| v.first()) {
            Some(ns) => {
                identifiers::validate("namespace", ns)?;
                ns.clone()
            }
            None => DEFAULT_NAMESPACE.to_string(),
        };
        // Version and Health concern no namespace.
        let namespaced = !matches!(
            method,
            "Version.Version" | "Health.Check" | "Health.Supervision"
        );
        if namespaced
            && grant
                .namespaces
                .as_ref()
                .is_some_and(|s| !s.contains(&namespace))
        {
            return deny(format!(
                "uid {} may not use namespace {namespace}",
                peer.uid
            ));
        }
        let in_flight = conn.requests();
        if in_flight > conn.requests_max {
            return Err(Error::ResourceExhausted(format!(
                "this connection has {in_flight} requests in flight, the limit is {} (limits.requests_per_connection)",
                conn.requests_max
            )));
        }
        Ok(RequestContext {
            namespace,
            peer,
            scope: grant.namespaces,
            conn,
        })
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

    /// A connection of `uid` over one end of a socket pair; the other end is
    /// returned to play the client.
    fn conn(uid: u32, limits: &Limits) -> (Arc<Conn>, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = Arc::new(Conn {
            peer: Peer {
                pid: 1,
                uid,
                gid: uid,
            },
            socket: OwnedFd::from(a),
            pending: Mutex::default(),
            requests_max: limits.requests_per_connection,
            bytes_max: limits.stream_bytes_per_connection,
            closed: AtomicBool::new(false),
            open_connections: Arc::new(AtomicUsize::new(1)),
        });
        (c, b)
    }

    fn ctx(c: Option<&Arc<Conn>>, ns: Option<&str>) -> TtrpcContext {
        let mut data = ttrpc::ConnectionData::new();
        if let Some(c) = c {
            data.insert(CONN_KEY.to_string(), Box::new(c.clone()));
        }
        let mut t = TtrpcContext {
            connection_data: Arc::new(data),
            ..Default::default()
        };
        if let Some(ns) = ns {
            t.metadata
                .insert(NAMESPACE_KEY.to_string(), vec![ns.to_string()]);
        }
        t
    }

    fn header(stream_id: u32, kind: u8, flags: u8) -> [u8; 6] {
        let mut h = [0u8; 6];
        h[..4].copy_from_slice(&stream_id.to_be_bytes());
        h[4] = kind;
        h[5] = flags;
        h
    }

    #[test]
    fn roles_and_namespaces_decide_who_may_call_what() {
        let auth = Auth::new(&[
            AccessEntry {
                uid: 1000,
                role: Role::Admin,
                namespaces: None,
            },
            AccessEntry {
                uid: 1001,
                role: Role::Reader,
                namespaces: Some(vec!["prod".into()]),
            },
        ]);
        let l = Limits::default();
        let (root, _r) = conn(0, &l);
        let (admin, _a) = conn(1000, &l);
        let (reader, _d) = conn(1001, &l);
        let (other, _o) = conn(65534, &l);
        let ok = |c: &Arc<Conn>, ns: Option<&str>, m: &str| auth.request(&ctx(Some(c), ns), m);
        assert_eq!(
            ok(&root, None, "Tasks.Create").unwrap().namespace,
            "default"
        );
        assert_eq!(
            ok(&admin, Some("x"), "Tasks.Delete").unwrap().namespace,
            "x"
        );
        let r = ok(&reader, Some("prod"), "Events.Subscribe").unwrap();
        assert!(r.sees("prod") && !r.sees("default"));
        for (c, ns, m, want) in [
            (&reader, Some("prod"), "Tasks.Kill", "needs the admin role"),
            (
                &reader,
                Some("prod"),
                "Events.Publish",
                "needs the admin role",
            ),
            (
                &reader,
                Some("prod"),
                "Content.Write",
                "needs the admin role",
            ),
            (&reader, None, "Tasks.List", "may not use namespace default"),
            (&other, None, "Version.Version", "may not use keeld"),
        ] {
            let e = ok(c, ns, m).unwrap_err();
            assert!(
                matches!(&e, Error::PermissionDenied(msg) if msg.contains(want)),
                "{m}: {e:?}"
            );
        }
        assert!(matches!(
            auth.request(&ctx(None, None), "Version.Version"),
            Err(Error::PermissionDenied(_))
        ));
        let e = ok(&root, Some("../etc"), "Tasks.List").unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("namespace")),
            "{e:?}"
        );
    }

    #[test]
    fn requests_in_flight_are_counted_until_answered_and_bounded() {
        let l = Limits {
            requests_per_connection: 2,
            ..Limits::default()
        };
        let auth = Auth::default();
        let (c, peer) = conn(0, &l);
        let t = ctx(Some(&c), None);
        for id in [1, 3] {
            c.inbound(&header(id, FRAME_REQUEST, 0), 10);
        }
        auth.request(&t, "Version.Version").unwrap();
        c.inbound(&header(5, FRAME_REQUEST, 0), 10);
        let e = auth.request(&t, "Version.Version").unwrap_err();
        assert!(
            matches!(&e, Error::ResourceExhausted(m) if m.contains("3 requests in flight")),
            "{e:?}"
        );
        // Answers and stream closes end requests; other frames do not.
        c.outbound(&header(1, FRAME_RESPONSE, 0));
        c.outbound(&header(3, FRAME_DATA, 0));
        assert_eq!(c.requests(), 2);
        c.outbound(&header(3, FRAME_DATA, FLAG_REMOTE_CLOSED));
        assert_eq!(c.requests(), 1);
        // A client that does not read its answers is cut off at twice the bound.
        for id in (7..).step_by(2).take(3) {
            c.inbound(&header(id, FRAME_REQUEST, 0), 10);
        }
        assert!(!c.hung_up());
        assert!(!c.closed.load(Ordering::Relaxed));
        c.inbound(&header(13, FRAME_REQUEST, 0), 10);
        assert!(c.closed.load(Ordering::Relaxed), "5 in flight > 2 × 2");
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!(
            (&peer).read(&mut buf).unwrap(),
            0,
            "the client sees the end"
        );
    }

    #[test]
    fn unconsumed_stream_bytes_are_bounded() {
        let l = Limits {
            stream_bytes_per_connection: 100,
            ..Limits::default()
        };
        let (c, _peer) = conn(0, &l);
        c.inbound(&header(1, FRAME_REQUEST, 0), 0);
        c.inbound(&header(1, FRAME_DATA, 0), 60);
        c.consumed(1, 60);
        c.inbound(&header(1, FRAME_DATA, 0), 60);
        assert!(!c.closed.load(Ordering::Relaxed));
        // Bytes of a stream that ended are released with it.
        c.outbound(&header(1, FRAME_RESPONSE, 0));
        c.inbound(&header(3, FRAME_DATA, 0), 100);
        assert!(!c.closed.load(Ordering::Relaxed));
        c.inbound(&header(3, FRAME_DATA, 0), 1);
        assert!(c.closed.load(Ordering::Relaxed));
    }

    #[test]
    fn hangup_is_seen() {
        let (c, peer) = conn(0, &Limits::default());
        assert!(!c.hung_up());
        drop(peer);
        assert!(c.hung_up());
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
