//! containerd-shim-keel-v1: a containerd shim v2 (runtime `io.containerd.keel.v1`)
//! that makes its containers in its own process through libcontainer.
//!
//! ```text
//! containerd-shim-keel-v1 -namespace NS -address A -publish-binary P -id ID [-debug] start
//! containerd-shim-keel-v1 -namespace NS -address A -publish-binary P -id ID -bundle B delete
//! ```
//!
//! `start` (cwd: the bundle) listens on `/run/containerd/s/<hash>`, writes the
//! bundle's `address`, starts the long-running shim on that socket and prints its
//! address. The shim serves `containerd.task.v2.Task` over ttrpc, one task per
//! shim, and forwards events to `TTRPC_ADDRESS`. `delete` cleans up after a shim
//! that is gone and prints a `DeleteResponse`.
//!
//! What the shim does not do is refused, naming the field, never ignored: see
//! [`options`].

mod args;
mod cgroups;
mod checkpoint;
mod console;
mod container;
mod criu;
mod events;
mod guard;
mod launch;
mod log;
mod options;
mod reaper;
mod service;
mod stdio;

use args::{Action, Args};

fn main() {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("io.containerd.keel.v1: {e}");
            eprintln!(
                "usage: containerd-shim-keel-v1 -namespace NS -address A -id ID [-bundle B] [-debug] [start|delete]"
            );
            std::process::exit(2);
        }
    };
    let result = match args.action {
        Action::Version => {
            println!(
                "containerd-shim-keel-v1:\n  Runtime: io.containerd.keel.v1\n  Version: {}",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        Action::Start => launch::start(&args),
        Action::Delete => launch::delete(&args),
        Action::Serve => service::serve(&args),
    };
    if let Err(e) = result {
        eprintln!("io.containerd.keel.v1: {e}");
        std::process::exit(1);
    }
}
