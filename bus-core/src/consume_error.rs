//! Why one consume attempt failed.

use crate::{BoxError, Permanent};

/// What kind of failure a [`ConsumeError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumeErrorKind {
    /// The consumer returned an error; retried by policy.
    Failed,
    /// The consumer marked its error [`Permanent`]; never retried.
    Permanent,
    /// The message could not be read as the consumer's type; never retried.
    Deserialize,
    /// The consumer panicked; retried by policy.
    Panicked,
    /// The consumer exceeded its timeout; retried by policy.
    TimedOut,
    /// The consumer returned [`Skip`](crate::Skip): the message moves to `_skipped`.
    Skipped,
}

/// A failed consume attempt, as middleware and observers see it.
///
/// Its text is the message of the error the consumer returned (as .NET's exception message),
/// and its causes are that error's own: the returned error is reachable with
/// [`source_error`](Self::source_error), not through [`source`](std::error::Error::source),
/// whose text this one already is.
#[derive(Debug)]
pub struct ConsumeError {
    kind: ConsumeErrorKind,
    exception_type: String,
    message: String,
    retry_count: u32,
    source: Option<BoxError>,
}

impl std::fmt::Display for ConsumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConsumeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().and_then(std::error::Error::source)
    }
}

impl ConsumeError {
    /// A failure of the given kind.
    pub fn new(kind: ConsumeErrorKind, exception_type: impl Into<String>, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        ConsumeError {
            kind,
            exception_type: exception_type.into(),
            message: source.to_string(),
            retry_count: 0,
            source: Some(source),
        }
    }

    pub(crate) fn from_consumer(error: BoxError) -> Self {
        if error.is::<crate::Skip>() {
            return ConsumeError::new(ConsumeErrorKind::Skipped, "Skip", error);
        }
        if let Some(permanent) = error.downcast_ref::<Permanent>() {
            let exception_type = short_type_name(permanent.type_name());
            return ConsumeError::new(ConsumeErrorKind::Permanent, exception_type, error);
        }
        let exception_type = debug_type_name(&*error);
        ConsumeError::new(ConsumeErrorKind::Failed, exception_type, error)
    }

    pub(crate) fn deserialize(error: crate::Error) -> Self {
        ConsumeError::new(ConsumeErrorKind::Deserialize, "SerializationException", error)
    }

    pub(crate) fn panicked(message: String) -> Self {
        ConsumeError {
            kind: ConsumeErrorKind::Panicked,
            exception_type: "Panic".to_owned(),
            message: format!("consumer panicked: {message}"),
            retry_count: 0,
            source: None,
        }
    }

    pub(crate) fn timed_out(after: std::time::Duration) -> Self {
        ConsumeError {
            kind: ConsumeErrorKind::TimedOut,
            exception_type: "TimeoutException".to_owned(),
            message: format!("consumer did not finish within {after:?}"),
            retry_count: 0,
            source: None,
        }
    }

    /// A copy for each message of a batch that failed with `error`: same kind, type, text
    /// and causes. The batch's retries are not counted as the message's own (a message of a
    /// batch has no retry policy of its own).
    pub(crate) fn copy_of(error: &std::sync::Arc<ConsumeError>) -> Self {
        ConsumeError {
            kind: error.kind,
            exception_type: error.exception_type.clone(),
            message: error.message.clone(),
            retry_count: 0,
            source: Some(Box::new(SharedCause(error.clone()))),
        }
    }

    pub(crate) fn with_retry_count(mut self, retry_count: u32) -> Self {
        self.retry_count = retry_count;
        self
    }

    /// How many in-process retries came before this failure.
    pub fn retry_count(&self) -> u32 {
        self.retry_count
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ConsumeErrorKind {
        self.kind
    }

    /// Whether a retry may help: false for permanent and deserialization failures.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind, ConsumeErrorKind::Permanent | ConsumeErrorKind::Deserialize | ConsumeErrorKind::Skipped)
    }

    /// The error's type, as written to `MT-Fault-ExceptionType` and the fault.
    pub fn exception_type(&self) -> &str {
        &self.exception_type
    }

    /// The error's message, as written to `MT-Fault-Message` and the fault.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The source chain below the message, one cause per line (our stand-in for a stack trace).
    pub fn causes(&self) -> String {
        let mut out = String::new();
        let mut next = std::error::Error::source(self);
        while let Some(cause) = next {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&cause.to_string());
            next = cause.source();
        }
        out
    }

    /// The error the consumer returned, when there is one.
    pub fn source_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

fn short_type_name(full: &str) -> String {
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base).to_owned()
}

/// A dyn error has no type name at run time; its `Debug` output usually starts with one.
fn debug_type_name(error: &(dyn std::error::Error + Send + Sync)) -> String {
    let debug = format!("{error:?}");
    let name: String = debug.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    if name.is_empty() {
        "Error".to_owned()
    } else {
        name
    }
}

/// One error shared by the copies made of it: its text, and its causes below.
#[derive(Debug)]
struct SharedCause(std::sync::Arc<ConsumeError>);

impl std::fmt::Display for SharedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}
