//! A process's stdio, as containerd's `cio` creates it.
//!
//! An [`Io`] says where a process's stdin, stdout and stderr go when it is
//! created; the shim opens them. The creators:
//!
//! - [`Io::null`]: nothing (`/dev/null`);
//! - [`Io::log_file`]: stdout and stderr appended to a file of the caller's;
//! - [`Io::keel_log`]: keeld's own log file for the task (`keelctl tasks logs`);
//! - [`Io::streams`]: FIFOs whose other ends the caller gets as async pipes
//!   ([`Streams`]);
//! - [`Io::copy`]: FIFOs copied to and from the caller's readers and writers (its
//!   own stdio, files, buffers) by background tasks.
//!
//! FIFOs live in a temporary directory removed with the `Io`, unless
//! [`Fifos::dir`] names a directory of the caller's: then they outlive the
//! program, and a later one re-attaches to the running process's stdio with
//! [`crate::Process::attach`].
//!
//! A process's stdin is copied only after it has started, and closed (the shim
//! told with CloseIO) when its source ends: a close before the start could cut
//! off what was written before it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_protocol::{Error, Result};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

/// A reader of a process's input, copied to it after it starts.
pub type Input = Box<dyn AsyncRead + Send + Unpin>;
/// A writer of a process's output.
pub type Output = Box<dyn AsyncWrite + Send + Unpin>;

/// Where a process's stdio goes.
#[derive(Default)]
pub struct Io {
    pub(crate) stdin: String,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) terminal: bool,
    pub(crate) log_to_file: bool,
    /// Copied into the stdin FIFO once the process has started.
    pending_stdin: Option<(PathBuf, Input)>,
    copies: Copies,
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io")
            .field("stdin", &self.stdin)
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .field("terminal", &self.terminal)
            .field("log_to_file", &self.log_to_file)
            .finish()
    }
}

/// How FIFOs are made: whether there is a stdin, a terminal, and where they live.
///
/// ```
/// let fifos = keel_client::io::Fifos::new().stdin(true).terminal(false);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Fifos {
    stdin: bool,
    terminal: bool,
    dir: Option<PathBuf>,
}

impl Fifos {
    /// stdout and stderr FIFOs, no stdin, no terminal, in a temporary directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the process gets a stdin.
    pub fn stdin(mut self, stdin: bool) -> Self {
        self.stdin = stdin;
        self
    }

    /// Whether the process gets a terminal: then stdout carries both output
    /// streams and there is no stderr.
    pub fn terminal(mut self, terminal: bool) -> Self {
        self.terminal = terminal;
        self
    }

    /// Makes the FIFOs in `dir` (created if missing, kept afterwards), so that
    /// another program can re-attach to them.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }
}

/// Output copies running in the background, stopped when dropped: dropped before
/// the shim ever opened the FIFOs (a failed create), they would wait for a
/// writer forever. [`crate::Process::wait_output`] lets them finish first.
#[derive(Default)]
struct Copies(Vec<JoinHandle<()>>);

impl Drop for Copies {
    fn drop(&mut self) {
        for c in &self.0 {
            c.abort();
        }
    }
}

/// The caller's ends of a process's FIFOs.
#[derive(Debug)]
pub struct Streams {
    /// Writes to the process's stdin (with [`Fifos::stdin`]). Drop it, then call
    /// [`crate::Process::close_stdin`], to give the process end-of-file.
    pub stdin: Option<pipe::Sender>,
    /// The process's stdout (and stderr, with a terminal).
    pub stdout: pipe::Receiver,
    /// The process's stderr (none with a terminal).
    pub stderr: Option<pipe::Receiver>,
}

/// Made FIFOs: their paths, and the temporary directory holding them, if any.
struct Made {
    stdin: Option<PathBuf>,
    stdout: PathBuf,
    stderr: Option<PathBuf>,
    temp: Option<tempfile::TempDir>,
}

impl Fifos {
    fn make(&self) -> Result<Made> {
        let (dir, temp) = match &self.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| io_error("fifo dir", d, &e))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("keel-io-")
                    .tempdir()
                    .map_err(|e| Error::Internal(format!("temporary fifo dir: {e}")))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mk = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| io_error("mkfifo", &p, &std::io::Error::from(e)))?;
            Ok(p)
        };
        Ok(Made {
            stdin: if self.stdin { Some(mk("stdin")?) } else { None },
            stdout: mk("stdout")?,
            stderr: if self.terminal {
                None
            } else {
                Some(mk("stderr")?)
            },
            temp,
        })
    }
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> Error {
    let m = format!("{what} {}: {e}", path.display());
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(m),
        std::io::ErrorKind::AlreadyExists => Error::AlreadyExists(m),
        std::io::ErrorKind::PermissionDenied => Error::PermissionDenied(m),
        _ => Error::Internal(m),
    }
}

fn show(p: Option<&PathBuf>) -> String {
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

/// Opens a FIFO's reading end. With no writer yet it waits for one rather than
/// reading end-of-file.
fn reader(p: &Path) -> Result<pipe::Receiver> {
    pipe::OpenOptions::new()
        .read_write(false)
        .open_receiver(p)
        .map_err(|e| io_error("open fifo", p, &e))
}

/// Opens a FIFO's writing end. `early`: whether or not its reader (the shim) has
/// opened it yet, at the cost of never seeing it go; otherwise the reader must
/// be there, and writes fail once it is gone.
fn writer(p: &Path, early: bool) -> Result<pipe::Sender> {
    pipe::OpenOptions::new()
        .read_write(early)
        .open_sender(p)
        .map_err(|e| io_error("open fifo", p, &e))
}

/// Copies `from` to `to` until `from` ends, then flushes.
fn spawn_copy(mut from: pipe::Receiver, mut to: Output) -> JoinHandle<()> {
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
        let _ = to.flush().await;
    })
}

impl Io {
    /// No stdio: the process reads nothing and its output is discarded.
    pub fn null() -> Self {
        Self::default()
    }

    /// stdout and stderr appended to `path` (made absolute), by the shim.
    pub fn log_file(path: impl AsRef<Path>) -> Result<Self> {
        let p = std::path::absolute(path.as_ref())
            .map_err(|e| io_error("log file", path.as_ref(), &e))?;
        let url = format!("file://{}", p.display());
        Ok(Self {
            stdout: url.clone(),
            stderr: url,
            ..Self::default()
        })
    }

    /// stdout and stderr in keeld's own log file for the task, read with
    /// [`crate::Task::log_path`]. For a task's init process only.
    pub fn keel_log() -> Self {
        Self {
            log_to_file: true,
            ..Self::default()
        }
    }

    /// FIFOs, whose other ends the caller reads and writes.
    pub fn streams(fifos: Fifos) -> Result<(Self, Streams)> {
        let made = fifos.make()?;
        let streams = Streams {
            stdin: made.stdin.as_deref().map(|p| writer(p, true)).transpose()?,
            stdout: reader(&made.stdout)?,
            stderr: made.stderr.as_deref().map(reader).transpose()?,
        };
        let io = Self {
            stdin: show(made.stdin.as_ref()),
            stdout: made.stdout.display().to_string(),
            stderr: show(made.stderr.as_ref()),
            terminal: fifos.terminal,
            _dir: made.temp,
            ..Self::default()
        };
        Ok((io, streams))
    }

    /// FIFOs copied to and from the caller's: `stdin` (if given) copied in after
    /// the process starts and closed when it ends, the output copied to `stdout`
    /// and `stderr` (stderr unused with a terminal) until the process's side
    /// closes. [`crate::Process::wait_output`] waits for the copies to finish;
    /// dropping the process (or this `Io`, if its create failed) stops them.
    ///
    /// ```no_run
    /// # fn f() -> keel_client::Result<()> {
    /// use keel_client::io::{Fifos, Io};
    /// let io = Io::copy(
    ///     Fifos::new(),
    ///     None,
    ///     Box::new(tokio::io::stdout()),
    ///     Box::new(tokio::io::stderr()),
    /// )?;
    /// # Ok(()) }
    /// ```
    pub fn copy(
        fifos: Fifos,
        stdin: Option<Input>,
        stdout: Output,
        stderr: Output,
    ) -> Result<Self> {
        let fifos = fifos.stdin(stdin.is_some());
        let made = fifos.make()?;
        let mut copies = vec![spawn_copy(reader(&made.stdout)?, stdout)];
        if let Some(p) = &made.stderr {
            copies.push(spawn_copy(reader(p)?, stderr));
        }
        Ok(Self {
            stdin: show(made.stdin.as_ref()),
            stdout: made.stdout.display().to_string(),
            stderr: show(made.stderr.as_ref()),
            terminal: fifos.terminal,
            pending_stdin: made.stdin.zip(stdin),
            copies: Copies(copies),
            _dir: made.temp,
            ..Self::default()
        })
    }

    /// Whether the process gets a terminal.
    pub fn terminal(&self) -> bool {
        self.terminal
    }

    /// The stdin source to copy once the process has started, if any: its FIFO
    /// opened for writing, and the source.
    pub(crate) fn take_stdin(&mut self) -> Result<Option<(pipe::Sender, Input)>> {
        match self.pending_stdin.take() {
            // After the start the shim has its end open.
            Some((path, input)) => Ok(Some((writer(&path, false)?, input))),
            None => Ok(None),
        }
    }

    /// Waits (up to `timeout`) for the output copies to finish: they end when the
    /// shim closes its side after the process exits.
    pub(crate) async fn finish(&mut self, timeout: Duration) {
        for c in std::mem::take(&mut self.copies.0) {
            let _ = tokio::time::timeout(timeout, c).await;
        }
    }
}

/// Opens the caller's ends of FIFOs a process was created with, for
/// [`crate::Process::attach`]. `file://` and empty paths are not FIFOs.
pub(crate) fn attach(stdin: &str, stdout: &str, stderr: &str) -> Result<Streams> {
    let fifo = |field: &str, p: &str| -> Result<Option<PathBuf>> {
        if p.is_empty() {
            return Ok(None);
        }
        if p.contains("://") {
            return Err(Error::FailedPrecondition(format!(
                "{field} is {p}, not a FIFO: there is nothing to attach to"
            )));
        }
        Ok(Some(PathBuf::from(p)))
    };
    let Some(out) = fifo("stdout", stdout)? else {
        return Err(Error::FailedPrecondition(
            "the process has no stdout to attach to".into(),
        ));
    };
    Ok(Streams {
        stdin: fifo("stdin", stdin)?
            .as_deref()
            .map(|p| writer(p, false))
            .transpose()?,
        stdout: reader(&out)?,
        stderr: fifo("stderr", stderr)?.as_deref().map(reader).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn fifos_carry_bytes_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let (io, mut s) = Io::streams(Fifos::new().stdin(true).dir(dir.path())).unwrap();
        assert!(io.stderr.ends_with("stderr") && !io.terminal);
        // The shim's side of stdin and stdout, as it would open them.
        let mut shim_in = reader(Path::new(&io.stdin)).unwrap();
        let mut shim_out = writer(Path::new(&io.stdout), false).unwrap();
        s.stdin.as_mut().unwrap().write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        shim_in.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        shim_out.write_all(b"pong").await.unwrap();
        s.stdout.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // Kept in the caller's directory, and openable again.
        let again = attach(&io.stdin, &io.stdout, &io.stderr).unwrap();
        assert!(again.stdin.is_some() && again.stderr.is_some());
    }

    #[test]
    fn a_terminal_has_no_stderr_and_files_cannot_be_attached() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (io, s) = Io::streams(Fifos::new().terminal(true).dir(dir.path())).unwrap();
            assert!(io.stderr.is_empty() && s.stderr.is_none() && io.terminal);
            let e = attach("", "file:///var/log/x", "").unwrap_err();
            assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        });
        let log = Io::log_file("relative.log").unwrap();
        assert!(log.stdout.starts_with("file:///") && log.stdout == log.stderr);
    }
}
