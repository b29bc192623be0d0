//! Endpoint names derived from consumer type names.

use std::fmt::Debug;

/// Turns a consumer's type name into an endpoint (queue) name.
pub trait EndpointNameFormatter: Debug + Send + Sync + 'static {
    /// The endpoint name for a consumer type (a full Rust path such as `my_app::SubmitOrderConsumer`).
    fn consumer(&self, type_name: &str) -> String;
}

/// The bare type name: its path, generics and a `Consumer` or `Saga` suffix removed.
fn base_name(type_name: &str) -> &str {
    let without_generics = type_name.split('<').next().unwrap_or(type_name);
    let last = without_generics.rsplit("::").next().unwrap_or(without_generics);
    ["Consumer", "Saga"]
        .iter()
        .find_map(|suffix| last.strip_suffix(suffix).filter(|rest| !rest.is_empty()))
        .unwrap_or(last)
}

fn separated(name: &str, separator: char) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    let chars: Vec<char> = name.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let after_lower = i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
            let acronym_end =
                i > 0 && chars[i - 1].is_uppercase() && chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if after_lower || acronym_end {
                out.push(separator);
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(*c);
        }
    }
    out
}

/// MassTransit's default: `SubmitOrderConsumer` -> `SubmitOrder`.
///
/// ```
/// use bus_core::{DefaultEndpointNameFormatter, EndpointNameFormatter};
/// assert_eq!(DefaultEndpointNameFormatter.consumer("app::SubmitOrderConsumer"), "SubmitOrder");
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultEndpointNameFormatter;

impl EndpointNameFormatter for DefaultEndpointNameFormatter {
    fn consumer(&self, type_name: &str) -> String {
        base_name(type_name).to_owned()
    }
}

/// Kebab case: `SubmitOrderConsumer` -> `submit-order`.
///
/// ```
/// use bus_core::{KebabCaseEndpointNameFormatter, EndpointNameFormatter};
/// assert_eq!(KebabCaseEndpointNameFormatter.consumer("app::SubmitOrderConsumer"), "submit-order");
/// assert_eq!(KebabCaseEndpointNameFormatter.consumer("HTTPRequestConsumer"), "http-request");
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct KebabCaseEndpointNameFormatter;

impl EndpointNameFormatter for KebabCaseEndpointNameFormatter {
    fn consumer(&self, type_name: &str) -> String {
        separated(base_name(type_name), '-')
    }
}

/// Snake case: `SubmitOrderConsumer` -> `submit_order`.
///
/// ```
/// use bus_core::{SnakeCaseEndpointNameFormatter, EndpointNameFormatter};
/// assert_eq!(SnakeCaseEndpointNameFormatter.consumer("SubmitOrderConsumer"), "submit_order");
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SnakeCaseEndpointNameFormatter;

impl EndpointNameFormatter for SnakeCaseEndpointNameFormatter {
    fn consumer(&self, type_name: &str) -> String {
        separated(base_name(type_name), '_')
    }
}
