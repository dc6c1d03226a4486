//! keelctl: the command line, shaped like containerd's `ctr`.

pub mod checkpoint;
pub mod content;
pub mod events;
pub mod mounts;
pub mod options;
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
    Run(Box<tasks::RunArgs>),
    /// Manage containers.
    #[command(subcommand, alias = "c")]
    Containers(tasks::ContainersCmd),
    /// Manage tasks.
    #[command(subcommand, alias = "t")]
    Tasks(tasks::TasksCmd),
    /// Print events as they happen.
    Events(events::EventsArgs),
    /// Look inside keeld.
    #[command(subcommand)]
    Debug(DebugCmd),
}

#[derive(Debug, Subcommand)]
pub enum DebugCmd {
    /// keeld's supervisors: strategy, restart limit, restarts and escalations, and
    /// the last failure's cause.
    Supervision {
        #[arg(long, value_enum, default_value_t = output::Format::Table)]
        format: output::Format,
    },
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
        Command::Run(a) => tasks::run(&connect().await?, *a).await,
        Command::Containers(cmd) => tasks::containers(&connect().await?, cmd).await,
        Command::Tasks(cmd) => tasks::tasks(&connect().await?, cmd).await,
        Command::Events(a) => events::run(&connect().await?, a).await,
        Command::Debug(DebugCmd::Supervision { format }) => {
            supervision(&connect().await?, format).await
        }
    }
}

/// `keelctl debug supervision`.
async fn supervision(client: &Client, format: output::Format) -> anyhow::Result<i32> {
    let r = client
        .health
        .supervision(client.ctx(), &Default::default())
        .await
        .map_err(keel_protocol::Error::from)?;
    let rows: Vec<serde_json::Value> = r
        .supervisors
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "strategy": s.strategy,
                "limit": format!("{} in {}s", s.max_restarts, s.within_secs),
                "restarts": s.restarts,
                "escalations": s.escalations,
                "last_failure": s.last_failure.as_ref().map(|t| keel_protocol::types::rfc3339(keel_protocol::types::system_time(t))).unwrap_or_default(),
                "last_cause": s.last_cause,
            })
        })
        .collect();
    let columns = [
        "name",
        "strategy",
        "limit",
        "restarts",
        "escalations",
        "last_failure",
        "last_cause",
    ];
    match format {
        output::Format::Json => {
            for r in &rows {
                println!("{r}");
            }
        }
        output::Format::Table => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    columns
                        .iter()
                        .map(|c| match &r[c] {
                            serde_json::Value::String(s) => s.clone(),
                            v => v.to_string(),
                        })
                        .collect()
                })
                .collect();
            let header: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
            output::table(
                &header.iter().map(String::as_str).collect::<Vec<_>>(),
                &cells,
            );
        }
    }
    Ok(0)
}
