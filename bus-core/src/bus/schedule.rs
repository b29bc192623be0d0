//! Scheduling from the bus and from a consume context.

use uuid::Uuid;

use super::Bus;
use crate::scheduling::{DueTime, MessageScheduler, ScheduledMessage};
use crate::{Error, Message, PreparedMessage, ReceiveContext, Result, SendOptions};

impl Bus {
    /// Sends `message` to `address` when `due` comes (a time, or a delay from now), through
    /// the bus's [`MessageScheduler`]; returns the token that cancels it. The message is
    /// prepared now (its ids and headers are fixed now), and delivered once.
    pub async fn schedule_send<M: Message>(&self, due: impl Into<DueTime>, address: &str, message: M) -> Result<Uuid> {
        let prepared = self.prepared_send(address, message, SendOptions::default(), None)?;
        self.schedule(due.into(), prepared.into()).await
    }

    /// Publishes `message` when `due` comes; returns the token that cancels it.
    pub async fn schedule_publish<M: Message>(&self, due: impl Into<DueTime>, message: M) -> Result<Uuid> {
        let prepared = self.prepared_publish(message, SendOptions::default(), None)?;
        self.schedule(due.into(), prepared.into()).await
    }

    /// Cancels a scheduled message; `false` when none waits under `token` (it fired, or was
    /// cancelled before).
    pub async fn cancel_scheduled(&self, token: Uuid) -> Result<bool> {
        self.scheduler()?.cancel(token).await
    }

    fn scheduler(&self) -> Result<&dyn MessageScheduler> {
        self.inner
            .scheduler
            .as_deref()
            .ok_or_else(|| Error::Configuration("no message scheduler: add one with BusBuilder::scheduler".to_owned()))
    }

    async fn schedule(&self, due: DueTime, message: PreparedMessage) -> Result<Uuid> {
        let token = Uuid::now_v7();
        self.scheduler()?.schedule(ScheduledMessage { token, due, message }).await?;
        Ok(token)
    }
}

impl ReceiveContext {
    /// Sends `message` to `address` when `due` comes, as part of this flow (ids carried on);
    /// returns the token that cancels it. Scheduled at once, not held by the outbox.
    pub async fn schedule_send<M: Message>(&self, due: impl Into<DueTime>, address: &str, message: M) -> Result<Uuid> {
        let bus = self.bus();
        let prepared = bus.prepared_send(address, message, SendOptions::default(), Some(self.parent()))?;
        bus.schedule(due.into(), prepared.into()).await
    }

    /// Publishes `message` when `due` comes, as part of this flow.
    pub async fn schedule_publish<M: Message>(&self, due: impl Into<DueTime>, message: M) -> Result<Uuid> {
        let bus = self.bus();
        let prepared = bus.prepared_publish(message, SendOptions::default(), Some(self.parent()))?;
        bus.schedule(due.into(), prepared.into()).await
    }

    /// Cancels a scheduled message (see [`Bus::cancel_scheduled`]).
    pub async fn cancel_scheduled(&self, token: Uuid) -> Result<bool> {
        self.bus().cancel_scheduled(token).await
    }
}
