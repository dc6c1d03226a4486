//! keeld: keel's daemon.

use clap::Parser;
use keel_supervisor::config::{Config, Flags};

fn main() {
    let flags = Flags::parse();
    let cfg = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keeld: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = keel_supervisor::observability::init(&cfg.log_level, cfg.log_format) {
        eprintln!("keeld: logging: {e:#}");
        std::process::exit(2);
    }
    // A panic on any thread (an actor, a ttrpc handler) ends the process, as release
    // builds' `panic = "abort"` does: half-working is worse than a restart, and the
    // restart restores every task from its shim.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(%info, "panic; aborting so the restart path takes over");
        report(info);
        std::process::abort();
    }));
    if let Err(e) = keel_supervisor::daemon::run(cfg) {
        tracing::error!("{e:#}");
        eprintln!("keeld: {e:#}");
        std::process::exit(1);
    }
}
