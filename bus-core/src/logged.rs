//! Text made to log: text from the wire made safe (control characters escaped, since a raw
//! newline would forge a log line, and bounded in length), and errors with their causes.

use std::borrow::Cow;

/// `text` with its control characters escaped (`\n`, `\u{1b}`...) and at most `max` characters
/// long (the cut marked with `...`).
///
/// ```
/// # use bus_core::logged::escaped;
/// assert_eq!(escaped("line\nforged: yes", 100), "line\\nforged: yes");
/// assert_eq!(escaped("abcdef", 3), "abc...");
/// assert_eq!(escaped("plain", 100), "plain");
/// ```
pub fn escaped(text: &str, max: usize) -> Cow<'_, str> {
    let cut = text.char_indices().nth(max).map(|(at, _)| at);
    let kept = cut.map_or(text, |at| &text[..at]);
    if cut.is_none() && !kept.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(kept.len() + 3);
    for c in kept.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if cut.is_some() {
        out.push_str("...");
    }
    Cow::Owned(out)
}

/// An error with its causes, `outer: inner: innermost`, for a log line or a message. The
/// errors of these crates do not repeat their source in their own text (it is their
/// [`source`](std::error::Error::source)), so this is how to show all of it.
///
/// ```
/// # use bus_core::logged::chain;
/// let error = bus_core::Error::transport("could not publish", true, Some("connection reset".into()));
/// assert_eq!(error.to_string(), "transport error: could not publish");
/// assert_eq!(chain(&error).to_string(), "transport error: could not publish: connection reset");
/// ```
pub fn chain<'a>(error: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain(error)
}

/// An error shown with its causes; see [`chain`].
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            write!(f, ": {cause}")?;
            next = cause.source();
        }
        Ok(())
    }
}
