//! The crate's error type.

use std::time::Duration;

/// Result with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to RabbitMQ. Messages never contain credentials. An error's text
/// says what failed; lapin's error, when there is one, is its
/// [`source`](std::error::Error::source) (`bus_core::logged::chain` shows both).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Could not connect, or the connection was lost.
    #[error("rabbitmq at {address}: {reason}")]
    Connection {
        /// The broker address, password redacted.
        address: String,
        /// What happened.
        reason: String,
        /// lapin's error (boxed: it is large).
        #[source]
        source: Option<Box<lapin::Error>>,
    },
    /// The broker stayed unreachable for longer than the publish timeout.
    #[error("rabbitmq unavailable: no connection within {0:?}")]
    Unavailable(Duration),
    /// The broker refused an operation (a declaration with other arguments, a missing entity...).
    #[error("rabbitmq refused {operation}")]
    Refused {
        /// What was attempted.
        operation: String,
        /// lapin's error (boxed: it is large).
        #[source]
        source: Box<lapin::Error>,
    },
    /// The broker blocked publishing (a memory or disk alarm) for longer than the publish timeout.
    #[error("rabbitmq blocks publishing: {0}")]
    Blocked(String),
    /// The broker negatively acknowledged a published message.
    #[error("rabbitmq did not accept a message published to `{0}`")]
    Nacked(String),
    /// A sent message had no queue to go to.
    #[error("no queue receives messages sent to `{0}`")]
    Unroutable(String),
    /// The transport was closed.
    #[error("the rabbitmq transport is closed")]
    Closed,
    /// The URI or options cannot work.
    #[error("invalid rabbitmq configuration: {0}")]
    Configuration(String),
    /// A message whose properties (its headers, mostly) do not fit in one frame of the size
    /// the connection negotiated: sent, it would make the broker close the whole connection.
    #[error("message headers need a frame of {size} bytes; the broker takes at most {limit}")]
    FrameTooLarge {
        /// The size of the frame that would carry the properties.
        size: usize,
        /// The connection's `frame_max`.
        limit: usize,
    },
    /// The delivery being settled came on a channel that has closed since: the broker has
    /// already put it back in its queue, so it is neither acknowledged nor moved here.
    #[error("the delivery's channel is closed; the broker delivers it again")]
    DeliveryGone,
    /// An exchange, queue or routing key name over AMQP's 255 bytes (such a name can come
    /// from a message: its fault or response address, its message types).
    #[error("`{0}...` is not a valid AMQP name: over 255 bytes")]
    NameTooLong(String),
}

impl Error {
    /// Whether trying again may succeed: lost connections and outages may heal; refusals,
    /// unroutable sends and bad configuration do not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connection { .. } | Error::Unavailable(_) | Error::Nacked(_) | Error::Blocked(_) => true,
            Error::Refused { source, .. } => is_connection_loss(source),
            Error::Unroutable(_)
            | Error::Closed
            | Error::Configuration(_)
            | Error::NameTooLong(_)
            | Error::FrameTooLarge { .. }
            | Error::DeliveryGone => false,
        }
    }
}

/// Whether a lapin error means the connection (or channel) went away rather than the broker
/// refusing what was asked.
pub(crate) fn is_connection_loss(error: &lapin::Error) -> bool {
    use lapin::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::IOError(_)
            | ErrorKind::MissingHeartbeatError
            | ErrorKind::InvalidConnectionState(_)
            | ErrorKind::InvalidChannelState(..)
            | ErrorKind::InvalidChannel(_)
    ) || error.is_amqp_hard_error()
}

/// Whether the broker refused an operation because something it names does not exist (AMQP's
/// 404 `NOT_FOUND`).
pub fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404)
}

impl Error {
    /// lapin's error under this one, when there is one.
    fn into_source(self) -> Option<bus_core::BoxError> {
        match self {
            Error::Connection { source, .. } => source.map(|s| s as bus_core::BoxError),
            Error::Refused { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for bus_core::Error {
    /// The bus's transport error: this error's text, and lapin's error as its source.
    fn from(error: Error) -> Self {
        let (message, transient) = (error.to_string(), error.is_transient());
        bus_core::Error::transport(message, transient, error.into_source())
    }
}
