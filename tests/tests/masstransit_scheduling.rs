//! MassTransit's scheduling commands on RabbitMQ: a .NET service that schedules through
//! `queue:quartz` gets its messages delivered by a Rust [`SchedulerService`] instead of
//! MassTransit's Quartz service. The commands are written as MassTransit v8 writes them.

use std::sync::Arc;

use bus_core::testing::{BusRecorder, MessageLog};
use bus_core::{Bus, CancelScheduledMessage, Endpoint, Message, ScheduleMessage, SchedulerService};
use bus_inmemory::InMemoryScheduler;
use bus_rabbitmq::RabbitMqTransport;
use chrono::{SecondsFormat, Utc};
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::Vhost;
use tests::WAIT;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
#[message(urn = "urn:message:Clinic.Contracts:AppointmentReminder")]
struct AppointmentReminder {
    patient_id: i64,
    text: String,
}

/// A bus with the scheduler service on `quartz` and a `reminders` endpoint.
async fn service(vhost: &Vhost, scheduler: InMemoryScheduler) -> (Bus, Arc<MessageLog>, Arc<BusRecorder>) {
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("rabbitmq");
    let reminders = Arc::new(MessageLog::default());
    let recorder = Arc::new(BusRecorder::default());
    let bus = Bus::builder(transport)
        .observer_arc(recorder.clone())
        .scheduler(scheduler)
        .endpoint(SchedulerService::endpoint("quartz"))
        .endpoint(tests::record::<AppointmentReminder>(Endpoint::new("reminders"), &reminders))
        .build();
    bus.start().await.expect("bus starts");
    (bus, reminders, recorder)
}

/// Sends `body` to `queue` as MassTransit does: the envelope content type, the message id
/// in the AMQP properties, persistent.
async fn send_raw(vhost: &Vhost, queue: &str, message_id: Uuid, body: String) {
    let connection = lapin::Connection::connect(&vhost.uri(5672), lapin::ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = connection.create_channel().await.expect("channel");
    let properties = BasicProperties::default()
        .with_content_type("application/vnd.masstransit+json".into())
        .with_message_id(message_id.to_string().into())
        .with_delivery_mode(2);
    channel
        .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body.as_bytes(), properties)
        .await
        .expect("publish")
        .await
        .expect("routed");
    connection.close(200, "done".into()).await.expect("closed");
}

/// A `ScheduleMessage` envelope as MassTransit v8 (System.Text.Json) writes it for
/// `ScheduleSend(new Uri("queue:reminders"), time, reminder)`.
fn schedule_command(vhost: &str, message_id: Uuid, conversation_id: Uuid, token: Uuid, at: &str) -> String {
    format!(
        r#"{{
  "messageId": "{message_id}",
  "requestId": null,
  "correlationId": null,
  "conversationId": "{conversation_id}",
  "initiatorId": null,
  "sourceAddress": "rabbitmq://localhost/{vhost}/CLINIC_Api_bus_g8xyyyfpkzz3ygkfbdq3bxnp3d?temporary=true",
  "destinationAddress": "rabbitmq://localhost/{vhost}/quartz",
  "responseAddress": null,
  "faultAddress": null,
  "messageType": ["urn:message:MassTransit.Scheduling:ScheduleMessage"],
  "message": {{
    "correlationId": "{token}",
    "scheduledTime": "{at}",
    "payloadType": ["urn:message:Clinic.Contracts:AppointmentReminder"],
    "destination": "rabbitmq://localhost/{vhost}/reminders",
    "payload": {{ "patientId": 42, "text": "Dr. Who, 10:30", "balance": 12345678901234567890.123456789 }}
  }},
  "expirationTime": null,
  "sentTime": "2026-12-06T09:00:00.1234567Z",
  "headers": {{ "Tenant": "north" }},
  "host": {{
    "machineName": "CLINIC-API-01",
    "processName": "Clinic.Api",
    "processId": 4242,
    "assembly": "Clinic.Api",
    "assemblyVersion": "1.0.0.0",
    "frameworkVersion": "8.0.11",
    "massTransitVersion": "8.3.0.0",
    "operatingSystemVersion": "Unix 6.8.0.0"
  }}
}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masstransit_schedule_message_is_delivered_at_its_time() {
    require_broker();
    let vhost = Vhost::create("mt-schedule");
    let (bus, reminders, _) = service(&vhost, InMemoryScheduler::new()).await;
    let (message_id, conversation_id, token) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let due = Utc::now() + chrono::Duration::milliseconds(1500);
    // .NET writes seven fraction digits.
    let at = format!("{}0Z", due.to_rfc3339_opts(SecondsFormat::Micros, true).trim_end_matches('Z'));
    send_raw(&vhost, "quartz", message_id, schedule_command(&vhost.name, message_id, conversation_id, token, &at))
        .await;

    let delivered = reminders.wait_for::<AppointmentReminder>(1, WAIT).await.expect("delivered");
    let received = Utc::now();
    assert_eq!(delivered[0], AppointmentReminder { patient_id: 42, text: "Dr. Who, 10:30".into() });
    assert!(received >= due, "delivered at {received}, before its time {due}");
    // As MassTransit's Quartz service delivers it: the command's ids and headers, the token.
    let envelope = &reminders.all()[0];
    assert_eq!(envelope.message_id, Some(message_id));
    assert_eq!(envelope.conversation_id, Some(conversation_id));
    assert_eq!(envelope.message_type, [AppointmentReminder::message_type()]);
    assert_eq!(envelope.headers.get_str("Tenant"), Some("north"));
    // The payload as it was written: a .NET decimal beyond f64 stays exact.
    assert!(envelope.message.get().contains("12345678901234567890.123456789"), "{}", envelope.message.get());
    let carried = envelope.headers.get_str(bus_core::header_names::SCHEDULING_TOKEN_ID).map(Uuid::parse_str);
    assert_eq!(carried.and_then(Result::ok), Some(token));
    assert_eq!(
        envelope.destination_address.as_deref(),
        Some(format!("rabbitmq://localhost/{}/reminders", vhost.name).as_str())
    );
    bus.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masstransit_cancel_scheduled_message_cancels_it() {
    require_broker();
    let vhost = Vhost::create("mt-schedule");
    let scheduler = InMemoryScheduler::new();
    let (bus, reminders, recorder) = service(&vhost, scheduler.clone()).await;
    let (message_id, token) = (Uuid::now_v7(), Uuid::now_v7());
    // A .NET DateTime of kind Unspecified: no zone, taken as UTC.
    let at = (Utc::now() + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%S%.6f0").to_string();
    send_raw(&vhost, "quartz", message_id, schedule_command(&vhost.name, message_id, Uuid::now_v7(), token, &at)).await;
    recorder.consumed.wait_for::<ScheduleMessage>(1, WAIT).await.expect("scheduled");
    assert_eq!(scheduler.len(), 1);

    let cancel_id = Uuid::now_v7();
    let cancel = format!(
        r#"{{"messageId":"{cancel_id}","conversationId":"{cancel_id}","destinationAddress":"rabbitmq://localhost/{}/quartz",
            "messageType":["urn:message:MassTransit.Scheduling:CancelScheduledMessage"],
            "message":{{"correlationId":"{}","timestamp":"2026-12-06T09:00:01.7654321Z","tokenId":"{token}"}},
            "headers":{{}}}}"#,
        vhost.name,
        Uuid::now_v7()
    );
    send_raw(&vhost, "quartz", cancel_id, cancel).await;
    recorder.consumed.wait_for::<CancelScheduledMessage>(1, WAIT).await.expect("cancel consumed");
    assert!(scheduler.is_empty(), "nothing waits: nothing will be delivered");
    assert!(reminders.is_empty());
    bus.stop().await.expect("stop");
}

/// A command that cannot be carried out (no destination it can send to) ends in
/// `quartz_error` with the reason, and is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_message_with_a_bad_destination_goes_to_the_error_queue() {
    require_broker();
    let vhost = Vhost::create("mt-schedule");
    let scheduler = InMemoryScheduler::new();
    let (bus, _, recorder) = service(&vhost, scheduler.clone()).await;
    let message_id = Uuid::now_v7();
    let body = schedule_command(&vhost.name, message_id, Uuid::now_v7(), Uuid::now_v7(), "2026-12-06T09:00:00Z")
        .replace(&format!("rabbitmq://localhost/{}/reminders", vhost.name), "rabbitmq://localhost/");
    send_raw(&vhost, "quartz", message_id, body).await;
    recorder.faults.wait_until("a fault", WAIT, |f| !f.is_empty()).await.expect("faulted");
    let fault = &recorder.faults.snapshot()[0];
    assert!(fault.message.contains("rabbitmq://localhost/"), "{}", fault.message);
    assert!(scheduler.is_empty());
    bus.stop().await.expect("stop");
    let error_queue = vhost.list_queues().into_iter().find(|(q, _)| q == "quartz_error").map(|(_, n)| n);
    assert_eq!(error_queue, Some(1));
}
