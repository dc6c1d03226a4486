//! keelctl: keel's command line.

use clap::Parser;
use keel_supervisor::ctl::{run, Cli};

fn main() {
    // Output piped into `head` and the like ends quietly when the reader goes, as
    // with any Unix tool, rather than as a panic on a broken pipe.
    // SAFETY: no other thread exists yet, and SIG_DFL installs no handler code.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = Cli::parse();
    // One thread: a command's work is a few requests in a row, and on a busy host
    // every extra thread is one more to be scheduled.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Show keel's own error (code and message), not ttrpc's status structure.
            match e.downcast_ref::<ttrpc::Error>() {
                Some(t) => eprintln!("keelctl: {}", keel_protocol::Error::from(t.clone())),
                None => eprintln!("keelctl: {e:#}"),
            }
            std::process::exit(1);
        }
    }
}
