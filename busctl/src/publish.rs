use std::io::Write;

use bus_core::serializer::{MassTransitJsonSerializer, Serializer as _};
use bus_core::{Envelope, Transport as _};
use bus_rabbitmq::RabbitMqTransport;

use crate::{Error, Result};

/// `busctl publish`: the JSON in `file` published as message type `urn`, in MassTransit's
/// envelope, as the bus publishes it (to the type's exchange, confirmed).
pub(crate) async fn publish(addr: &str, urn: &str, file: &std::path::Path, out: &mut impl Write) -> Result<()> {
    let text = std::fs::read_to_string(file)?;
    let message = serde_json::value::RawValue::from_string(text)
        .map_err(|e| Error::Usage(format!("{} is not JSON: {e}", file.display())))?;
    if !urn.starts_with("urn:message:") {
        return Err(Error::Usage(format!("`{urn}` is not a message type (urn:message:Namespace:Type)")));
    }
    let envelope = Envelope::new(vec![urn.to_owned()], message);
    let id = envelope.message_id;
    let serialized = MassTransitJsonSerializer.serialize(&envelope)?;
    let transport = RabbitMqTransport::connect(addr).await?;
    let published = transport.publish(&[urn], serialized).await;
    transport.close().await;
    published?;
    writeln!(out, "published {} as {urn}", id.map(|id| id.to_string()).unwrap_or_default())?;
    Ok(())
}
