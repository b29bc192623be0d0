//! Scheduling from the bus and from a consume context.

use uuid::Uuid;

use super::send::Parent;
use super::Bus;
use crate::headers::names::SCHEDULING_TOKEN_ID;
use crate::scheduling::{DueTime, MessageScheduler, ScheduledMessage};
use crate::{Error, Message, PreparedMessage, ReceiveContext, Result, SendOptions};

impl Bus {
    /// Sends `message` to `address` when `due` comes (a time, or a delay from now), through
    /// the bus's [`MessageScheduler`]; returns the token that cancels it. The message is
    /// prepared now (its ids and headers are fixed now), and delivered once.
    pub async fn schedule_send<M: Message>(&self, due: impl Into<DueTime>, address: &str, message: M) -> Result<Uuid> {
        let token = crate::id::new_token();
        self.schedule_send_with(token, due, address, message, SendOptions::default()).await?;
        Ok(token)
    }

    /// Sends `message` to `address` when `due` comes, under a token of your choosing (kept
    /// before the call, as a saga keeps its timeout's) and with these options. Scheduling
    /// again under a waiting token replaces what waits there.
    ///
    /// The delivered message carries the token in its `MT-Scheduling-TokenId` header, as
    /// MassTransit's do; see [`ReceiveContext::scheduling_token`].
    pub async fn schedule_send_with<M: Message>(
        &self,
        token: Uuid,
        due: impl Into<DueTime>,
        address: &str,
        message: M,
        options: SendOptions,
    ) -> Result<()> {
        self.schedule_send_in(token, due.into(), address, message, options, None).await
    }

    /// Publishes `message` when `due` comes; returns the token that cancels it.
    pub async fn schedule_publish<M: Message>(&self, due: impl Into<DueTime>, message: M) -> Result<Uuid> {
        let token = crate::id::new_token();
        self.schedule_publish_with(token, due, message, SendOptions::default()).await?;
        Ok(token)
    }

    /// Publishes `message` when `due` comes, under a token of your choosing (see
    /// [`schedule_send_with`](Self::schedule_send_with)).
    pub async fn schedule_publish_with<M: Message>(
        &self,
        token: Uuid,
        due: impl Into<DueTime>,
        message: M,
        options: SendOptions,
    ) -> Result<()> {
        self.schedule_publish_in(token, due.into(), message, options, None).await
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

    /// Prepares a send (as part of `parent`'s flow, if any) and schedules it under `token`.
    async fn schedule_send_in<M: Message>(
        &self,
        token: Uuid,
        due: DueTime,
        address: &str,
        message: M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
    ) -> Result<()> {
        let prepared = self.prepared_send(address, message, with_token(options, token), parent)?;
        self.schedule(token, due, prepared.into()).await
    }

    /// Prepares a publish (as part of `parent`'s flow, if any) and schedules it under `token`.
    async fn schedule_publish_in<M: Message>(
        &self,
        token: Uuid,
        due: DueTime,
        message: M,
        options: SendOptions,
        parent: Option<Parent<'_>>,
    ) -> Result<()> {
        let prepared = self.prepared_publish(message, with_token(options, token), parent)?;
        self.schedule(token, due, prepared.into()).await
    }

    async fn schedule(&self, token: Uuid, due: DueTime, message: PreparedMessage) -> Result<()> {
        self.scheduler()?.schedule(ScheduledMessage { token, due, message }).await
    }
}

fn with_token(options: SendOptions, token: Uuid) -> SendOptions {
    options.header(SCHEDULING_TOKEN_ID, token.to_string())
}

impl ReceiveContext {
    /// Sends `message` to `address` when `due` comes, as part of this flow (ids carried on);
    /// returns the token that cancels it. Scheduled at once, not held by the outbox.
    pub async fn schedule_send<M: Message>(&self, due: impl Into<DueTime>, address: &str, message: M) -> Result<Uuid> {
        let token = crate::id::new_token();
        self.schedule_send_with(token, due, address, message, SendOptions::default()).await?;
        Ok(token)
    }

    /// As [`schedule_send`](Self::schedule_send), under a token of your choosing and with
    /// these options (see [`Bus::schedule_send_with`]).
    pub async fn schedule_send_with<M: Message>(
        &self,
        token: Uuid,
        due: impl Into<DueTime>,
        address: &str,
        message: M,
        options: SendOptions,
    ) -> Result<()> {
        self.bus().schedule_send_in(token, due.into(), address, message, options, Some(self.parent())).await
    }

    /// Publishes `message` when `due` comes, as part of this flow.
    pub async fn schedule_publish<M: Message>(&self, due: impl Into<DueTime>, message: M) -> Result<Uuid> {
        let token = crate::id::new_token();
        self.schedule_publish_with(token, due, message, SendOptions::default()).await?;
        Ok(token)
    }

    /// As [`schedule_publish`](Self::schedule_publish), under a token of your choosing and
    /// with these options.
    pub async fn schedule_publish_with<M: Message>(
        &self,
        token: Uuid,
        due: impl Into<DueTime>,
        message: M,
        options: SendOptions,
    ) -> Result<()> {
        self.bus().schedule_publish_in(token, due.into(), message, options, Some(self.parent())).await
    }

    /// Cancels a scheduled message (see [`Bus::cancel_scheduled`]).
    pub async fn cancel_scheduled(&self, token: Uuid) -> Result<bool> {
        self.bus().cancel_scheduled(token).await
    }

    /// The token this message was scheduled under (its `MT-Scheduling-TokenId` header), when
    /// a scheduler delivered it.
    pub fn scheduling_token(&self) -> Option<Uuid> {
        self.headers().get_str(SCHEDULING_TOKEN_ID).and_then(|token| Uuid::parse_str(token).ok())
    }
}
