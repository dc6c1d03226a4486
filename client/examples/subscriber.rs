//! Prints task events, one line each, and keeps the last sequence number it
//! printed in a file: run it again (or let keeld restart under it) and it goes on
//! from there, skipping nothing and repeating nothing.
//!
//! ```text
//! cargo run -p keel-client --example subscriber -- /run/keel/keel.sock /var/lib/my-agent/events.seq
//! ```

use std::path::Path;

use futures::StreamExt;
use keel_client::{Client, Event};

/// Writes the sequence number durably: to a temporary file, fsynced, renamed over
/// the old one, and the directory fsynced.
fn save(path: &Path, seq: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{seq}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: subscriber SOCKET SEQUENCE_FILE";
    let socket = args.next().ok_or(usage)?;
    let seq_file = args.next().ok_or(usage)?;
    let seq_file = Path::new(&seq_file);
    // Where the last run stopped; from now on if there was none.
    let since = match std::fs::read_to_string(seq_file) {
        Ok(s) => Some(s.trim().parse::<u64>()?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };

    let client = Client::connect(&socket).await?;
    let mut events = client.subscribe(&["topic~=\"^/tasks/\""], since).await?;
    while let Some(env) = events.next().await {
        let env = match env {
            Ok(env) => env,
            // keeld unreachable for longer than the client waits: the
            // subscription tries again on the next poll.
            Err(e) if e.is_retriable() => {
                eprintln!("waiting for keeld: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match &env.event {
            Event::TaskExit(x) => println!(
                "{} {} {} exited with {}",
                env.sequence, env.namespace, x.container_id, x.exit_status
            ),
            Event::Gap(g) => println!(
                "{} events lost: after {} and before {} (retained from {})",
                env.sequence, g.lost_after, g.lost_before, g.first_retained
            ),
            other => println!("{} {} {} {other:?}", env.sequence, env.namespace, env.topic),
        }
        save(seq_file, env.sequence)?;
    }
    Ok(())
}
