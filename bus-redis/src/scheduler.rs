//! Scheduled messages in Redis.

use std::time::Duration;

use bus_core::logged::chain;
use bus_core::{
    Bus, Headers, MessageScheduler, PreparedDestination, PreparedMessage, ScheduledMessage, TransportMessage,
};
use futures::future::BoxFuture;
use futures::StreamExt;
use redis::{AsyncCommands, Script};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{has_hash_tag, RedisConfig, RedisConnection, RedisTimeouts};

/// Settings of a [`RedisScheduler`].
#[derive(Debug, Clone)]
pub struct RedisSchedulerOptions {
    /// Keys are `{key_prefix}:due`, `{key_prefix}:claimed` and `{key_prefix}:message:{token}`.
    /// On a Redis Cluster the prefix goes in braces (a hash tag) unless it carries one: the
    /// scripts touch several of the keys at once, so they must all live in one slot.
    pub key_prefix: String,
    /// How long a claimed message may take to be delivered before another instance claims it
    /// again (the claiming one is taken to have died).
    pub lease: Duration,
    /// How often due messages are looked for when none is due sooner.
    pub poll_interval: Duration,
    /// How many due messages are claimed at once.
    pub batch_size: usize,
}

impl Default for RedisSchedulerOptions {
    fn default() -> Self {
        RedisSchedulerOptions {
            key_prefix: "bus:scheduled".to_owned(),
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            batch_size: 100,
        }
    }
}

/// Moves up to ARGV[2] messages due by ARGV[1] (ms) from the due set to the claims, with a
/// lease until ARGV[3]; first gives back claims whose lease ran out. Returns their tokens,
/// earliest first (ties in the order scheduled: the bus's tokens are ordered as they were
/// made, within a millisecond too).
const CLAIM: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, token in ipairs(expired) do
  redis.call('ZREM', KEYS[2], token)
  redis.call('ZADD', KEYS[1], ARGV[1], token)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, token in ipairs(due) do
  redis.call('ZREM', KEYS[1], token)
  redis.call('ZADD', KEYS[2], ARGV[3], token)
end
return due
";

/// Settles a fired batch: KEYS[1] the claimed set, KEYS[2..] the messages' keys; ARGV token
/// and nonce pairs, one per message. Each claim is dropped; each message is deleted only if
/// it is still the one fired (same nonce): one scheduled again under its token meanwhile stays.
const SETTLE: &str = r"
for i = 2, #KEYS do
  local token = ARGV[2 * i - 3]
  local nonce = ARGV[2 * i - 2]
  if nonce == '' or redis.call('HGET', KEYS[i], 'nonce') == nonce then
    redis.call('DEL', KEYS[i])
  end
  redis.call('ZREM', KEYS[1], token)
end
return 1
";

/// Stores a message and makes it due: KEYS[1] its hash, KEYS[2] the due set; ARGV[1] its
/// token, ARGV[2] its due time (ms), then field and value pairs. One script rather than a
/// transaction, which a Redis Cluster client may not carry: a token in the due set always
/// has its message.
const SCHEDULE: &str = r"
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
";

/// A durable [`MessageScheduler`] on Redis (see the crate's documentation).
///
/// ```no_run
/// use std::time::Duration;
/// use bus_core::{Bus, Message};
/// use bus_redis::{RedisScheduler, RedisSchedulerOptions};
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
/// # #[message(urn = "urn:message:Shop:OrderTimeout")]
/// # struct OrderTimeout { order_id: i64 }
/// # #[tokio::main] async fn main() -> Result<(), bus_core::BoxError> {
/// let scheduler = RedisScheduler::connect("redis://127.0.0.1:6379", RedisSchedulerOptions::default()).await?;
/// let bus = Bus::builder(bus_inmemory::InMemoryTransport::new()).scheduler(scheduler).build();
/// bus.start().await?;
/// bus.schedule_send(Duration::from_secs(30), "queue:orders", OrderTimeout { order_id: 7 }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisScheduler {
    connection: RedisConnection,
    options: RedisSchedulerOptions,
    claim: Script,
    settle: Script,
    store: Script,
}

impl std::fmt::Debug for RedisScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisScheduler").field("options", &self.options).finish_non_exhaustive()
    }
}

fn transport_error(error: redis::RedisError) -> bus_core::Error {
    let transient = error.is_io_error() || error.is_timeout() || error.is_connection_dropped();
    bus_core::Error::transport("the Redis scheduler failed", transient, Some(Box::new(error) as bus_core::BoxError))
}

/// How many messages of a batch are delivered at once.
const IN_FLIGHT: usize = 64;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl RedisScheduler {
    /// Connects to the Redis at `address`: one server, a Redis Cluster or a master watched by
    /// Sentinel ([`RedisConfig::parse`]).
    pub async fn connect(address: &str, options: RedisSchedulerOptions) -> bus_core::Result<Self> {
        let config = RedisConfig::parse(address).map_err(transport_error)?;
        let connection = RedisConnection::connect(&config, RedisTimeouts::default()).await.map_err(transport_error)?;
        Self::with_connection(connection, options)
    }

    /// Uses an existing connection.
    ///
    /// # Errors
    ///
    /// On a Redis Cluster, a key prefix with a brace but no hash tag (`orders}`): put in
    /// braces, it would hash on part of itself.
    pub fn with_connection(connection: RedisConnection, options: RedisSchedulerOptions) -> bus_core::Result<Self> {
        let prefix = &options.key_prefix;
        if connection.is_cluster() && prefix.contains(['{', '}']) && !has_hash_tag(prefix) {
            return Err(bus_core::Error::transport(
                format!("the scheduler's key prefix `{prefix}` has a brace but no hash tag; on a Redis Cluster use `{{name}}` or no brace"),
                false,
                None,
            ));
        }
        Ok(RedisScheduler {
            connection,
            options,
            claim: Script::new(CLAIM),
            settle: Script::new(SETTLE),
            store: Script::new(SCHEDULE),
        })
    }

    /// The prefix every key starts with: the configured one; on a Redis Cluster, in braces
    /// unless it carries a hash tag already.
    fn prefix(&self) -> String {
        let prefix = &self.options.key_prefix;
        if !self.connection.is_cluster() || has_hash_tag(prefix) {
            prefix.clone()
        } else {
            format!("{{{prefix}}}")
        }
    }

    fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.prefix())
    }

    fn message_key(&self, token: &str) -> String {
        format!("{}:message:{token}", self.prefix())
    }

    /// How many messages wait (claimed ones included).
    pub async fn waiting(&self) -> bus_core::Result<u64> {
        let mut connection = self.connection.clone();
        let due: u64 = connection.zcard(self.key("due")).await.map_err(transport_error)?;
        let claimed: u64 = connection.zcard(self.key("claimed")).await.map_err(transport_error)?;
        Ok(due + claimed)
    }

    /// Claims and delivers the due messages of one batch; returns how many it claimed.
    async fn fire(&self, bus: &Bus) -> bus_core::Result<usize> {
        let mut connection = self.connection.clone();
        let lease_until = now_ms() + i64::try_from(self.options.lease.as_millis()).unwrap_or(i64::MAX / 2);
        let tokens: Vec<String> = self
            .claim
            .key(self.key("due"))
            .key(self.key("claimed"))
            .arg(now_ms())
            .arg(self.options.batch_size)
            .arg(lease_until)
            .invoke_async(&mut connection)
            .await
            .map_err(transport_error)?;
        if tokens.is_empty() {
            return Ok(0);
        }
        // The batch's messages in one round trip.
        let mut read = redis::pipe();
        for token in &tokens {
            read.hgetall(self.message_key(token));
        }
        let stored: Vec<Vec<(String, Vec<u8>)>> = read.query_async(&mut connection).await.map_err(transport_error)?;
        // Delivered side by side (started in due order); each settles on its own.
        let claimed = tokens.len();
        let deliveries: Vec<_> = tokens
            .into_iter()
            .zip(stored)
            .map(|(token, fields)| {
                let bus = bus.clone();
                async move { deliver(&bus, token, fields).await }
            })
            .collect();
        let settled: Vec<(String, String, Option<bus_core::Error>)> =
            futures::stream::iter(deliveries).buffered(IN_FLIGHT.min(self.options.batch_size.max(1))).collect().await;
        // Those delivered (or dropped) are done; one that failed keeps its claim, and is
        // claimed again when the claim runs out.
        let mut settle = self.settle.key(self.key("claimed"));
        let mut failure = None;
        for (token, nonce, error) in settled {
            match error {
                None => {
                    settle.key(self.message_key(&token)).arg(token).arg(nonce);
                }
                Some(error) => failure = Some(error),
            }
        }
        let _: i64 = settle.invoke_async(&mut connection).await.map_err(transport_error)?;
        if let Some(error) = failure {
            return Err(error);
        }
        Ok(claimed)
    }
}

/// Delivers one claimed message; the error when it could not be delivered yet (it keeps its
/// claim), `None` when it is done with (delivered, or dropped as undeliverable).
async fn deliver(
    bus: &Bus,
    token: String,
    fields: Vec<(String, Vec<u8>)>,
) -> (String, String, Option<bus_core::Error>) {
    let nonce = fields
        .iter()
        .find(|(name, _)| name == "nonce")
        .and_then(|(_, value)| String::from_utf8(value.clone()).ok())
        .unwrap_or_default();
    let Some(prepared) = message(fields) else {
        tracing::error!(%token, "a scheduled message in Redis is incomplete; dropped");
        return (token, nonce, None);
    };
    let failure = match bus.deliver(prepared).await {
        Ok(()) => None,
        Err(error) if error.is_transient() || matches!(error, bus_core::Error::Stopped) => {
            tracing::warn!(%token, error = %chain(&error), "a scheduled message could not be delivered yet");
            Some(error)
        }
        Err(error) => {
            tracing::error!(%token, error = %chain(&error), "a scheduled message was refused; dropped");
            None
        }
    };
    (token, nonce, failure)
}

/// A stored message back from its hash's fields.
fn message(fields: Vec<(String, Vec<u8>)>) -> Option<PreparedMessage> {
    let mut map: std::collections::HashMap<String, Vec<u8>> = fields.into_iter().collect();
    let text = |map: &mut std::collections::HashMap<String, Vec<u8>>, name: &str| {
        map.remove(name).and_then(|v| String::from_utf8(v).ok()).filter(|v| !v.is_empty())
    };
    let destination = match (text(&mut map, "kind")?.as_str(), text(&mut map, "destination")?) {
        ("publish", types) => PreparedDestination::Publish(types.split('\n').map(str::to_owned).collect()),
        ("send", endpoint) => PreparedDestination::Send(endpoint),
        _ => return None,
    };
    let headers: Headers = serde_json::from_str(&text(&mut map, "headers")?).ok()?;
    let expires_at = text(&mut map, "expires_at").and_then(|ms| ms.parse::<i64>().ok());
    let message = TransportMessage {
        body: map.remove("body").unwrap_or_default().into(),
        content_type: text(&mut map, "content_type").map(Into::into),
        headers,
        message_id: text(&mut map, "message_id").and_then(|id| id.parse().ok()),
        correlation_id: text(&mut map, "correlation_id").and_then(|id| id.parse().ok()),
        // What is left of its time to live; at least a moment, so that the broker expires it.
        time_to_live: expires_at.map(|at| Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(1).max(1))),
        priority: text(&mut map, "priority").and_then(|p| p.parse().ok()),
        routing_key: text(&mut map, "routing_key"),
    };
    Some(PreparedMessage { destination, message })
}

impl MessageScheduler for RedisScheduler {
    fn schedule<'a>(&'a self, scheduled: ScheduledMessage) -> BoxFuture<'a, bus_core::Result<()>> {
        Box::pin(async move {
            let ScheduledMessage { token, due, message: PreparedMessage { destination, message } } = scheduled;
            let (kind, destination) = match destination {
                PreparedDestination::Publish(types) => ("publish", types.join("\n")),
                PreparedDestination::Send(endpoint) => ("send", endpoint),
            };
            let headers = serde_json::to_string(&message.headers).map_err(bus_core::Error::Serialize)?;
            let expires_at = message
                .time_to_live
                .map(|ttl| now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2)));
            let token = token.to_string();
            let fields: Vec<(&str, Vec<u8>)> = vec![
                ("kind", kind.as_bytes().to_vec()),
                ("destination", destination.into_bytes()),
                ("headers", headers.into_bytes()),
                ("body", message.body.to_vec()),
                ("content_type", message.content_type.as_deref().unwrap_or("").as_bytes().to_vec()),
                ("message_id", message.message_id.map(|id| id.to_string()).unwrap_or_default().into_bytes()),
                ("correlation_id", message.correlation_id.map(|id| id.to_string()).unwrap_or_default().into_bytes()),
                ("expires_at", expires_at.map(|ms| ms.to_string()).unwrap_or_default().into_bytes()),
                ("priority", message.priority.map(|p| p.to_string()).unwrap_or_default().into_bytes()),
                ("routing_key", message.routing_key.clone().unwrap_or_default().into_bytes()),
                // Tells this scheduling from a later one under the same token.
                ("nonce", Uuid::now_v7().to_string().into_bytes()),
            ];
            let mut connection = self.connection.clone();
            let mut store = self.store.key(self.message_key(&token));
            store.key(self.key("due")).arg(&token).arg(due.time().timestamp_millis());
            for (name, value) in fields {
                store.arg(name).arg(value);
            }
            let _: i64 = store.invoke_async(&mut connection).await.map_err(transport_error)?;
            Ok(())
        })
    }

    fn cancel<'a>(&'a self, token: Uuid) -> BoxFuture<'a, bus_core::Result<bool>> {
        Box::pin(async move {
            let token = token.to_string();
            let mut connection = self.connection.clone();
            let removed: u64 = connection.zrem(self.key("due"), &token).await.map_err(transport_error)?;
            if removed > 0 {
                let _: () = connection.del(self.message_key(&token)).await.map_err(transport_error)?;
            }
            Ok(removed > 0)
        })
    }

    fn run(&self, bus: Bus, stop: CancellationToken) -> BoxFuture<'static, ()> {
        let scheduler = self.clone();
        Box::pin(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let pause = match scheduler.fire(&bus).await {
                    Ok(claimed) if claimed >= scheduler.options.batch_size => Duration::ZERO,
                    Ok(_) => {
                        backoff = Duration::from_millis(100);
                        scheduler.next_due().await.unwrap_or(scheduler.options.poll_interval)
                    }
                    Err(error) => {
                        tracing::warn!(error = %chain(&error), "scheduled messages could not be delivered; trying again after a pause");
                        let pause = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        pause
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        })
    }
}

impl RedisScheduler {
    /// How long until the next message is due, at most the poll interval.
    async fn next_due(&self) -> Option<Duration> {
        let mut connection = self.connection.clone();
        let first: Vec<(String, i64)> = connection.zrange_withscores(self.key("due"), 0, 0).await.ok()?;
        let (_, at) = first.into_iter().next()?;
        let wait = Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0));
        Some(wait.min(self.options.poll_interval))
    }
}
