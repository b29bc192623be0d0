//! `init` honours the standard sampler settings. A test binary of its own: the variables are
//! set before anything reads them, and `init` installs process-wide providers.

use bus_core::{Bus, ConsumeContext, Endpoint, Message};
use bus_inmemory::InMemoryTransport;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Telemetry:Sampled")]
struct Sampled {
    n: u32,
}

/// `OTEL_TRACES_SAMPLER=traceidratio` with `OTEL_TRACES_SAMPLER_ARG=0` samples nothing: the
/// message still carries its trace context, marked not sampled (`-00`), where the default
/// (parent-based, always on) would mark it sampled (`-01`).
#[test]
fn the_sampler_variables_decide_what_is_sampled() {
    // Set before any other thread exists.
    std::env::set_var("OTEL_TRACES_SAMPLER", "traceidratio");
    std::env::set_var("OTEL_TRACES_SAMPLER_ARG", "0");
    std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(publish_and_check());
}

async fn publish_and_check() {
    let telemetry = bus_telemetry::init("sampler-settings").expect("telemetry set up");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let bus = Bus::builder(InMemoryTransport::new())
        .endpoint(Endpoint::new("sampler-settings").handler(move |ctx: ConsumeContext<Sampled>| {
            let _ = tx.send(ctx.headers().get_str("traceparent").map(str::to_owned));
            async { Ok(()) }
        }))
        .build();
    bus.start().await.expect("bus starts");
    for n in 0..3 {
        bus.publish(Sampled { n }).await.expect("publish");
    }
    for _ in 0..3 {
        let traceparent = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("consumed in time")
            .flatten()
            .expect("a traceparent header");
        assert!(traceparent.starts_with("00-") && traceparent.ends_with("-00"), "not sampled: {traceparent}");
    }
    bus.stop().await.expect("bus stops");
    drop(telemetry);
}
