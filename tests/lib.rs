//! Cross-crate tests and the transport conformance suite.
//!
//! The suite is written once, generic over a [`Fixture`] (a transport plus a way to look
//! into its queues), and instantiated per transport with [`conformance_suite!`]: every
//! transport must pass the same cases unchanged.

pub mod conformance;

pub use conformance::support::record;
pub mod instances;
pub mod json_order;
pub mod postgres_support;
pub mod rabbit_fixture;
pub mod rabbit_support;
pub mod redis_support;

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
    /// and returns every message waiting there. While it waits for messages (`n > 0`), a
    /// queue not declared yet counts as empty.
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

/// One runtime for every test of a binary, so that they can share a broker connection
/// (a connection lives on the runtime that opened it).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the test runtime starts")
    })
}

/// Asks `check` every `every` until it answers `Ok`, for at most `timeout`, and returns its
/// answer: for state that tells no one when it changes (health, a process's port, queue
/// sizes from `rabbitmqctl` or the management API). `check`'s `Err` says what it saw; the
/// last one is in the panic when the time is up.
///
/// # Panics
///
/// When `check` has not answered `Ok` within `timeout`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match check().await {
            Ok(answer) => return answer,
            Err(seen) if tokio::time::Instant::now() >= deadline => panic!("{what}: not within {timeout:?}; {seen}"),
            Err(_) => {}
        }
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
            messages_answering_no_request_go_to_the_response_endpoints_error_and_skipped_queues,
            always_failing_consumer_is_retried_then_moved_to_error_with_one_fault,
            redelivered_failures_produce_one_fault_after_the_last_redelivery,
            consumer_failing_twice_then_succeeding_publishes_only_from_the_successful_attempt,
            delayed_redelivery_delivers_again_with_a_counted_header,
            unknown_message_type_goes_to_skipped_queue,
            unreadable_messages_go_to_error_queue_with_their_reason,
            panicking_and_hung_consumers_are_failed_attempts,
            permanent_errors_are_not_retried,
            a_retrying_message_does_not_block_the_others,
            consumer_concurrency_limit_is_respected,
            a_message_whose_outbox_cannot_be_delivered_ends_in_error,
            a_message_produced_after_the_consume_finished_still_leaves,
            panics_in_middleware_and_observers_do_not_loop,
            a_fault_address_that_names_no_endpoint_falls_back_to_the_response_address,
            names_from_the_wire_too_long_for_the_broker_fail_only_what_needs_them,
            a_panic_while_writing_the_fault_moves_the_message_to_error,
            stop_and_restart_mid_run_loses_nothing,
            stop_cancels_overrunning_consumers_and_requeues_their_messages,
            a_consumer_finishing_during_stop_can_still_publish_and_request,
            partitioned_messages_run_one_at_a_time_per_key_in_delivery_order,
            kill_switch_stops_an_endpoint_through_an_outage_and_loses_nothing,
            batches_end_at_their_message_limit_or_their_time_limit,
            a_failed_batch_sends_each_message_to_error_with_one_fault_each,
            the_bus_wide_concurrency_limit_holds_across_endpoints,
            an_idle_endpoint_holds_no_place_in_the_bus_wide_limit,
            a_busy_key_does_not_hold_the_places_of_other_keys,
        );
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::runtime().block_on(async {
                    let fixture = $fixture.await;
                    $crate::conformance::$case(&fixture).await;
                });
            }
        )*
    };
}
