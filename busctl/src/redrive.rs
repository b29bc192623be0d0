//! `busctl redrive`: messages back from an error (or skipped) queue to their endpoint.
//!
//! One message at a time: fetched unacknowledged, published to the endpoint's queue with
//! the broker's confirm, and only then removed. Killed at any point, a message is in the
//! error queue, in the endpoint's queue, or (killed between the confirm and the removal,
//! for the one message in hand) in both: never in neither.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Connection;

use crate::faulted::Faulted;
use crate::scan::{Fetched, QueueScan};
use crate::{Error, Result};

/// The header that counts how often a message was redriven.
pub const REDRIVE_COUNT: &str = "MT-Redrive-Count";

/// `busctl redrive <endpoint>`: which messages go back.
#[derive(Debug, clap::Args)]
pub struct Redrive {
    /// The endpoint: messages go back to its queue.
    pub endpoint: String,
    /// Only the messages with these ids.
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Every message.
    #[arg(long, conflicts_with_all = ["ids", "message_type", "older_than"])]
    pub all: bool,
    /// Only messages of this type (a URN).
    #[arg(long = "type")]
    pub message_type: Option<String>,
    /// Only messages that failed longer ago than this (`30m`, `2h`, `1d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
    /// From `<endpoint>_skipped` instead of `<endpoint>_error`.
    #[arg(long)]
    pub skipped: bool,
    /// Lists what would go back, and moves nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl Redrive {
    fn selects(&self, fetched: &Fetched, faulted: &Faulted) -> bool {
        if self.all {
            return true;
        }
        let by_id = self.ids.is_empty() || self.ids.iter().any(|id| id.eq_ignore_ascii_case(&faulted.message_id));
        let by_type = self.message_type.as_ref().is_none_or(|urn| {
            faulted.message_type == *urn
                || serde_json::from_slice::<serde_json::Value>(&fetched.body).ok().is_some_and(|e| {
                    e["messageType"].as_array().is_some_and(|types| types.iter().any(|t| t.as_str() == Some(urn)))
                })
        });
        let by_age = self.older_than.is_none_or(|age| {
            chrono::DateTime::parse_from_rfc3339(&faulted.fault_time)
                .is_ok_and(|at| chrono::Utc::now().signed_duration_since(at).to_std().is_ok_and(|ago| ago >= age))
        });
        by_id && by_type && by_age
    }

    /// Runs the redrive, reporting each message moved (or that would be).
    pub(crate) async fn run(&self, connection: &Connection, out: &mut impl Write) -> Result<()> {
        if !self.all && self.ids.is_empty() && self.message_type.is_none() && self.older_than.is_none() {
            return Err(Error::Usage("say which messages: --id, --type, --older-than or --all".to_owned()));
        }
        let source = format!("{}_{}", self.endpoint, if self.skipped { "skipped" } else { "error" });
        crate::counts(connection, &self.endpoint).await?.ok_or_else(|| Error::NoSuchQueue(self.endpoint.clone()))?;
        let mut scan = QueueScan::open(connection, &source).await?;
        scan.channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut moved = 0usize;
        while let Some(fetched) = scan.next().await? {
            let faulted = Faulted::of(&fetched.message);
            if !self.selects(&fetched, &faulted) || self.dry_run {
                if self.dry_run && self.selects(&fetched, &faulted) {
                    writeln!(out, "would redrive {}\t{}", shown(&faulted.message_id), shown(&faulted.message_type))?;
                    moved += 1;
                }
                continue;
            }
            let properties = redriven_properties(&fetched);
            let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
            let confirm = scan
                .channel
                .basic_publish("".into(), self.endpoint.as_str().into(), options, &fetched.body, properties)
                .await?
                .await?;
            // Unroutable (the queue went away): returned, not delivered; it stays where it is.
            if !confirm.is_ack() || confirm.take_message().is_some() {
                scan.finish().await?;
                return Err(Error::NotConfirmed(self.endpoint.clone()));
            }
            scan.remove(fetched.tag).await?;
            writeln!(out, "redriven {}\t{}", shown(&faulted.message_id), shown(&faulted.message_type))?;
            moved += 1;
        }
        scan.finish().await?;
        if moved == 0 && !self.ids.is_empty() {
            // Not there, or held by another reader at the moment (an open dashboard page).
            return Err(Error::Usage(format!("no message with the ids given is waiting in {source}")));
        }
        let verb = if self.dry_run { "would redrive" } else { "redrove" };
        writeln!(out, "{verb} {moved} messages from {source} to {}", self.endpoint)?;
        Ok(())
    }
}

/// Wire text for a terminal: control characters escaped, so a message cannot drive it.
pub(crate) fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    bus_core::logged::escaped(text, 4096)
}

/// The properties the message goes back with: its own, but for the user it was published by
/// (the broker refuses a publish whose user id is not the publisher's) and the headers its
/// failure and the broker added.
fn redriven_properties(fetched: &Fetched) -> lapin::BasicProperties {
    let from = &fetched.properties;
    let mut properties = lapin::BasicProperties::default().with_headers(redriven_headers(fetched));
    if let Some(v) = from.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = from.content_encoding() {
        properties = properties.with_content_encoding(v.clone());
    }
    if let Some(v) = from.delivery_mode() {
        properties = properties.with_delivery_mode(*v);
    }
    if let Some(v) = from.priority() {
        properties = properties.with_priority(*v);
    }
    if let Some(v) = from.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = from.reply_to() {
        properties = properties.with_reply_to(v.clone());
    }
    if let Some(v) = from.expiration() {
        properties = properties.with_expiration(v.clone());
    }
    if let Some(v) = from.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = from.timestamp() {
        properties = properties.with_timestamp(*v);
    }
    if let Some(v) = from.kind() {
        properties = properties.with_type(v.clone());
    }
    if let Some(v) = from.app_id() {
        properties = properties.with_app_id(v.clone());
    }
    properties
}

/// The message's headers without what its failure added (`MT-Fault-*`, `MT-Reason`) and what
/// the broker added (`x-death`, `x-delivery-count`, `x-first-death-*`...), and with its
/// redrives counted.
fn redriven_headers(fetched: &Fetched) -> FieldTable {
    let mut headers: BTreeMap<ShortString, AMQPValue> = BTreeMap::new();
    let mut count = 0i64;
    if let Some(table) = fetched.properties.headers() {
        for (name, value) in table {
            let text = name.as_str();
            if text == REDRIVE_COUNT {
                count = match value {
                    AMQPValue::LongLongInt(n) => *n,
                    AMQPValue::LongInt(n) => i64::from(*n),
                    _ => 0,
                };
            } else if !text.starts_with("MT-Fault-") && text != "MT-Reason" && !text.starts_with("x-") {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    headers.insert(REDRIVE_COUNT.into(), AMQPValue::LongLongInt(count.saturating_add(1)));
    FieldTable::from(headers)
}
