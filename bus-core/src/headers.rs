//! Message headers: names to JSON values, as in the MassTransit envelope.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Header names the bus itself reads or writes.
pub mod names {
    /// Number of delayed redeliveries a message has had.
    pub const REDELIVERY_COUNT: &str = "MT-Redelivery-Count";
    /// Why a message was moved to `_error` (`fault`) or `_skipped` (`dead-letter`).
    pub const REASON: &str = "MT-Reason";
    /// W3C trace context, carried by MassTransit under its own name.
    pub const ACTIVITY_ID: &str = "MT-Activity-Id";
    /// The token a scheduled message was scheduled under, as MassTransit sets it: a saga
    /// compares it with the token it kept, to tell a stale timeout from the current one.
    pub const SCHEDULING_TOKEN_ID: &str = "MT-Scheduling-TokenId";
    /// Not a header: the key of the transport header value that stands for a time,
    /// `{"$rust-bus:time": <seconds since the epoch>}` (see `SendOptions::header_time`).
    /// Transports write it as their own time type (RabbitMQ: an AMQP timestamp), and one
    /// with none as its text again.
    pub const TIME_VALUE_KEY: &str = "$rust-bus:time";
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
///
/// Headers keep the order they were set or read in, each name once (setting a name again
/// replaces its value, and of a name read twice the last value counts, as serde_json does).
///
/// They are a list, not a map: a message has a handful, and a traced message has two on
/// every hop, for which a tree map took a 632-byte node on each side. A clone shares the
/// list until one side changes it (a serializer copies every envelope header into the
/// transport headers).
#[derive(Debug, Clone, Default)]
pub struct Headers {
    list: Option<Arc<Vec<(String, Value)>>>,
}

/// Above this many headers, names read from the wire are made unique with a hash set
/// rather than by comparing each with all the others.
const LINEAR_DEDUP: usize = 16;

impl Headers {
    /// Empty headers.
    pub fn new() -> Self {
        Self::default()
    }

    fn from_shared(list: Option<Arc<Vec<(String, Value)>>>) -> Self {
        Headers { list }
    }

    fn entries(&self) -> &[(String, Value)] {
        self.list.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The headers to change: shared ones are copied first.
    fn entries_mut(&mut self) -> &mut Vec<(String, Value)> {
        Arc::make_mut(self.list.get_or_insert_with(Default::default))
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries().iter().position(|(k, _)| k == name)
    }

    /// Sets a header, replacing any value it had.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        let name = name.into();
        let value = value.into();
        match self.position(&name) {
            Some(at) => self.entries_mut()[at].1 = value,
            None => self.entries_mut().push((name, value)),
        }
    }

    /// Sets a header only when it is not set yet.
    pub fn insert_if_absent(&mut self, name: &str, value: impl Into<Value>) {
        if !self.contains(name) {
            self.entries_mut().push((name.to_owned(), value.into()));
        }
    }

    /// The value of a header.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.entries().iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The value of a header that holds a string.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(Value::as_str)
    }

    /// The value of a header as an integer, read from a number or a numeric string.
    pub fn get_i64(&self, name: &str) -> Option<i64> {
        match self.get(name)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// Removes a header, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        // Looked up first, so that removing what is not there copies nothing.
        let at = self.position(name)?;
        Some(self.entries_mut().remove(at).1)
    }

    /// These headers less the ones named, in one pass: shared as they are when none is here.
    pub(crate) fn without(&self, names: &[&str]) -> Headers {
        if !self.entries().iter().any(|(k, _)| names.contains(&k.as_str())) {
            return self.clone();
        }
        let rest: Vec<(String, Value)> =
            self.entries().iter().filter(|(k, _)| !names.contains(&k.as_str())).cloned().collect();
        if rest.is_empty() {
            Headers::default()
        } else {
            Headers::from_shared(Some(Arc::new(rest)))
        }
    }

    /// Whether a header is set.
    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// Iterates over the headers.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.entries().iter())
    }

    /// Adds every header of `other`, replacing values set here (a replaced name takes its
    /// place among `other`'s).
    pub fn extend(&mut self, other: Headers) {
        let Some(other) = other.list else { return };
        if self.is_empty() {
            *self = Headers::from_shared(Some(other));
            return;
        }
        // One pass over both, however many there are: inserting one at a time would
        // compare each name with all the others.
        let mut list = std::mem::take(self.entries_mut());
        list.extend(Arc::unwrap_or_clone(other));
        *self = Headers::from_list(list);
    }

    /// Adds the headers of `other` that `wanted` accepts and that are not set here, in one
    /// pass over both (the names here go into a set when there are many: a message from the
    /// wire can carry hundreds of thousands).
    pub(crate) fn add_absent(&mut self, other: &Headers, mut wanted: impl FnMut(&str, &Value) -> bool) {
        let added: Vec<(String, Value)> = {
            let here = self.entries();
            let names: Option<foldhash::HashSet<&str>> =
                (here.len() > LINEAR_DEDUP).then(|| here.iter().map(|(k, _)| k.as_str()).collect());
            let present = |name: &str| match &names {
                Some(names) => names.contains(name),
                None => here.iter().any(|(k, _)| k == name),
            };
            // `other`'s names are unique, so the ones added are too.
            other.entries().iter().filter(|(name, value)| !present(name) && wanted(name, value)).cloned().collect()
        };
        if !added.is_empty() {
            self.entries_mut().extend(added);
        }
    }

    /// Headers from a list that may name a header more than once: the last value counts,
    /// at the place of the name's last occurrence.
    fn from_list(mut list: Vec<(String, Value)>) -> Self {
        if list.is_empty() {
            return Headers::default();
        }
        let unique = if list.len() <= LINEAR_DEDUP {
            (1..list.len()).all(|i| list[..i].iter().all(|(k, _)| *k != list[i].0))
        } else {
            let mut seen = foldhash::HashSet::default();
            list.iter().all(|(k, _)| seen.insert(k.as_str()))
        };
        if !unique {
            let mut seen = foldhash::HashSet::default();
            let mut keep: Vec<bool> = list.iter().rev().map(|(k, _)| seen.insert(k.clone())).collect();
            keep.reverse();
            let mut flags = keep.into_iter();
            list.retain(|_| flags.next().unwrap_or(true));
        }
        Headers::from_shared(Some(Arc::new(list)))
    }
}

/// An iterator over [`Headers`], in their order.
#[derive(Debug, Clone)]
pub struct Iter<'a>(std::slice::Iter<'a, (String, Value)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a String, &'a Value);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(k, v)| (k, v))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl std::iter::FusedIterator for Iter<'_> {}

impl PartialEq for Headers {
    /// Equal when they hold the same names with the same values, in any order.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Headers;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of headers")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut list = Vec::with_capacity(map.size_hint().unwrap_or(0).min(LINEAR_DEDUP));
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    list.push(entry);
                }
                Ok(Headers::from_list(list))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

impl FromIterator<(String, Value)> for Headers {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        Headers::from_list(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a String, &'a Value);
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// About how many bytes `value` takes on the wire: its length for a string, its JSON for
/// anything else.
pub(crate) fn value_len(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        other => serde_json::to_string(other).map_or(0, |json| json.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(headers: &Headers) -> Vec<&str> {
        headers.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn headers_keep_their_order_and_each_name_once() {
        let mut headers = Headers::new();
        headers.insert("b", 1);
        headers.insert("a", 2);
        headers.insert("b", 3);
        headers.insert_if_absent("a", 4);
        assert_eq!(names(&headers), ["b", "a"]);
        assert_eq!(headers.get_i64("b"), Some(3), "a name set again takes the new value");
        assert_eq!(headers.get_i64("a"), Some(2), "insert_if_absent leaves a set name alone");
        assert_eq!(headers.remove("b"), Some(Value::from(3)));
        assert_eq!(headers.remove("b"), None);
        assert_eq!(names(&headers), ["a"]);
    }

    #[test]
    fn a_name_read_twice_keeps_its_last_value_few_or_many() {
        let few: Headers = serde_json::from_str(r#"{"a":1,"b":2,"a":3}"#).expect("headers");
        assert_eq!(names(&few), ["b", "a"]);
        assert_eq!(few.get_i64("a"), Some(3));

        // Past the linear check, a hash set finds the repeated names.
        let mut json: Vec<String> = (0..40).map(|i| format!(r#""h{i}":{i}"#)).collect();
        json.push(r#""h7":"last""#.to_owned());
        let many: Headers = serde_json::from_str(&format!("{{{}}}", json.join(","))).expect("headers");
        assert_eq!(many.len(), 40);
        assert_eq!(many.get_str("h7"), Some("last"));
        assert_eq!(names(&many).last(), Some(&"h7"));

        let collected: Headers =
            [("x".to_owned(), Value::from(1)), ("x".to_owned(), Value::from(2))].into_iter().collect();
        assert_eq!(collected.len(), 1);
        assert_eq!(collected.get_i64("x"), Some(2));
    }

    #[test]
    fn a_clone_is_shared_until_changed() {
        let mut original = Headers::new();
        original.insert("Tenant", "acme");
        let copy = original.clone();
        assert_eq!(copy, original);
        let mut changed = copy.clone();
        changed.insert("MT-Redelivery-Count", 1);
        assert_eq!(original.len(), 1, "changing a clone leaves the original alone");
        assert_eq!(copy.len(), 1);
        assert_eq!(changed.len(), 2);
        let mut removed = copy.clone();
        removed.remove("Tenant");
        assert!(removed.is_empty());
        assert_eq!(copy.get_str("Tenant"), Some("acme"));
    }

    #[test]
    fn many_headers_are_merged_in_one_pass() {
        // Quadratic merging of 200,000 names would take minutes; one pass takes milliseconds.
        let many: Headers = (0..200_000).map(|i| (format!("h{i}"), Value::from(i))).collect();
        let mut here: Headers = (0..200_000).map(|i| (format!("h{}", i * 2), Value::from(-1))).collect();
        here.add_absent(&many, |name, _| name.ends_with('1') || name.ends_with('2'));
        assert_eq!(here.get_i64("h2"), Some(-1), "a name set here keeps its value");
        assert_eq!(here.get_i64("h1"), Some(1), "a missing one is added");
        assert_eq!(here.get_i64("h3"), None, "one not wanted is not");
        let mut replaced = here.clone();
        replaced.extend(many.clone());
        assert_eq!(replaced.get_i64("h2"), Some(2), "extend replaces");
        assert_eq!(replaced.len(), 200_000 + 100_000);
        assert_eq!(here.iter().next_back().map(|(k, _)| k.as_str()), Some("h199991"), "added after those here");
    }

    #[test]
    fn headers_compare_by_content_in_any_order() {
        let ab: Headers = serde_json::from_str(r#"{"a":1,"b":"x"}"#).expect("headers");
        let ba: Headers = serde_json::from_str(r#"{"b":"x","a":1}"#).expect("headers");
        assert_eq!(ab, ba);
        assert_ne!(ab, Headers::new());
        assert_eq!(serde_json::to_string(&ab).expect("json"), r#"{"a":1,"b":"x"}"#);
        assert_eq!(serde_json::to_string(&Headers::new()).expect("json"), "{}");
    }
}
