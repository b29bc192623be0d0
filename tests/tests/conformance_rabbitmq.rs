//! The conformance suite on RabbitMQ (127.0.0.1:5672), unchanged from the in-memory run.

use tests::rabbit_fixture::RabbitFixture;

tests::conformance_suite!(RabbitFixture::shared("conformance"));
