//! Printing figures: one `name value unit` line each, and a table of ratios at the end.

use std::sync::Mutex;

/// One measured scenario beside its baseline.
#[derive(Debug, Clone)]
pub(crate) struct Comparison {
    pub(crate) scenario: String,
    pub(crate) bus: f64,
    pub(crate) baseline: f64,
    pub(crate) unit: &'static str,
    pub(crate) target: Option<f64>,
}

static ROWS: Mutex<Vec<Comparison>> = Mutex::new(Vec::new());

/// Prints a figure as `name value unit`.
pub(crate) fn figure(name: &str, value: f64, unit: &str) {
    println!("{name} {value:.1} {unit}");
}

/// Records a comparison for the final table.
pub(crate) fn compare(scenario: &str, bus: f64, baseline: f64, unit: &'static str, target: Option<f64>) {
    let ratio = if baseline > 0.0 { bus / baseline } else { 0.0 };
    println!("{scenario}.ratio {ratio:.3} bus/baseline");
    if let Ok(mut rows) = ROWS.lock() {
        rows.push(Comparison { scenario: scenario.to_owned(), bus, baseline, unit, target });
    }
}

/// Prints the table of every comparison made.
pub(crate) fn table() {
    let rows = ROWS.lock().map(|r| r.clone()).unwrap_or_default();
    if rows.is_empty() {
        return;
    }
    println!();
    println!("| scenario | bus | baseline | unit | ratio | target |");
    println!("| --- | ---: | ---: | --- | ---: | ---: |");
    for row in rows {
        let ratio = if row.baseline > 0.0 { row.bus / row.baseline } else { 0.0 };
        let target = row.target.map_or_else(
            || "-".to_owned(),
            |t| format!("{:.0}% {}", t * 100.0, if ratio >= t { "met" } else { "missed" }),
        );
        println!(
            "| {} | {:.0} | {:.0} | {} | {:.0}% | {} |",
            row.scenario,
            row.bus,
            row.baseline,
            row.unit,
            ratio * 100.0,
            target
        );
    }
}

/// Writes the comparisons as an SVG bar chart: each scenario's bus figure as a share of its
/// baseline, with its target marked.
pub(crate) fn chart(path: &std::path::Path) -> std::io::Result<()> {
    let rows = ROWS.lock().map(|r| r.clone()).unwrap_or_default();
    let (width, bar, gap, left) = (1100.0, 26.0, 14.0, 560.0);
    let height = 60.0 + rows.len() as f64 * (bar + gap);
    let scale = (width - left - 40.0) / 1.2;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">
<text x="10" y="22" font-size="15" font-weight="bold">bus throughput as a share of its raw baseline (same run)</text>
"##
    );
    for (i, row) in rows.iter().enumerate() {
        let y = 40.0 + i as f64 * (bar + gap);
        let ratio = if row.baseline > 0.0 { row.bus / row.baseline } else { 0.0 };
        let met = row.target.is_none_or(|t| ratio >= t);
        let color = if met { "#2e8b57" } else { "#cd5c5c" };
        let w = (ratio.min(1.2) * scale).max(1.0);
        svg.push_str(&format!(
            r##"<text x="10" y="{ty}">{name}</text><rect x="{left}" y="{y}" width="{w:.1}" height="{bar}" fill="{color}"/><text x="{tx:.1}" y="{ty}">{pct:.0}%</text>
"##,
            ty = y + bar * 0.7,
            name = row.scenario.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;"),
            tx = left + w + 6.0,
            pct = ratio * 100.0,
        ));
        if let Some(target) = row.target {
            let x = left + target * scale;
            svg.push_str(&format!(
                r##"<line x1="{x:.1}" y1="{y1}" x2="{x:.1}" y2="{y2}" stroke="black" stroke-dasharray="4,2"/>
"##,
                y1 = y - 3.0,
                y2 = y + bar + 3.0
            ));
        }
    }
    let full = left + scale;
    svg.push_str(&format!(
        r##"<line x1="{full:.1}" y1="32" x2="{full:.1}" y2="{bottom}" stroke="#888"/><text x="{full:.1}" y="{label}" text-anchor="middle" fill="#888">100% of baseline</text>
</svg>
"##,
        bottom = height - 22.0,
        label = height - 8.0
    ));
    std::fs::write(path, svg)
}
