//! Saga features beyond the order saga: respond, send, during_any, async activities,
//! missing-instance policies, expiry.

use std::sync::Arc;
use std::time::Duration;

use bus_core::{BoxError, ConsumeContext, Endpoint, Message};
use bus_inmemory::InMemoryTestHarness;
use bus_saga::{
    when, InMemorySagaRepository, MissingInstance, RedisSagaOptions, RedisSagaRepository, Saga, SagaInstance,
    SagaRepository, StateMachine,
};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TicketState {
    notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Tickets:Open")]
struct Open {
    ticket: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Tickets:Note")]
struct Note {
    ticket: Uuid,
    text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Tickets:Status")]
struct Status {
    ticket: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Tickets:StatusReply")]
struct StatusReply {
    state: String,
    notes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Tickets:Audit")]
struct Audit {
    ticket: Uuid,
}

fn machine(missing: MissingInstance<Note>) -> Arc<StateMachine<TicketState>> {
    StateMachine::<TicketState>::builder("TicketState")
        .states(["Opened", "Answered"])
        .event::<Open>(|m| m.ticket)
        .event_with::<Note>(|m| m.ticket, missing)
        .event::<Status>(|m| m.ticket)
        .initially(
            when::<TicketState, Open>()
                .send("queue:audit", |t, _| Audit { ticket: t.correlation_id })
                .transition_to("Opened"),
        )
        .during_any(
            when::<TicketState, Note>()
                .then_async(|ticket, note| {
                    Box::pin(async move {
                        tokio::task::yield_now().await;
                        ticket.data.notes.push(note.text.clone());
                        Ok::<_, BoxError>(())
                    })
                })
                .transition_to("Answered"),
        )
        .during_any(
            when::<TicketState, Status>()
                .respond(|t, _| StatusReply { state: t.current_state.clone(), notes: t.data.notes.len() }),
        )
        .build()
        .expect("valid state machine")
}

#[tokio::test]
async fn during_any_async_activities_send_and_respond() {
    let m = machine(MissingInstance::Skip);
    let id = Uuid::now_v7();
    let opened = m.apply(None, &Open { ticket: id }).await.expect("opened");
    assert_eq!(opened.produced[0].kind, bus_saga::ProducedKind::Send("queue:audit".into()));
    let noted = m.apply(Some(opened.instance), &Note { ticket: id, text: "hi".into() }).await.expect("noted");
    assert_eq!(noted.instance.current_state, "Answered");
    assert_eq!(noted.instance.data.notes, ["hi"]);
    let status = m.apply(Some(noted.instance), &Status { ticket: id }).await.expect("status");
    assert_eq!(status.produced[0].message::<StatusReply>(), Some(StatusReply { state: "Answered".into(), notes: 1 }));

    let repository = InMemorySagaRepository::<TicketState>::new();
    let saga_repository = repository.clone();
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.endpoint(Saga::new(machine(MissingInstance::Skip), saga_repository).endpoint())
            .endpoint(Endpoint::new("audit").handler(|_: ConsumeContext<Audit>| async { Ok(()) }))
    })
    .await
    .expect("harness");
    harness.bus().publish(Open { ticket: id }).await.expect("open");
    harness.consumed().wait_for::<Audit>(1, WAIT).await.expect("the saga sent an audit");
    harness.bus().publish(Note { ticket: id, text: "first".into() }).await.expect("note");
    harness.consumed().wait_for::<Note>(1, WAIT).await.expect("noted");
    let reply = harness.bus().request::<Status, StatusReply>(Status { ticket: id }).await.expect("the saga responds");
    harness.stop().await.expect("stop");
    assert_eq!(reply.message(), &StatusReply { state: "Answered".into(), notes: 1 });
}

#[tokio::test]
async fn missing_instance_can_fault_or_run_custom_code() {
    let harness = InMemoryTestHarness::start(|bus| {
        bus.endpoint(Saga::new(machine(MissingInstance::Fault), InMemorySagaRepository::new()).endpoint())
    })
    .await
    .expect("harness");
    harness.bus().publish(Note { ticket: Uuid::now_v7(), text: "lost".into() }).await.expect("publish");
    harness.transport().wait_for_queue_len("TicketState_error", 1, WAIT).await.expect("faulted to _error");
    harness.stop().await.expect("stop");
    let moved = &harness.transport().peek("TicketState_error")[0];
    assert!(moved.headers.get_str("MT-Fault-Message").is_some_and(|m| m.contains("no saga instance")));

    let custom = MissingInstance::Execute(Arc::new(|ctx: &ConsumeContext<Note>| {
        Box::pin(async move {
            ctx.publish(Audit { ticket: ctx.message().ticket }).await?;
            Ok::<_, BoxError>(())
        })
    }));
    let harness = InMemoryTestHarness::start(move |bus| {
        bus.endpoint(Saga::new(machine(custom), InMemorySagaRepository::new()).endpoint())
    })
    .await
    .expect("harness");
    let ticket = Uuid::now_v7();
    harness.bus().publish(Note { ticket, text: "orphan".into() }).await.expect("publish");
    let audits = harness.published().wait_for::<Audit>(1, WAIT).await.expect("custom code ran");
    harness.stop().await.expect("stop");
    assert_eq!(audits[0], Audit { ticket });
}

#[tokio::test]
async fn redis_instances_expire_and_the_expiry_is_refreshed_on_write() {
    if std::net::TcpStream::connect(("127.0.0.1", 6379)).is_err() {
        panic!("Redis does not answer on 127.0.0.1:6379: run scripts/test.sh, which starts it");
    }
    let options = RedisSagaOptions {
        key_prefix: tests::unique("expiring"),
        expiry: Some(Duration::from_secs(60)),
        ..RedisSagaOptions::default()
    };
    let repository =
        RedisSagaRepository::<TicketState>::connect("redis://127.0.0.1:6379", options).await.expect("redis");
    let id = Uuid::now_v7();
    let mut connection = repository.connection();
    let ttl = |mut c: bus_redis::RedisConnection, key: String| async move {
        redis::cmd("PTTL").arg(key).query_async::<i64>(&mut c).await.expect("pttl")
    };
    repository.insert(&SagaInstance::new(id, TicketState::default())).await.expect("insert");
    let key = repository.key(id);
    assert!(ttl(connection.clone(), key.clone()).await > 50_000, "expiry set on insert");
    let _: () = redis::cmd("PEXPIRE").arg(&key).arg(1_000).query_async(&mut connection).await.expect("shorten");
    let mut instance = repository.load(id).await.expect("load").expect("instance");
    instance.data.notes.push("x".into());
    repository.update(&instance, 1).await.expect("update");
    assert!(ttl(connection.clone(), key.clone()).await > 50_000, "expiry refreshed on update");
    let stale = repository.update(&instance, 1).await;
    assert!(matches!(stale, Err(bus_saga::Error::Conflict(_))), "a stale version conflicts");
    repository.delete(id, 2).await.expect("delete");
    assert_eq!(ttl(connection, key).await, -2, "deleted");
}

/// A transport that refuses, as an unreachable broker would, publishes of one message type
/// while `refuse` says so; everything else goes to the in-memory transport inside.
#[derive(Clone)]
struct RefusesPublishOf {
    inner: bus_inmemory::InMemoryTransport,
    urn: &'static str,
    refuse: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl bus_core::Transport for RefusesPublishOf {
    fn system(&self) -> &'static str {
        self.inner.system()
    }
    fn address(&self, name: &str) -> String {
        self.inner.address(name)
    }
    fn declare<'a>(&'a self, topology: &'a bus_core::EndpointTopology) -> BoxFuture<'a, bus_core::Result<()>> {
        self.inner.declare(topology)
    }
    fn publish<'a>(
        &'a self,
        types: &'a [&'a str],
        message: bus_core::TransportMessage,
    ) -> BoxFuture<'a, bus_core::Result<()>> {
        if types.first() == Some(&self.urn) && (self.refuse)() {
            return Box::pin(async { Err(bus_core::Error::transport("the broker is unreachable", true, None)) });
        }
        self.inner.publish(types, message)
    }
    fn send<'a>(
        &'a self,
        destination: &'a str,
        message: bus_core::TransportMessage,
    ) -> BoxFuture<'a, bus_core::Result<()>> {
        self.inner.send(destination, message)
    }
    fn subscribe<'a>(
        &'a self,
        topology: &'a bus_core::EndpointTopology,
        prefetch: u16,
    ) -> BoxFuture<'a, bus_core::Result<bus_core::Subscription>> {
        self.inner.subscribe(topology, prefetch)
    }
    fn delete<'a>(&'a self, topology: &'a bus_core::EndpointTopology) -> BoxFuture<'a, bus_core::Result<()>> {
        self.inner.delete(topology)
    }
}

/// A saga on a transport that refuses its first `Audit`, with one redelivery, and an
/// endpoint that records the audits.
struct AuditedSaga {
    bus: bus_core::Bus,
    stats: Arc<bus_saga::SagaStats>,
    audits: Arc<bus_core::testing::MessageLog>,
    inner: bus_inmemory::InMemoryTransport,
}

fn audited_saga<R: SagaRepository<TicketState>>(machine: Arc<StateMachine<TicketState>>, repository: R) -> AuditedSaga {
    let refused = std::sync::atomic::AtomicBool::new(false);
    let first = move || !refused.swap(true, std::sync::atomic::Ordering::SeqCst);
    audited_saga_refusing(machine, repository, Arc::new(first), &[Duration::from_millis(10)])
}

/// As [`audited_saga`], refusing `Audit` while `refuse` says so, redelivering after each of
/// `redeliveries`.
fn audited_saga_refusing<R: SagaRepository<TicketState>>(
    machine: Arc<StateMachine<TicketState>>,
    repository: R,
    refuse: Arc<dyn Fn() -> bool + Send + Sync>,
    redeliveries: &[Duration],
) -> AuditedSaga {
    let inner = bus_inmemory::InMemoryTransport::new();
    let transport = RefusesPublishOf { inner: inner.clone(), urn: Audit::message_type(), refuse };
    let audits = Arc::new(bus_core::testing::MessageLog::default());
    let audits_in = audits.clone();
    let redelivery = bus_core::RedeliveryPolicy::intervals(redeliveries.iter().copied());
    let saga = Saga::new(machine, repository);
    let stats = saga.stats();
    let bus = bus_core::Bus::builder(transport)
        .endpoint(saga.endpoint().redelivery(redelivery))
        .endpoint(Endpoint::new(tests::unique("audits")).handler(move |ctx: ConsumeContext<Audit>| {
            audits_in.record(ctx.envelope());
            async { Ok(()) }
        }))
        .build();
    AuditedSaga { bus, stats, audits, inner }
}

/// Runs an event whose transition is saved but whose published message cannot leave at
/// first: delivered again, the event sends that message (it used to meet the state it had
/// already moved to, and end in `_error` with the message never sent).
async fn event_delivered_again_after_its_save_sends_its_messages<R>(repository: R)
where
    R: SagaRepository<TicketState> + Clone,
{
    let machine = StateMachine::<TicketState>::builder("AuditedTicket")
        .states(["Opened"])
        .event::<Open>(|m| m.ticket)
        .initially(
            when::<TicketState, Open>().publish(|t, _| Audit { ticket: t.correlation_id }).transition_to("Opened"),
        )
        .build()
        .expect("valid state machine");
    let AuditedSaga { bus, stats, audits, inner } = audited_saga(machine, repository.clone());
    bus.start().await.expect("bus starts");
    let id = Uuid::now_v7();
    let open_id = Uuid::now_v7();
    bus.publish_with(Open { ticket: id }, bus_core::SendOptions::new().message_id(open_id)).await.expect("open");
    audits.wait_for::<Audit>(1, WAIT).await.expect("the audit leaves when the event comes again");
    let instance = repository.load(id).await.expect("load").expect("the instance is saved");
    bus.stop().await.expect("stop");
    assert_eq!(audits.len(), 1, "sent once: the first attempt was refused");
    assert_eq!((instance.current_state.as_str(), instance.version), ("Opened", 1), "applied once");
    assert_eq!(stats.transitions(), 1);
    assert_eq!(instance.applied_events.len(), 1);
    let applied = instance.applied(open_id, Open::message_type()).expect("the applied event is kept");
    assert_eq!((applied.message_id, applied.event_type.as_str()), (open_id, Open::message_type()));
    assert_eq!(applied.produced.len(), 1);
    assert_eq!(applied.produced[0].message_type, Audit::message_type());
    assert_eq!(applied.produced[0].message["ticket"], id.to_string());
    // Derived from the event's id: the same however often the event is applied or sent again.
    let derived = Uuid::new_v5(&open_id, format!("AuditedTicket/{}/0", Open::message_type()).as_bytes());
    assert_eq!(applied.produced[0].message_id, derived);
    let sent = audits.envelopes::<Audit>();
    assert_eq!(sent[0].message_id, Some(derived), "sent again with the id it was given");
    assert!(inner.drain("AuditedTicket_error").is_empty(), "nothing in _error");
}

#[tokio::test]
async fn an_event_delivered_again_after_its_save_sends_its_messages_in_memory() {
    event_delivered_again_after_its_save_sends_its_messages(InMemorySagaRepository::<TicketState>::new()).await;
}

#[tokio::test]
async fn an_event_delivered_again_after_its_save_sends_its_messages_from_redis() {
    if std::net::TcpStream::connect(("127.0.0.1", 6379)).is_err() {
        panic!("Redis does not answer on 127.0.0.1:6379: run scripts/test.sh, which starts it");
    }
    let options = RedisSagaOptions { key_prefix: tests::unique("applied"), ..RedisSagaOptions::default() };
    let repository =
        RedisSagaRepository::<TicketState>::connect("redis://127.0.0.1:6379", options).await.expect("redis");
    event_delivered_again_after_its_save_sends_its_messages(repository).await;
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Tickets:Ping")]
struct Ping {
    ticket: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Tickets:Pong")]
struct Pong {
    ticket: Uuid,
}

/// One message that is both a `Ping` and a `Pong`.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Tickets:PingPong", implements("urn:message:Tickets:Ping", "urn:message:Tickets:Pong"))]
struct PingPong {
    ticket: Uuid,
}

/// A bus on the in-memory transport running `machine` on an in-memory repository, one
/// event at a time.
fn one_at_a_time(
    machine: Arc<StateMachine<TicketState>>,
) -> (bus_core::Bus, Arc<bus_saga::SagaStats>, InMemorySagaRepository<TicketState>) {
    let repository = InMemorySagaRepository::<TicketState>::new();
    let saga = Saga::new(machine, repository.clone());
    let stats = saga.stats();
    let bus = bus_core::Bus::builder(bus_inmemory::InMemoryTransport::new())
        .endpoint(saga.endpoint().concurrency_limit(1))
        .build();
    (bus, stats, repository)
}

/// One delivery that is two events of a saga applies both: the second is not taken for the
/// first delivered again (they share the message id, not the event type).
#[tokio::test]
async fn one_message_that_is_two_events_applies_both() {
    let machine = StateMachine::<TicketState>::builder("PingPongTicket")
        .states(["Opened"])
        .event::<Open>(|m| m.ticket)
        .event::<Ping>(|m| m.ticket)
        .event::<Pong>(|m| m.ticket)
        .initially(when::<TicketState, Open>().transition_to("Opened"))
        .during_any(when::<TicketState, Ping>().then(|t, _| t.data.notes.push("ping".into())))
        .during_any(when::<TicketState, Pong>().then(|t, _| t.data.notes.push("pong".into())))
        .build()
        .expect("valid state machine");
    let (bus, stats, repository) = one_at_a_time(machine);
    bus.start().await.expect("bus starts");
    let id = Uuid::now_v7();
    bus.publish(Open { ticket: id }).await.expect("open");
    assert!(stats.wait_for_transitions(1, WAIT).await, "opened");
    bus.publish(PingPong { ticket: id }).await.expect("ping-pong");
    let both = stats.wait_for_transitions(3, WAIT).await;
    let instance = repository.load(id).await.expect("load").expect("the instance");
    bus.stop().await.expect("stop");
    assert!(both, "both events applied: {:?}", instance.data.notes);
    let mut notes = instance.data.notes.clone();
    notes.sort();
    assert_eq!(notes, ["ping", "pong"]);
}

/// An event that creates and finalizes its instance, whose message could not leave, keeps the
/// finalized instance for it; delivered again, it sends the message (with the id derived from
/// the event's, the same as the first time) without being applied again, and the instance is
/// deleted then.
#[tokio::test]
async fn an_event_that_finalized_its_instance_sends_its_message_again_with_the_same_id() {
    let machine = StateMachine::<TicketState>::builder("FinalizedTicket")
        .event::<Open>(|m| m.ticket)
        .initially(when::<TicketState, Open>().publish(|t, _| Audit { ticket: t.correlation_id }).finalize())
        .build()
        .expect("valid state machine");
    let repository = InMemorySagaRepository::<TicketState>::new();
    let AuditedSaga { bus, stats, audits, inner } = audited_saga(machine, repository.clone());
    bus.start().await.expect("bus starts");
    let (id, open_id) = (Uuid::now_v7(), Uuid::now_v7());
    bus.publish_with(Open { ticket: id }, bus_core::SendOptions::new().message_id(open_id)).await.expect("open");
    audits.wait_for::<Audit>(1, WAIT).await.expect("the audit leaves when the event comes again");
    bus.stop().await.expect("stop");
    let derived = Uuid::new_v5(&open_id, format!("FinalizedTicket/{}/0", Open::message_type()).as_bytes());
    assert_eq!(audits.envelopes::<Audit>()[0].message_id, Some(derived));
    assert_eq!(stats.transitions(), 1, "applied once: the finalized instance was kept for its message");
    assert!(repository.load(id).await.expect("load").is_none(), "finalized and deleted");
    assert!(inner.drain("FinalizedTicket_error").is_empty(), "nothing in _error");
}

/// An event whose message cannot leave, delivered again after a later event moved its
/// instance on, still finds its record among the instance's latest applied events: it sends
/// its message then (it used to meet the later state, not be accepted there, and end in
/// `_error` with its message never sent). An event older than the window is applied anew.
#[tokio::test]
async fn an_event_delivered_again_after_a_later_event_still_sends_its_messages() {
    let machine = StateMachine::<TicketState>::builder("InterleavedTicket")
        .states(["Opened", "Answered"])
        .event::<Open>(|m| m.ticket)
        .event::<Note>(|m| m.ticket)
        .initially(
            when::<TicketState, Open>().publish(|t, _| Audit { ticket: t.correlation_id }).transition_to("Opened"),
        )
        .during(
            "Opened",
            when::<TicketState, Note>().then(|t, n| t.data.notes.push(n.text.clone())).transition_to("Answered"),
        )
        .during("Answered", when::<TicketState, Note>().then(|t, n| t.data.notes.push(n.text.clone())))
        .duplicate_window(2)
        .build()
        .expect("valid state machine");
    let repository = InMemorySagaRepository::<TicketState>::new();
    // The broker is "down" for audits until the note is applied: the open event keeps coming
    // back (every 20 ms, for up to 10 s) and failing to send its audit meanwhile.
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let is_down = down.clone();
    let refuse = Arc::new(move || is_down.load(std::sync::atomic::Ordering::SeqCst));
    let AuditedSaga { bus, stats, audits, inner } =
        audited_saga_refusing(machine, repository.clone(), refuse, &[Duration::from_millis(20); 500]);
    bus.start().await.expect("bus starts");
    let (id, open_id) = (Uuid::now_v7(), Uuid::now_v7());
    bus.publish_with(Open { ticket: id }, bus_core::SendOptions::new().message_id(open_id)).await.expect("open");
    assert!(stats.wait_for_transitions(1, WAIT).await, "opened and saved; its audit refused");
    bus.publish(Note { ticket: id, text: "first".into() }).await.expect("note");
    assert!(stats.wait_for_transitions(2, WAIT).await, "the note moved the instance on");
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    audits.wait_for::<Audit>(1, WAIT).await.expect("the open event, back again, sends its audit");
    let instance = repository.load(id).await.expect("load").expect("the instance");
    bus.stop().await.expect("stop");

    assert_eq!((instance.current_state.as_str(), instance.version), ("Answered", 2), "open applied once");
    assert_eq!(stats.transitions(), 2);
    let derived = Uuid::new_v5(&open_id, format!("InterleavedTicket/{}/0", Open::message_type()).as_bytes());
    assert_eq!(audits.envelopes::<Audit>()[0].message_id, Some(derived), "with the id it was given");
    assert!(inner.drain("InterleavedTicket_error").is_empty(), "nothing in _error");
    let kept: Vec<&str> = instance.applied_events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(kept, [Open::message_type(), Note::message_type()], "oldest first");
}

/// The window keeps the latest events only: the oldest is dropped as new ones are applied.
#[tokio::test]
async fn the_applied_events_window_keeps_the_latest() {
    let machine = StateMachine::<TicketState>::builder("WindowedTicket")
        .states(["Opened"])
        .event::<Open>(|m| m.ticket)
        .event::<Note>(|m| m.ticket)
        .initially(when::<TicketState, Open>().transition_to("Opened"))
        .during("Opened", when::<TicketState, Note>().then(|t, n| t.data.notes.push(n.text.clone())))
        .duplicate_window(2)
        .build()
        .expect("valid state machine");
    let (bus, stats, repository) = one_at_a_time(machine);
    bus.start().await.expect("bus starts");
    let id = Uuid::now_v7();
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    bus.publish_with(Open { ticket: id }, bus_core::SendOptions::new().message_id(ids[0])).await.expect("open");
    assert!(stats.wait_for_transitions(1, WAIT).await);
    for (n, note_id) in ids[1..].iter().enumerate() {
        let note = Note { ticket: id, text: n.to_string() };
        bus.publish_with(note, bus_core::SendOptions::new().message_id(*note_id)).await.expect("note");
        assert!(stats.wait_for_transitions(n as u64 + 2, WAIT).await);
    }
    let instance = repository.load(id).await.expect("load").expect("the instance");
    bus.stop().await.expect("stop");
    let kept: Vec<Uuid> = instance.applied_events.iter().map(|e| e.message_id).collect();
    assert_eq!(kept, ids[2..], "the two latest, oldest first");
    assert!(instance.applied(ids[0], Open::message_type()).is_none());
}
