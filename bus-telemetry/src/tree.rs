//! A span exporter that prints each trace as an indented tree when it shuts down.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use opentelemetry::trace::{SpanId, Status};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// Collects spans and prints them as one tree per trace on shutdown.
#[derive(Debug, Clone, Default)]
pub struct TreeExporter {
    spans: Arc<Mutex<Vec<SpanData>>>,
}

impl SpanExporter for TreeExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(batch);
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: std::time::Duration) -> OTelSdkResult {
        let spans = self.spans.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        let rendered = render(&spans);
        if !rendered.is_empty() {
            #[allow(clippy::print_stdout)]
            {
                println!("\n{rendered}");
            }
        }
        Ok(())
    }
}

impl TreeExporter {
    /// The spans collected so far, as the trees shutdown prints.
    pub fn rendered(&self) -> String {
        self.spans.lock().map(|spans| render(&spans)).unwrap_or_default()
    }
}

fn label(span: &SpanData) -> String {
    let mut label = format!(
        "{} ({:.1} ms)",
        span.name,
        span.end_time.duration_since(span.start_time).unwrap_or_default().as_secs_f64() * 1000.0
    );
    let attribute =
        |key: &str| span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str().into_owned());
    if let (Some(begin), Some(end)) = (attribute("saga.begin_state"), attribute("saga.end_state")) {
        let _ = write!(label, "  saga {begin} -> {end}");
    }
    if let Status::Error { description } = &span.status {
        let _ = write!(label, "  ERROR {description}");
    }
    label
}

/// One tree per trace, children under their parents, in start order.
pub(crate) fn render(spans: &[SpanData]) -> String {
    let mut by_trace: HashMap<_, Vec<&SpanData>> = HashMap::new();
    for span in spans {
        by_trace.entry(span.span_context.trace_id()).or_default().push(span);
    }
    let mut traces: Vec<_> = by_trace.into_iter().collect();
    traces.sort_by_key(|(_, spans)| spans.iter().map(|s| s.start_time).min());
    let mut out = String::new();
    for (trace, mut spans) in traces {
        spans.sort_by_key(|s| s.start_time);
        let ids: std::collections::HashSet<SpanId> = spans.iter().map(|s| s.span_context.span_id()).collect();
        let _ = writeln!(out, "trace {trace}");
        for root in spans.iter().filter(|s| !ids.contains(&s.parent_span_id)) {
            write_tree(&mut out, root, &spans, 1);
        }
    }
    out
}

fn write_tree(out: &mut String, span: &SpanData, all: &[&SpanData], depth: usize) {
    let _ = writeln!(out, "{}{}", "  ".repeat(depth), label(span));
    for child in all.iter().filter(|s| s.parent_span_id == span.span_context.span_id()) {
        write_tree(out, child, all, depth + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _, TracerProvider as _};
    use opentelemetry::KeyValue;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    #[test]
    fn a_trace_prints_as_a_tree_with_saga_states_and_errors() {
        let spans = TreeExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(spans.clone()).build();
        let tracer = provider.tracer("test");
        tracer.in_span("Orders:NewOrder send", |_| {
            tracer.in_span("orders receive", |_| {
                tracer.in_span("orders process", |cx| {
                    cx.span().set_attributes([
                        KeyValue::new("saga.begin_state", "Initial"),
                        KeyValue::new("saga.end_state", "Pending"),
                    ]);
                });
            });
            tracer.in_span("billing process", |cx| cx.span().set_status(Status::error("card declined")));
        });
        let mut other = tracer.start("elsewhere send");
        other.end();
        let rendered = spans.rendered();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 7, "{rendered}");
        assert!(lines[0].starts_with("trace "), "{rendered}");
        assert!(lines[1].starts_with("  Orders:NewOrder send ("), "{rendered}");
        assert!(lines[2].starts_with("    orders receive ("), "{rendered}");
        assert!(
            lines[3].starts_with("      orders process (") && lines[3].ends_with("saga Initial -> Pending"),
            "{rendered}"
        );
        assert!(
            lines[4].starts_with("    billing process (") && lines[4].ends_with("ERROR card declined"),
            "{rendered}"
        );
        assert!(
            lines[5].starts_with("trace ") && lines[6].starts_with("  elsewhere send ("),
            "a trace of its own: {rendered}"
        );
    }
}
