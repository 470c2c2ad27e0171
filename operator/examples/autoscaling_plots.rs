//! Runs every autoscaling scenario through the simulator and writes docs/autoscaling/<scenario>.svg:
//! offered load, replicas (ready and desired) and p95 against the target over time.
//!
//! `cargo run -p inferpool-operator --example autoscaling_plots [out-dir]` (or `make autoscaling-plots`).

use std::fmt::Write as _;
use std::path::PathBuf;

use inferpool_operator::autoscale::sim::{self, Point, Scenario, scenarios};

const WIDTH: f64 = 900.0;
const PANEL: f64 = 150.0;
const GAP: f64 = 40.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 50.0;

/// One line of a panel: a label, a colour, a dash pattern and a value per tick.
struct Series<'a> {
    label: &'a str,
    colour: &'a str,
    dash: &'a str,
    value: fn(&Point) -> f64,
}

fn main() -> std::io::Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/autoscaling"));
    std::fs::create_dir_all(&out)?;
    for s in scenarios::all() {
        let trace = sim::run(&s);
        let path = out.join(format!("{}.svg", s.name));
        std::fs::write(&path, plot(&s, &trace.points))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn plot(s: &Scenario, points: &[Point]) -> String {
    let height = TOP + 3.0 * PANEL + 2.0 * GAP + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"#, escape(s.title));
    let panels: [(&str, Vec<Series>); 3] = [
        (
            "load (rps)",
            vec![
                Series { label: "offered", colour: "#1f77b4", dash: "", value: |p| p.load_rps },
                Series { label: "served", colour: "#9ecae1", dash: "", value: |p| p.served_rps },
            ],
        ),
        (
            "replicas",
            vec![
                Series { label: "desired", colour: "#d62728", dash: "6 3", value: |p| f64::from(p.desired) },
                Series { label: "ready", colour: "#2ca02c", dash: "", value: |p| f64::from(p.ready) },
                Series {
                    label: "batch / 8",
                    colour: "#9467bd",
                    dash: "2 3",
                    value: |p| f64::from(p.tuning.max_batch_size) / 8.0,
                },
            ],
        ),
        (
            "p95 (ms)",
            vec![
                Series { label: "p95", colour: "#ff7f0e", dash: "", value: |p| p.p95_ms },
                Series { label: "target", colour: "#000000", dash: "6 3", value: |p| p.target_ms },
            ],
        ),
    ];
    let seconds = points.last().map_or(1.0, |p| p.at).max(1.0);
    for (i, (title, series)) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + GAP);
        let mut max = points.iter().flat_map(|p| series.iter().map(move |s| (s.value)(p))).fold(0.0, f64::max);
        if i == 2 {
            // Keep the target visible without letting overload squash the plot.
            max = max.min(points.first().map_or(1.0, |p| p.target_ms) * 3.0);
        }
        let max = nice(max.max(1.0));
        panel(&mut svg, title, top, seconds, max);
        for (k, line) in series.iter().enumerate() {
            let coords: Vec<String> = points
                .iter()
                .map(|p| {
                    let x = LEFT + p.at / seconds * (WIDTH - LEFT - RIGHT);
                    let y = top + PANEL - ((line.value)(p).min(max) / max) * PANEL;
                    format!("{x:.1},{y:.1}")
                })
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" stroke-dasharray="{}" points="{}"/>"#,
                line.colour,
                line.dash,
                coords.join(" ")
            );
            let lx = WIDTH - RIGHT + 15.0;
            let ly = top + 15.0 + k as f64 * 18.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2" stroke-dasharray="{}"/><text x="{}" y="{}">{}</text>"#,
                lx + 24.0,
                line.colour,
                line.dash,
                lx + 30.0,
                ly + 4.0,
                escape(line.label)
            );
        }
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">time (s)</text>"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        height - 8.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// Axes, grid and tick labels of one panel.
fn panel(svg: &mut String, title: &str, top: f64, seconds: f64, max: f64) {
    let w = WIDTH - LEFT - RIGHT;
    let _ = writeln!(svg, r##"<rect x="{LEFT}" y="{top}" width="{w}" height="{PANEL}" fill="none" stroke="#444"/>"##);
    let _ = writeln!(svg, r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#, top - 6.0, escape(title));
    let divisions = if (max / 4.0).fract() == 0.0 { 4 } else { 5 };
    for k in 0..=divisions {
        let v = max * f64::from(k) / f64::from(divisions);
        let y = top + PANEL - PANEL * f64::from(k) / f64::from(divisions);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + w,
            LEFT - 6.0,
            y + 4.0,
            label(v)
        );
    }
    let step = nice(seconds / 8.0);
    let mut t = 0.0;
    while t <= seconds + 1e-9 {
        let x = LEFT + t / seconds * w;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#444"/><text x="{x:.1}" y="{}" text-anchor="middle">{t:.0}</text>"##,
            top + PANEL,
            top + PANEL + 4.0,
            top + PANEL + 16.0
        );
        t += step;
    }
}

/// A round number at or above `v` (1, 2 or 5 times a power of ten).
fn nice(v: f64) -> f64 {
    let base = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * base).find(|&n| n >= v).unwrap_or(10.0 * base)
}

fn label(v: f64) -> String {
    if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
