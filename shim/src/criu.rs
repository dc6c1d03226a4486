//! CRIU's RPC as `criu swrk` serves it on one end of a socket pair: one request,
//! the notifications CRIU sends while it works (each answered), one response.
//! The messages are CRIU's own (`rpc.proto`, as the `rust-criu` crate carries
//! them); the exchange is here because the shim needs what that crate's client
//! does not give: CRIU placed in a cgroup before it restores, the restored
//! pid, and cgroup roots.
//!
//! The shim calls CRIU synchronously on its only thread (see `container.rs`), so
//! the reaper never takes CRIU's exit: it is waited for here. (A `Swrk` dropped
//! before [`Swrk::call`] leaves CRIU to end on the closed socket; the reaper
//! then takes its exit, as any unknown child's.) CRIU is killed when it says
//! nothing for [`DEADLINE`].

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use nix::sys::socket::{
    recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use protobuf::Message;
pub use rust_criu::rust_criu_protobuf::rpc::{
    Cgroup_root, Criu_cg_mode, Criu_notify, Criu_opts, Criu_req_type, Ext_mount_map, Inherit_fd,
};
use rust_criu::rust_criu_protobuf::rpc::{Criu_req, Criu_resp};

use crate::service::Error;

/// Largest message taken from CRIU.
const MAX_MESSAGE: usize = 64 << 10;
/// Longest CRIU may go without a message (a notification or its response)
/// before it is killed: keeld waits as long for a dump or a restore.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// A `criu swrk` process, waiting for its request.
pub struct Swrk {
    sock: OwnedFd,
    child: Child,
}

impl Swrk {
    /// Starts `criu swrk` (the `criu` on the shim's PATH, as runc finds it) with
    /// `inherit` open in it: the descriptors the request names (image and work
    /// directories, files for the restored process).
    pub fn spawn(inherit: &[RawFd]) -> Result<Self, Error> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| Error::Internal(format!("criu: socketpair: {e}")))?;
        let mut keep: Vec<RawFd> = inherit.to_vec();
        keep.push(theirs.as_raw_fd());
        let mut cmd = Command::new("criu");
        cmd.arg("swrk")
            .arg(theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only fcntl(2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &keep {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::FailedPrecondition(format!("criu: no `criu` on the shim's PATH: {e}"))
            }
            _ => Error::Internal(format!("criu: cannot start `criu swrk`: {e}")),
        })?;
        drop(theirs);
        let deadline = nix::sys::time::TimeVal::new(
            libc::time_t::try_from(DEADLINE.as_secs()).unwrap_or(libc::time_t::MAX),
            0,
        );
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &deadline)
            .map_err(|e| Error::Internal(format!("criu: socket deadline: {e}")))?;
        Ok(Self { sock: ours, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the request and answers CRIU's notifications with `notify` (the
    /// descriptor CRIU passes with one, if any) until its response, which is
    /// returned when CRIU succeeded; CRIU is waited for either way.
    pub fn call(
        mut self,
        kind: Criu_req_type,
        opts: Criu_opts,
        mut notify: impl FnMut(&Criu_notify, Option<OwnedFd>) -> Result<(), Error>,
    ) -> Result<Criu_resp, Error> {
        let result = (|| {
            let mut req = Criu_req::new();
            req.set_type(kind);
            req.opts = protobuf::MessageField::some(opts);
            self.send(&req)?;
            loop {
                let (resp, fd) = self.receive()?;
                if resp.type_() == Criu_req_type::NOTIFY {
                    let ok = notify(&resp.notify, fd);
                    let mut ack = Criu_req::new();
                    ack.set_type(Criu_req_type::NOTIFY);
                    ack.set_notify_success(ok.is_ok());
                    self.send(&ack)?;
                    ok?;
                    continue;
                }
                if !resp.success() {
                    return Err(Error::Internal(format!(
                        "criu {kind:?} failed (errno {}{})",
                        resp.cr_errno(),
                        if resp.cr_errmsg().is_empty() {
                            String::new()
                        } else {
                            format!(": {}", resp.cr_errmsg())
                        }
                    )));
                }
                return Ok(resp);
            }
        })();
        if result.is_err() {
            // It may be stuck (past the deadline) or half-way: it goes.
            let _ = self.child.kill();
        }
        // CRIU ends when its end of the pair is closed.
        drop(self.sock);
        let _ = self.child.wait();
        result
    }

    fn send(&self, req: &Criu_req) -> Result<(), Error> {
        let bytes = req
            .write_to_bytes()
            .map_err(|e| Error::Internal(format!("criu: encode request: {e}")))?;
        loop {
            match nix::unistd::write(&self.sock, &bytes) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r,
            }
        }
        .map_err(|e| Error::Internal(format!("criu: send request: {e}")))?;
        Ok(())
    }

    fn receive(&self) -> Result<(Criu_resp, Option<OwnedFd>), Error> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = nix::cmsg_space!(RawFd);
        let (len, fd) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            // A socket with a receive deadline is not restarted after a signal
            // (the reaper's SIGCHLD): EINTR is tried again.
            let msg = loop {
                match recvmsg::<()>(
                    self.sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            }
            .map_err(|e| match e {
                nix::errno::Errno::EAGAIN => {
                    Error::Internal(format!("criu: no word from it in {} s", DEADLINE.as_secs()))
                }
                e => Error::Internal(format!("criu: receive: {e}")),
            })?;
            // Descriptors first, so that none is left open whatever follows.
            let mut fd = None;
            for c in msg
                .cmsgs()
                .map_err(|e| Error::Internal(format!("criu: {e}")))?
            {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: the kernel just gave us this descriptor.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        fd.get_or_insert(owned);
                    }
                }
            }
            if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                return Err(Error::Internal(format!(
                    "criu: a message larger than {MAX_MESSAGE} bytes"
                )));
            }
            if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                return Err(Error::Internal(
                    "criu: it sent more descriptors than one".into(),
                ));
            }
            (msg.bytes, fd)
        };
        if len == 0 {
            return Err(Error::Internal(
                "criu: it ended without a response (see its log)".into(),
            ));
        }
        let resp = Criu_resp::parse_from_bytes(&buf[..len])
            .map_err(|e| Error::Internal(format!("criu: bad response: {e}")))?;
        Ok((resp, fd))
    }
}
