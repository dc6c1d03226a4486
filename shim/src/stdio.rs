//! A process's stdio as containerd passes it, opened for the container.
//!
//! | given | stdin | stdout, stderr |
//! |---|---|---|
//! | `""` | /dev/null | /dev/null |
//! | a FIFO | the FIFO read-only; the shim holds a writer until CloseIO or exit, so the process never reads an early EOF | the FIFO, opened read-write so neither the open nor a write fails while no reader is there; the shim holds it until the process exits |
//! | a regular file | read-only | appended to, never created |
//! | `file:///path` | refused | created if missing, appended to |
//! | anything else (`binary://…`) | refused | refused |
//!
//! The container gets the descriptors themselves: no copying through the shim
//! (a terminal is the exception: see `container::Console`).

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::options::MAX_PATH;
use crate::service::Error;

/// What the container's process gets, and what the shim holds for it.
#[derive(Debug)]
pub struct Opened {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Kept open while the process runs (see the module doc); dropped at exit.
    pub held: Held,
}

/// Descriptors the shim keeps for a process.
#[derive(Debug, Default)]
pub struct Held {
    /// A writer on the stdin FIFO: dropped by CloseIO.
    pub stdin: Option<File>,
    pub outputs: Vec<File>,
}

/// Opens the three streams. `terminal` ones are not opened here.
pub fn open(stdin: &str, stdout: &str, stderr: &str) -> Result<Opened, Error> {
    let mut held = Held::default();
    let stdin = open_stdin(stdin, &mut held)?;
    let stdout = open_output("stdout", stdout, &mut held)?;
    let stderr = open_output("stderr", stderr, &mut held)?;
    Ok(Opened {
        stdin,
        stdout,
        stderr,
        held,
    })
}

fn checked<'a>(field: &str, given: &'a str) -> Result<&'a str, Error> {
    if given.len() > MAX_PATH {
        return Err(Error::InvalidArgument(format!(
            "{field}: longer than {MAX_PATH} bytes"
        )));
    }
    if given.contains("://") && !given.starts_with("file://") {
        return Err(Error::InvalidArgument(format!(
            "{field} {given:?}: only FIFOs, files and file:// URIs are supported (runtime io.containerd.keel.v1)"
        )));
    }
    Ok(given)
}

fn io_err(field: &str, path: &str, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(format!("{field} {path:?}: {e}")),
        _ => Error::InvalidArgument(format!("{field} {path:?}: {e}")),
    }
}

fn is_fifo(path: &str) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

fn null(read: bool) -> Result<OwnedFd, Error> {
    OpenOptions::new()
        .read(read)
        .write(!read)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| Error::Internal(format!("/dev/null: {e}")))
}

fn open_stdin(given: &str, held: &mut Held) -> Result<OwnedFd, Error> {
    let path = checked("stdin", given)?;
    if path.is_empty() {
        return null(true);
    }
    if path.starts_with("file://") {
        return Err(Error::InvalidArgument(format!(
            "stdin {path:?}: a file:// URI is for output"
        )));
    }
    if is_fifo(path) {
        let writer = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("stdin", path, e))?;
        let reader = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|e| io_err("stdin", path, e))?;
        held.stdin = Some(writer);
        return Ok(reader.into());
    }
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|e| io_err("stdin", path, e))
}

fn open_output(field: &str, given: &str, held: &mut Held) -> Result<OwnedFd, Error> {
    let path = checked(field, given)?;
    if path.is_empty() {
        return null(false);
    }
    if let Some(file) = path.strip_prefix("file://") {
        if !Path::new(file).is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "{field} {path:?}: the path must be absolute"
            )));
        }
        return OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(file)
            .map(OwnedFd::from)
            .map_err(|e| io_err(field, path, e));
    }
    if is_fifo(path) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(field, path, e))?;
        let given = f
            .try_clone()
            .map_err(|e| Error::Internal(format!("{field}: {e}")))?;
        held.outputs.push(f);
        return Ok(given.into());
    }
    OpenOptions::new()
        .append(true)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| io_err(field, path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn fifos_files_and_uris() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = |name: &str| {
            let p = dir.path().join(name);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            p.to_str().unwrap().to_string()
        };
        let (i, o) = (fifo("in"), fifo("out"));
        let log = dir.path().join("log");
        let opened = open(&i, &o, &format!("file://{}", log.display())).unwrap();
        assert!(opened.held.stdin.is_some());
        assert_eq!(opened.held.outputs.len(), 1);
        // Output written before any reader is there stays in the FIFO.
        File::from(opened.stdout).write_all(b"out").unwrap();
        let mut r = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&o)
            .unwrap();
        let mut buf = [0u8; 3];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"out");
        File::from(opened.stderr).write_all(b"err").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"err");
        // stdin: data from a client arrives; no EOF while the shim holds its writer.
        let mut w = OpenOptions::new().write(true).open(&i).unwrap();
        w.write_all(b"x").unwrap();
        drop(w);
        let mut stdin = File::from(opened.stdin);
        let mut one = [0u8; 1];
        stdin.read_exact(&mut one).unwrap();
        drop(opened.held);
        assert_eq!(
            stdin.read(&mut one).unwrap(),
            0,
            "EOF once the holder is gone"
        );
    }

    #[test]
    fn what_cannot_be_opened_is_refused_naming_the_stream() {
        let e = open("", "binary:///usr/bin/logger?x=1", "").unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.starts_with("stdout")),
            "{e:?}"
        );
        let e = open("", "", "/nonexistent/file").unwrap_err();
        assert!(
            matches!(&e, Error::NotFound(m) if m.starts_with("stderr")),
            "{e:?}"
        );
        let e = open("file:///tmp/x", "", "").unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.starts_with("stdin")),
            "{e:?}"
        );
        let e = open("", "file://relative", "").unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("absolute")),
            "{e:?}"
        );
    }
}
