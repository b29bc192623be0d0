//! Trace context in message headers: W3C `traceparent` and MassTransit's `MT-Activity-Id`.

use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;

use crate::headers::names::ACTIVITY_ID;
use crate::Headers;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
const BAGGAGE: &str = "baggage";
const PROPAGATION: &str = "MT-Activity-Propagation";
/// MassTransit's name for the baggage it carries (the W3C format, under the name of .NET's
/// older `Correlation-Context`).
const CORRELATION_CONTEXT: &str = "MT-Activity-Correlation-Context";

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

/// Reads headers for the SDK's propagators: an exact name first, then one equal ignoring
/// case ([`TraceHeaders`] finds the same values in one pass).
struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let found = self
            .0
            .get_str(key)
            .or_else(|| self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).and_then(|(_, v)| v.as_str()));
        // MassTransit writes the W3C values under its own names only.
        match found {
            None if key == TRACEPARENT => self.0.get_str(ACTIVITY_ID),
            None if key == BAGGAGE => self.0.get_str(CORRELATION_CONTEXT),
            other => other,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// The trace headers of a message, found in one pass over its headers.
///
/// W3C names are matched ignoring case (an exact match wins), MassTransit's exactly. This
/// runs for every received message: one pass is about a third of the lookups it replaces,
/// most of which looked for headers a message does not have.
#[derive(Default)]
struct TraceHeaders<'a> {
    traceparent: Found<'a>,
    tracestate: Found<'a>,
    baggage: Found<'a>,
    activity_id: Option<&'a str>,
    correlation_context: Option<&'a str>,
    link: bool,
}

/// A header looked for: the value under its exact name, and the first under a name equal
/// ignoring case; read as [`HeaderExtractor::get`] reads it (the exact name's text, else the
/// first match's).
#[derive(Default, Clone, Copy)]
struct Found<'a> {
    exact: Option<&'a serde_json::Value>,
    ignoring_case: Option<&'a serde_json::Value>,
}

impl<'a> Found<'a> {
    fn offer(&mut self, name: &str, wanted: &str, value: &'a serde_json::Value) {
        if name == wanted {
            self.exact = Some(value);
        }
        if self.ignoring_case.is_none() && name.eq_ignore_ascii_case(wanted) {
            self.ignoring_case = Some(value);
        }
    }

    fn value(self) -> Option<&'a str> {
        self.exact
            .and_then(serde_json::Value::as_str)
            .or_else(|| self.ignoring_case.and_then(serde_json::Value::as_str))
    }
}

impl<'a> TraceHeaders<'a> {
    fn read(headers: &'a Headers) -> Self {
        let mut found = TraceHeaders::default();
        for (name, value) in headers.iter() {
            match name.len() {
                11 => found.traceparent.offer(name, TRACEPARENT, value),
                10 => found.tracestate.offer(name, TRACESTATE, value),
                7 => found.baggage.offer(name, BAGGAGE, value),
                _ if name == ACTIVITY_ID => found.activity_id = value.as_str(),
                _ if name == CORRELATION_CONTEXT => found.correlation_context = value.as_str(),
                _ if name == PROPAGATION => found.link = value.as_str().is_some_and(|p| p.eq_ignore_ascii_case("link")),
                _ => {}
            }
        }
        found
    }

    /// The W3C value, or MassTransit's when only that is there.
    fn traceparent(&self) -> Option<&'a str> {
        self.traceparent.value().or(self.activity_id)
    }
}

/// Writes `cx` into the headers, when it holds a valid span: `traceparent` and
/// `MT-Activity-Id` (the same value), `tracestate` when there is one, and when there is
/// baggage, `baggage` and `MT-Activity-Correlation-Context` (the same value).
///
/// This runs for every message. The `traceparent` is written here rather than by the SDK's
/// propagator, which formats it through `format!` and always adds an empty `tracestate`:
/// together, a seventh of a traced message's cost. Reading it back is checked against the SDK.
pub(crate) fn inject(cx: &Context, headers: &mut Headers) {
    let span = cx.span();
    let context = span.span_context();
    if !context.is_valid() {
        return;
    }
    let traceparent = traceparent(context);
    headers.insert(ACTIVITY_ID, traceparent.clone());
    headers.insert(TRACEPARENT, traceparent);
    let state = context.trace_state().header();
    if state.is_empty() {
        // One left from elsewhere (another trace's) must not travel with this one.
        headers.remove(TRACESTATE);
    } else {
        headers.insert(TRACESTATE, state);
    }
    if !cx.baggage().is_empty() {
        sdk::baggage().inject_context(cx, &mut HeaderInjector(headers));
        if let Some(baggage) = headers.get(BAGGAGE).cloned() {
            headers.insert(CORRELATION_CONTEXT, baggage);
        }
    }
}

/// The propagators of what the bus does not write and read itself: `baggage`, and a
/// `traceparent` in a form other than the canonical one. The SDK's, with the
/// `opentelemetry-sdk` feature; else whatever propagator the application installed globally.
#[cfg(feature = "opentelemetry-sdk")]
mod sdk {
    use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};

    pub(super) fn baggage() -> BaggagePropagator {
        BaggagePropagator::new()
    }

    pub(super) fn trace_context() -> TraceContextPropagator {
        TraceContextPropagator::new()
    }
}

#[cfg(not(feature = "opentelemetry-sdk"))]
mod sdk {
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::Context;

    /// The globally installed propagator, for both.
    #[derive(Debug)]
    pub(super) struct Global;

    impl TextMapPropagator for Global {
        fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
            opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, injector));
        }

        fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
            opentelemetry::global::get_text_map_propagator(|p| p.extract_with_context(cx, extractor))
        }

        fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
            opentelemetry::propagation::text_map_propagator::FieldIter::new(&[])
        }
    }

    pub(super) fn baggage() -> Global {
        Global
    }

    pub(super) fn trace_context() -> Global {
        Global
    }
}

/// `00-{trace id}-{span id}-{flags}`: W3C Trace Context, version 00.
fn traceparent(context: &SpanContext) -> String {
    fn put_hex(out: &mut [u8], bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
    }
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    put_hex(&mut out[3..35], &context.trace_id().to_bytes());
    put_hex(&mut out[36..52], &context.span_id().to_bytes());
    put_hex(&mut out[53..55], &[(context.trace_flags() & TraceFlags::SAMPLED).to_u8()]);
    // Only ASCII was written: the check cannot fail, and costs less than the `unsafe` that skips it.
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

const TRACEPARENT_LEN: usize = 55;

/// Reads a `traceparent` in its canonical form (version 00, lowercase hex), the one every
/// producer writes; `None` for anything else, which the SDK's propagator then reads.
fn parse_canonical(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    /// Each byte's value as a lowercase hex digit, or `NOT_HEX`: one load per digit where
    /// matching ranges took three branches, on every traced message received.
    const NOT_HEX: u8 = 0xff;
    const NIBBLES: [u8; 256] = {
        let mut table = [NOT_HEX; 256];
        let mut digit = 0;
        while digit < 16 {
            table[b"0123456789abcdef"[digit] as usize] = digit as u8;
            digit += 1;
        }
        table
    };
    fn decode<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        let mut invalid = false;
        for (slot, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            let (high, low) = (NIBBLES[usize::from(pair[0])], NIBBLES[usize::from(pair[1])]);
            invalid |= (high | low) > 15;
            *slot = high << 4 | (low & 0x0f);
        }
        (!invalid).then_some(out)
    }
    let bytes = value.as_bytes();
    if bytes.len() != TRACEPARENT_LEN || !bytes.starts_with(b"00-") || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let trace_id = TraceId::from_bytes(decode::<16>(&bytes[3..35])?);
    let span_id = SpanId::from_bytes(decode::<8>(&bytes[36..52])?);
    let [flags] = decode::<1>(&bytes[53..55])?;
    Some((trace_id, span_id, TraceFlags::new(flags) & TraceFlags::SAMPLED))
}

/// Reads the producer's context from the headers; an empty context when there is none or
/// it does not parse.
#[cfg(test)]
pub(crate) fn extract(headers: &Headers) -> Context {
    extract_from(headers, &TraceHeaders::read(headers))
}

fn extract_from(headers: &Headers, found: &TraceHeaders<'_>) -> Context {
    let canonical = found.traceparent().map(str::trim).and_then(parse_canonical);
    let cx = match canonical {
        Some((trace_id, span_id, flags)) => {
            // As the SDK's propagator does: a bad `tracestate` is dropped, not fatal.
            let state = match found.tracestate.value() {
                Some(state) if !state.is_empty() => state.parse().unwrap_or_default(),
                _ => TraceState::default(),
            };
            let context = SpanContext::new(trace_id, span_id, flags, true, state);
            if context.is_valid() {
                Context::current().with_remote_span_context(context)
            } else {
                Context::current()
            }
        }
        // A `traceparent` the fast path does not read goes to the propagator, which reads
        // more forms. Without one the SDK's W3C propagator finds nothing, so it is not asked;
        // the global one (without the SDK) may read headers of its own, so it always is.
        None if found.traceparent().is_some() || !cfg!(feature = "opentelemetry-sdk") => {
            sdk::trace_context().extract(&HeaderExtractor(headers))
        }
        None => Context::current(),
    };
    with_baggage(cx, headers, found)
}

/// Adds the producer's baggage: `baggage`, else MassTransit's `MT-Activity-Correlation-Context`.
fn with_baggage(cx: Context, headers: &Headers, found: &TraceHeaders<'_>) -> Context {
    if found.baggage.value().is_some() || found.correlation_context.is_some() {
        sdk::baggage().extract_with_context(&cx, &HeaderExtractor(headers))
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

/// Reads the producer's context and how to continue it: linked when the message asks for
/// it or `always_link` (the endpoint's setting) says so, else as a child.
pub(crate) fn extract_producer(headers: &Headers, always_link: bool) -> Producer {
    let found = TraceHeaders::read(headers);
    let parent = extract_from(headers, &found);
    if found.link || always_link {
        let remote = parent.span().span_context().clone();
        if remote.is_valid() {
            let parent = with_baggage(Context::new(), headers, &found);
            return Producer { parent, link: Some(remote) };
        }
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
    fn trace_headers_are_found_ignoring_case_an_exact_name_first() {
        let exact = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let other = "00-11111111111111111111111111111111-2222222222222222-01";
        let mut headers = Headers::new();
        headers.insert("TraceParent", other);
        headers.insert("TRACESTATE", "vendor=x1");
        let cx = extract(&headers);
        assert_eq!(cx.span().span_context().trace_id().to_string(), "11111111111111111111111111111111");
        assert_eq!(cx.span().span_context().trace_state().get("vendor"), Some("x1"));
        headers.insert(TRACEPARENT, exact);
        headers.insert(ACTIVITY_ID, other);
        let cx = extract(&headers);
        assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");

        headers.insert(PROPAGATION, "Link");
        let producer = extract_producer(&headers, false);
        assert_eq!(producer.link.map(|l| l.span_id().to_string()).as_deref(), Some("00f067aa0ba902b7"));
        assert!(!producer.parent.span().span_context().is_valid(), "a linked consumer starts a new trace");

        // An exact name whose value is not text gives way to a variant's text, as a lookup does.
        let mut headers = Headers::new();
        headers.insert("Baggage", "tenant=acme");
        headers.insert(BAGGAGE, 1);
        headers.insert(TRACEPARENT, exact);
        let cx = extract(&headers);
        assert_eq!(cx.baggage().get("tenant").map(|v| v.as_str().to_owned()).as_deref(), Some("acme"));
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
    fn masstransit_baggage_is_read_and_written_under_its_own_name_too() {
        use opentelemetry::KeyValue;
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        // As a .NET MassTransit service writes it: no W3C names at all.
        let mut from_dotnet = Headers::new();
        from_dotnet.insert(ACTIVITY_ID, traceparent);
        from_dotnet.insert(CORRELATION_CONTEXT, "tenant=acme,region=eu");
        let cx = extract(&from_dotnet);
        assert_eq!(cx.baggage().get("tenant").map(|v| v.as_str().to_owned()).as_deref(), Some("acme"));
        assert_eq!(cx.baggage().len(), 2);

        // The W3C header wins when both are there.
        from_dotnet.insert(BAGGAGE, "tenant=other");
        let cx = extract(&from_dotnet);
        assert_eq!(cx.baggage().get("tenant").map(|v| v.as_str().to_owned()).as_deref(), Some("other"));
        assert_eq!(cx.baggage().len(), 1);

        // Written under both names, so a .NET consumer sees it.
        let cx = extract(&from_dotnet).with_baggage([KeyValue::new("tenant", "acme")]);
        let mut headers = Headers::new();
        inject(&cx, &mut headers);
        assert_eq!(headers.get_str(BAGGAGE), Some("tenant=acme"));
        assert_eq!(headers.get_str(CORRELATION_CONTEXT), Some("tenant=acme"));
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
        assert!(headers.get(CORRELATION_CONTEXT).is_none());
        assert!(headers.get(TRACEPARENT).is_some());
    }

    /// The hand-written `traceparent` codec must agree with the SDK's propagator: the same
    /// header written, and the same context read from well-formed and malformed headers.
    #[test]
    fn traceparent_agrees_with_the_sdk_propagator() {
        use opentelemetry::trace::TraceState;
        use std::collections::HashMap;
        let sdk = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..2_000u32 {
            let trace = (u128::from(next()) << 64) | u128::from(next());
            let span = next();
            let flags = TraceFlags::new((next() & 0xff) as u8);
            let state =
                if i % 3 == 0 { TraceState::from_key_value([("k", "v")]).expect("state") } else { TraceState::NONE };
            let context = SpanContext::new(TraceId::from(trace), SpanId::from(span), flags, true, state);
            let cx = Context::new().with_remote_span_context(context);
            let mut ours = Headers::new();
            inject(&cx, &mut ours);
            let mut theirs = HashMap::new();
            sdk.inject_context(&cx, &mut theirs);
            assert_eq!(ours.get_str(TRACEPARENT), theirs.get(TRACEPARENT).map(String::as_str));
            let state = theirs.get(TRACESTATE).filter(|s| !s.is_empty()).map(String::as_str);
            assert_eq!(ours.get_str(TRACESTATE), state);
            let back = extract(&ours);
            let read = sdk.extract(&theirs);
            assert_eq!(back.span().span_context(), read.span().span_context());
        }
        let odd = [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
            "garbage",
        ];
        for value in odd {
            for state in [None, Some("vendor=x1"), Some("not a valid state!")] {
                let mut ours = Headers::new();
                ours.insert(TRACEPARENT, value);
                let mut theirs = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
                if let Some(state) = state {
                    ours.insert(TRACESTATE, state);
                    theirs.insert(TRACESTATE.to_owned(), state.to_owned());
                }
                let back = extract(&ours);
                let read = sdk.extract(&theirs);
                assert_eq!(back.span().span_context(), read.span().span_context(), "{value:?} {state:?}");
            }
        }
        // No `traceparent` at all, which the SDK's propagator is not asked about.
        let mut ours = Headers::new();
        ours.insert(TRACESTATE, "vendor=x1");
        ours.insert("Traceparent-Other", odd[0]);
        let theirs = HashMap::from([(TRACESTATE.to_owned(), "vendor=x1".to_owned())]);
        assert_eq!(extract(&ours).span().span_context(), sdk.extract(&theirs).span().span_context());
        // A `traceparent` that is not text is no `traceparent`: MassTransit's is read instead.
        let mut ours = Headers::new();
        ours.insert(TRACEPARENT, 1);
        assert!(!extract(&ours).span().span_context().is_valid());
        ours.insert(ACTIVITY_ID, odd[0]);
        let theirs = HashMap::from([(TRACEPARENT.to_owned(), odd[0].to_owned())]);
        assert_eq!(extract(&ours).span().span_context(), sdk.extract(&theirs).span().span_context());
        // Under another case only, a value the fast path does not read goes to the SDK's.
        for value in [odd[1], odd[0]] {
            let mut ours = Headers::new();
            ours.insert("TraceParent", value);
            let theirs = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
            assert_eq!(extract(&ours).span().span_context(), sdk.extract(&theirs).span().span_context(), "{value}");
        }
    }

    #[test]
    fn nothing_is_written_without_an_active_context() {
        let mut headers = Headers::new();
        inject(&Context::new(), &mut headers);
        assert!(headers.is_empty());
    }
}
