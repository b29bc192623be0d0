//! Message headers: names to JSON values, as in the MassTransit envelope.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Header names the bus itself reads or writes.
pub mod names {
    /// Number of delayed redeliveries a message has had.
    pub const REDELIVERY_COUNT: &str = "MT-Redelivery-Count";
    /// Why a message was moved to `_error` (`fault`) or `_skipped` (`dead-letter`).
    pub const REASON: &str = "MT-Reason";
    /// W3C trace context, carried by MassTransit under its own name.
    pub const ACTIVITY_ID: &str = "MT-Activity-Id";
}

/// Headers of a message: user headers and `MT-*` infrastructure headers.
///
/// ```
/// use bus_core::Headers;
/// let mut headers = Headers::new();
/// headers.insert("Tenant", "acme");
/// headers.insert("Attempt", 3);
/// assert_eq!(headers.get_str("Tenant"), Some("acme"));
/// assert_eq!(headers.get_i64("Attempt"), Some(3));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headers(Map<String, Value>);

impl Headers {
    /// Empty headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a header, replacing any value it had.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.0.insert(name.into(), value.into());
    }

    /// Sets a header only when it is not set yet.
    pub fn insert_if_absent(&mut self, name: &str, value: impl Into<Value>) {
        if !self.0.contains_key(name) {
            self.0.insert(name.to_owned(), value.into());
        }
    }

    /// The value of a header.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// The value of a header that holds a string.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(Value::as_str)
    }

    /// The value of a header as an integer, read from a number or a numeric string.
    pub fn get_i64(&self, name: &str) -> Option<i64> {
        match self.0.get(name)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// Removes a header, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name)
    }

    /// Whether a header is set.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over the headers.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0.iter()
    }

    /// Adds every header of `other`, replacing values set here.
    pub fn extend(&mut self, other: Headers) {
        self.0.extend(other.0);
    }
}

impl FromIterator<(String, Value)> for Headers {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        Headers(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a String, &'a Value);
    type IntoIter = serde_json::map::Iter<'a>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
