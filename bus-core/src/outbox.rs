//! The in-memory outbox: messages produced while consuming, held until the consume succeeds.

use crate::sync::MutexExt;
use std::sync::{Arc, Mutex};

use crate::{Envelope, TransportMessage};

/// The URNs a message is published under.
#[derive(Debug, Clone)]
pub(crate) enum MessageTypes {
    Static(&'static [&'static str]),
    Owned(Vec<String>),
}

impl MessageTypes {
    /// The first URN when it is one of the bus's own (no allocation for its metric).
    pub(crate) fn first_static(&self) -> Option<&'static str> {
        match self {
            MessageTypes::Static(types) => types.first().copied(),
            MessageTypes::Owned(_) => None,
        }
    }
}

/// Where an outgoing message goes.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    Publish(MessageTypes),
    Send(String),
}

/// A serialized message waiting to leave. It travels boxed ([`Boxed`]): it is large, and
/// on its way to the transport it passes through several futures, each of which would
/// otherwise copy it.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) route: Route,
    pub(crate) envelope: Envelope,
    pub(crate) message: TransportMessage,
}

/// How an [`Outgoing`] travels.
pub(crate) type Boxed = Box<Outgoing>;

/// What an outbox holds, and whether it was released.
#[derive(Debug, Default)]
struct Held {
    messages: Vec<Boxed>,
    /// Set when the held messages were taken for release (every consumer of the message
    /// succeeded): a message produced after that (by a task the consumer left running)
    /// leaves at once instead of waiting for a release that already happened.
    released: bool,
}

/// Messages held for one consume attempt; `None` when the outbox is off and messages leave at once.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outbox(Option<Arc<Mutex<Held>>>);

impl Outbox {
    pub(crate) fn new(enabled: bool) -> Self {
        Outbox(enabled.then(Default::default))
    }

    fn held(&self) -> Option<std::sync::MutexGuard<'_, Held>> {
        self.0.as_ref().map(|held| held.locked())
    }

    /// Holds `outgoing`, or hands it back when it is to leave now (the outbox is off, or
    /// was already released).
    pub(crate) fn hold(&self, outgoing: Boxed) -> Option<Boxed> {
        match self.held() {
            Some(mut held) if !held.released => {
                held.messages.push(outgoing);
                None
            }
            _ => Some(outgoing),
        }
    }

    /// Drops everything held: the attempt failed.
    pub(crate) fn discard(&self) {
        if let Some(mut held) = self.held() {
            held.messages.clear();
        }
    }

    /// Takes everything held, without releasing: what comes after is held too.
    pub(crate) fn take(&self) -> Vec<Boxed> {
        self.held().map(|mut held| std::mem::take(&mut held.messages)).unwrap_or_default()
    }

    /// Takes everything held, to be released now that every consumer of the message
    /// succeeded; from here on, messages leave at once.
    pub(crate) fn release(&self) -> Vec<Boxed> {
        match self.held() {
            Some(mut held) => {
                held.released = true;
                std::mem::take(&mut held.messages)
            }
            None => Vec::new(),
        }
    }
}
