//! A scheduler service for MassTransit senders: the `ScheduleMessage` and
//! `CancelScheduledMessage` commands a .NET service sends to its scheduler's queue (as to
//! MassTransit's Quartz or Hangfire service), handled with the bus's [`MessageScheduler`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::headers::names::SCHEDULING_TOKEN_ID;
use crate::outbox::Route;
use crate::scheduling::{MessageScheduler, ScheduledMessage};
use crate::{address, BoxError, ConsumeContext, Consumer, Endpoint, Error, Message, Permanent, PreparedMessage};

/// MassTransit's `ScheduleMessage` command (`MassTransit.Scheduling`): deliver `payload`
/// to `destination` at `scheduled_time`, under the token `correlation_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleMessage {
    /// The token the message is scheduled (and cancelled) under.
    pub correlation_id: Uuid,
    /// When to deliver it (UTC; a .NET time without a zone is read as UTC).
    #[serde(deserialize_with = "crate::envelope::read_time")]
    pub scheduled_time: DateTime<Utc>,
    /// The payload's message types, its own first.
    pub payload_type: Vec<String>,
    /// Where to send it: an address (`rabbitmq://host/vhost/queue`, `queue:name`).
    pub destination: String,
    /// The message to deliver, as it came (numbers beyond `f64` kept exact).
    pub payload: Box<RawValue>,
}

impl Message for ScheduleMessage {
    fn message_types() -> &'static [&'static str] {
        &["urn:message:MassTransit.Scheduling:ScheduleMessage"]
    }

    fn correlation_id(&self) -> Option<Uuid> {
        Some(self.correlation_id)
    }
}

/// MassTransit's `CancelScheduledMessage` command: cancel what waits under `token_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelScheduledMessage {
    /// The command's own id.
    pub correlation_id: Uuid,
    /// When it was sent.
    #[serde(default, deserialize_with = "dotnet_utc_option")]
    pub timestamp: Option<DateTime<Utc>>,
    /// The token of the scheduled message to cancel.
    pub token_id: Uuid,
}

impl Message for CancelScheduledMessage {
    fn message_types() -> &'static [&'static str] {
        &["urn:message:MassTransit.Scheduling:CancelScheduledMessage"]
    }

    fn correlation_id(&self) -> Option<Uuid> {
        Some(self.correlation_id)
    }
}

fn dotnet_utc_option<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.as_deref().and_then(crate::envelope::parse_time))
}

/// Consumes MassTransit's scheduling commands and hands them to the bus's scheduler, so
/// that a Rust service stands in for MassTransit's Quartz or Hangfire scheduler service.
///
/// The delivered message is what the Quartz service delivers: the payload as the message,
/// under its payload types, with the command's message id, conversation, correlation,
/// initiator and request ids, addresses, expiration and headers, and the token in
/// `MT-Scheduling-TokenId`. A command scheduled again under a waiting token replaces it.
///
/// ```
/// use bus_core::{Bus, SchedulerService};
/// # let scheduler = bus_inmemory::InMemoryScheduler::new();
/// // .NET senders configured with `UseMessageScheduler(new Uri("queue:quartz"))`:
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new())
///     .scheduler(scheduler)
///     .endpoint(SchedulerService::endpoint("quartz"))
///     .build();
/// # drop(bus);
/// ```
#[derive(Debug, Clone, Copy, Default)]
#[doc(alias = "ScheduleMessageConsumer")]
#[doc(alias = "CancelScheduledMessageConsumer")]
pub struct SchedulerService;

impl SchedulerService {
    /// An endpoint named `name` (MassTransit's default: `quartz`, or `hangfire`) that
    /// consumes both commands. The bus needs a [`MessageScheduler`].
    pub fn endpoint(name: impl Into<String>) -> Endpoint {
        Endpoint::new(name)
            .consumer::<ScheduleMessage, _>(SchedulerService)
            .consumer::<CancelScheduledMessage, _>(SchedulerService)
    }
}

fn scheduler(ctx: &crate::ReceiveContext) -> Result<&dyn MessageScheduler, BoxError> {
    ctx.bus().inner.scheduler.as_deref().ok_or_else(|| {
        Permanent::new(Error::Configuration("no message scheduler: add one with BusBuilder::scheduler".to_owned()))
            .into()
    })
}

impl Consumer<ScheduleMessage> for SchedulerService {
    async fn consume(&self, ctx: ConsumeContext<ScheduleMessage>) -> Result<(), BoxError> {
        let command = ctx.message();
        let name = address::entity_name(&command.destination).map_err(Permanent::new)?.to_owned();
        if command.payload_type.is_empty() {
            return Err(Permanent::new(Error::Configuration("ScheduleMessage without a payloadType".to_owned())).into());
        }
        // The command's envelope, its ids and headers kept, carrying the payload instead.
        let mut envelope = ctx.envelope().clone();
        envelope.message_type.clone_from(&command.payload_type);
        envelope.message = command.payload.clone();
        envelope.binary = None;
        envelope.destination_address = Some(command.destination.clone());
        envelope.headers.insert(SCHEDULING_TOKEN_ID, command.correlation_id.to_string());
        let bus = ctx.bus();
        let prepared: PreparedMessage = bus.inner.outgoing(Route::Send(name), envelope)?.into();
        let scheduled =
            ScheduledMessage { token: command.correlation_id, due: command.scheduled_time.into(), message: prepared };
        scheduler(&ctx)?.schedule(scheduled).await?;
        tracing::debug!(token = %command.correlation_id, destination = %command.destination, due = %command.scheduled_time, "MassTransit ScheduleMessage scheduled");
        Ok(())
    }
}

impl Consumer<CancelScheduledMessage> for SchedulerService {
    async fn consume(&self, ctx: ConsumeContext<CancelScheduledMessage>) -> Result<(), BoxError> {
        let token = ctx.message().token_id;
        let cancelled = scheduler(&ctx)?.cancel(token).await?;
        tracing::debug!(%token, cancelled, "MassTransit CancelScheduledMessage");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduled time as .NET writes it: with `Z`, with an offset, or without a zone
    /// (`DateTimeKind.Unspecified`), which is taken as UTC.
    #[test]
    fn scheduled_times_with_and_without_a_zone() {
        let read = |time: &str| {
            let json = format!(
                r#"{{"correlationId":"{}","scheduledTime":"{time}","payloadType":["urn:message:A:B"],"destination":"queue:b","payload":{{}}}}"#,
                Uuid::nil()
            );
            serde_json::from_str::<ScheduleMessage>(&json).map(|m| m.scheduled_time).ok()
        };
        let utc = read("2026-12-06T17:30:00.1234567Z").expect("Z");
        assert_eq!(utc.timestamp_nanos_opt(), Some(1_796_578_200_123_456_700));
        assert_eq!(read("2026-12-06T17:30:00.1234567"), Some(utc));
        assert_eq!(read("2026-12-06T18:30:00.1234567+01:00"), Some(utc));
        assert_eq!(read("tomorrow"), None);
    }
}
