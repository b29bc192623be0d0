//! Requests from a saga: a request sent to a service, whose response, fault or timeout
//! comes back as an event of the instance.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bus_core::message::interned_types;
use bus_core::Message;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

type RequestIdField<S> = Arc<dyn Fn(&mut S) -> &mut Option<Uuid> + Send + Sync>;

/// How long a saga's request waits for its response unless [`Request::timeout`] says
/// otherwise: 30 seconds, as MassTransit's.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A request `Q` a saga sends to a service that responds `R` (MassTransit's `Request`):
/// where it goes, how long it may take, and the field of the instance that keeps the
/// pending request's id.
///
/// Send it with [`EventActivities::request`](crate::EventActivities::request) and declare
/// it with [`StateMachineBuilder::request`](crate::StateMachineBuilder::request): then `R`
/// (completed), [`Fault<Q>`](bus_core::Fault) (faulted) and [`RequestTimeoutExpired<Q>`]
/// (no answer in time) are events of the instance. Each request gets a new request id,
/// kept in the field while it is pending; its correlation id is the instance's, which its
/// answers carry back as their initiator id (MassTransit's responders and this bus's set it
/// so), and by which they find the instance. An answer whose request id is not the pending
/// one (to an earlier request, or after the timeout) is ignored.
///
/// ```
/// use std::time::Duration;
/// use bus_saga::Request;
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
/// # #[message(urn = "urn:message:Shop:ReserveStock")] struct ReserveStock { order_id: uuid::Uuid }
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
/// # #[message(urn = "urn:message:Shop:StockReserved")] struct StockReserved { order_id: uuid::Uuid }
/// #[derive(Clone, Default)]
/// struct OrderState { reserve_request_id: Option<uuid::Uuid> }
///
/// let reserve = Request::<OrderState, ReserveStock, StockReserved>::new("queue:inventory", |s| &mut s.reserve_request_id)
///     .timeout(Duration::from_secs(10));
/// assert_eq!(reserve.service_address(), "queue:inventory");
/// ```
pub struct Request<S, Q, R> {
    service_address: String,
    timeout: Option<Duration>,
    request_id: RequestIdField<S>,
    _messages: PhantomData<fn() -> (Q, R)>,
}

impl<S, Q, R> Clone for Request<S, Q, R> {
    fn clone(&self) -> Self {
        Request {
            service_address: self.service_address.clone(),
            timeout: self.timeout,
            request_id: self.request_id.clone(),
            _messages: PhantomData,
        }
    }
}

impl<S, Q, R> std::fmt::Debug for Request<S, Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("request", &std::any::type_name::<Q>())
            .field("response", &std::any::type_name::<R>())
            .field("service_address", &self.service_address)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<S, Q: Message, R> Request<S, Q, R> {
    /// A request sent to `service_address`, its pending id kept in the field `request_id`
    /// returns, timing out after [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn new<F>(service_address: impl Into<String>, request_id: F) -> Self
    where
        F: Fn(&mut S) -> &mut Option<Uuid> + Send + Sync + 'static,
    {
        Request {
            service_address: service_address.into(),
            timeout: Some(DEFAULT_REQUEST_TIMEOUT),
            request_id: Arc::new(request_id),
            _messages: PhantomData,
        }
    }

    /// How long the request waits before [`RequestTimeoutExpired<Q>`] comes; needs a
    /// scheduler on the bus.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// No timeout: the request waits for its response or fault for good, and no scheduler
    /// is needed.
    pub fn without_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    /// Where the request goes.
    pub fn service_address(&self) -> &str {
        &self.service_address
    }

    /// How long it waits, if it times out.
    pub fn timeout_after(&self) -> Option<Duration> {
        self.timeout
    }

    /// The pending request's id the instance keeps, if one is pending.
    pub fn pending(&self, data: &mut S) -> Option<Uuid> {
        *(self.request_id)(data)
    }

    pub(crate) fn set_request_id(&self, data: &mut S, id: Uuid) {
        *(self.request_id)(data) = Some(id);
    }

    pub(crate) fn take_request_id(&self, data: &mut S) -> Option<Uuid> {
        (self.request_id)(data).take()
    }

    /// The token the timeout of request `request_id` is scheduled under.
    pub(crate) fn timeout_token(&self, request_id: Uuid) -> Uuid {
        Uuid::new_v5(&request_id, Q::message_type().as_bytes())
    }
}

/// A saga's request `Q` got no response in time (MassTransit's `RequestTimeoutExpired<T>`);
/// scheduled to the saga's endpoint when the request is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", bound = "")]
pub struct RequestTimeoutExpired<Q> {
    /// The instance that sent the request.
    pub correlation_id: Uuid,
    /// The request's id.
    pub request_id: Uuid,
    #[serde(skip)]
    _request: PhantomData<fn() -> Q>,
}

impl<Q> RequestTimeoutExpired<Q> {
    /// The timeout of request `request_id` from instance `correlation_id`.
    pub fn new(correlation_id: Uuid, request_id: Uuid) -> Self {
        RequestTimeoutExpired { correlation_id, request_id, _request: PhantomData }
    }
}

impl<Q: Message> Message for RequestTimeoutExpired<Q> {
    fn message_types() -> &'static [&'static str] {
        interned_types::<RequestTimeoutExpired<Q>>(|| {
            let inner = Q::message_type();
            let inner = inner.strip_prefix("urn:message:").unwrap_or(inner);
            vec![format!("urn:message:MassTransit:RequestTimeoutExpired[[{inner}]]")]
        })
    }

    fn correlation_id(&self) -> Option<Uuid> {
        Some(self.correlation_id)
    }
}
