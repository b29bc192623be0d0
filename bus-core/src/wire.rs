//! Reading what .NET writes: decimals as strings, PascalCase property names.

use std::fmt::Display;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde_json::Value;

/// Deserializes a number written either as a JSON number or as a string, as .NET writes
/// `decimal` values. Use it with `#[serde(deserialize_with = "...")]`.
///
/// ```
/// use serde::Deserialize;
/// #[derive(Deserialize)]
/// struct Payment {
///     #[serde(deserialize_with = "bus_core::wire::number_or_string")]
///     amount: f64,
/// }
/// let a: Payment = serde_json::from_str(r#"{"amount":"12.50"}"#).unwrap();
/// let b: Payment = serde_json::from_str(r#"{"amount":12.5}"#).unwrap();
/// assert_eq!(a.amount, b.amount);
/// ```
pub fn number_or_string<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    struct NumberOrString<T>(std::marker::PhantomData<T>);
    impl<T: FromStr> Visitor<'_> for NumberOrString<T>
    where
        T::Err: Display,
    {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number, or a string holding one")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            v.trim().parse().map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
    }
    deserializer.deserialize_any(NumberOrString(std::marker::PhantomData))
}

/// A number written as a JSON string and read from either, as MassTransit 8 (System.Text.Json
/// with its decimal converter) writes and reads `decimal`: for `#[serde(with = "...")]` on a
/// field whose type prints and parses its exact value (an integer, or a decimal type such
/// as `rust_decimal::Decimal`).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// #[serde(rename_all = "camelCase")]
/// struct Invoice {
///     #[serde(with = "bus_core::wire::decimal_string")]
///     amount_in_cents: i64,
/// }
/// let json = serde_json::to_string(&Invoice { amount_in_cents: 1250 }).unwrap();
/// assert_eq!(json, r#"{"amountInCents":"1250"}"#);
/// let from_number: Invoice = serde_json::from_str(r#"{"amountInCents":1250}"#).unwrap();
/// assert_eq!(from_number, Invoice { amount_in_cents: 1250 });
/// ```
pub mod decimal_string {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserializer, Serializer};

    /// Writes the value as a string.
    pub fn serialize<T: Display, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    /// Reads a number or a string holding one.
    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        super::number_or_string(deserializer)
    }
}

/// The transport header value that stands for a time set with
/// [`SendOptions::header_time`](crate::SendOptions::header_time), `seconds` after the epoch:
/// transports write it as their own time type.
pub fn time_header(seconds: i64) -> Value {
    serde_json::json!({ crate::header_names::TIME_VALUE_KEY: seconds })
}

/// The seconds after the epoch a header value made by [`time_header`] stands for.
///
/// ```
/// use bus_core::wire::{time_header, time_header_seconds, time_text};
/// assert_eq!(time_header_seconds(&time_header(1_800_000_000)), Some(1_800_000_000));
/// assert_eq!(time_header_seconds(&serde_json::json!("2027-01-15")), None);
/// assert_eq!(time_text(1_800_000_000).as_deref(), Some("2027-01-15T08:00:00.0000000Z"));
/// ```
pub fn time_header_seconds(value: &Value) -> Option<i64> {
    value.as_object().filter(|o| o.len() == 1)?.get(crate::header_names::TIME_VALUE_KEY)?.as_i64()
}

/// A time `seconds` after the epoch as MassTransit's round-trip text (seven fraction
/// digits); `None` past what a time holds.
pub fn time_text(seconds: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(seconds, 0).map(|t| crate::envelope::format_time(&t))
}

/// Rewrites object keys to camelCase (first letter lowercased), recursively: a second
/// chance for payloads written with PascalCase names, since MassTransit readers match
/// property names case-insensitively.
pub(crate) fn camel_case_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let mut chars = k.chars();
                    let key = match chars.next() {
                        Some(first) => first.to_lowercase().chain(chars).collect(),
                        None => k,
                    };
                    (key, camel_case_keys(v))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(camel_case_keys).collect()),
        other => other,
    }
}
