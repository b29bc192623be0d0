//! Messages and their MassTransit type names (URNs).

use crate::sync::RwLockExt;
use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

/// A message type: serde data with a stable MassTransit URN.
///
/// Derive it; the URN defaults to `urn:message:{crate name}:{TypeName}` and is usually set
/// explicitly so that .NET services agree on it:
///
/// ```
/// use bus_core::Message;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// #[serde(rename_all = "camelCase")]
/// #[message(urn = "urn:message:DistributedAppWithMassTransitShared:NewOrderEvent")]
/// struct NewOrderEvent {
///     user_email: String,
/// }
///
/// // A message may carry contracts it implements; consumers of those receive it too.
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// #[message(namespace = "Shop", implements("urn:message:Shop:OrderEvent"))]
/// struct OrderShipped {
///     order_id: uuid::Uuid,
/// }
///
/// assert_eq!(NewOrderEvent::message_type(), "urn:message:DistributedAppWithMassTransitShared:NewOrderEvent");
/// assert_eq!(OrderShipped::message_types(), ["urn:message:Shop:OrderShipped", "urn:message:Shop:OrderEvent"]);
/// ```
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Every URN this message carries, its own first, then the contracts it implements.
    ///
    /// Must not be empty.
    fn message_types() -> &'static [&'static str];

    /// The message's own URN.
    fn message_type() -> &'static str {
        // The derive always writes the own URN first; an empty hand-written list is a
        // programming error caught by the first test that sends the type.
        Self::message_types().first().copied().unwrap_or("urn:message:Unknown:Unknown")
    }

    /// The `correlationId` the envelope carries for this message, if it has one.
    fn correlation_id(&self) -> Option<Uuid> {
        None
    }

    /// The message as protobuf, for prost messages declared with `#[message(protobuf)]`.
    fn to_protobuf(&self) -> Option<Vec<u8>> {
        None
    }

    /// Reads the message from protobuf; `None` when it is not a prost message or the bytes
    /// do not decode.
    fn from_protobuf(bytes: &[u8]) -> Option<Self>
    where
        Self: Sized,
    {
        let _ = bytes;
        None
    }
}

/// The MassTransit exchange (entity) name of a message URN: `Ns:Type`, generics as `Name--Ns:Arg--`.
///
/// ```
/// use bus_core::message::entity_name;
/// assert_eq!(entity_name("urn:message:Shop:OrderPlaced"), "Shop:OrderPlaced");
/// assert_eq!(entity_name("urn:message:MassTransit:Fault[[Shop:OrderPlaced]]"), "MassTransit:Fault--Shop:OrderPlaced--");
/// ```
pub fn entity_name(urn: &str) -> String {
    let name = urn.strip_prefix("urn:message:").unwrap_or(urn);
    // Only generic types' URNs have brackets; the others need no search-and-replace.
    if name.contains('[') || name.contains(']') {
        name.replace("[[", "--").replace("]]", "--")
    } else {
        name.to_owned()
    }
}

/// Interns URN lists computed at run time for generic message types such as `Fault<T>`,
/// so that their [`Message::message_types`] can return `'static` names.
///
/// Each generic instantiation is computed once and kept for the life of the process; the
/// set is bounded by the types in the program, never by input from the wire.
///
/// ```
/// use bus_core::message::interned_types;
/// struct Wrapper<T>(T);
/// fn urns<T: 'static>(inner: &str) -> &'static [&'static str] {
///     interned_types::<Wrapper<T>>(|| vec![format!("urn:message:Shop:Wrapper[[{inner}]]")])
/// }
/// assert_eq!(urns::<u8>("Shop:A"), ["urn:message:Shop:Wrapper[[Shop:A]]"]);
/// // Computed once per type: the second call returns the first list.
/// assert_eq!(urns::<u8>("ignored"), ["urn:message:Shop:Wrapper[[Shop:A]]"]);
/// ```
pub fn interned_types<T: 'static>(make: impl FnOnce() -> Vec<String>) -> &'static [&'static str] {
    static CACHE: OnceLock<RwLock<HashMap<TypeId, &'static [&'static str]>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = TypeId::of::<T>();
    if let Some(found) = cache.read_locked().get(&key) {
        return found;
    }
    let mut write = cache.write_locked();
    write.entry(key).or_insert_with(|| {
        let list: Vec<&'static str> = make().into_iter().map(|s| &*Box::leak(s.into_boxed_str())).collect();
        Box::leak(list.into_boxed_slice())
    })
}

/// Turns a message field into a correlation id; used by `#[message(correlation_id = "...")]`.
#[doc(hidden)]
pub trait ToCorrelationId {
    fn to_correlation_id(&self) -> Option<Uuid>;
}

impl ToCorrelationId for Uuid {
    fn to_correlation_id(&self) -> Option<Uuid> {
        Some(*self)
    }
}

impl ToCorrelationId for Option<Uuid> {
    fn to_correlation_id(&self) -> Option<Uuid> {
        *self
    }
}
