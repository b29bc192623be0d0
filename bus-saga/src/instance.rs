//! A saga instance: the user's state plus correlation id, current state and version.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Name of the state a new instance starts in.
pub const INITIAL: &str = "Initial";
/// Name of the state `finalize()` moves to.
pub const FINAL: &str = "Final";

/// One saga instance, as stored: `{"correlationId":..,"currentState":..,"version":..,"appliedEvents":[..],<your fields>}`.
///
/// Your state's fields share that object, so none may be named `correlationId`,
/// `currentState`, `version` or `appliedEvents`: the Redis repository refuses such state with
/// [`Error::ReservedField`](crate::Error::ReservedField) (the in-memory one never
/// serializes it, and cannot tell).
///
/// ```
/// use bus_saga::SagaInstance;
/// #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
/// #[serde(rename_all = "camelCase")]
/// struct OrderState { processing_id: Option<uuid::Uuid> }
///
/// let instance = SagaInstance::new(uuid::Uuid::nil(), OrderState::default());
/// let json = serde_json::to_value(&instance).unwrap();
/// assert_eq!(json["currentState"], "Initial");
/// assert_eq!(json["version"], 0);
/// assert!(json.get("processingId").is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SagaInstance<S> {
    /// The instance's id: what events correlate on.
    pub correlation_id: Uuid,
    /// The state it is in.
    pub current_state: String,
    /// Optimistic concurrency version: 0 before the first save, then 1, 2...
    pub version: u64,
    /// The latest events applied (oldest first, at most the machine's
    /// [`duplicate_window`](crate::StateMachineBuilder::duplicate_window)) and what their
    /// transitions produced, saved with the state they led to. Delivered again (its messages
    /// could not all leave, or its ack was lost), such an event sends those messages again
    /// instead of meeting a state the instance has moved past, even after later events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_events: Vec<AppliedEvent>,
    /// Your data.
    #[serde(flatten)]
    pub data: S,
}

/// An event applied to an instance: its message id and the messages its transition produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedEvent {
    /// The event's message id.
    pub message_id: Uuid,
    /// The event's URN: one delivery can reach several event types of a saga (a message
    /// listing several contracts), each applied on its own.
    pub event_type: String,
    /// What the transition published, sent or responded, in order (not stored when none:
    /// most events produce nothing, and every instance keeps several of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub produced: Vec<StoredMessage>,
}

/// A message a transition produced, as stored with its instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredMessage {
    /// How it leaves.
    pub kind: crate::ProducedKind,
    /// Its URN.
    pub message_type: String,
    /// Its message id: sent again, it keeps it, so receivers can tell it is the same message.
    pub message_id: Uuid,
    /// The message.
    pub message: serde_json::Value,
}

/// The names the instance itself takes in its JSON.
const RESERVED: [&str; 4] = ["correlationId", "currentState", "version", "appliedEvents"];

/// Checks that the state's own fields do not collide with the instance's when stored as one
/// JSON object (they would: two `version` keys, say, and the stored instance would not load).
/// For the repositories that store it so.
///
/// ```
/// #[derive(serde::Serialize)]
/// struct Bad { version: u32 }
/// assert!(bus_saga::check_state_fields(&Bad { version: 1 }).is_err());
/// ```
pub fn check_state_fields<S: Serialize>(data: &S) -> crate::Result<()> {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(data) {
        if let Some(reserved) = RESERVED.into_iter().find(|name| fields.contains_key(*name)) {
            return Err(crate::Error::ReservedField(reserved));
        }
    }
    Ok(())
}

impl<S> SagaInstance<S> {
    /// A new instance in the initial state.
    pub fn new(correlation_id: Uuid, data: S) -> Self {
        SagaInstance { correlation_id, current_state: INITIAL.to_owned(), version: 0, applied_events: Vec::new(), data }
    }

    /// The applied event with this message id and type, if it is among the latest kept.
    pub fn applied(&self, message_id: Uuid, event_type: &str) -> Option<&AppliedEvent> {
        self.applied_events.iter().rev().find(|e| e.message_id == message_id && e.event_type == event_type)
    }

    /// Records `event` as applied, keeping the latest `window` events.
    pub(crate) fn record_applied(&mut self, event: AppliedEvent, window: usize) {
        self.applied_events.push(event);
        let excess = self.applied_events.len().saturating_sub(window);
        self.applied_events.drain(..excess);
    }

    /// Whether the instance is in `state`.
    pub fn is_in(&self, state: &str) -> bool {
        self.current_state == state
    }
}
