//! keelctl: keel's command line, shaped like containerd's `ctr`, on keel-client.

mod checkpoint;
mod content;
mod events;
mod mounts;
mod options;
mod output;
mod tasks;

use clap::{Parser, Subcommand};
use keel_client::protocol as keel_protocol;

/// keelctl's version.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision keelctl was built from.
const REVISION: &str = env!("KEEL_GIT_REVISION");

/// keelctl's global options.
#[derive(Debug, Parser)]
#[command(name = "keelctl", version = VERSION, about = "Control keeld, the keel container node agent")]
pub struct Cli {
    /// keeld's socket.
    #[arg(long, global = true, env = "KEEL_ADDRESS", default_value = keel_client::DEFAULT_ADDRESS)]
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

/// How long a command waits for keeld when it cannot be reached: not at all,
/// as keelctl always has (a script retries if it wants to).
const RECONNECT: std::time::Duration = std::time::Duration::ZERO;

/// Runs a parsed command; returns the process exit code.
async fn run(cli: Cli) -> anyhow::Result<i32> {
    let Cli {
        address,
        namespace,
        command,
    } = cli;
    let connect = || {
        keel_client::ClientBuilder::new(address.as_str())
            .namespace(namespace.as_str())
            .reconnect_timeout(RECONNECT)
            .connect()
    };
    match command {
        Command::Version => {
            println!("Client:\n  Version:  {VERSION}\n  Revision: {REVISION}");
            let client = connect().await?;
            let (v, r) = client.version().await?;
            println!("\nServer:\n  Version:  {v}\n  Revision: {r}");
            Ok(0)
        }
        Command::Content(cmd) => content::run(&connect().await?.raw().await?, cmd).await,
        Command::Run(a) => tasks::run(&connect().await?, *a).await,
        Command::Containers(cmd) => tasks::containers(&connect().await?, cmd).await,
        Command::Tasks(cmd) => tasks::tasks(&connect().await?, cmd).await,
        Command::Events(a) => events::run(&connect().await?.raw().await?, a).await,
        Command::Debug(DebugCmd::Supervision { format }) => {
            supervision(&connect().await?.raw().await?, format).await
        }
    }
}

/// `keelctl debug supervision`.
async fn supervision(
    client: &keel_protocol::Client,
    format: output::Format,
) -> anyhow::Result<i32> {
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
            match e.downcast_ref::<keel_client::protocol::ttrpc::Error>() {
                Some(t) => eprintln!("keelctl: {}", keel_client::Error::from(t.clone())),
                None => eprintln!("keelctl: {e:#}"),
            }
            std::process::exit(1);
        }
    }
}
