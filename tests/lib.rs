//! Cross-crate tests and the transport conformance suite.
//!
//! The suite is written once, generic over a [`Fixture`] (a transport plus a way to look
//! into its queues), and instantiated per transport with [`conformance_suite!`]: every
//! transport must pass the same cases unchanged.

pub mod conformance;

use std::future::Future;
use std::time::Duration;

use bus_core::{Bus, BusBuilder, Transport, TransportMessage};

/// How long conformance waits last before they fail.
pub const WAIT: Duration = Duration::from_secs(10);

/// A transport under test.
pub trait Fixture: Send + Sync + 'static {
    /// The transport type.
    type Transport: Transport + Clone;

    /// The transport; clones share one broker (connection).
    fn transport(&self) -> Self::Transport;

    /// Waits until `queue` holds at least `n` messages (or `timeout` passes), then takes
    /// and returns every message waiting there.
    fn take_messages(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
    ) -> impl Future<Output = Vec<TransportMessage>> + Send;

    /// A builder for a bus on this transport with short timeouts suited to tests.
    fn bus(&self) -> BusBuilder {
        Bus::builder(self.transport()).stop_timeout(Duration::from_secs(5)).request_timeout(Duration::from_secs(5))
    }
}

/// A name no other test (or earlier run) uses, so tests can share a broker.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}-{}", &id[id.len() - 10..])
}

/// Declares one `#[tokio::test]` per conformance case for a fixture.
///
/// `$fixture` is an expression evaluating to a future of the fixture.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:expr) => {
        $crate::conformance_suite!(@cases $fixture;
            publish_reaches_every_consuming_endpoint_and_no_other,
            competing_consumers_share_one_endpoint_without_duplicates,
            send_reaches_only_its_queue,
            consumer_of_a_contract_receives_messages_that_list_it,
            headers_round_trip,
            ids_flow_from_consumed_to_produced_messages,
            request_returns_the_typed_response,
            request_without_responder_times_out,
            request_whose_consumer_fails_returns_the_fault,
        );
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $fixture.await;
                $crate::conformance::$case(&fixture).await;
            }
        )*
    };
}
