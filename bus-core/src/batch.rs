//! Batch consumers: one call with many messages, each settled by the batch's outcome.

use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Semaphore};

use crate::consumer::ErasedConsumer;
use crate::middleware::{panic_message, RetryPolicy};
use crate::sync::MutexExt;
use crate::{ConsumeContext, ConsumeError, Consumer, Message, ReceiveContext};

/// Messages of type `T` consumed together by a `Consumer<Batch<T>>` (MassTransit's
/// `Batch<T>`), registered with [`Endpoint::batch_consumer`](crate::Endpoint::batch_consumer).
///
/// Each message keeps its own [`ReceiveContext`] (ids, headers, redelivery count). The
/// [`ConsumeContext`] the batch comes in is the first message's: what the consumer publishes
/// or sends through it leaves once the batch has succeeded.
///
/// ```
/// use bus_core::{Batch, BoxError, ConsumeContext, Consumer, Message};
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, Message)]
/// # #[message(urn = "urn:message:Metrics:Reading")] struct Reading { value: f64 }
/// struct SaveReadings;
/// impl Consumer<Batch<Reading>> for SaveReadings {
///     async fn consume(&self, ctx: ConsumeContext<Batch<Reading>>) -> Result<(), BoxError> {
///         let total: f64 = ctx.message().iter().map(|r| r.value).sum();
///         println!("{} readings, total {total}", ctx.message().len());
///         Ok(())
///     }
/// }
/// let readings = bus_core::Endpoint::new("readings").batch_consumer(SaveReadings, bus_core::BatchOptions::new());
/// # drop(readings);
/// assert_eq!(<Batch<Reading> as Message>::message_type(), "urn:message:MassTransit:Batch[[Metrics:Reading]]");
/// ```
#[doc(alias = "IConsumer<Batch<T>>")]
#[derive(Debug, Serialize, Deserialize)]
pub struct Batch<T> {
    messages: Vec<T>,
    #[serde(skip)]
    contexts: Vec<ReceiveContext>,
    #[serde(skip)]
    completed_by: BatchCompletion,
}

/// What ended the collection of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BatchCompletion {
    /// It reached the message limit.
    MessageLimit,
    /// Its time limit passed first.
    #[default]
    TimeLimit,
}

impl<T> Batch<T> {
    /// How many messages it holds (at least one).
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether it holds none (never, for a batch handed to a consumer).
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The messages, in the order they were delivered.
    pub fn messages(&self) -> &[T] {
        &self.messages
    }

    /// The messages, in the order they were delivered.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.messages.iter()
    }

    /// Each message with its receive context.
    pub fn with_contexts(&self) -> impl Iterator<Item = (&T, &ReceiveContext)> {
        self.messages.iter().zip(&self.contexts)
    }

    /// Takes the messages out.
    pub fn into_messages(self) -> Vec<T> {
        self.messages
    }

    /// What ended its collection.
    pub fn completed_by(&self) -> BatchCompletion {
        self.completed_by
    }
}

impl<'a, T> IntoIterator for &'a Batch<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.messages.iter()
    }
}

impl<T: Message> Message for Batch<T> {
    fn message_types() -> &'static [&'static str] {
        crate::message::interned_types::<Batch<T>>(|| {
            vec![format!("urn:message:MassTransit:Batch[[{}]]", crate::message::entity_name(T::message_type()))]
        })
    }
}

/// How a batch consumer collects its batches (MassTransit's `BatchOptions`).
///
/// ```
/// use std::time::Duration;
/// use bus_core::BatchOptions;
/// use bus_core::middleware::RetryPolicy;
/// let options = BatchOptions::new()
///     .message_limit(100)
///     .time_limit(Duration::from_millis(500))
///     .concurrency_limit(2)
///     .retry(RetryPolicy::immediate(2));
/// assert_eq!(options.in_flight(), 200);
/// ```
#[derive(Debug, Clone)]
pub struct BatchOptions {
    message_limit: usize,
    time_limit: Duration,
    concurrency_limit: usize,
    retry: RetryPolicy,
}

impl Default for BatchOptions {
    /// MassTransit's defaults: up to 10 messages or 1 s, one batch at a time, no retry.
    fn default() -> Self {
        BatchOptions {
            message_limit: 10,
            time_limit: Duration::from_secs(1),
            concurrency_limit: 1,
            retry: RetryPolicy::none(),
        }
    }
}

impl BatchOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most messages in one batch (at least 1).
    pub fn message_limit(mut self, n: usize) -> Self {
        self.message_limit = n.max(1);
        self
    }

    /// How long a batch collects after its first message before it is consumed, full or not.
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = limit;
        self
    }

    /// How many batches are consumed at once (at least 1).
    pub fn concurrency_limit(mut self, n: usize) -> Self {
        self.concurrency_limit = n.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// How a failed batch is tried again, as a batch (default: not). After that, each of its
    /// messages takes the endpoint's failure path: redelivery, `_error`, a fault each.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How many messages the endpoint must hold at once to fill its batches: the message
    /// limit times the concurrency limit. The endpoint's prefetch and concurrency are raised
    /// to it when lower.
    pub fn in_flight(&self) -> usize {
        self.message_limit.saturating_mul(self.concurrency_limit)
    }
}

type Outcome = Result<(), Arc<ConsumeError>>;

/// A message waiting in a batch: its context, and where its batch's outcome goes.
struct Member<T> {
    /// Its place in the batch, to leave it by.
    seq: u64,
    message: T,
    ctx: ReceiveContext,
    outcome: oneshot::Sender<Outcome>,
}

struct Collecting<T> {
    /// Counts batches taken, so that a member leaving finds its own batch.
    generation: u64,
    members: Vec<Member<T>>,
    /// The next member's `seq`.
    next_seq: u64,
    /// The time limit of the batch being collected, aborted when the batch is taken sooner.
    timer: Option<tokio::task::AbortHandle>,
}

/// The erased consumer of `T` a batch consumer is registered as: each delivery's consume
/// adds its message to the batch being collected and waits for that batch's outcome.
pub(crate) struct BatchCollector<T, C> {
    shared: Arc<Shared<T, C>>,
}

struct Shared<T, C> {
    consumer: C,
    options: BatchOptions,
    collecting: Mutex<Collecting<T>>,
    running: Semaphore,
    _message: PhantomData<fn(T)>,
}

impl<T: Message, C: Consumer<Batch<T>>> BatchCollector<T, C> {
    pub(crate) fn erased(consumer: C, options: BatchOptions) -> Arc<dyn ErasedConsumer> {
        let running = Semaphore::new(options.concurrency_limit);
        let collecting = Mutex::new(Collecting { generation: 0, members: Vec::new(), next_seq: 0, timer: None });
        Arc::new(BatchCollector {
            shared: Arc::new(Shared { consumer, options, collecting, running, _message: PhantomData }),
        })
    }
}

impl<T: Message, C: Consumer<Batch<T>>> ErasedConsumer for BatchCollector<T, C> {
    fn consume(&self, ctx: ReceiveContext) -> BoxFuture<'_, Result<(), ConsumeError>> {
        Box::pin(async move {
            // A message that cannot be read fails alone, not its batch.
            let message: T = ctx.envelope().message_of().map_err(ConsumeError::deserialize)?;
            let (outcome, mut waiting) = oneshot::channel();
            let cancel = ctx.cancellation_token().clone();
            let shared = &self.shared;
            let (generation, seq, full) = {
                let mut collecting = shared.collecting.locked();
                let seq = collecting.next_seq;
                collecting.next_seq += 1;
                collecting.members.push(Member { seq, message, ctx, outcome });
                if collecting.members.len() == 1 {
                    if let Some(stale) = collecting.timer.take() {
                        stale.abort();
                    }
                    let (generation, shared) = (collecting.generation, shared.clone());
                    let timer = tokio::spawn(async move {
                        tokio::time::sleep(shared.options.time_limit).await;
                        let members = shared.take_when_due(generation);
                        shared.run(members, BatchCompletion::TimeLimit).await;
                    });
                    collecting.timer = Some(timer.abort_handle());
                }
                let generation = collecting.generation;
                let full = collecting.members.len() >= shared.options.message_limit;
                (generation, seq, full.then(|| shared.take_locked(&mut collecting)))
            };
            if let Some(members) = full {
                tokio::spawn(shared.clone().run_owned(members, BatchCompletion::MessageLimit));
            }
            let outcome = tokio::select! {
                outcome = &mut waiting => outcome,
                // The bus is stopping and cancels its consumers: a message still waiting for
                // its batch to fill leaves it, and goes back to its queue.
                () = cancel.cancelled() => match shared.leave(generation, seq) {
                    true => return Err(ConsumeError::panicked("the bus stopped before the batch was consumed".to_owned())),
                    false => waiting.await,
                },
            };
            match outcome {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(ConsumeError::copy_of(&error)),
                Err(_) => Err(ConsumeError::panicked("the batch was dropped before it was consumed".to_owned())),
            }
        })
    }
}

impl<T: Message, C: Consumer<Batch<T>>> Shared<T, C> {
    /// The time limit's task takes the batch it was started for, if it is still collecting.
    fn take_when_due(&self, generation: u64) -> Vec<Member<T>> {
        let mut collecting = self.collecting.locked();
        if generation != collecting.generation {
            return Vec::new();
        }
        // This task is the timer: forgotten, not aborted.
        collecting.timer = None;
        self.take_locked(&mut collecting)
    }

    fn take_locked(&self, collecting: &mut Collecting<T>) -> Vec<Member<T>> {
        collecting.generation += 1;
        if let Some(timer) = collecting.timer.take() {
            timer.abort();
        }
        std::mem::take(&mut collecting.members)
    }

    /// Takes member `seq` out of batch `generation` if that batch is still collecting;
    /// whether it did.
    fn leave(&self, generation: u64, seq: u64) -> bool {
        let mut collecting = self.collecting.locked();
        if generation != collecting.generation {
            return false;
        }
        let before = collecting.members.len();
        collecting.members.retain(|m| m.seq != seq);
        if collecting.members.is_empty() {
            if let Some(timer) = collecting.timer.take() {
                timer.abort();
            }
        }
        collecting.members.len() < before
    }

    async fn run_owned(self: Arc<Self>, members: Vec<Member<T>>, completed_by: BatchCompletion) {
        self.run(members, completed_by).await;
    }

    /// Consumes one batch, by the retry policy, and hands its outcome to every member.
    async fn run(&self, members: Vec<Member<T>>, completed_by: BatchCompletion) {
        // Never closed: acquiring only waits.
        let _running = self.running.acquire().await;
        let (mut messages, mut contexts, mut outcomes) = (Vec::new(), Vec::new(), Vec::new());
        // A member whose delivery was dropped meanwhile went back to its queue: it is not
        // consumed here as well.
        for member in members.into_iter().filter(|m| !m.outcome.is_closed()) {
            messages.push(member.message);
            contexts.push(member.ctx);
            outcomes.push(member.outcome);
        }
        if contexts.is_empty() {
            return;
        }
        let mut first_attempt = Some(messages);
        let mut retry = 0;
        let outcome = loop {
            // Read again for a retry: the first attempt took the messages.
            let messages = match first_attempt.take() {
                Some(messages) => messages,
                None => match contexts.iter().map(|c| c.envelope().message_of::<T>()).collect() {
                    Ok(messages) => messages,
                    Err(error) => break Err(ConsumeError::deserialize(error)),
                },
            };
            let error = match self.attempt(messages, &contexts, completed_by, retry).await {
                Ok(()) => break Ok(()),
                Err(error) => error.with_retry_count(retry),
            };
            contexts[0].outbox().discard();
            let cancelled = contexts[0].cancellation_token().is_cancelled();
            if !self.options.retry.should_retry(&error) || cancelled {
                break Err(error);
            }
            retry += 1;
            let Some(delay) = self.options.retry.delay(retry) else { break Err(error) };
            contexts[0].record_retry(retry, delay, &error);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = contexts[0].cancellation_token().cancelled() => break Err(error),
            }
        };
        let outcome = outcome.map_err(Arc::new);
        for sender in outcomes {
            let _ = sender.send(outcome.clone());
        }
    }

    async fn attempt(
        &self,
        messages: Vec<T>,
        contexts: &[ReceiveContext],
        completed_by: BatchCompletion,
        retry: u32,
    ) -> Result<(), ConsumeError> {
        let mut first = contexts[0].clone();
        first.set_retry_attempt(retry);
        let batch = Batch { messages, contexts: contexts.to_vec(), completed_by };
        let consume = self.consumer.consume(ConsumeContext::new(batch, first));
        match AssertUnwindSafe(consume).catch_unwind().await {
            Ok(result) => result.map_err(ConsumeError::from_consumer),
            Err(panic) => Err(ConsumeError::panicked(panic_message(&*panic))),
        }
    }
}
