//! Trace context in message headers: W3C `traceparent` and MassTransit's `MT-Activity-Id`.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};

use crate::headers::names::ACTIVITY_ID;
use crate::Headers;

const TRACEPARENT: &str = "traceparent";

fn propagator() -> &'static TextMapCompositePropagator {
    static PROPAGATOR: OnceLock<TextMapCompositePropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(|| {
        TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ])
    })
}

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
pub(crate) fn inject(cx: &Context, headers: &mut Headers) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    propagator().inject_context(cx, &mut HeaderInjector(headers));
    if let Some(traceparent) = headers.get_str(TRACEPARENT).map(str::to_owned) {
        headers.insert(ACTIVITY_ID, traceparent);
    }
}

/// Reads the producer's context from the headers; an empty context when there is none or
/// it does not parse.
pub(crate) fn extract(headers: &Headers) -> Context {
    propagator().extract(&HeaderExtractor(headers))
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
    fn nothing_is_written_without_an_active_context() {
        let mut headers = Headers::new();
        inject(&Context::new(), &mut headers);
        assert!(headers.is_empty());
    }
}
