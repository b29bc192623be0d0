//! Serializer choices refused when a bus is built.

/// An endpoint's default content type that no serializer of the bus reads is refused when
/// the bus is built, not met by every message without a content type.
#[test]
fn an_unreadable_default_content_type_is_refused_when_built() {
    #[derive(Debug, serde::Serialize, serde::Deserialize, bus_core::Message)]
    #[message(urn = "urn:message:Legacy:Reading")]
    struct Reading {
        value: f64,
    }
    let refused = bus_core::Bus::builder(bus_inmemory::InMemoryTransport::new())
        .endpoint(
            bus_core::Endpoint::new("readings")
                .default_content_type("application/x-protobuf-legacy")
                .handler(|_: bus_core::ConsumeContext<Reading>| async { Ok(()) }),
        )
        .try_build();
    let error = refused.expect_err("refused");
    assert!(error.to_string().contains("application/x-protobuf-legacy"), "{error}");
}
