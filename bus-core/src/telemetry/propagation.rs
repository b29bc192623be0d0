//! Trace context in message headers: W3C `traceparent` and MassTransit's `MT-Activity-Id`.

use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};

use crate::headers::names::ACTIVITY_ID;
use crate::Headers;

const TRACEPARENT: &str = "traceparent";
const BAGGAGE: &str = "baggage";
const PROPAGATION: &str = "MT-Activity-Propagation";

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let found = self
            .0
            .get_str(key)
            .or_else(|| self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).and_then(|(_, v)| v.as_str()));
        // MassTransit writes the W3C value under its own name only.
        match found {
            None if key == TRACEPARENT => self.0.get_str(ACTIVITY_ID),
            other => other,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Writes `cx` into the headers, when it holds a valid span.
///
/// The two propagators are called one by one, baggage only when there is some: this runs
/// for every message, and a composite propagator would look for baggage every time.
pub(crate) fn inject(cx: &Context, headers: &mut Headers) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    if let Some(traceparent) = headers.get_str(TRACEPARENT).map(str::to_owned) {
        headers.insert(ACTIVITY_ID, traceparent);
    }
    if !cx.baggage().is_empty() {
        BaggagePropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// Reads the producer's context from the headers; an empty context when there is none or
/// it does not parse.
pub(crate) fn extract(headers: &Headers) -> Context {
    let extractor = HeaderExtractor(headers);
    let cx = TraceContextPropagator::new().extract(&extractor);
    with_baggage(cx, &extractor)
}

fn with_baggage(cx: Context, extractor: &HeaderExtractor<'_>) -> Context {
    if extractor.get(BAGGAGE).is_some() {
        BaggagePropagator::new().extract_with_context(&cx, extractor)
    } else {
        cx
    }
}

/// What a received message's spans continue: the producer's context as parent, or, with
/// MassTransit's `MT-Activity-Propagation: Link`, a new trace (baggage kept) linked to it.
pub(crate) struct Producer {
    /// The parent context of the receive span.
    pub(crate) parent: Context,
    /// The producer's span, when the receive span links to it instead.
    pub(crate) link: Option<SpanContext>,
}

/// Reads the producer's context and how to continue it.
pub(crate) fn extract_producer(headers: &Headers) -> Producer {
    let parent = extract(headers);
    let link = headers.get_str(PROPAGATION).is_some_and(|p| p.eq_ignore_ascii_case("link"));
    let remote = parent.span().span_context().clone();
    if link && remote.is_valid() {
        let parent = with_baggage(Context::new(), &HeaderExtractor(headers));
        return Producer { parent, link: Some(remote) };
    }
    Producer { parent, link: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masstransit_activity_id_is_read_when_traceparent_is_missing() {
        let mut headers = Headers::new();
        headers.insert(ACTIVITY_ID, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let cx = extract(&headers);
        let span = cx.span();
        let context = span.span_context();
        assert!(context.is_valid());
        assert_eq!(context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
    }

    #[test]
    fn malformed_headers_give_an_empty_context() {
        for value in ["garbage", "00-zz-yy-01", ""] {
            let mut headers = Headers::new();
            headers.insert(TRACEPARENT, value);
            headers.insert(ACTIVITY_ID, value);
            assert!(!extract(&headers).span().span_context().is_valid(), "{value}");
        }
    }

    #[test]
    fn trace_state_and_baggage_travel_with_the_trace() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        use opentelemetry::KeyValue;
        let state = TraceState::from_key_value([("vendor", "x1")]).expect("trace state");
        let producer = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            true,
            state,
        );
        let cx = Context::new()
            .with_remote_span_context(producer)
            .with_baggage([KeyValue::new("tenant", "acme"), KeyValue::new("region", "eu")]);
        let mut headers = Headers::new();
        inject(&cx, &mut headers);
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(headers.get_str(TRACEPARENT), Some(traceparent));
        assert_eq!(headers.get_str(ACTIVITY_ID), Some(traceparent), "MassTransit's header has the same value");
        assert_eq!(headers.get_str("tracestate"), Some("vendor=x1"));

        let back = extract(&headers);
        assert_eq!(back.span().span_context().trace_id(), cx.span().span_context().trace_id());
        assert_eq!(back.span().span_context().trace_state().get("vendor"), Some("x1"));
        assert_eq!(back.baggage().get("tenant").map(|v| v.as_str().to_owned()).as_deref(), Some("acme"));
        assert_eq!(back.baggage().len(), 2);
    }

    #[test]
    fn no_baggage_header_without_baggage() {
        let producer = extract(&{
            let mut headers = Headers::new();
            headers.insert(TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
            headers
        });
        let mut headers = Headers::new();
        inject(&producer, &mut headers);
        assert!(headers.get(BAGGAGE).is_none());
        assert!(headers.get(TRACEPARENT).is_some());
    }

    #[test]
    fn nothing_is_written_without_an_active_context() {
        let mut headers = Headers::new();
        inject(&Context::new(), &mut headers);
        assert!(headers.is_empty());
    }
}
