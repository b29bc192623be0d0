use std::marker::PhantomData;
use std::time::Duration;

use bus_redis::{has_hash_tag, same_slot, RedisConfig, RedisConnection, RedisTimeouts};
use redis::Script;
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use super::SagaRepository;
use crate::{Error, Result, SagaInstance};

/// Settings of a [`RedisSagaRepository`].
#[derive(Debug, Clone)]
pub struct RedisSagaOptions {
    /// Keys are `{key_prefix}:{correlationId}`; an empty prefix stores under the bare id
    /// (MassTransit's default). The keys that go with an instance are `<instance key>_lock`
    /// and `<instance key>:indexes`; on a Redis Cluster, `{<instance key>}_lock` and
    /// `{<instance key>}:indexes` (a hash tag), so that they live in the instance's slot.
    pub key_prefix: String,
    /// Expiry of an instance, refreshed on every write; `None` keeps instances until deleted.
    pub expiry: Option<Duration>,
    /// Pessimistic mode: hold a lock key (`{key}_lock`, a random token, this lease) while a
    /// message is processed. `None` (default) is optimistic concurrency only.
    pub lock_lease: Option<Duration>,
    /// How long to wait for a lock held by another process.
    pub lock_wait: Duration,
    /// How long one Redis command may take before it fails (and the message is retried).
    pub response_timeout: Duration,
    /// Fields of the saga's data (top-level, as serialized) that events correlate by
    /// ([`StateMachineBuilder::event_correlated_by`](crate::StateMachineBuilder::event_correlated_by)):
    /// each is kept in a secondary index, `{key_prefix}:index:{field}:{value as JSON}` ->
    /// correlation id, written in the same script as the instance (the keys an instance owns
    /// are listed in `{key}:indexes`). Empty by default. The script that writes them touches
    /// index keys of any value, so on a Redis Cluster indexed fields need a key prefix with a
    /// hash tag (`{orders}`), which keeps all the saga's keys in one slot.
    pub indexed_fields: Vec<String>,
    /// After each write, wait until this many replicas have it (`WAIT`), at most
    /// [`replica_wait`](Self::replica_wait); 0 (default) does not wait. Redis replicates
    /// asynchronously: a master that dies right after a write may take it with it, and the
    /// replica that takes over has the instance as it was before; the message was
    /// acknowledged, so that update is lost. Waiting for one replica closes that window for a
    /// failover (at the cost of a round trip to the replica per write). A write that fewer
    /// replicas confirmed in time still counts (it is on the master) and is logged.
    pub replicas_to_wait_for: u32,
    /// How long a write waits for its replicas (see
    /// [`replicas_to_wait_for`](Self::replicas_to_wait_for)).
    pub replica_wait: Duration,
}

impl Default for RedisSagaOptions {
    fn default() -> Self {
        RedisSagaOptions {
            key_prefix: String::new(),
            expiry: None,
            lock_lease: None,
            lock_wait: Duration::from_secs(30),
            response_timeout: Duration::from_secs(5),
            indexed_fields: Vec::new(),
            replicas_to_wait_for: 0,
            replica_wait: Duration::from_millis(500),
        }
    }
}

// The scripts read the stored version as the first `"version":<digits>` in the JSON, not
// by decoding it (which cost more as instances grew): the instance writes its `version`
// before any field of the state or its applied events, and no JSON string can hold an
// unescaped quote, so the first match is the instance's own. Compared as text: exact for any
// u64, where Lua's numbers are doubles.

/// Replaces the instance only if the stored one has the expected version.
const UPDATE: &str = r#"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if string.match(current, '"version":(%d+)') ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"#;

/// Deletes the instance only if the stored one has the expected version.
const DELETE: &str = r#"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if string.match(current, '"version":(%d+)') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#;

/// Releases a lock only if it is still held with our token.
// With indexed fields: KEYS[1] the instance, KEYS[2] the set of index keys it owns, KEYS[3..]
// its index keys now; ARGV[1] the expected version (empty: insert), ARGV[2] the JSON,
// ARGV[3] the expiry in ms (0: none), ARGV[4] the correlation id. An index key is removed
// only while it still names this instance.
const WRITE_INDEXED: &str = r#"
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if current then return 0 end
else
  if not current then return 0 end
  if string.match(current, '"version":(%d+)') ~= ARGV[1] then return 0 end
end
local keep = {}
for i = 3, #KEYS do keep[KEYS[i]] = true end
for _, old in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not keep[old] and redis.call('GET', old) == ARGV[4] then redis.call('DEL', old) end
end
redis.call('DEL', KEYS[2])
local expiry = tonumber(ARGV[3])
if expiry > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', expiry)
else
  redis.call('SET', KEYS[1], ARGV[2])
end
for i = 3, #KEYS do
  if expiry > 0 then
    redis.call('SET', KEYS[i], ARGV[4], 'PX', expiry)
  else
    redis.call('SET', KEYS[i], ARGV[4])
  end
  redis.call('SADD', KEYS[2], KEYS[i])
end
if expiry > 0 and #KEYS > 2 then redis.call('PEXPIRE', KEYS[2], expiry) end
return 1
"#;

// KEYS[1] the instance, KEYS[2] its index set; ARGV[1] the expected version, ARGV[2] its id.
const DELETE_INDEXED: &str = r#"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if string.match(current, '"version":(%d+)') ~= ARGV[1] then return 0 end
for _, old in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('GET', old) == ARGV[2] then redis.call('DEL', old) end
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"#;

const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Saga instances in Redis, one string key each, as camelCase JSON with a `version`.
///
/// Insert is set-if-absent, so two concurrent initiating events never create two
/// instances (the loser runs again as an update); update and delete are atomic
/// compare-and-set on `version` (Lua). Redis unreachable makes the message fail
/// transiently: it is retried or redelivered, never lost or acked.
///
/// It runs on one Redis server, a Redis Cluster or a master watched by Sentinel
/// ([`RedisConfig`]): every script touches only the keys of one instance, which share a hash
/// slot, and the connection follows a failover.
///
/// ```no_run
/// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)] struct OrderState;
/// use bus_saga::{RedisSagaOptions, RedisSagaRepository};
/// # #[tokio::main] async fn main() -> bus_saga::Result<()> {
/// let repository = RedisSagaRepository::<OrderState>::connect("redis://127.0.0.1:6379", RedisSagaOptions::default()).await?;
/// # drop(repository);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisSagaRepository<S> {
    connection: RedisConnection,
    options: RedisSagaOptions,
    update: Script,
    delete: Script,
    write_indexed: Script,
    delete_indexed: Script,
    unlock: Script,
    _state: PhantomData<fn() -> S>,
}

impl<S> std::fmt::Debug for RedisSagaRepository<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSagaRepository").field("options", &self.options).finish_non_exhaustive()
    }
}

impl<S> RedisSagaRepository<S> {
    /// Connects to `address`: `redis://host:port/db` for one server,
    /// `redis-cluster://host:port,host:port` for a Redis Cluster,
    /// `redis-sentinel://host:port,host:port/service` for a master watched by Sentinel
    /// ([`RedisConfig::parse`]). The connection reconnects by itself and follows a failover.
    ///
    /// # Errors
    ///
    /// A bad address, no server answering, or indexed fields on a Redis Cluster without a
    /// hash tag in the key prefix ([`Error::Configuration`]).
    pub async fn connect(address: &str, options: RedisSagaOptions) -> Result<Self> {
        let config = RedisConfig::parse(address)?;
        let timeouts = RedisTimeouts { connect: options.response_timeout, response: options.response_timeout };
        let connection = RedisConnection::connect(&config, timeouts).await?;
        Self::with_connection(connection, options)
    }

    /// Uses an existing connection.
    ///
    /// # Errors
    ///
    /// Indexed fields on a Redis Cluster without a hash tag in the key prefix
    /// ([`Error::Configuration`]).
    pub fn with_connection(connection: RedisConnection, options: RedisSagaOptions) -> Result<Self> {
        let prefix = &options.key_prefix;
        if connection.is_cluster() && !options.indexed_fields.is_empty() && !has_hash_tag(prefix) {
            return Err(Error::Configuration(format!(
                "indexed fields ({}) on a Redis Cluster need a key prefix with a hash tag, such as `{{{}}}`: \
                 an instance and its index entries are written by one script, which may only touch keys of one slot",
                options.indexed_fields.join(", "),
                if prefix.is_empty() { "saga" } else { prefix.as_str() }
            )));
        }
        if connection.is_cluster() && prefix.contains(['{', '}']) && !has_hash_tag(prefix) {
            return Err(Error::Configuration(format!(
                "the key prefix `{prefix}` has a brace but no hash tag: on a Redis Cluster an instance's lock and \
                 index keys would land in another slot; use `{{name}}` or no brace"
            )));
        }
        if options.replicas_to_wait_for > 0 && options.replica_wait >= options.response_timeout {
            return Err(Error::Configuration(format!(
                "replica_wait ({:?}) must be shorter than response_timeout ({:?}), or every WAIT times out",
                options.replica_wait, options.response_timeout
            )));
        }
        Ok(RedisSagaRepository {
            connection,
            options,
            update: Script::new(UPDATE),
            delete: Script::new(DELETE),
            write_indexed: Script::new(WRITE_INDEXED),
            delete_indexed: Script::new(DELETE_INDEXED),
            unlock: Script::new(UNLOCK),
            _state: PhantomData,
        })
    }

    /// The key an instance is stored under.
    pub fn key(&self, id: Uuid) -> String {
        if self.options.key_prefix.is_empty() {
            id.to_string()
        } else {
            format!("{}:{id}", self.options.key_prefix)
        }
    }

    /// The key of the index entry for `field` equal to `value`.
    fn index_key(&self, field: &str, value: &serde_json::Value) -> String {
        format!("{}:index:{field}:{value}", self.options.key_prefix)
    }

    fn expiry_ms(&self) -> u64 {
        self.options.expiry.map_or(0, |e| u64::try_from(e.as_millis()).unwrap_or(u64::MAX).max(1))
    }

    /// A key that belongs with instance `id`'s key: on a Redis Cluster, in its hash slot.
    fn companion(&self, id: Uuid, suffix: &str) -> String {
        if self.connection.is_cluster() {
            same_slot(&self.key(id), suffix)
        } else {
            format!("{}{suffix}", self.key(id))
        }
    }

    /// Waits until the replicas asked for have the writes made so far (see
    /// [`RedisSagaOptions::replicas_to_wait_for`]).
    async fn replicated(&self, id: Uuid) {
        let wanted = self.options.replicas_to_wait_for;
        if wanted == 0 {
            return;
        }
        let wait_ms = u64::try_from(self.options.replica_wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut connection = self.connection.clone();
        // The write is done: a failed WAIT is reported, not returned, since the message tried
        // again would find its event applied already.
        match redis::cmd("WAIT").arg(wanted).arg(wait_ms).query_async::<u32>(&mut connection).await {
            Ok(acked) if acked < wanted => {
                tracing::warn!(instance = %id, acked, wanted, "a saga write reached fewer replicas than asked in time");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(instance = %id, %error, "could not wait for a saga write's replicas"),
        }
    }

    /// The connection, for tools and benchmarks that talk to the same Redis.
    pub fn connection(&self) -> RedisConnection {
        self.connection.clone()
    }
}

fn to_json<S: Serialize>(instance: &SagaInstance<S>) -> Result<String> {
    crate::instance::check_state_fields(&instance.data)?;
    serde_json::to_string(instance).map_err(|source| Error::Serialization { id: instance.correlation_id, source })
}

impl<S: Serialize + Clone> RedisSagaRepository<S> {
    /// Writes an instance and its index entries in one script: as new when `expected` is
    /// `None`, else over that version.
    async fn write_indexed(&self, stored: &SagaInstance<S>, expected: Option<u64>, expiry_ms: u64) -> Result<()> {
        let id = stored.correlation_id;
        let json = to_json(stored)?;
        let data = serde_json::to_value(&stored.data).map_err(|source| Error::Serialization { id, source })?;
        let mut script = self.write_indexed.key(self.key(id));
        script.key(self.companion(id, ":indexes"));
        for field in &self.options.indexed_fields {
            if let Some(value) = data.get(field).filter(|v| !v.is_null()) {
                script.key(self.index_key(field, value));
            }
        }
        let expected = expected.map(|v| v.to_string()).unwrap_or_default();
        let mut connection = self.connection.clone();
        let written: i64 =
            script.arg(expected).arg(json).arg(expiry_ms).arg(id.to_string()).invoke_async(&mut connection).await?;
        if written == 1 {
            {
                self.replicated(id).await;
                Ok(())
            }
        } else {
            Err(Error::Conflict(id))
        }
    }

    /// Stores a new instance (version 1), expiring after `expiry_ms` (0: never).
    async fn insert_expiring(&self, instance: &SagaInstance<S>, expiry_ms: u64) -> Result<()> {
        let mut stored = instance.clone();
        stored.version = 1;
        if !self.options.indexed_fields.is_empty() {
            return self.write_indexed(&stored, None, expiry_ms).await;
        }
        let mut command = redis::cmd("SET");
        command.arg(self.key(instance.correlation_id)).arg(to_json(&stored)?).arg("NX");
        if expiry_ms > 0 {
            command.arg("PX").arg(expiry_ms);
        }
        let mut connection = self.connection.clone();
        let set: Option<String> = command.query_async(&mut connection).await?;
        match set {
            Some(_) => {
                self.replicated(instance.correlation_id).await;
                Ok(())
            }
            None => Err(Error::Conflict(instance.correlation_id)),
        }
    }

    /// Replaces the instance stored with `expected_version`, expiring after `expiry_ms` (0: never).
    async fn update_expiring(&self, instance: &SagaInstance<S>, expected_version: u64, expiry_ms: u64) -> Result<()> {
        let mut stored = instance.clone();
        stored.version = Error::next_version(instance.correlation_id, expected_version)?;
        if !self.options.indexed_fields.is_empty() {
            return self.write_indexed(&stored, Some(expected_version), expiry_ms).await;
        }
        let mut connection = self.connection.clone();
        let updated: i64 = self
            .update
            .key(self.key(instance.correlation_id))
            .arg(expected_version)
            .arg(to_json(&stored)?)
            .arg(expiry_ms)
            .invoke_async(&mut connection)
            .await?;
        if updated == 1 {
            {
                self.replicated(instance.correlation_id).await;
                Ok(())
            }
        } else {
            Err(Error::Conflict(instance.correlation_id))
        }
    }
}

impl<S: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> SagaRepository<S> for RedisSagaRepository<S> {
    async fn load(&self, id: Uuid) -> Result<Option<SagaInstance<S>>> {
        let mut connection = self.connection.clone();
        let stored: Option<String> = redis::cmd("GET").arg(self.key(id)).query_async(&mut connection).await?;
        stored.map(|json| serde_json::from_str(&json).map_err(|source| Error::Serialization { id, source })).transpose()
    }

    async fn insert(&self, instance: &SagaInstance<S>) -> Result<()> {
        self.insert_expiring(instance, self.expiry_ms()).await
    }

    async fn update(&self, instance: &SagaInstance<S>, expected_version: u64) -> Result<()> {
        self.update_expiring(instance, expected_version, self.expiry_ms()).await
    }

    async fn keep_finalized(
        &self,
        instance: &SagaInstance<S>,
        expected: Option<u64>,
        keep_for: Duration,
    ) -> Result<()> {
        let keep_ms = u64::try_from(keep_for.as_millis()).unwrap_or(u64::MAX).max(1);
        let expiry_ms = match self.expiry_ms() {
            0 => keep_ms,
            expiry => expiry.min(keep_ms),
        };
        match expected {
            Some(version) => self.update_expiring(instance, version, expiry_ms).await,
            None => self.insert_expiring(instance, expiry_ms).await,
        }
    }

    async fn delete(&self, id: Uuid, expected_version: u64) -> Result<()> {
        let mut connection = self.connection.clone();
        let deleted: i64 = if self.options.indexed_fields.is_empty() {
            self.delete.key(self.key(id)).arg(expected_version).invoke_async(&mut connection).await?
        } else {
            self.delete_indexed
                .key(self.key(id))
                .key(self.companion(id, ":indexes"))
                .arg(expected_version)
                .arg(id.to_string())
                .invoke_async(&mut connection)
                .await?
        };
        if deleted == 1 {
            {
                self.replicated(id).await;
                Ok(())
            }
        } else {
            Err(Error::Conflict(id))
        }
    }

    async fn find_id_by(&self, field: &str, value: &serde_json::Value) -> Result<Option<Uuid>> {
        if !self.options.indexed_fields.iter().any(|f| f == field) {
            return Err(Error::NotIndexed(field.to_owned()));
        }
        let mut connection = self.connection.clone();
        let found: Option<String> =
            redis::cmd("GET").arg(self.index_key(field, value)).query_async(&mut connection).await?;
        Ok(found.and_then(|id| Uuid::parse_str(&id).ok()))
    }

    async fn lock(&self, id: Uuid, token: &str) -> Result<bool> {
        let Some(lease) = self.options.lock_lease else {
            return Ok(false);
        };
        let key = self.companion(id, "_lock");
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
        let deadline = tokio::time::Instant::now() + self.options.lock_wait.min(Duration::from_secs(365 * 24 * 3600));
        let mut pause = Duration::from_millis(2);
        loop {
            let mut connection = self.connection.clone();
            let taken: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .query_async(&mut connection)
                .await?;
            if taken.is_some() {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Conflict(id));
            }
            // Another process holds the lock; Redis has no wake-up for its release, so back off.
            tokio::time::sleep(pause).await;
            pause = pause.saturating_mul(2).min(Duration::from_millis(50));
        }
    }

    async fn unlock(&self, id: Uuid, token: String) -> Result<()> {
        let mut connection = self.connection.clone();
        let _: i64 = self.unlock.key(self.companion(id, "_lock")).arg(token).invoke_async(&mut connection).await?;
        Ok(())
    }
}
