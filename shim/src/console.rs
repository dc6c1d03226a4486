//! A process's terminal: the master libcontainer sent, copied to the stdout
//! FIFO and fed from the stdin FIFO, resized on request.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use crate::log::log_warn;
use crate::service::Error;

/// A running terminal's copies; they stop when it is dropped.
#[derive(Debug)]
pub struct Console {
    master: std::sync::Arc<AsyncFd<OwnedFd>>,
    input: Option<JoinHandle<()>>,
    output: JoinHandle<()>,
}

/// A terminal's stdin and stdout, which the shim copies, must each be a FIFO
/// (or not given).
pub fn check(stdin: &str, stdout: &str) -> Result<(), Error> {
    use std::os::unix::fs::FileTypeExt;
    for (field, path) in [("stdin", stdin), ("stdout", stdout)] {
        let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
        if !path.is_empty() && !fifo {
            return Err(Error::InvalidArgument(format!(
                "{field} {path:?}: with a terminal, only a FIFO (runtime io.containerd.keel.v1)"
            )));
        }
    }
    Ok(())
}

impl Console {
    /// Starts copying between `master` and the FIFOs (`""`: none).
    pub fn start(master: OwnedFd, stdin: &str, stdout: &str) -> Result<Self, Error> {
        nix::fcntl::fcntl(
            master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::Internal(format!("terminal: {e}")))?;
        // SAFETY: the AsyncFd owns the descriptor, which stays open as long as it.
        let master = unsafe { AsyncFd::register(master) }
            .map_err(|e| Error::Internal(format!("terminal: {e}")))?;
        let master = std::sync::Arc::new(master);
        let out = if stdout.is_empty() {
            None
        } else {
            Some(
                pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(stdout)
                    .map_err(|e| Error::InvalidArgument(format!("stdout {stdout:?}: {e}")))?,
            )
        };
        let input = if stdin.is_empty() {
            None
        } else {
            let rx = pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(stdin)
                .map_err(|e| Error::InvalidArgument(format!("stdin {stdin:?}: {e}")))?;
            Some(tokio::spawn(feed(master.clone(), rx)))
        };
        let output = tokio::spawn(drain(master.clone(), out));
        Ok(Self {
            master,
            input,
            output,
        })
    }

    /// Sets the terminal's size.
    pub fn resize(&self, width: u32, height: u32) -> Result<(), Error> {
        let ws = libc::winsize {
            ws_row: u16::try_from(height)
                .map_err(|_| Error::InvalidArgument(format!("height {height}: too large")))?,
            ws_col: u16::try_from(width)
                .map_err(|_| Error::InvalidArgument(format!("width {width}: too large")))?,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        if unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(Error::Internal(format!(
                "resize: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Stops feeding stdin.
    pub fn close_stdin(&mut self) {
        if let Some(t) = self.input.take() {
            t.abort();
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.close_stdin();
        self.output.abort();
    }
}

async fn feed(master: std::sync::Arc<AsyncFd<OwnedFd>>, mut rx: pipe::Receiver) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut done = 0;
        while done < n {
            let r = master
                .async_io(Interest::WRITABLE, |fd| {
                    nix::unistd::write(fd, &buf[done..n]).map_err(io::Error::from)
                })
                .await;
            match r {
                Ok(w) => done += w,
                Err(_) => return,
            }
        }
    }
}

async fn drain(master: std::sync::Arc<AsyncFd<OwnedFd>>, mut out: Option<pipe::Sender>) {
    let mut buf = vec![0u8; 8192];
    loop {
        let r = master
            .async_io(Interest::READABLE, |fd| {
                nix::unistd::read(fd.as_raw_fd(), &mut buf).map_err(io::Error::from)
            })
            .await;
        let n = match r {
            Ok(0) => return,
            Ok(n) => n,
            // EIO: every process holding the terminal has gone.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return,
            Err(e) => return log_warn!("terminal: {e}"),
        };
        if let Some(o) = out.as_mut() {
            if o.write_all(&buf[..n]).await.is_err() {
                out = None;
            }
        }
    }
}
