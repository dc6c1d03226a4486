//! keel-powercut: a power-loss simulator for keel's tests and benchmarks.
//!
//! ```text
//! keel-powercut STORE MOUNTPOINT [LOG]
//! ```
//!
//! Mounts at MOUNTPOINT a filesystem showing STORE/data. Written bytes stay in
//! this process until an fsync or fdatasync of their file; new, removed and
//! renamed directory entries are undone unless an fsync of their directory
//! made them durable (see `namespace.rs` for the model). When the filesystem
//! is unmounted, everything not made durable is dropped: a power cut without a
//! reboot. Mount it again on the same STORE to "power on".
//!
//! `MOUNTPOINT/.powercut` takes `arm N` (cut right after the N-th fsync from
//! now, killing its caller) and `cut`; LOG gets a line per fsync and the cut.
//! "mounted" is printed on stdout once the filesystem serves.

mod fs;
mod namespace;
mod overlay;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fuser::MountOption;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (store, mountpoint, log) = match args.as_slice() {
        [s, m] => (PathBuf::from(s), PathBuf::from(m), None),
        [s, m, l] => (PathBuf::from(s), PathBuf::from(m), Some(PathBuf::from(l))),
        _ => {
            eprintln!("usage: keel-powercut STORE MOUNTPOINT [LOG]");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(store, mountpoint, log) {
        eprintln!("keel-powercut: {e}");
        std::process::exit(1);
    }
}

fn run(store: PathBuf, mountpoint: PathBuf, log: Option<PathBuf>) -> std::io::Result<()> {
    let log = match log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => None,
    };
    let state = Arc::new(Mutex::new(fs::State::new(&store, log)?));
    let options = [
        MountOption::FSName("keel-powercut".into()),
        MountOption::AllowOther,
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
    ];
    let mut session = fuser::Session::new(fs::PowerCut(state.clone()), &mountpoint, &options)?;
    println!("mounted");
    std::io::stdout().flush()?;
    match session.run() {
        Ok(()) => {}
        // The kernel ended the connection (it reports an aborted one this way
        // rather than as an unmount): power is off all the same.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            eprintln!("keel-powercut: the kernel aborted the connection");
        }
        Err(e) => return Err(e),
    }
    drop(session);
    let dropped = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .power_off()?;
    println!(
        "power off: dropped {} bytes in {} files and {} directory entry changes",
        dropped.bytes, dropped.files, dropped.entries
    );
    Ok(())
}
