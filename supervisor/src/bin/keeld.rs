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
    // A panic unwinds its actor's task (or a request's), not the process: the
    // supervisors restart what failed (`keel_supervisor::root`). A failure past
    // their limits ends keeld with status 70, for systemd to start it again.
    match keel_supervisor::daemon::run(cfg) {
        Ok(keel_supervisor::root::Ending::Signal(_)) => {}
        Ok(keel_supervisor::root::Ending::Escalated(why)) => {
            eprintln!("keeld: exiting for a restart: {why}");
            std::process::exit(70);
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("keeld: {e:#}");
            std::process::exit(1);
        }
    }
}
