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
    if rows.is_empty() {
        return Ok(());
    }
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
            name = escape(&row.scenario),
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

/// One point of a curve: `series` at `x`.
#[derive(Debug, Clone)]
struct Point {
    curve: String,
    series: String,
    x: f64,
    y: f64,
}

static POINTS: Mutex<Vec<Point>> = Mutex::new(Vec::new());

/// Records a point of a scaling curve, drawn by [`curves`].
pub(crate) fn point(curve: &str, series: &str, x: f64, y: f64) {
    if let Ok(mut points) = POINTS.lock() {
        points.push(Point { curve: curve.to_owned(), series: series.to_owned(), x, y });
    }
}

/// A curve's title and axis labels.
fn labels(curve: &str) -> (&'static str, &'static str, &'static str) {
    match curve {
        "endpoints-throughput-inmemory" => {
            ("in memory: throughput vs endpoints (a message type each)", "endpoints", "msg/s")
        }
        "endpoints-throughput-rabbitmq" => {
            ("RabbitMQ end to end: throughput vs endpoints (a message type each)", "endpoints", "msg/s")
        }
        "endpoints-p99" => ("p99 latency at 1,000 msg/s vs endpoints", "endpoints", "ms"),
        "size-inmemory" => ("in memory: throughput vs payload size", "payload bytes", "msg/s"),
        "size-rabbitmq" => ("RabbitMQ end to end: throughput vs payload size", "payload bytes", "msg/s"),
        "saga-instances" => ("saga transitions vs instances stored in Redis", "instances", "transitions/s"),
        "saga-memory" => ("Redis memory per saga instance", "instances", "bytes/instance"),
        "memory-endpoints" => ("resident memory of an idle bus vs endpoints", "endpoints", "MiB"),
        "memory-backlog" => ("peak resident memory vs messages waiting (in memory)", "messages waiting", "MiB"),
        _ => ("", "", ""),
    }
}

/// Writes each curve as `performance-{curve}.svg` in `dir`: a line per series, x on a log
/// scale (the curves run over decades), y from zero.
pub(crate) fn curves(dir: &std::path::Path) -> std::io::Result<Vec<String>> {
    let points = POINTS.lock().map(|p| p.clone()).unwrap_or_default();
    let mut names: Vec<String> = points.iter().map(|p| p.curve.clone()).collect();
    names.dedup();
    names.sort();
    names.dedup();
    let mut written = Vec::new();
    for name in names {
        let mine: Vec<&Point> = points.iter().filter(|p| p.curve == name).collect();
        let file = dir.join(format!("performance-{name}.svg"));
        std::fs::write(&file, curve_svg(&name, &mine))?;
        written.push(file.display().to_string());
    }
    Ok(written)
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn curve_svg(name: &str, points: &[&Point]) -> String {
    let (title, x_label, y_label) = labels(name);
    let (width, height, left, right, top, bottom) = (760.0, 360.0, 90.0, 250.0, 40.0, 50.0);
    let (plot_w, plot_h) = (width - left - right, height - top - bottom);
    let log = |x: f64| x.max(1.0).log10();
    let (x_min, x_max) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(log(p.x)), hi.max(log(p.x))));
    let x_span = (x_max - x_min).max(1.0);
    // Throughput against size runs over decades too: log scale, from a decade below the least.
    let log_y = name.starts_with("size-");
    let y_top = points.iter().fold(0f64, |m, p| m.max(p.y));
    let y_least = points.iter().fold(f64::MAX, |m, p| m.min(p.y.max(1.0)));
    let (y_lo, y_hi) = if log_y {
        (y_least.log10().floor(), y_top.max(10.0).log10().ceil())
    } else {
        (0.0, if y_top > 0.0 { y_top * 1.1 } else { 1.0 })
    };
    let scale_y = |y: f64| if log_y { y.max(1.0).log10() } else { y };
    let px = |x: f64| left + (log(x) - x_min) / x_span * plot_w;
    let py = |y: f64| top + plot_h - (scale_y(y) - y_lo) / (y_hi - y_lo).max(1e-9) * plot_h;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<text x="10" y="22" font-size="14" font-weight="bold">{title}</text>
<line x1="{left}" y1="{top}" x2="{left}" y2="{b}" stroke="#444"/><line x1="{left}" y1="{b}" x2="{r}" y2="{b}" stroke="#444"/>
<text x="{cx}" y="{xl}" text-anchor="middle">{x_label} (log scale)</text>
<text x="14" y="{cy}" transform="rotate(-90 14 {cy})" text-anchor="middle">{y_label}{y_scale}</text>
"##,
        y_scale = if log_y { " (log scale)" } else { "" },
        b = top + plot_h,
        r = left + plot_w,
        cx = left + plot_w / 2.0,
        xl = height - 10.0,
        cy = top + plot_h / 2.0,
    );
    for tick in 0..=4 {
        let at = y_lo + (y_hi - y_lo) * f64::from(tick) / 4.0;
        let y = if log_y { 10f64.powf(at) } else { at };
        svg.push_str(&format!(
            r##"<text x="{x}" y="{ty:.1}" text-anchor="end">{label}</text><line x1="{left}" y1="{ly:.1}" x2="{r}" y2="{ly:.1}" stroke="#eee"/>
"##,
            x = left - 6.0,
            ty = py(y) + 4.0,
            ly = py(y),
            r = left + plot_w,
            label = short(y),
        ));
    }
    let mut xs: Vec<f64> = points.iter().map(|p| p.x).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        svg.push_str(&format!(
            r##"<text x="{tx:.1}" y="{ty}" text-anchor="middle">{label}</text>
"##,
            tx = px(x),
            ty = top + plot_h + 16.0,
            label = short(x),
        ));
    }
    let mut series: Vec<&str> = Vec::new();
    for p in points {
        if !series.contains(&p.series.as_str()) {
            series.push(&p.series);
        }
    }
    for (i, name) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut line: Vec<(f64, f64)> = points.iter().filter(|p| p.series == *name).map(|p| (p.x, p.y)).collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = line.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
        svg.push_str(&format!(
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>
"##,
            path.join(" ")
        ));
        for (x, y) in &line {
            svg.push_str(&format!(
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="10">{}</text>
"##,
                px(*x),
                py(*y),
                px(*x) + 5.0,
                py(*y) - 5.0,
                short(*y)
            ));
        }
        let ly = top + 10.0 + i as f64 * 18.0;
        svg.push_str(&format!(
            r##"<rect x="{lx}" y="{ry}" width="12" height="12" fill="{color}"/><text x="{tx}" y="{ly}">{label}</text>
"##,
            lx = left + plot_w + 12.0,
            ry = ly - 10.0,
            tx = left + plot_w + 30.0,
            label = escape(name),
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// A number in a few characters: 1.2M, 35k, 0.45.
fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e4 => format!("{:.0}k", v / 1e3),
        a if a >= 1e3 => format!("{:.1}k", v / 1e3),
        a if a >= 10.0 || v.fract() == 0.0 => format!("{v:.0}"),
        _ => format!("{v:.2}"),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
