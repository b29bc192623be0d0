//! Conversions between bus-core's messages and AMQP properties and header tables.

use std::borrow::Cow;
use std::time::Duration;

use bus_core::wire::{time_header_seconds, time_text};
use bus_core::{Headers, TransportMessage};
use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::Value;

/// A header value as MassTransit's `SetHeaders` writes it into the AMQP table: strings and
/// numbers as they are, `true` as the string `"True"`, a time (`SendOptions::header_time`) as
/// an AMQP timestamp in seconds; `false`, `null`, arrays and other objects left out (they
/// travel in the envelope's `headers` only, as MassTransit's `MT-Request-AcceptType`).
fn to_amqp(value: &Value) -> Option<AMQPValue> {
    match value {
        Value::Bool(true) => Some(AMQPValue::LongString(LongString::from("True"))),
        Value::Number(n) => Some(match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        }),
        Value::String(s) => Some(AMQPValue::LongString(LongString::from(s.as_str()))),
        // A time set with `SendOptions::header_time`: an AMQP timestamp in seconds, as
        // MassTransit (8.3.1 and later) writes a `DateTime` header.
        Value::Object(_) if time_header_seconds(value).is_some() => {
            let seconds = time_header_seconds(value)?;
            Some(match u64::try_from(seconds) {
                Ok(seconds) => AMQPValue::Timestamp(seconds),
                // Before 1970, as MassTransit: its round-trip text.
                Err(_) => AMQPValue::LongString(LongString::from(time_text(seconds)?)),
            })
        }
        Value::Null | Value::Bool(false) | Value::Array(_) | Value::Object(_) => None,
    }
}

/// How deep tables and arrays in a header are read; deeper ones are read as `null`.
/// serde_json stops at 128 levels when it parses; this is the same guard for headers, which
/// arrive already parsed (and are later written and dropped recursively).
const MAX_HEADER_DEPTH: usize = 32;

fn from_amqp(value: &AMQPValue) -> Value {
    from_amqp_at(value, 0)
}

fn from_amqp_at(value: &AMQPValue, depth: usize) -> Value {
    if depth >= MAX_HEADER_DEPTH && matches!(value, AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_)) {
        return Value::Null;
    }
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => Value::String(format!("{d:?}")),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(text(s.as_bytes())),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(|item| from_amqp_at(item, depth + 1)).collect())
        }
        // A time, read as the text the envelope carries for one (MassTransit 8.3.1 and later
        // write seconds); one past what a time holds stays a number.
        AMQPValue::Timestamp(t) => {
            i64::try_from(*t).ok().and_then(time_text).map_or_else(|| Value::from(*t), Value::from)
        }
        AMQPValue::FieldTable(table) => {
            let entries = table.inner().iter().map(|(k, v)| (k.as_str().to_owned(), from_amqp_at(v, depth + 1)));
            Value::Object(entries.collect())
        }
        AMQPValue::ByteArray(bytes) => Value::String(text(bytes.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

/// Header bytes as text. Headers from the wire need not be UTF-8: what can be read is kept,
/// and reading never fails. Checked first as a whole: that check is word at a time, the lossy
/// reading byte at a time (about ten times the cost for a `traceparent`).
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Headers the broker writes when it dead-letters a message. Republishing them (moving a
/// message to `_error`, or into a delay queue) would confuse the broker's own bookkeeping,
/// so they are dropped on the way.
const BROKER_HEADERS: [&str; 8] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
];

/// The properties of a delivered message forwarded elsewhere (to `_error`, `_skipped` or a
/// delay queue): the original ones as they came, ids and header values untouched (whatever
/// their types: byte arrays, decimals, timestamps, ids that are not GUIDs), without the
/// broker's dead-lettering headers and the sender's `user_id`, with `added` on top, and
/// persistent; the expiration kept only when `expires` (not on a move to `_error`).
pub(crate) fn forwarded_properties(original: &BasicProperties, added: &Headers, expires: bool) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(headers) = original.headers() {
        for (name, value) in headers.inner() {
            if !BROKER_HEADERS.contains(&name.as_str()) {
                table.insert(name.clone(), value.clone());
            }
        }
    }
    for (name, value) in added {
        if let (Ok(key), Some(value)) = (ShortString::try_new(name.as_str()), to_amqp(value)) {
            table.insert(key, value);
        }
    }
    // Field by field, all but `user_id`: the broker checks it against the publishing
    // connection's user, and a message from another user would be refused for ever.
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    macro_rules! copy {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(value) = original.$get().clone() {
                properties = properties.$set(value);
            })*
        };
    }
    copy!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
    );
    // As MassTransit's error transport clears it: a message in `_error` waits for someone to
    // look, however long its time to live was (a request's is its timeout).
    if let Some(expiration) = original.expiration().as_ref().filter(|_| expires) {
        properties = properties.with_expiration(expiration.clone());
    }
    if table.inner().is_empty() {
        properties
    } else {
        properties.with_headers(table)
    }
}

/// Headers as an AMQP table.
pub(crate) fn to_table(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        // AMQP header names are short strings (at most 255 bytes); longer ones cannot travel.
        if let (Ok(key), Some(value)) = (ShortString::try_new(name.as_str()), to_amqp(value)) {
            table.insert(key, value);
        }
    }
    table
}

/// An AMQP table as headers.
pub(crate) fn from_table(table: &FieldTable) -> Headers {
    table.inner().iter().map(|(k, v)| (k.as_str().to_owned(), from_amqp(v))).collect()
}

/// AMQP properties for a message: content type, ids, persistence, expiration, headers.
pub(crate) fn properties(message: &TransportMessage, persistent: bool) -> BasicProperties {
    let mut properties = BasicProperties::default();
    // No table at all rather than an empty one: less for the broker to read and store.
    if !message.headers.is_empty() {
        properties = properties.with_headers(to_table(&message.headers));
    }
    if persistent {
        properties = properties.with_delivery_mode(2);
    }
    if let Some(content_type) = &message.content_type {
        properties = properties.with_content_type(ShortString::from(content_type.as_ref()));
    }
    if let Some(id) = message.message_id {
        properties = properties.with_message_id(ShortString::from(id.to_string()));
    }
    if let Some(id) = message.correlation_id {
        properties = properties.with_correlation_id(ShortString::from(id.to_string()));
    }
    if let Some(ttl) = message.time_to_live {
        properties = properties.with_expiration(ShortString::from(ttl.as_millis().max(1).to_string()));
    }
    if let Some(priority) = message.priority {
        properties = properties.with_priority(priority);
    }
    properties
}

/// A delivered message as a [`TransportMessage`]; nothing from the wire makes this fail.
pub fn transport_message(data: Vec<u8>, properties: &BasicProperties) -> TransportMessage {
    TransportMessage {
        body: Bytes::from(data),
        content_type: properties.content_type().as_ref().map(|c| Cow::Owned(c.as_str().to_owned())),
        headers: properties.headers().as_ref().map(from_table).unwrap_or_default(),
        message_id: properties.message_id().as_ref().and_then(|id| uuid::Uuid::parse_str(id.as_str()).ok()),
        correlation_id: properties.correlation_id().as_ref().and_then(|id| uuid::Uuid::parse_str(id.as_str()).ok()),
        time_to_live: properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok())
            .map(Duration::from_millis),
        priority: *properties.priority(),
        // What it was published with is the sender's; a consumer reads it from the delivery.
        routing_key: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tables_nested_past_the_limit_are_read_as_null() {
        let mut value = AMQPValue::LongString(LongString::from("deep"));
        for _ in 0..1_000 {
            let mut table = FieldTable::default();
            table.insert("inner".into(), value);
            value = AMQPValue::FieldTable(table);
        }
        let mut table = FieldTable::default();
        table.insert("Nested".into(), value);
        let headers = from_table(&table);
        let mut level = headers.get("Nested").expect("the header is kept");
        let mut depth = 0;
        while let Some(inner) = level.get("inner") {
            level = inner;
            depth += 1;
        }
        assert_eq!(depth, MAX_HEADER_DEPTH);
        assert!(level.is_null(), "the part past the limit is null: {level:?}");
    }

    #[test]
    fn headers_survive_a_round_trip_through_an_amqp_table() {
        let mut headers = Headers::new();
        headers.insert("Tenant", "acme");
        headers.insert("MT-Redelivery-Count", 2);
        headers.insert("Ratio", 0.5);
        headers.insert("Urgent", true);
        headers.insert("Quiet", false);
        headers.insert("MT-Request-AcceptType", serde_json::json!(["urn:message:Shop:Accepted"]));
        headers.insert("Nested", serde_json::json!({ "a": 1 }));
        headers.insert("Nothing", Value::Null);
        let back = from_table(&to_table(&headers));
        assert_eq!(back.get_str("Tenant"), Some("acme"));
        assert_eq!(back.get_i64("MT-Redelivery-Count"), Some(2));
        assert_eq!(back.get("Ratio"), Some(&Value::from(0.5)));
        assert_eq!(back.get_str("Urgent"), Some("True"), "true as MassTransit writes it");
        // As MassTransit's SetHeaders: false, arrays, objects and nulls stay out of the table.
        for absent in ["Quiet", "MT-Request-AcceptType", "Nested", "Nothing"] {
            assert!(back.get(absent).is_none(), "{absent}");
        }
        assert_eq!(back.len(), 4);
    }

    #[test]
    fn non_utf8_header_values_are_read_lossily() {
        let mut table = FieldTable::default();
        table.insert("Bad".into(), AMQPValue::LongString(LongString::from(vec![0xff, 0xfe, b'a'])));
        table.insert("Bytes".into(), AMQPValue::ByteArray(vec![b'x', 0xc3].into()));
        table.insert("Good".into(), AMQPValue::LongString(LongString::from("café ☕")));
        let headers = from_table(&table);
        assert_eq!(headers.get_str("Bad"), Some("\u{fffd}\u{fffd}a"));
        assert_eq!(headers.get_str("Bytes"), Some("x\u{fffd}"), "a sequence cut short");
        assert_eq!(headers.get_str("Good"), Some("café ☕"), "text that is UTF-8 is kept as it is");
    }
}
