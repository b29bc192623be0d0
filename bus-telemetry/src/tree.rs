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
