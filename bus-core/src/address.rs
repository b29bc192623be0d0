//! Endpoint addresses: `queue:name`, `exchange:name`, or a URI whose last path segment is the name.

use crate::{Error, Result};

/// The entity (queue or exchange) name an address points to.
///
/// Accepts MassTransit's short forms and full URIs of any transport; the query string
/// (`?temporary=true`) is ignored.
///
/// ```
/// use bus_core::address::entity_name;
/// assert_eq!(entity_name("queue:orders").unwrap(), "orders");
/// assert_eq!(entity_name("exchange:Shop:OrderPlaced").unwrap(), "Shop:OrderPlaced");
/// assert_eq!(entity_name("rabbitmq://localhost/vhost/orders?durable=true").unwrap(), "orders");
/// assert_eq!(entity_name("loopback://localhost/orders").unwrap(), "orders");
/// assert_eq!(entity_name("orders").unwrap(), "orders");
/// assert!(entity_name("rabbitmq://localhost/").is_err());
/// ```
pub fn entity_name(address: &str) -> Result<&str> {
    let invalid = || Error::InvalidAddress(address.to_owned());
    let address = address.trim();
    if let Some(name) = address.strip_prefix("queue:").or_else(|| address.strip_prefix("exchange:")) {
        return if name.is_empty() { Err(invalid()) } else { Ok(name) };
    }
    let Some((_, rest)) = address.split_once("://") else {
        return if address.is_empty() { Err(invalid()) } else { Ok(address) };
    };
    let path = rest.split(['?', '#']).next().unwrap_or("");
    let name = path.split_once('/').map(|(_, p)| p).unwrap_or("").rsplit('/').next().unwrap_or("");
    if name.is_empty() {
        Err(invalid())
    } else {
        Ok(name)
    }
}
