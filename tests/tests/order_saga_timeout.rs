//! The order saga's timeout on RabbitMQ with Redis (instances and the durable scheduler),
//! with the orchestrator as a process of its own; and a saga's request on RabbitMQ.
//!
//! What is broken: the orchestrator is killed with SIGKILL after it scheduled the timeout
//! and before the timeout is due. What must hold: the timeout waits in Redis, fires once
//! after a new orchestrator starts, and the order ends `Cancelled` with reason "timeout";
//! nothing else waits or is left in the queue afterwards.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::sync::MutexExt;
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Fault, Message};
use bus_inmemory::InMemoryScheduler;
use bus_rabbitmq::RabbitMqTransport;
use bus_saga::{
    when, InMemorySagaRepository, RedisSagaOptions, RedisSagaRepository, Request, RequestTimeoutExpired, Saga,
    SagaProbe, StateMachine, FINAL,
};
use examples::order_saga::{
    order_state_machine_with, InventoryConsumer, NewOrderEvent, OrderState, OrderTimeoutExpired, TIMEOUT_REASON,
};
use serde::{Deserialize, Serialize};
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::Vhost;
use tests::{unique, WAIT};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

const REDIS: &str = "redis://127.0.0.1:6379";

/// An orchestrator process and the lines it printed.
struct Orchestrator {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    printed: Arc<tokio::sync::Notify>,
}

impl Orchestrator {
    /// Starts one and waits until it consumes.
    async fn start(amqp: &str, prefix: &str, timeout: Duration) -> Orchestrator {
        let mut child = Command::new(env!("CARGO_BIN_EXE_order-orchestrator"))
            .args([amqp, REDIS, prefix, &timeout.as_millis().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the orchestrator starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let (lines, printed) = (Arc::new(Mutex::new(Vec::new())), Arc::new(tokio::sync::Notify::new()));
        let (into, notify) = (lines.clone(), printed.clone());
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                into.locked().push(line);
                notify.notify_waiters();
            }
        });
        let orchestrator = Orchestrator { child, lines, printed };
        orchestrator.wait_line("ready", |l| l == "ready").await;
        orchestrator
    }

    /// Waits until it printed a line `matches` accepts.
    async fn wait_line(&self, what: &str, matches: impl Fn(&str) -> bool) {
        let wait = async {
            loop {
                let printed = self.printed.notified();
                if self.lines.locked().iter().any(|l| matches(l)) {
                    return;
                }
                printed.await;
            }
        };
        tokio::time::timeout(WAIT * 2, wait).await.unwrap_or_else(|_| panic!("the orchestrator never printed {what}"));
    }

    /// How many messages of type `M` it consumed.
    fn consumed<M: Message>(&self) -> usize {
        let line = format!("consumed {} ", M::message_type());
        self.lines.locked().iter().filter(|l| l.starts_with(&line)).count()
    }

    async fn kill(&mut self) {
        self.child.kill().await.expect("killed");
    }
}

/// A probe of the orchestrator's instances, read from Redis.
async fn orders(prefix: &str) -> SagaProbe<OrderState> {
    let machine = order_state_machine_with(Duration::from_secs(1), |m| m.completed_when_finalized(false))
        .expect("valid state machine");
    let options = RedisSagaOptions { key_prefix: prefix.to_owned(), ..RedisSagaOptions::default() };
    let repository = RedisSagaRepository::<OrderState>::connect(REDIS, options).await.expect("redis");
    Saga::new(machine, repository).probe().timeout(WAIT * 3)
}

/// How many messages wait, and are claimed, in the orchestrator's Redis scheduler.
async fn scheduled(prefix: &str) -> (u64, u64) {
    let client = redis::Client::open(REDIS).expect("redis url");
    let mut connection = client.get_multiplexed_async_connection().await.expect("redis");
    let due: u64 =
        redis::cmd("ZCARD").arg(format!("{prefix}:scheduled:due")).query_async(&mut connection).await.expect("zcard");
    let claimed: u64 = redis::cmd("ZCARD")
        .arg(format!("{prefix}:scheduled:claimed"))
        .query_async(&mut connection)
        .await
        .expect("zcard");
    (due, claimed)
}

async fn website(amqp: &str, inventory: bool) -> Bus {
    let transport = RabbitMqTransport::connect(amqp).await.expect("rabbitmq");
    let mut builder = Bus::builder(transport);
    if inventory {
        builder = builder.endpoint(Endpoint::new("Inventory").consumer(InventoryConsumer::default()));
    }
    let bus = builder.build();
    bus.start().await.expect("bus starts");
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_fires_once_after_the_orchestrator_is_killed_and_restarted() {
    require_broker();
    let vhost = Vhost::create("order-timeout");
    let amqp = vhost.uri(5672);
    let prefix = unique("order-timeout");
    let timeout = Duration::from_secs(4);
    let mut first = Orchestrator::start(&amqp, &prefix, timeout).await;
    // Nobody serves inventory: only the timeout can end the order.
    let website = website(&amqp, false).await;
    let order_id = Uuid::now_v7();
    website.publish(NewOrderEvent { order_id, user_email: "ann@example.com".into() }).await.expect("publish");
    let probe = orders(&prefix).await;
    let pending = probe.wait_for(order_id, "Pending").await.expect("pending");
    let token = pending.data.order_timeout_token_id.expect("the timeout's token is kept");
    // Consumed: the instance is saved and the timeout scheduled (both before the ack).
    let new_order = format!("consumed {}", NewOrderEvent::message_type());
    first.wait_line("the order consumed", |l| l.starts_with(&new_order)).await;

    first.kill().await;
    assert_eq!(scheduled(&prefix).await, (1, 0), "the timeout waits in Redis, not in the dead process");
    let second = Orchestrator::start(&amqp, &prefix, timeout).await;

    let cancelled = probe.wait_for(order_id, FINAL).await.expect("the timeout cancelled the order");
    assert_eq!(cancelled.data.cancel_reason.as_deref(), Some(TIMEOUT_REASON));
    assert_eq!(cancelled.data.order_timeout_token_id, None);
    second
        .wait_line("the timeout consumed", |l| {
            l.starts_with(&format!("consumed {}", OrderTimeoutExpired::message_type()))
        })
        .await;
    assert_eq!(first.consumed::<OrderTimeoutExpired>(), 0, "killed before it was due");
    assert_eq!(second.consumed::<OrderTimeoutExpired>(), 1, "fired once");
    // Nothing else can come: nothing waits in the scheduler, nothing in the queue.
    assert_eq!(scheduled(&prefix).await, (0, 0));
    let queued: u64 = vhost.list_queues().iter().filter(|(q, _)| q == "OrderState").map(|(_, n)| *n).sum();
    assert_eq!(queued, 0, "token {token}: no timeout left in the queue");
    website.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_answered_in_time_leaves_no_timeout_to_fire() {
    require_broker();
    let vhost = Vhost::create("order-timeout");
    let amqp = vhost.uri(5672);
    let prefix = unique("order-answered");
    let orchestrator = Orchestrator::start(&amqp, &prefix, Duration::from_secs(30)).await;
    let website = website(&amqp, true).await;
    let order_id = Uuid::now_v7();
    website.publish(NewOrderEvent { order_id, user_email: "ann@example.com".into() }).await.expect("publish");
    let accepted = orders(&prefix).await.wait_for(order_id, FINAL).await.expect("accepted");
    assert_eq!(accepted.data.cancel_reason, None);
    assert_eq!(accepted.data.order_timeout_token_id, None);
    // The timeout was cancelled when inventory answered: nothing is left to fire.
    assert_eq!(scheduled(&prefix).await, (0, 0));
    assert_eq!(orchestrator.consumed::<OrderTimeoutExpired>(), 0);
    website.stop().await.expect("stop");
}

// ---- a saga's request on RabbitMQ ------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payment {
    authorize_request_id: Option<Uuid>,
    outcome: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaRequests:Pay")]
struct Pay {
    payment: Uuid,
    card: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaRequests:Authorize")]
struct Authorize {
    payment: Uuid,
    card: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:SagaRequests:Authorized")]
struct Authorized {
    payment: Uuid,
}

fn payment_machine(timeout: Duration) -> Arc<StateMachine<Payment>> {
    let authorize =
        Request::<Payment, Authorize, Authorized>::new("queue:cards", |p| &mut p.authorize_request_id).timeout(timeout);
    let ended = |p: &mut bus_saga::SagaInstance<Payment>, outcome: String| p.data.outcome = Some(outcome);
    StateMachine::<Payment>::builder("Payment")
        .states(["Authorizing", "Authorized", "Declined"])
        .event::<Pay>(|m| m.payment)
        .request(&authorize)
        .initially(
            when::<Payment, Pay>()
                .request(&authorize, |p, m| Authorize { payment: p.correlation_id, card: m.card.clone() })
                .transition_to("Authorizing"),
        )
        .during(
            "Authorizing",
            when::<Payment, Authorized>().then(move |p, _| ended(p, "authorized".into())).transition_to("Authorized"),
        )
        .during(
            "Authorizing",
            when::<Payment, Fault<Authorize>>()
                .then(move |p, f| ended(p, format!("declined: {}", f.exceptions[0].message)))
                .transition_to("Declined"),
        )
        .during(
            "Authorizing",
            when::<Payment, RequestTimeoutExpired<Authorize>>()
                .then(move |p, _| ended(p, "timed out".into()))
                .transition_to("Declined"),
        )
        .completed_when_finalized(false)
        .build()
        .expect("valid state machine")
}

/// A saga's request on RabbitMQ: answered, faulted, and never answered (the timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_request_on_rabbitmq_completes_faults_and_times_out() {
    require_broker();
    let vhost = Vhost::create("saga-request");
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("rabbitmq");
    let saga = Saga::new(payment_machine(Duration::from_secs(2)), InMemorySagaRepository::new());
    let probe = saga.probe().timeout(WAIT);
    let cards = Endpoint::new("cards").handler(|ctx: ConsumeContext<Authorize>| async move {
        match ctx.message().card.as_str() {
            "good" => ctx.respond(Authorized { payment: ctx.message().payment }).await?,
            "stolen" => return Err(bus_core::Permanent::new("card reported stolen").into()),
            _ => {}
        }
        Ok::<_, BoxError>(())
    });
    let bus =
        Bus::builder(transport).scheduler(InMemoryScheduler::new()).endpoint(saga.endpoint()).endpoint(cards).build();
    bus.start().await.expect("bus starts");
    let mut outcomes = Vec::new();
    for card in ["good", "stolen", "silent"] {
        let payment = Uuid::now_v7();
        bus.publish(Pay { payment, card: card.into() }).await.expect("publish");
        let state = if card == "good" { "Authorized" } else { "Declined" };
        let ended = probe.wait_for(payment, state).await.expect("answered");
        assert_eq!(ended.data.authorize_request_id, None);
        outcomes.push(ended.data.outcome.unwrap_or_default());
    }
    assert_eq!(outcomes[0], "authorized");
    assert!(outcomes[1].starts_with("declined: card reported stolen"), "{}", outcomes[1]);
    assert_eq!(outcomes[2], "timed out");
    bus.stop().await.expect("stop");
}
