//! keelctl: the command line, shaped like containerd's `ctr`.

pub mod checkpoint;
pub mod content;
pub mod events;
pub mod output;
pub mod tasks;

use clap::{Parser, Subcommand};
use keel_protocol::Client;

/// keelctl's global options.
#[derive(Debug, Parser)]
#[command(name = "keelctl", version = crate::VERSION, about = "Control keeld, the keel container node agent")]
pub struct Cli {
    /// keeld's socket.
    #[arg(long, global = true, env = "KEEL_ADDRESS", default_value = crate::config::DEFAULT_ADDRESS)]
    pub address: String,
    /// Namespace for the request.
    #[arg(long, short = 'n', global = true, env = "KEEL_NAMESPACE", default_value = keel_protocol::DEFAULT_NAMESPACE)]
    pub namespace: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the client's and the daemon's version and git revision.
    Version,
    /// Manage the content store.
    #[command(subcommand)]
    Content(content::ContentCmd),
    /// Create a container and run its task.
    Run(tasks::RunArgs),
    /// Manage containers.
    #[command(subcommand, alias = "c")]
    Containers(tasks::ContainersCmd),
    /// Manage tasks.
    #[command(subcommand, alias = "t")]
    Tasks(tasks::TasksCmd),
    /// Print events as they happen.
    Events(events::EventsArgs),
}

/// Runs a parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let Cli {
        address,
        namespace,
        command,
    } = cli;
    let connect = || Client::connect(&address, Some(&namespace));
    match command {
        Command::Version => {
            println!(
                "Client:\n  Version:  {}\n  Revision: {}",
                crate::VERSION,
                crate::REVISION
            );
            let client = connect().await?;
            let (v, r) = client.daemon_version().await?;
            println!("\nServer:\n  Version:  {v}\n  Revision: {r}");
            Ok(0)
        }
        Command::Content(cmd) => content::run(&connect().await?, cmd).await,
        Command::Run(a) => tasks::run(&connect().await?, a).await,
        Command::Containers(cmd) => tasks::containers(&connect().await?, cmd).await,
        Command::Tasks(cmd) => tasks::tasks(&connect().await?, cmd).await,
        Command::Events(a) => events::run(&connect().await?, a).await,
    }
}
