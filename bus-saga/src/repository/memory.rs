use bus_core::sync::MutexExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use uuid::Uuid;

use super::SagaRepository;
use crate::{Error, Result, SagaInstance};

/// Saga instances in a map: for tests and single-process use. Same concurrency rules as
/// the Redis repository; a finalized instance kept for its last messages expires as it does
/// there.
#[derive(Debug)]
pub struct InMemorySagaRepository<S> {
    instances: Arc<Mutex<Stored<S>>>,
}

#[derive(Debug)]
struct Stored<S> {
    instances: HashMap<Uuid, SagaInstance<S>>,
    /// Kept finalized instances and when they expire.
    expiring: HashMap<Uuid, Instant>,
}

impl<S> Default for Stored<S> {
    fn default() -> Self {
        Stored { instances: HashMap::new(), expiring: HashMap::new() }
    }
}

impl<S> Clone for InMemorySagaRepository<S> {
    fn clone(&self) -> Self {
        InMemorySagaRepository { instances: self.instances.clone() }
    }
}

impl<S> Default for InMemorySagaRepository<S> {
    fn default() -> Self {
        InMemorySagaRepository { instances: Arc::default() }
    }
}

impl<S: Clone> InMemorySagaRepository<S> {
    /// An empty repository.
    pub fn new() -> Self {
        Self::default()
    }

    /// The instances, those expired taken out first.
    fn map(&self) -> InstancesGuard<'_, S> {
        let mut stored = self.instances.locked();
        if !stored.expiring.is_empty() {
            let now = Instant::now();
            let Stored { instances, expiring } = &mut *stored;
            expiring.retain(|id, at| {
                let live = *at > now;
                if !live {
                    instances.remove(id);
                }
                live
            });
        }
        InstancesGuard(stored)
    }

    /// A copy of an instance, for assertions.
    pub fn get(&self, id: Uuid) -> Option<SagaInstance<S>> {
        self.map().get(&id).cloned()
    }

    /// Number of instances stored.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether no instance is stored.
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }
}

impl<S: Clone + serde::Serialize + Send + Sync + 'static> SagaRepository<S> for InMemorySagaRepository<S> {
    async fn load(&self, id: Uuid) -> Result<Option<SagaInstance<S>>> {
        Ok(self.get(id))
    }

    async fn insert(&self, instance: &SagaInstance<S>) -> Result<()> {
        let mut map = self.map();
        if map.contains_key(&instance.correlation_id) {
            return Err(Error::Conflict(instance.correlation_id));
        }
        let mut stored = instance.clone();
        stored.version = 1;
        map.insert(instance.correlation_id, stored);
        Ok(())
    }

    async fn update(&self, instance: &SagaInstance<S>, expected_version: u64) -> Result<()> {
        let mut map = self.map();
        match map.get(&instance.correlation_id) {
            Some(current) if current.version == expected_version => {
                let mut stored = instance.clone();
                stored.version = Error::next_version(instance.correlation_id, expected_version)?;
                map.insert(instance.correlation_id, stored);
                Ok(())
            }
            _ => Err(Error::Conflict(instance.correlation_id)),
        }
    }

    async fn find_id_by(&self, field: &str, value: &serde_json::Value) -> Result<Option<Uuid>> {
        let map = self.map();
        let matches = |instance: &SagaInstance<S>| {
            serde_json::to_value(&instance.data).ok().is_some_and(|data| data.get(field) == Some(value))
        };
        Ok(map.values().find(|i| matches(i)).map(|i| i.correlation_id))
    }

    async fn delete(&self, id: Uuid, expected_version: u64) -> Result<()> {
        let mut map = self.map();
        match map.get(&id) {
            Some(current) if current.version == expected_version => {
                map.remove(&id);
                map.0.expiring.remove(&id);
                Ok(())
            }
            _ => Err(Error::Conflict(id)),
        }
    }

    async fn keep_finalized(
        &self,
        instance: &SagaInstance<S>,
        expected: Option<u64>,
        keep_for: Duration,
    ) -> Result<()> {
        match expected {
            Some(version) => self.update(instance, version).await?,
            None => self.insert(instance).await?,
        }
        let expires = Instant::now() + keep_for.min(Duration::from_secs(100 * 365 * 24 * 3600));
        self.map().0.expiring.insert(instance.correlation_id, expires);
        Ok(())
    }
}

/// The instance map, behind the repository's lock.
struct InstancesGuard<'a, S>(std::sync::MutexGuard<'a, Stored<S>>);

impl<S> std::ops::Deref for InstancesGuard<'_, S> {
    type Target = HashMap<Uuid, SagaInstance<S>>;
    fn deref(&self) -> &Self::Target {
        &self.0.instances
    }
}

impl<S> std::ops::DerefMut for InstancesGuard<'_, S> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0.instances
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_kept_finalized_instance_expires() {
        let repository = InMemorySagaRepository::<()>::new();
        let id = Uuid::now_v7();
        let mut instance = SagaInstance::new(id, ());
        instance.current_state = crate::instance::FINAL.to_owned();
        repository.keep_finalized(&instance, None, Duration::from_secs(60)).await.expect("kept");
        assert!(repository.load(id).await.expect("loads").is_some());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(repository.load(id).await.expect("loads").is_none(), "expired");
        assert!(repository.is_empty());
    }
}
