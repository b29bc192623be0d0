//! The in-memory outbox: messages produced while consuming, held until the consume succeeds.

use std::sync::{Arc, Mutex};

use crate::{Envelope, TransportMessage};

/// The URNs a message is published under.
#[derive(Debug, Clone)]
pub(crate) enum MessageTypes {
    Static(&'static [&'static str]),
    Owned(Vec<String>),
}

/// Where an outgoing message goes.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    Publish(MessageTypes),
    Send(String),
}

/// A serialized message waiting to leave.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) route: Route,
    pub(crate) envelope: Envelope,
    pub(crate) message: TransportMessage,
}

/// Messages held for one consume attempt; `None` when the outbox is off and messages leave at once.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outbox(Option<Arc<Mutex<Vec<Outgoing>>>>);

impl Outbox {
    pub(crate) fn new(enabled: bool) -> Self {
        Outbox(enabled.then(Default::default))
    }

    /// Holds `outgoing`, or hands it back when the outbox is off.
    pub(crate) fn hold(&self, outgoing: Outgoing) -> Option<Outgoing> {
        match &self.0 {
            Some(held) => {
                held.lock().unwrap_or_else(|e| e.into_inner()).push(outgoing);
                None
            }
            None => Some(outgoing),
        }
    }

    /// Drops everything held: the attempt failed.
    pub(crate) fn discard(&self) {
        if let Some(held) = &self.0 {
            held.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Takes everything held, to be released after the consume succeeded.
    pub(crate) fn take(&self) -> Vec<Outgoing> {
        match &self.0 {
            Some(held) => std::mem::take(&mut *held.lock().unwrap_or_else(|e| e.into_inner())),
            None => Vec::new(),
        }
    }
}
