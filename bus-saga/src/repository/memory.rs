use bus_core::sync::MutexExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::SagaRepository;
use crate::{Error, Result, SagaInstance};

/// Saga instances in a map: for tests and single-process use. Same concurrency rules as
/// the Redis repository.
#[derive(Debug)]
pub struct InMemorySagaRepository<S> {
    instances: Arc<Mutex<HashMap<Uuid, SagaInstance<S>>>>,
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

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, SagaInstance<S>>> {
        self.instances.locked()
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

impl<S: Clone + Send + Sync + 'static> SagaRepository<S> for InMemorySagaRepository<S> {
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

    async fn delete(&self, id: Uuid, expected_version: u64) -> Result<()> {
        let mut map = self.map();
        match map.get(&id) {
            Some(current) if current.version == expected_version => {
                map.remove(&id);
                Ok(())
            }
            _ => Err(Error::Conflict(id)),
        }
    }
}
