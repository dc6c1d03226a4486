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
    if let Err(e) = keel_supervisor::daemon::run(cfg) {
        tracing::error!("{e:#}");
        eprintln!("keeld: {e:#}");
        std::process::exit(1);
    }
}
