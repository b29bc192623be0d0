//! Request/response: a request carries a `requestId` and the bus's address; the response
//! comes back to the bus's own endpoint and completes the waiting request.

use crate::sync::MutexExt;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Bus, BusInner};
use crate::dead_letter;
use crate::fault::FAULT_URN;
use crate::{DeliveryStream, Envelope, Error, Message, Result, SendOptions, Settlement, DEFAULT_MAX_MESSAGE_SIZE};

/// A typed response to a request.
#[derive(Debug)]
pub struct Response<R> {
    message: R,
    envelope: Envelope,
}

impl<R> Response<R> {
    /// The response message.
    pub fn message(&self) -> &R {
        &self.message
    }

    /// Takes the response message.
    pub fn into_message(self) -> R {
        self.message
    }

    /// The response's envelope (ids, headers).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }
}

/// Sends requests of type `M` and awaits their responses.
///
/// By default a request is published; with [`with_destination`](Self::with_destination)
/// it is sent to one endpoint. A response that does not come within the timeout is
/// [`Error::RequestTimeout`]; a consumer that faulted is [`Error::RequestFaulted`].
pub struct RequestClient<M> {
    bus: Bus,
    destination: Option<String>,
    timeout: Duration,
    _message: PhantomData<fn(M)>,
}

impl<M> fmt::Debug for RequestClient<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestClient").field("destination", &self.destination).field("timeout", &self.timeout).finish()
    }
}

impl<M: Message> RequestClient<M> {
    /// Sends requests to `address` instead of publishing them.
    pub fn with_destination(mut self, address: impl Into<String>) -> Self {
        self.destination = Some(address.into());
        self
    }

    /// How long to wait for a response.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends the request and waits for a response of type `R`.
    pub async fn request<R: Message>(&self, message: M) -> Result<Response<R>> {
        self.request_with(message, SendOptions::default()).await
    }

    /// Sends the request with options and waits for a response of type `R`.
    pub async fn request_with<R: Message>(&self, message: M, mut options: SendOptions) -> Result<Response<R>> {
        let inner = &self.bus.inner;
        inner.ensure_answerable()?;
        let request_id = Uuid::now_v7();
        options.request_id = Some(request_id);
        options.response_address = Some(inner.address.clone());
        let (tx, rx) = oneshot::channel();
        inner.pending.locked().insert(request_id, tx);
        let _pending = PendingGuard { inner, request_id };
        match &self.destination {
            Some(address) => self.bus.send_with(address, message, options).await?,
            None => self.bus.publish_with(message, options).await?,
        }
        let envelope = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(envelope)) => envelope,
            Ok(Err(_)) => return Err(Error::Stopped),
            Err(_) => return Err(Error::RequestTimeout { request_type: M::message_type(), timeout: self.timeout }),
        };
        response_from(envelope)
    }
}

/// Removes a request from the pending map however the wait ends.
struct PendingGuard<'a> {
    inner: &'a BusInner,
    request_id: Uuid,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.inner.pending.locked().remove(&self.request_id);
    }
}

fn response_from<R: Message>(envelope: Envelope) -> Result<Response<R>> {
    if envelope.has_message_type(R::message_type()) {
        let message = envelope.message_of()?;
        return Ok(Response { message, envelope });
    }
    if envelope.message_type.iter().any(|t| t.starts_with(FAULT_URN)) {
        #[derive(serde::Deserialize)]
        struct FaultView {
            #[serde(default)]
            exceptions: Vec<crate::fault::ExceptionInfo>,
        }
        let fault: FaultView = envelope.message_as()?;
        let first = fault.exceptions.into_iter().next();
        return Err(Error::RequestFaulted {
            exception_type: first.as_ref().map_or_else(|| "Unknown".to_owned(), |e| e.exception_type.clone()),
            message: first.map_or_else(|| "the request faulted".to_owned(), |e| e.message),
        });
    }
    Err(Error::deserialize(format!("expected a {} response, got {:?}", R::message_type(), envelope.message_type), None))
}

impl Bus {
    /// A client for requests of type `M`, with the bus's default timeout.
    pub fn request_client<M: Message>(&self) -> RequestClient<M> {
        RequestClient {
            bus: self.clone(),
            destination: None,
            timeout: self.inner.request_timeout,
            _message: PhantomData,
        }
    }

    /// Publishes a request and waits for its response (see [`RequestClient`]).
    pub async fn request<M: Message, R: Message>(&self, message: M) -> Result<Response<R>> {
        self.request_client::<M>().request(message).await
    }
}

/// Consumes the bus's own endpoint: every message there answers a pending request.
///
/// What answers none goes where MassTransit's bus endpoint puts it: a message that cannot be
/// read to the endpoint's `_error` queue with the reason, a response whose requester is gone
/// (it timed out, say) to `_skipped`. Those two queues are declared when first needed, and
/// again after a move to them fails (deleted meanwhile, or lost with a broker reset).
pub(super) async fn run_response_endpoint(bus: Bus, mut deliveries: DeliveryStream, stop: CancellationToken) {
    enum Outcome {
        Answered,
        Unanswered(Option<Uuid>),
        Unreadable(Error),
    }
    let inner = &bus.inner;
    let topology = &inner.response_topology;
    let mut dead_letters_declared = false;
    loop {
        let delivery = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            next = deliveries.next() => match next {
                Some(delivery) => delivery,
                None => break,
            },
        };
        let size = delivery.message().body.len();
        let read = if size > DEFAULT_MAX_MESSAGE_SIZE {
            // As on any endpoint: not read at all.
            Err(Error::MessageTooLarge { size, limit: DEFAULT_MAX_MESSAGE_SIZE })
        } else {
            inner.serializers.deserialize(delivery.message())
        };
        let outcome = match read {
            Ok(envelope) => {
                let request_id = envelope.request_id;
                let waiting = request_id.and_then(|id| inner.pending.locked().remove(&id));
                // The requester may have given up just now; then the response has nobody to go to.
                match waiting.map(|tx| tx.send(envelope).is_ok()) {
                    Some(true) => Outcome::Answered,
                    _ => Outcome::Unanswered(request_id),
                }
            }
            Err(error) => Outcome::Unreadable(error),
        };
        if !matches!(outcome, Outcome::Answered) && !dead_letters_declared {
            match inner.transport.declare_dead_letter_queues(topology).await {
                Ok(()) => dead_letters_declared = true,
                Err(error) if error.is_transient() => {
                    // The broker is unreachable: the message comes back, and declaring is tried again.
                    tracing::warn!(%error, "could not declare the response endpoint's dead-letter queues; message requeued");
                    let _ = delivery.settle(Settlement::Requeue).await;
                    continue;
                }
                Err(_) if stop.is_cancelled() => {
                    // Stopping (the transport may be closing): left unsettled, the message goes
                    // back to its queue.
                    break;
                }
                Err(error) => {
                    // Refused for good (a queue of that name exists with other arguments):
                    // moving would fail and requeue the message, round and round, on an
                    // endpoint whose messages go with it when the bus stops anyway.
                    tracing::error!(%error, "the response endpoint's dead-letter queues are refused; message dropped");
                    let _ = delivery.settle(Settlement::Ack).await;
                    continue;
                }
            }
        }
        let settlement = match outcome {
            Outcome::Answered => Settlement::Ack,
            Outcome::Unanswered(request_id) => {
                tracing::info!(?request_id, "response for no pending request moved to the skipped queue");
                dead_letter::skipped(&bus, topology, delivery.message())
            }
            Outcome::Unreadable(error) => {
                let kind = dead_letter::unreadable_type(&error);
                dead_letter::unreadable(&bus, topology, &inner.address, delivery.message(), kind, &error)
            }
        };
        let moving = matches!(settlement, Settlement::MoveTo { .. });
        if let Err(error) = delivery.settle(settlement).await {
            // The message went back to its queue; a dead-letter queue may be gone, so the
            // next one to move declares them again.
            dead_letters_declared &= !moving;
            tracing::warn!(%error, "could not settle a delivery on the response endpoint");
        }
    }
}
