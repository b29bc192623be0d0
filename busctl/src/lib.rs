//! busctl: an operator's command line for a bus on RabbitMQ. It reads the wire (queue names,
//! MassTransit's `MT-*` headers and envelopes), not our types, so it serves .NET MassTransit
//! endpoints on the same broker too.
//!
//! ```text
//! busctl endpoints [orders billing] [--watch]  # ready, unacknowledged and consumer counts, _error and _skipped sizes
//! busctl errors orders [--json]            # what is in orders_error, and why
//! busctl show orders <message-id>          # one message's headers and body
//! busctl redrive orders --all [--dry-run]  # back from orders_error to orders (or --id, --type, --older-than)
//! busctl purge orders_error [--yes]
//! busctl publish urn:message:Shop:OrderPlaced --json order.json
//! busctl topology                          # exchanges and bindings as a tree
//! busctl serve --listen 127.0.0.1:8080 [orders]  # the dashboard
//! ```
//!
//! The broker is `--addr`, else `AMQP_ADDR`, else `amqp://guest:guest@127.0.0.1:5672/%2f`.
//! Counts come from the RabbitMQ management HTTP API when the broker has it enabled
//! (`--management`, else port 15672 of the broker's host), and from passive declares when
//! not; listing endpoints without naming them, unacknowledged counts and `topology` need it.

pub mod dashboard;
mod error;
mod faulted;
mod management;
mod publish;
mod redrive;
mod scan;
mod show;
mod topology;

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
    /// The management HTTP API (default: port 15672 of the broker's host), asked with the
    /// address's user.
    #[arg(long, env = "BUSCTL_MANAGEMENT", global = true)]
    pub management: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A busctl command.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Each endpoint's ready and unacknowledged messages and consumers, and the sizes of its
    /// `_error` and `_skipped` queues.
    Endpoints {
        /// The endpoints (queue names); all of them when the management API answers.
        names: Vec<String>,
        /// Refreshes the table until stopped.
        #[arg(long)]
        watch: bool,
        /// How often `--watch` refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Exchanges and what they route to, as a tree (needs the management API).
    Topology,
    /// Serves the dashboard: endpoints, error queues, redrive and purge.
    Serve {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The endpoints to show when the management API does not list them.
        endpoints: Vec<String>,
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
    let management = management::Management::detect(&cli.addr, cli.management.as_deref()).await;
    let result = match cli.command {
        Command::Endpoints { names, watch, interval } => loop {
            let shown = endpoints(&connection, management.as_ref(), &names, out).await;
            if !watch || shown.is_err() {
                break shown;
            }
            out.flush()?;
            tokio::time::sleep(interval).await;
            // Clears the terminal for the next table.
            write!(out, "\x1b[2J\x1b[H")?;
        },
        Command::Serve { listen, endpoints } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            writeln!(out, "dashboard on http://{}", listener.local_addr()?)?;
            out.flush()?;
            let app = dashboard::router(cli.addr.clone(), cli.management.clone(), endpoints);
            axum::serve(listener, app).await.map_err(Error::Io)
        }
        Command::Topology => match &management {
            Some(management) => topology::print(management, out).await,
            None => Err(Error::Usage(NEEDS_MANAGEMENT.to_owned())),
        },
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

/// A name made safe for a URL path segment (a vhost, a queue): every byte but
/// `A-Z a-z 0-9 - _ . ~` percent-encoded.
pub(crate) fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(char::from(byte)),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// Why a command needs the management API.
const NEEDS_MANAGEMENT: &str = "this needs the RabbitMQ management API, which does not answer: enable it with \
     `rabbitmq-plugins enable rabbitmq_management`, or give its address with --management";

/// One endpoint's row: ready, unacknowledged (when known) and consumers, and the sizes of
/// its `_error` and `_skipped` queues (`None`: no such queue).
pub(crate) struct EndpointRow {
    pub(crate) name: String,
    pub(crate) counts: Option<(u64, Option<u64>, u64)>,
    pub(crate) error: Option<u64>,
    pub(crate) skipped: Option<u64>,
    /// Messages per second in and out, when the management API says.
    pub(crate) rates: Option<(f64, f64)>,
}

/// Whether a queue is an endpoint's own, not one of its dead-letter or delay queues.
fn is_endpoint(name: &str) -> bool {
    !(name.ends_with("_error") || name.ends_with("_skipped") || name.contains("_delay_"))
}

pub(crate) async fn endpoint_rows(
    connection: &Connection,
    management: Option<&management::Management>,
    names: &[String],
) -> Result<Vec<EndpointRow>> {
    if let Some(management) = management {
        let queues = management.queues().await?;
        let size =
            |name: String| queues.iter().find(|q| q.name == name).map(|q| q.messages_ready + q.messages_unacknowledged);
        let chosen: Vec<String> = if names.is_empty() {
            queues.iter().map(|q| q.name.clone()).filter(|n| is_endpoint(n)).collect()
        } else {
            names.to_vec()
        };
        return Ok(chosen
            .into_iter()
            .map(|name| EndpointRow {
                counts: queues
                    .iter()
                    .find(|q| q.name == name)
                    .map(|q| (q.messages_ready, Some(q.messages_unacknowledged), q.consumers)),
                error: size(format!("{name}_error")),
                skipped: size(format!("{name}_skipped")),
                rates: queues.iter().find(|q| q.name == name).and_then(|q| q.message_stats.as_ref()).map(|stats| {
                    let rate = |r: &Option<management::Rate>| r.map_or(0.0, |r| r.rate);
                    (rate(&stats.publish_details), rate(&stats.deliver_get_details))
                }),
                name,
            })
            .collect());
    }
    if names.is_empty() {
        return Err(Error::Usage(format!("name the endpoints; listing them all: {NEEDS_MANAGEMENT}")));
    }
    let mut rows = Vec::new();
    for name in names {
        let counts =
            counts(connection, name).await?.map(|(ready, consumers)| (u64::from(ready), None, u64::from(consumers)));
        let error = counts_of(connection, &format!("{name}_error")).await?;
        let skipped = counts_of(connection, &format!("{name}_skipped")).await?;
        rows.push(EndpointRow { name: name.clone(), counts, error, skipped, rates: None });
    }
    Ok(rows)
}

/// The messages waiting in `queue`, by a passive declare.
async fn counts_of(connection: &Connection, queue: &str) -> Result<Option<u64>> {
    Ok(counts(connection, queue).await?.map(|(ready, _)| u64::from(ready)))
}

async fn endpoints(
    connection: &Connection,
    management: Option<&management::Management>,
    names: &[String],
    out: &mut impl Write,
) -> Result<()> {
    let rows = endpoint_rows(connection, management, names).await?;
    writeln!(
        out,
        "{:<40} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "endpoint", "ready", "unacked", "consumers", "error", "skipped"
    )?;
    let show = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    for row in rows {
        let name = &row.name;
        let Some((ready, unacked, consumers)) = row.counts else {
            writeln!(out, "{name:<40} (no such queue)")?;
            continue;
        };
        let (unacked, error, skipped) = (show(unacked), show(row.error), show(row.skipped));
        writeln!(out, "{name:<40} {ready:>8} {unacked:>8} {consumers:>9} {error:>8} {skipped:>8}")?;
    }
    Ok(())
}

pub(crate) async fn purge(connection: &Connection, queue: &str, yes: bool, out: &mut impl Write) -> Result<()> {
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
