//! busctl: an operator's command line for a bus on RabbitMQ. It reads the wire (queue names,
//! MassTransit's `MT-*` headers and envelopes), not our types, so it serves .NET MassTransit
//! endpoints on the same broker too.
//!
//! ```text
//! busctl endpoints orders billing          # ready and consumer counts, _error and _skipped sizes
//! busctl errors orders [--json]            # what is in orders_error, and why
//! busctl show orders <message-id>          # one message's headers and body
//! busctl redrive orders --all [--dry-run]  # back from orders_error to orders (or --id, --type, --older-than)
//! busctl purge orders_error [--yes]
//! busctl publish urn:message:Shop:OrderPlaced --json order.json
//! ```
//!
//! The broker is `--addr`, else `AMQP_ADDR`, else `amqp://guest:guest@127.0.0.1:5672/%2f`.

mod error;
mod faulted;
mod publish;
mod redrive;
mod scan;
mod show;

use std::io::Write;
use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use lapin::{Connection, ConnectionProperties};

pub use error::{Error, Result};
pub use redrive::{Redrive, REDRIVE_COUNT};

/// The command line.
#[derive(Debug, clap::Parser)]
#[command(name = "busctl", version, about = "Endpoints, error queues and redrive for a bus on RabbitMQ")]
pub struct Cli {
    /// The broker's address.
    #[arg(long, env = "AMQP_ADDR", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", global = true)]
    pub addr: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A busctl command.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Each endpoint's ready messages and consumers, and the sizes of its `_error` and `_skipped` queues.
    Endpoints {
        /// The endpoints (queue names).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The messages in `<endpoint>_error`: id, type, reason, exception and fault time.
    Errors {
        /// The endpoint.
        endpoint: String,
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// One message of `<endpoint>_error` (or `_skipped`): its headers and its body.
    Show {
        /// The endpoint.
        endpoint: String,
        /// The message's id.
        message_id: String,
    },
    /// Moves messages from `<endpoint>_error` (or `_skipped`) back to the endpoint's queue.
    Redrive(Redrive),
    /// Empties a queue.
    Purge {
        /// The queue.
        queue: String,
        /// Without asking.
        #[arg(long)]
        yes: bool,
    },
    /// Publishes a message as a MassTransit envelope (for testing).
    Publish {
        /// Its message type.
        urn: String,
        /// A file holding the message as JSON.
        #[arg(long = "json")]
        file: std::path::PathBuf,
    },
}

/// Runs `cli`, writing what it shows to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> Result<()> {
    let connect = Connection::connect(&cli.addr, ConnectionProperties::default());
    let connection = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| Error::Usage(format!("no answer from {} within 10 s", bus_rabbitmq::redact(&cli.addr))))??;
    let result = match cli.command {
        Command::Endpoints { names } => endpoints(&connection, &names, out).await,
        Command::Errors { endpoint, json } => faulted::list(&connection, &endpoint, json, out).await,
        Command::Show { endpoint, message_id } => show::show(&connection, &endpoint, &message_id, out).await,
        Command::Redrive(redrive) => redrive.run(&connection, out).await,
        Command::Purge { queue, yes } => purge(&connection, &queue, yes, out).await,
        Command::Publish { urn, file } => publish::publish(&cli.addr, &urn, &file, out).await,
    };
    let _ = connection.close(200, "busctl done".into()).await;
    result
}

/// Messages ready in `queue` and its consumers (`None`: no such queue), by a passive declare.
async fn counts(connection: &Connection, queue: &str) -> Result<Option<(u32, u32)>> {
    // A passive declare of a missing queue closes its channel: one channel per question.
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let answer = match channel.queue_declare(queue.into(), options, Default::default()).await {
        Ok(declared) => Some((declared.message_count(), declared.consumer_count())),
        Err(error) if bus_rabbitmq::is_not_found(&error) => None,
        Err(error) => return Err(error.into()),
    };
    if channel.status().connected() {
        let _ = channel.close(200, "asked".into()).await;
    }
    Ok(answer)
}

async fn endpoints(connection: &Connection, names: &[String], out: &mut impl Write) -> Result<()> {
    writeln!(out, "{:<40} {:>8} {:>9} {:>8} {:>8}", "endpoint", "ready", "consumers", "error", "skipped")?;
    for name in names {
        let Some((ready, consumers)) = counts(connection, name).await? else {
            writeln!(out, "{name:<40} (no such queue)")?;
            continue;
        };
        let size = |counts: Option<(u32, u32)>| counts.map_or_else(|| "-".to_owned(), |(n, _)| n.to_string());
        let error = size(counts(connection, &format!("{name}_error")).await?);
        let skipped = size(counts(connection, &format!("{name}_skipped")).await?);
        writeln!(out, "{name:<40} {ready:>8} {consumers:>9} {error:>8} {skipped:>8}")?;
    }
    Ok(())
}

async fn purge(connection: &Connection, queue: &str, yes: bool, out: &mut impl Write) -> Result<()> {
    if counts(connection, queue).await?.is_none() {
        return Err(Error::NoSuchQueue(queue.to_owned()));
    }
    if !yes {
        write!(out, "purge every message of `{queue}`? type its name to confirm: ")?;
        out.flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != queue {
            writeln!(out, "not purged")?;
            return Ok(());
        }
    }
    let channel = connection.create_channel().await?;
    let purged = channel.queue_purge(queue.into(), QueuePurgeOptions::default()).await?;
    writeln!(out, "purged {purged} messages from {queue}")?;
    Ok(())
}
