//! The crate's error type.

use std::time::Duration;

/// A boxed error that can cross tasks: what consumers and transports return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in bus-core.
///
/// An error's text says what went wrong here; why (the error it came from) is its
/// [`source`](std::error::Error::source), not repeated in the text.
/// [`logged::chain`](crate::logged::chain) shows both.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport failed; `transient` says whether trying again may succeed.
    #[error("transport error: {message}")]
    Transport {
        /// What failed, without credentials.
        message: String,
        /// Whether trying again may succeed (a lost connection) or not (a refused declaration).
        transient: bool,
        /// The transport's own error.
        #[source]
        source: Option<BoxError>,
    },
    /// A message could not be turned into bytes.
    #[error("could not serialize message")]
    Serialize(#[source] serde_json::Error),
    /// Bytes from the wire could not be read as a message.
    #[error("could not deserialize message: {reason}")]
    Deserialize {
        /// What exactly was wrong with the bytes, without the values it quotes from the
        /// message (which would put a message's content in logs and fault headers).
        reason: String,
        /// The parser's own error, for code that wants it: not this error's `source()`,
        /// since `reason` says it already, and its text may quote the message.
        parser_error: Option<BoxError>,
    },
    /// No serializer is registered for the content type a delivery carries.
    #[error("unsupported content type `{0}`")]
    UnsupportedContentType(String),
    /// A body is larger than the endpoint accepts.
    #[error("message body of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// Size of the body in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// An address could not be understood.
    #[error("invalid address `{0}`")]
    InvalidAddress(String),
    /// A request got no response in time.
    #[error("request {request_type} timed out after {timeout:?}")]
    RequestTimeout {
        /// URN of the request message.
        request_type: &'static str,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The consumer of a request failed; the remote fault is attached.
    #[error("request faulted: {exception_type}: {message}")]
    RequestFaulted {
        /// The remote exception type, as written in the fault.
        exception_type: String,
        /// The remote error message.
        message: String,
    },
    /// A send middleware refused the message.
    #[error("send refused by middleware")]
    SendRejected(#[source] BoxError),
    /// The bus was stopped (or not started where starting is required).
    #[error("the bus is stopped")]
    Stopped,
    /// The bus was configured in a way that cannot work.
    #[error("invalid configuration: {0}")]
    Configuration(String),
}

impl Error {
    /// Creates a transport error.
    pub fn transport(message: impl Into<String>, transient: bool, source: impl Into<Option<BoxError>>) -> Self {
        Error::Transport { message: message.into(), transient, source: source.into() }
    }

    /// Creates a deserialization error with its reason and the parser's error.
    pub fn deserialize(reason: impl Into<String>, source: impl Into<Option<BoxError>>) -> Self {
        Error::Deserialize { reason: reason.into(), parser_error: source.into() }
    }

    /// Whether trying the same operation again may succeed.
    ///
    /// ```
    /// use bus_core::Error;
    /// assert!(Error::transport("connection lost", true, None).is_transient());
    /// assert!(!Error::deserialize("not JSON", None).is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { transient, .. } => *transient,
            Error::RequestTimeout { .. } => true,
            _ => false,
        }
    }
}
