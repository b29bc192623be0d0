//! The RabbitMQ management HTTP API, when the broker has the plugin enabled: the only way to
//! list queues, exchanges and bindings, and to count unacknowledged messages.

use std::time::Duration;

use serde::Deserialize;

use crate::{Error, Result};

/// One queue, as the API reports it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct QueueInfo {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) messages_ready: u64,
    #[serde(default)]
    pub(crate) messages_unacknowledged: u64,
    #[serde(default)]
    pub(crate) consumers: u64,
    #[serde(default)]
    pub(crate) message_stats: Option<MessageStats>,
}

/// A queue's message rates.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct MessageStats {
    #[serde(default)]
    pub(crate) publish_details: Option<Rate>,
    #[serde(default)]
    pub(crate) deliver_get_details: Option<Rate>,
}

/// Messages per second.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub(crate) struct Rate {
    #[serde(default)]
    pub(crate) rate: f64,
}

/// One exchange.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ExchangeInfo {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) kind: String,
}

/// One binding: `source` routes to `destination` (a queue or an exchange).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct BindingInfo {
    pub(crate) source: String,
    pub(crate) destination: String,
    pub(crate) destination_type: String,
    #[serde(default)]
    pub(crate) routing_key: String,
}

/// The API of the broker at an AMQP address.
#[derive(Debug)]
pub(crate) struct Management {
    client: reqwest::Client,
    base: String,
    user: String,
    password: String,
    /// The vhost, escaped for a path.
    vhost: String,
}

impl Management {
    /// The API at `explicit`, else on port 15672 of the AMQP address's host, with the AMQP
    /// address's user and vhost; `None` when it does not answer (the plugin is not enabled).
    pub(crate) async fn detect(amqp: &str, explicit: Option<&str>) -> Option<Management> {
        let uri: lapin::uri::AMQPUri = amqp.parse().ok()?;
        let base = match explicit {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                // Beside a TLS broker the API is asked over TLS too (port 15671).
                let (scheme, port) = match uri.scheme {
                    lapin::uri::AMQPScheme::AMQPS => ("https", 15671),
                    lapin::uri::AMQPScheme::AMQP => ("http", 15672),
                };
                let host = &uri.authority.host;
                let host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
                format!("{scheme}://{host}:{port}")
            }
        };
        let vhost = crate::path_segment(&uri.vhost);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .build()
            .ok()?;
        let management = Management {
            client,
            base,
            user: uri.authority.userinfo.username.clone(),
            password: uri.authority.userinfo.password.clone(),
            vhost,
        };
        management.get::<serde_json::Value>("/api/overview").await.ok()?;
        Some(management)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let response = self
            .client
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| Error::Management(format!("{url}: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Error::Management(format!("{url}: {status}")));
        }
        response.json().await.map_err(|e| Error::Management(format!("{url}: {e}")))
    }

    /// Every queue of the vhost.
    pub(crate) async fn queues(&self) -> Result<Vec<QueueInfo>> {
        self.get(&format!("/api/queues/{}?columns=name,messages_ready,messages_unacknowledged,consumers", self.vhost))
            .await
    }

    /// Every exchange of the vhost.
    pub(crate) async fn exchanges(&self) -> Result<Vec<ExchangeInfo>> {
        self.get(&format!("/api/exchanges/{}?columns=name,type", self.vhost)).await
    }

    /// Every binding of the vhost.
    pub(crate) async fn bindings(&self) -> Result<Vec<BindingInfo>> {
        self.get(&format!("/api/bindings/{}", self.vhost)).await
    }
}
