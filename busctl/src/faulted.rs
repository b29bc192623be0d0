//! What an error queue holds, as MassTransit's headers and envelope say it.

use std::io::Write;

use bus_core::TransportMessage;
use lapin::Connection;

use crate::scan::QueueScan;
use crate::Result;

/// One message of an error (or skipped) queue.
pub(crate) struct Faulted {
    pub(crate) message_id: String,
    pub(crate) message_type: String,
    pub(crate) reason: String,
    pub(crate) exception_type: String,
    pub(crate) exception_message: String,
    pub(crate) fault_time: String,
}

impl Faulted {
    pub(crate) fn of(message: &TransportMessage) -> Self {
        let envelope: Option<serde_json::Value> = serde_json::from_slice(&message.body).ok();
        let from_envelope = |name: &str| {
            envelope.as_ref().and_then(|e| e.get(name)).and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(items) => items.first().and_then(|i| i.as_str()).map(str::to_owned),
                _ => None,
            })
        };
        let header = |name: &str| message.headers.get_str(name).map(str::to_owned);
        Faulted {
            message_id: message
                .message_id
                .map(|id| id.to_string())
                .or_else(|| from_envelope("messageId"))
                .unwrap_or_default(),
            message_type: header("MT-Fault-MessageType").or_else(|| from_envelope("messageType")).unwrap_or_default(),
            reason: header("MT-Reason").unwrap_or_default(),
            exception_type: header("MT-Fault-ExceptionType").unwrap_or_default(),
            exception_message: header("MT-Fault-Message").unwrap_or_default(),
            fault_time: header("MT-Fault-Timestamp").unwrap_or_default(),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "messageId": self.message_id,
            "messageType": self.message_type,
            "reason": self.reason,
            "exceptionType": self.exception_type,
            "exceptionMessage": self.exception_message,
            "faultTimestamp": self.fault_time,
        })
    }
}

/// Every message of `queue`, read and left in place, with what its headers say.
pub(crate) async fn read_all(connection: &Connection, queue: &str) -> Result<Vec<(Faulted, TransportMessage)>> {
    let mut scan = QueueScan::open(connection, queue).await?;
    let mut found = Vec::new();
    while let Some(fetched) = scan.next().await? {
        found.push((Faulted::of(&fetched.message), fetched.message));
    }
    scan.finish().await?;
    Ok(found)
}

/// `busctl errors`: every message of `<endpoint>_error`, one line each (or one JSON array).
pub(crate) async fn list(connection: &Connection, endpoint: &str, json: bool, out: &mut impl Write) -> Result<()> {
    let found: Vec<Faulted> =
        read_all(connection, &format!("{endpoint}_error")).await?.into_iter().map(|(f, _)| f).collect();
    if json {
        let all: Vec<serde_json::Value> = found.iter().map(Faulted::json).collect();
        writeln!(out, "{}", serde_json::Value::Array(all))?;
        return Ok(());
    }
    for f in &found {
        use crate::redrive::shown;
        writeln!(
            out,
            "{}\t{}\t{}\t{}: {}\t{}",
            shown(&f.message_id),
            shown(&f.message_type),
            shown(&f.reason),
            shown(&f.exception_type),
            shown(&f.exception_message),
            shown(&f.fault_time)
        )?;
    }
    writeln!(out, "{} messages in {endpoint}_error", found.len())?;
    Ok(())
}
