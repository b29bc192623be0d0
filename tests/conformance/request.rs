//! Request/response: typed responses, timeouts, remote faults, request ids.

use std::time::Duration;

use bus_core::{BoxError, ConsumeContext, Endpoint, Error, Message, Transport};
use serde::{Deserialize, Serialize};

use super::support::{header, raw};
use crate::{unique, Fixture};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Conformance:CheckPayment")]
struct CheckPayment {
    amount: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Conformance:PaymentChecked")]
struct PaymentChecked {
    approved: bool,
    amount: u32,
}

/// A bus with an endpoint that answers `CheckPayment`, approving amounts under 100; and the
/// endpoint's name.
fn payments_bus<F: Fixture>(fixture: &F) -> (String, bus_core::Bus) {
    let name = unique("payments");
    let bus = fixture
        .bus()
        .endpoint(Endpoint::new(&name).handler(|ctx: ConsumeContext<CheckPayment>| async move {
            let amount = ctx.message().amount;
            ctx.respond(PaymentChecked { approved: amount < 100, amount }).await?;
            Ok(())
        }))
        .build();
    (name, bus)
}

/// A request gets the typed response its consumer sends back, with the request's id.
pub async fn request_returns_the_typed_response<F: Fixture>(fixture: &F) {
    let (name, bus) = payments_bus(fixture);
    bus.start().await.expect("bus starts");
    let client = bus.request_client::<CheckPayment>().with_destination(format!("queue:{name}"));
    let approved = client.request::<PaymentChecked>(CheckPayment { amount: 40 }).await.expect("response");
    let declined = bus.request::<CheckPayment, PaymentChecked>(CheckPayment { amount: 400 }).await.expect("response");
    bus.stop().await.expect("stop");
    assert!(approved.message().approved);
    assert_eq!(approved.message().amount, 40);
    assert!(!declined.message().approved);
    let envelope = approved.envelope();
    assert!(envelope.request_id.is_some(), "the response carries the request id");
    assert_eq!(envelope.initiator_id, envelope.request_id, "initiated by the request");
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:NobodyAnswers")]
struct NobodyAnswers;

/// A request nobody answers ends in a timeout error, not a hang.
pub async fn request_without_responder_times_out<F: Fixture>(fixture: &F) {
    let bus = fixture.bus().build();
    bus.start().await.expect("bus starts");
    let client = bus.request_client::<NobodyAnswers>().with_timeout(Duration::from_millis(300));
    let result = client.request::<PaymentChecked>(NobodyAnswers).await;
    bus.stop().await.expect("stop");
    match result {
        Err(Error::RequestTimeout { timeout, request_type }) => {
            assert_eq!(timeout, Duration::from_millis(300));
            assert_eq!(request_type, NobodyAnswers::message_type());
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Conformance:FailingRequest")]
struct FailingRequest;

#[derive(Debug)]
struct CardDeclined;

impl std::fmt::Display for CardDeclined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("card declined")
    }
}

impl std::error::Error for CardDeclined {}

/// A request whose consumer fails comes back as the remote fault, promptly (not a timeout).
pub async fn request_whose_consumer_fails_returns_the_fault<F: Fixture>(fixture: &F) {
    let name = unique("failing-requests");
    let bus = fixture
        .bus()
        .endpoint(
            Endpoint::new(&name)
                .handler(|_: ConsumeContext<FailingRequest>| async move { Err::<(), BoxError>(CardDeclined.into()) }),
        )
        .build();
    bus.start().await.expect("bus starts");
    let client = bus.request_client::<FailingRequest>().with_timeout(Duration::from_secs(10));
    let started = std::time::Instant::now();
    let result = client.request::<PaymentChecked>(FailingRequest).await;
    let waited = started.elapsed();
    let errors = fixture.take_messages(&format!("{name}_error"), 1, crate::WAIT).await;
    bus.stop().await.expect("stop");
    match result {
        Err(Error::RequestFaulted { exception_type, message }) => {
            assert_eq!(exception_type, "CardDeclined");
            assert_eq!(message, "card declined");
        }
        other => panic!("expected the remote fault, got {other:?}"),
    }
    assert!(waited < Duration::from_secs(10), "the fault came back before the timeout");
    assert_eq!(errors.len(), 1, "the failed request is in the error queue");
}

/// What reaches the bus's response endpoint and answers no request is kept, as on any
/// endpoint: a message that cannot be read goes to the endpoint's `_error` queue with the
/// reason, a response nobody waits for (its requester timed out, say) to `_skipped`; and
/// the endpoint goes on answering requests.
pub async fn messages_answering_no_request_go_to_the_response_endpoints_error_and_skipped_queues<F: Fixture>(
    fixture: &F,
) {
    let (name, bus) = payments_bus(fixture);
    bus.start().await.expect("bus starts");
    let address = bus.address().to_owned();
    let queue = address.rsplit('/').next().and_then(|last| last.split('?').next()).expect("queue name").to_owned();
    let transport = fixture.transport();
    transport.send(&queue, raw(&b"{not json"[..], "application/vnd.masstransit+json")).await.expect("raw send");
    let oversized = vec![b' '; bus_core::DEFAULT_MAX_MESSAGE_SIZE + 1];
    transport.send(&queue, raw(oversized, "application/vnd.masstransit+json")).await.expect("raw send");
    let late = format!(
        r#"{{"requestId":"{}","messageType":["{}"],"message":{{"approved":true,"amount":7}}}}"#,
        uuid::Uuid::new_v4(),
        PaymentChecked::message_type()
    );
    transport.send(&queue, raw(late.into_bytes(), "application/vnd.masstransit+json")).await.expect("raw send");
    let errors = fixture.take_messages(&format!("{queue}_error"), 2, crate::WAIT).await;
    let skipped = fixture.take_messages(&format!("{queue}_skipped"), 1, crate::WAIT).await;
    let answered = bus
        .request_client::<CheckPayment>()
        .with_destination(format!("queue:{name}"))
        .request::<PaymentChecked>(CheckPayment { amount: 3 })
        .await;
    bus.stop().await.expect("stop");

    assert_eq!(errors.len(), 2, "the unreadable messages are in the response endpoint's error queue");
    assert_eq!(header(&errors[1], "MT-Fault-ExceptionType"), "MessageTooLarge", "not read at all");
    assert_eq!(&errors[0].body[..], b"{not json", "kept as it came");
    assert_eq!(header(&errors[0], "MT-Reason"), "fault");
    assert_eq!(header(&errors[0], "MT-Fault-ExceptionType"), "SerializationException");
    assert!(header(&errors[0], "MT-Fault-Message").contains("not valid JSON"), "{:?}", errors[0].headers);
    assert_eq!(header(&errors[0], "MT-Fault-InputAddress"), address);
    assert_eq!(skipped.len(), 1, "the response nobody waits for is in the skipped queue");
    assert!(String::from_utf8_lossy(&skipped[0].body).contains(r#""amount":7"#));
    assert_eq!(header(&skipped[0], "MT-Reason"), "dead-letter");
    assert_eq!(answered.expect("the endpoint still answers").message().amount, 3);
}
