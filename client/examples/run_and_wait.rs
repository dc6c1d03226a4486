//! Runs a command in a container and waits for it, printing its output.
//!
//! ```text
//! cargo run -p keel-client --example run_and_wait -- /run/keel/keel.sock /srv/rootfs echo hello
//! ```

use keel_client::io::{Fifos, Io};
use keel_client::{Client, ContainerSpec};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: run_and_wait SOCKET ROOTFS COMMAND [ARG]...";
    let socket = args.next().ok_or(usage)?;
    let rootfs = args.next().ok_or(usage)?;
    let command: Vec<String> = args.collect();
    if command.is_empty() {
        return Err(usage.into());
    }

    let client = Client::connect(&socket).await?;
    let id = format!("example-{}", std::process::id());
    let container = client
        .containers()
        .create(ContainerSpec::new(&id, &rootfs).args(command))
        .await?;
    // The task's stdout and stderr copied to ours.
    let io = Io::copy(
        Fifos::new(),
        None,
        Box::new(tokio::io::stdout()),
        Box::new(tokio::io::stderr()),
    )?;
    let task = container.new_task(io).await?;
    let exit = task.wait_after_start().await;
    task.wait_output().await;
    task.delete(true).await?;
    container.delete().await?;
    let exit = exit?;
    eprintln!("{id} exited with {}", exit.code);
    std::process::exit(i32::try_from(exit.code).unwrap_or(255));
}
