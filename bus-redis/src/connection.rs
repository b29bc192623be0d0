//! One connection to Redis, whichever way Redis is deployed: a single server, a Redis
//! Cluster, or a master watched by Sentinel. Each reconnects by itself and follows a failover.

use std::sync::Arc;
use std::time::Duration;

use bus_core::sync::MutexExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// Where Redis is and how it is deployed.
///
/// One string says it all ([`parse`](Self::parse)):
/// - `redis://host:port/db` (or `rediss://`, `redis+unix://`): one server;
/// - `redis-cluster://host1:port1,host2:port2`: a Redis Cluster, found from any of its nodes;
/// - `redis-sentinel://host1:port1,host2:port2/service`: the master Sentinel names `service`.
///
/// User and password before the hosts (`redis-cluster://:secret@h1:7000,h2:7001`) are those of
/// the data nodes; Sentinel nodes are asked without them. A Sentinel address's password is
/// taken as written (not percent-decoded).
///
/// ```
/// use bus_redis::RedisConfig;
/// let cluster = RedisConfig::parse("redis-cluster://127.0.0.1:7000,127.0.0.1:7001").unwrap();
/// assert_eq!(cluster, RedisConfig::Cluster(vec!["redis://127.0.0.1:7000".into(), "redis://127.0.0.1:7001".into()]));
/// let sentinel = RedisConfig::parse("redis-sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/orders").unwrap();
/// assert!(matches!(sentinel, RedisConfig::Sentinel { ref service, .. } if service == "orders"));
/// assert!(RedisConfig::parse("redis-sentinel://10.0.0.1:26379").is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub enum RedisConfig {
    /// One server, by URL.
    Single(String),
    /// A Redis Cluster: URLs of some of its nodes (the client learns the rest).
    Cluster(Vec<String>),
    /// A master and its replicas watched by Sentinel.
    Sentinel {
        /// URLs of the Sentinel nodes.
        sentinels: Vec<String>,
        /// The name the Sentinels know the master by (`sentinel monitor <service> ...`).
        service: String,
        /// User name for the master, if any.
        username: Option<String>,
        /// Password for the master, if any.
        password: Option<String>,
    },
}

impl std::fmt::Debug for RedisConfig {
    // By hand: the URLs and the password would reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |urls: &[String]| urls.iter().map(|u| redact(u)).collect::<Vec<_>>();
        match self {
            RedisConfig::Single(url) => f.debug_tuple("Single").field(&redact(url)).finish(),
            RedisConfig::Cluster(nodes) => f.debug_tuple("Cluster").field(&redacted(nodes)).finish(),
            RedisConfig::Sentinel { sentinels, service, username, password } => f
                .debug_struct("Sentinel")
                .field("sentinels", &redacted(sentinels))
                .field("service", service)
                .field("username", username)
                .field("password", &password.as_ref().map(|_| "***"))
                .finish(),
        }
    }
}

fn invalid(message: String) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, "invalid Redis address", message))
}

/// Splits `userinfo@host1,host2/path` into its parts; the user information ends at the last
/// `@` (a password may hold `@` or `/`; hosts and a service name hold neither).
fn split_hosts(rest: &str) -> (Option<&str>, Vec<&str>, &str) {
    let (userinfo, after) = match rest.rsplit_once('@') {
        Some((userinfo, after)) => (Some(userinfo), after),
        None => (None, rest),
    };
    let (hosts, path) = after.split_once('/').unwrap_or((after, ""));
    let hosts = hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).collect();
    (userinfo, hosts, path)
}

impl RedisConfig {
    /// Reads an address in one of the three forms (see the type's documentation).
    ///
    /// # Errors
    ///
    /// A cluster or Sentinel address without hosts, or a Sentinel address without the
    /// service's name.
    pub fn parse(address: &str) -> RedisResult<RedisConfig> {
        if let Some(rest) = address.strip_prefix("redis-cluster://") {
            let (userinfo, hosts, _) = split_hosts(rest);
            if hosts.is_empty() {
                return Err(invalid(format!("`{}` names no cluster node", redact(address))));
            }
            let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            return Ok(RedisConfig::Cluster(hosts.iter().map(|h| format!("redis://{auth}{h}")).collect()));
        }
        if let Some(rest) = address.strip_prefix("redis-sentinel://") {
            let (userinfo, hosts, service) = split_hosts(rest);
            if hosts.is_empty() || service.is_empty() {
                return Err(invalid(format!(
                    "`{}`: a Sentinel address is redis-sentinel://host:port[,host:port...]/service",
                    redact(address)
                )));
            }
            let (username, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
                Some((user, password)) => (
                    Some(user.to_owned()).filter(|u| !u.is_empty()),
                    Some(password.to_owned()).filter(|p| !p.is_empty()),
                ),
                None => (None, None),
            };
            return Ok(RedisConfig::Sentinel {
                sentinels: hosts.iter().map(|h| format!("redis://{h}")).collect(),
                service: service.to_owned(),
                username,
                password,
            });
        }
        Ok(RedisConfig::Single(address.to_owned()))
    }

    /// Whether keys spread over hash slots (a Redis Cluster), so that a script or a
    /// transaction may only touch keys of one slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConfig::Cluster(_))
    }
}

/// The address with its password replaced by `***`, for errors and logs.
fn redact(address: &str) -> String {
    match address.split_once("://") {
        Some((scheme, rest)) => match split_hosts(rest).0 {
            Some(userinfo) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{}", &rest[userinfo.len() + 1..])
            }
            None => address.to_owned(),
        },
        None => address.to_owned(),
    }
}

/// Timeouts of a [`RedisConnection`].
#[derive(Debug, Clone, Copy)]
pub struct RedisTimeouts {
    /// How long connecting may take.
    pub connect: Duration,
    /// How long one command may take before it fails.
    pub response: Duration,
}

impl Default for RedisTimeouts {
    fn default() -> Self {
        RedisTimeouts { connect: Duration::from_secs(5), response: Duration::from_secs(5) }
    }
}

/// A connection to Redis, however it is deployed ([`RedisConfig`]), that reconnects by itself:
/// to the same server, to the node a Redis Cluster now serves a slot from, or to the master
/// Sentinel names after a failover. Cloning it is cheap; clones share the connection.
///
/// It is a [`ConnectionLike`], so every command of the `redis` crate runs on it. A command
/// that was in flight when the server went away fails (the caller retries); the next one
/// goes to the server now in charge.
///
/// ```no_run
/// use bus_redis::{RedisConfig, RedisConnection, RedisTimeouts};
/// # #[tokio::main] async fn main() -> redis::RedisResult<()> {
/// let config = RedisConfig::parse("redis-cluster://127.0.0.1:7000,127.0.0.1:7001")?;
/// let mut connection = RedisConnection::connect(&config, RedisTimeouts::default()).await?;
/// let _: () = redis::cmd("SET").arg("greeting").arg("hello").query_async(&mut connection).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConnection {
    inner: Inner,
    cluster: bool,
}

#[derive(Clone)]
enum Inner {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.inner {
            Inner::Single(_) => "single",
            Inner::Cluster(_) => "cluster",
            Inner::Sentinel(_) => "sentinel",
        };
        f.debug_struct("RedisConnection").field("deployment", &kind).finish_non_exhaustive()
    }
}

impl RedisConnection {
    /// Connects as `config` says; fails when no server answers within `timeouts.connect`.
    ///
    /// # Errors
    ///
    /// A bad address, or no server (or no Sentinel) answering.
    pub async fn connect(config: &RedisConfig, timeouts: RedisTimeouts) -> RedisResult<RedisConnection> {
        let inner = match config {
            RedisConfig::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let manager = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_response_timeout(Some(timeouts.response))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Inner::Single(ConnectionManager::new_with_config(client, manager).await?)
            }
            RedisConfig::Cluster(nodes) => {
                // Retries cover a failover: the slot map is read again after `MOVED` or a lost
                // node, and the command goes to the node that now serves the slot.
                let client = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                    .connection_timeout(timeouts.connect)
                    .response_timeout(timeouts.response)
                    .retries(8)
                    .build()?;
                Inner::Cluster(client.get_async_connection().await?)
            }
            RedisConfig::Sentinel { sentinels, service, username, password } => {
                let mut info = redis::RedisConnectionInfo::default();
                if let Some(username) = username {
                    info = info.set_username(username);
                }
                if let Some(password) = password {
                    info = info.set_password(password);
                }
                let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
                let client = SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    service.to_string(),
                    Some(node),
                    SentinelServerType::Master,
                )?;
                let connection = SentinelConnection {
                    shared: Arc::new(SentinelShared {
                        client: tokio::sync::Mutex::new(client),
                        current: std::sync::Mutex::new(None),
                        opened: std::sync::atomic::AtomicU64::new(0),
                        config: AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(timeouts.connect))
                            .set_response_timeout(Some(timeouts.response)),
                    }),
                };
                connection.current().await?;
                Inner::Sentinel(connection)
            }
        };
        Ok(RedisConnection { inner, cluster: config.is_cluster() })
    }

    /// Wraps a [`ConnectionManager`] to one server.
    pub fn from_manager(manager: ConnectionManager) -> RedisConnection {
        RedisConnection { inner: Inner::Single(manager), cluster: false }
    }

    /// Whether this is a Redis Cluster, where a script may only touch keys of one hash slot.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.inner {
            Inner::Single(c) => c.req_packed_command(cmd),
            Inner::Cluster(c) => c.req_packed_command(cmd),
            Inner::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.inner {
            Inner::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single(c) => c.get_db(),
            Inner::Cluster(c) => c.get_db(),
            Inner::Sentinel(_) => 0,
        }
    }
}

/// The master Sentinel names, connected again (asking the Sentinels anew) after an error that
/// says the server went away or is no longer the master (`READONLY` after a failover).
#[derive(Clone)]
struct SentinelConnection {
    shared: Arc<SentinelShared>,
}

struct SentinelShared {
    client: tokio::sync::Mutex<SentinelClient>,
    /// The current master connection and its number, so that an error forgets only the
    /// connection it happened on.
    current: std::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Numbers connections, never twice the same.
    opened: std::sync::atomic::AtomicU64,
    config: AsyncConnectionConfig,
}

/// Whether an error means the connection no longer reaches the master.
fn lost_master(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown)
        )
}

impl SentinelConnection {
    async fn current(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.shared.current.locked().clone() {
            return Ok(current);
        }
        // One reconnection at a time: the others wait for it and share its result.
        let mut client = self.shared.client.lock().await;
        if let Some(current) = self.shared.current.locked().clone() {
            return Ok(current);
        }
        let master = client.async_get_client().await?;
        let connection = master.get_multiplexed_async_connection_with_config(&self.shared.config).await?;
        let number = self.shared.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.shared.current.locked() = Some((number, connection.clone()));
        Ok((number, connection))
    }

    /// `result` of a command on connection `number`; an error that says the master went away
    /// forgets that connection (not a newer one), so that the next command asks Sentinel again.
    fn checked<T>(&self, number: u64, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(error) = &result {
            if lost_master(error) {
                let mut current = self.shared.current.locked();
                if current.as_ref().is_some_and(|(n, _)| *n == number) {
                    tracing::warn!(%error, "the Redis master went away; asking Sentinel for the master again");
                    *current = None;
                }
            }
        }
        result
    }

    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (number, mut connection) = self.current().await?;
            self.checked(number, connection.req_packed_command(cmd).await)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (number, mut connection) = self.current().await?;
            self.checked(number, connection.req_packed_commands(pipeline, offset, count).await)
        })
    }
}

/// Whether `key` carries a hash tag (`{...}` with something inside): only the tag decides its
/// slot in a Redis Cluster.
pub fn has_hash_tag(key: &str) -> bool {
    key.find('{').is_some_and(|open| key[open + 1..].find('}').is_some_and(|close| close > 0))
}

/// A key that lives in the same hash slot as `key`: `key` followed by `suffix` when `key`
/// carries a hash tag already, else `{key}` followed by `suffix` (the tag is the whole key,
/// which hashes like `key` itself).
///
/// ```
/// use bus_redis::same_slot;
/// assert_eq!(same_slot("orders:42", ":indexes"), "{orders:42}:indexes");
/// assert_eq!(same_slot("{orders}:42", ":indexes"), "{orders}:42:indexes");
/// ```
pub fn same_slot(key: &str, suffix: &str) -> String {
    if has_hash_tag(key) {
        format!("{key}{suffix}")
    } else {
        format!("{{{key}}}{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_in_their_three_forms() {
        assert_eq!(RedisConfig::parse("redis://h:1/2").unwrap(), RedisConfig::Single("redis://h:1/2".into()));
        assert_eq!(
            RedisConfig::parse("redis-cluster://u:p@w@a:1, b:2").unwrap(),
            RedisConfig::Cluster(vec!["redis://u:p@w@a:1".into(), "redis://u:p@w@b:2".into()])
        );
        assert_eq!(
            RedisConfig::parse("redis-sentinel://:pw@a:26379/mymaster").unwrap(),
            RedisConfig::Sentinel {
                sentinels: vec!["redis://a:26379".into()],
                service: "mymaster".into(),
                username: None,
                password: Some("pw".into()),
            }
        );
        let error = RedisConfig::parse("redis-cluster://:secret@").unwrap_err().to_string();
        assert!(error.contains("names no cluster node") && !error.contains("secret"), "{error}");
    }

    #[test]
    fn hash_tags_need_something_inside() {
        assert!(has_hash_tag("{a}b"));
        assert!(!has_hash_tag("{}ab"));
        assert!(!has_hash_tag("a{b"));
    }
}

#[cfg(test)]
mod secret_tests {
    use super::RedisConfig;

    #[test]
    fn passwords_stay_out_of_debug_and_errors() {
        let config = RedisConfig::parse("redis-sentinel://:pa/ss@a:26379,b:26379/orders").unwrap();
        assert!(
            matches!(&config, RedisConfig::Sentinel { sentinels, service, .. } if sentinels.len() == 2 && service == "orders")
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("pa/ss"), "{shown}");
        let cluster = RedisConfig::parse("redis-cluster://:pa/ss@a:7000").unwrap();
        assert!(!format!("{cluster:?}").contains("pa/ss"));
    }
}
