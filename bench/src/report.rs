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
