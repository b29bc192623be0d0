//! `Fault<T>`: what the bus says when a message finally failed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::message::interned_types;
use crate::{HostInfo, Message};

/// URN of the untyped fault every fault also carries.
pub const FAULT_URN: &str = "urn:message:MassTransit:Fault";

/// The fault URN of a message URN: `urn:message:MassTransit:Fault[[Ns:Type]]`.
///
/// ```
/// assert_eq!(bus_core::fault::fault_urn("urn:message:Shop:OrderPlaced"),
///            "urn:message:MassTransit:Fault[[Shop:OrderPlaced]]");
/// ```
pub fn fault_urn(urn: &str) -> String {
    format!("urn:message:MassTransit:Fault[[{}]]", urn.strip_prefix("urn:message:").unwrap_or(urn))
}

/// One error of a fault, as MassTransit's `ExceptionInfo`, its members in MassTransit v8's
/// order (nulls written, missing ones read as absent, as MassTransit 5 to 7 left them out).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExceptionInfo {
    /// Error type.
    pub exception_type: String,
    /// The error it wraps, if any (.NET's `InnerException`).
    #[serde(default)]
    pub inner_exception: Option<Box<ExceptionInfo>>,
    /// Where it happened; for us the error's cause chain.
    #[serde(default)]
    pub stack_trace: Option<String>,
    /// Error message.
    #[serde(default)]
    pub message: String,
    /// The consumer type that failed.
    #[serde(default)]
    pub source: Option<String>,
    /// .NET's `Exception.Data`.
    #[serde(default)]
    pub data: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A message that finally failed, with why: MassTransit's `Fault<T>`.
///
/// Consume `Fault<T>` to react to failures of `T`; a request client gets it back as
/// [`Error::RequestFaulted`](crate::Error::RequestFaulted).
///
/// ```
/// use bus_core::{Fault, Message};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Serialize, Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:OrderPlaced")]
/// # struct OrderPlaced { order_id: u32 }
/// assert_eq!(Fault::<OrderPlaced>::message_types(),
///            ["urn:message:MassTransit:Fault[[Shop:OrderPlaced]]", "urn:message:MassTransit:Fault"]);
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault<T> {
    /// Id of this fault.
    pub fault_id: Uuid,
    /// Id of the message that failed.
    pub faulted_message_id: Option<Uuid>,
    /// When it failed (written with seven fraction digits, as MassTransit).
    #[serde(serialize_with = "dotnet_time", deserialize_with = "crate::envelope::read_time")]
    pub timestamp: DateTime<Utc>,
    /// Why it failed.
    #[serde(default)]
    pub exceptions: Vec<ExceptionInfo>,
    /// The process where it failed.
    #[serde(default)]
    pub host: HostInfo,
    /// The URNs of the message that failed.
    #[serde(default)]
    pub fault_message_types: Vec<String>,
    /// The message that failed.
    pub message: T,
}

fn dotnet_time<S: serde::Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&crate::envelope::format_time(time))
}

impl<T: Message> Message for Fault<T> {
    fn message_types() -> &'static [&'static str] {
        interned_types::<Fault<T>>(|| {
            T::message_types().iter().map(|t| fault_urn(t)).chain([FAULT_URN.to_owned()]).collect()
        })
    }
}
