//! Request/response: a request carries a `requestId` and the bus's address; the response
//! comes back to the bus's own endpoint and completes the waiting request.

use crate::sync::MutexExt;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{Bus, BusInner};
use crate::consumer::ErasedConsumer;
use crate::fault::FAULT_URN;
use crate::{ConsumeError, ConsumeErrorKind, Envelope, Error, Message, ReceiveContext, Result, SendOptions};

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
    pub async fn request_with<R: Message>(&self, message: M, options: SendOptions) -> Result<Response<R>> {
        let envelope = self.send_and_wait(message, options, &[R::message_type()]).await?;
        response_from(envelope)
    }

    /// Sends the request and waits for a response of either type, as MassTransit's
    /// `GetResponse<T1, T2>`: a responder may answer `OrderAccepted` or `OrderRejected`. Both
    /// are listed in the request's `MT-Request-AcceptType`.
    ///
    /// ```
    /// use bus_core::{ConsumeContext, Endpoint, EitherResponse, Message};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Serialize, Deserialize, Message)] #[message(urn = "urn:message:Shop:SubmitOrder")] struct SubmitOrder { total: u32 }
    /// # #[derive(Debug, Serialize, Deserialize, Message)] #[message(urn = "urn:message:Shop:OrderAccepted")] struct OrderAccepted;
    /// # #[derive(Debug, Serialize, Deserialize, Message)] #[message(urn = "urn:message:Shop:OrderRejected")] struct OrderRejected { reason: String }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), bus_core::BoxError> {
    /// let harness = bus_inmemory::InMemoryTestHarness::start(|bus| {
    ///     bus.endpoint(Endpoint::new("orders").handler(|ctx: ConsumeContext<SubmitOrder>| async move {
    ///         if ctx.message().total > 100 {
    ///             ctx.respond(OrderRejected { reason: "over the limit".into() }).await?;
    ///         } else {
    ///             ctx.respond(OrderAccepted).await?;
    ///         }
    ///         Ok(())
    ///     }))
    /// })
    /// .await?;
    /// let client = harness.bus().request_client::<SubmitOrder>().with_destination("queue:orders");
    /// match client.request_either::<OrderAccepted, OrderRejected>(SubmitOrder { total: 500 }).await? {
    ///     EitherResponse::First(_) => unreachable!("too much to accept"),
    ///     EitherResponse::Second(rejected) => assert_eq!(rejected.message().reason, "over the limit"),
    /// }
    /// # Ok(()) }
    /// ```
    #[doc(alias = "GetResponse")]
    pub async fn request_either<A: Message, B: Message>(&self, message: M) -> Result<EitherResponse<A, B>> {
        let envelope =
            self.send_and_wait(message, SendOptions::default(), &[A::message_type(), B::message_type()]).await?;
        if envelope.has_message_type(B::message_type()) && !envelope.has_message_type(A::message_type()) {
            return response_from(envelope).map(EitherResponse::Second);
        }
        response_from(envelope).map(EitherResponse::First)
    }

    /// Sends the request, accepting responses of `accept`, and waits for its answer. Its
    /// time to live is the timeout (unless the options set one), as MassTransit sets it: a
    /// request nobody took in time is not worth handling.
    async fn send_and_wait(&self, message: M, mut options: SendOptions, accept: &[&str]) -> Result<Envelope> {
        let inner = &self.bus.inner;
        inner.ensure_answerable()?;
        let request_id = crate::id::new_id();
        options.request_id = Some(request_id);
        options.response_address = Some(inner.address.clone());
        options.time_to_live = options.time_to_live.or(Some(self.timeout));
        options.headers.insert(ACCEPT_TYPE, accept.to_vec());
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
        Ok(envelope)
    }
}

/// The header a request lists the response types its client accepts in, as MassTransit's.
const ACCEPT_TYPE: &str = "MT-Request-AcceptType";

/// A response of one of two types (see [`RequestClient::request_either`]).
#[derive(Debug)]
pub enum EitherResponse<A, B> {
    /// A response of the first type.
    First(Response<A>),
    /// A response of the second type.
    Second(Response<B>),
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

/// The one consumer of the bus's own endpoint: every message there answers a pending
/// request. One that answers none (its requester gave up, say) is skipped, so it ends in the
/// endpoint's `_skipped` queue, as with MassTransit's bus endpoint; one that cannot be read
/// ends in `_error`, as on any endpoint.
pub(super) struct PendingRequests;

impl ErasedConsumer for PendingRequests {
    fn consume(&self, ctx: ReceiveContext) -> BoxFuture<'_, std::result::Result<(), ConsumeError>> {
        Box::pin(async move {
            let envelope = ctx.envelope();
            let request_id = envelope.request_id;
            let waiting = request_id.and_then(|id| ctx.bus().inner.pending.locked().remove(&id));
            // The requester may have given up just now; then the response has nobody to go to.
            match waiting.map(|tx| tx.send(envelope.clone()).is_ok()) {
                Some(true) => Ok(()),
                _ => {
                    tracing::info!(?request_id, "response for no pending request moved to the skipped queue");
                    Err(ConsumeError::new(ConsumeErrorKind::Skipped, "Skip", "no request is waiting for this response"))
                }
            }
        })
    }
}
