//! Text from the wire made safe to log or to put in a header: control characters escaped (a
//! raw newline would forge a log line), and bounded in length.

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
