//! Samples summarised and drawn, for every results module of the bench:
//! [`Stat`] (min, median, max), percentiles, a checked [`Target`], and the
//! SVG bar chart. Pure.
use std::fmt::Write as _;

use serde_json::{Value, json};

/// Minimum, median and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stat {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        Some(Self {
            min: s[0],
            median: median_sorted(&s),
            max: s[s.len() - 1],
        })
    }

    pub fn json(&self) -> Value {
        json!({ "min": round2(self.min), "median": round2(self.median), "max": round2(self.max) })
    }
}

fn median_sorted(s: &[f64]) -> f64 {
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0..=100) by nearest rank; `None` for no samples.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

pub(super) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One of the issue's targets, checked (never enforced).
#[derive(Debug, Clone)]
pub struct Target {
    pub what: &'static str,
    pub limit: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// `min / median / max` with `prec` decimals, or `-`.
pub(super) fn fmt_stat(s: Option<Stat>, prec: usize) -> String {
    s.map_or("-".into(), |s| {
        format!("{:.p$} / {:.p$} / {:.p$}", s.min, s.median, s.max, p = prec)
    })
}

/// One bar of a chart: a median with a min..max whisker.
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    pub stat: Stat,
    /// Drawn as a red tick: the issue's target for this bar, if any.
    pub target: Option<f64>,
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A step of 1, 2 or 5 times a power of ten giving about five ticks up to `max`.
pub(super) fn tick_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 5.0;
    let pow = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow)
}

/// A horizontal bar chart as SVG text.
pub fn bar_chart_svg(title: &str, unit: &str, bars: &[Bar], footnote: &str) -> String {
    let (label_w, chart_w, value_w) = (290.0, 380.0, 110.0);
    let (top, row) = (48.0, 30.0);
    let width = label_w + chart_w + value_w;
    let chart_h = row * bars.len() as f64;
    let height = top + chart_h + 64.0;
    let top_value = bars
        .iter()
        .flat_map(|b| [b.stat.max, b.target.unwrap_or(0.0)])
        .fold(0.0, f64::max);
    let step = tick_step(top_value * 1.05);
    let axis_max = (top_value * 1.05 / step).ceil().max(1.0) * step;
    let x = |v: f64| label_w + (v.max(0.0) / axis_max) * chart_w;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{width}" height="{height}" fill="white"/><text x="10" y="24" font-size="15" font-weight="bold">{}</text>"#,
        xml_escape(title)
    );
    let mut t = 0.0;
    let mut guard = 0;
    while t <= axis_max + step / 2.0 && guard < 50 {
        let xt = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{xt:.1}" y1="{top}" x2="{xt:.1}" y2="{:.1}" stroke="#ddd"/><text x="{xt:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            top + chart_h,
            top + chart_h + 16.0,
            t
        );
        t += step;
        guard += 1;
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
        label_w + chart_w / 2.0,
        top + chart_h + 32.0,
        xml_escape(unit)
    );
    for (i, b) in bars.iter().enumerate() {
        let y = top + row * i as f64;
        let (x0, xm) = (x(0.0), x(b.stat.median));
        let cy = y + row / 2.0;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4a7ab5"/>"##,
            label_w - 8.0,
            cy + 4.0,
            xml_escape(&b.label),
            y + 6.0,
            (xm - x0).max(0.5),
            row - 12.0
        );
        let (xa, xb) = (x(b.stat.min), x(b.stat.max));
        let _ = writeln!(
            s,
            r##"<line x1="{xa:.1}" y1="{cy:.1}" x2="{xb:.1}" y2="{cy:.1}" stroke="#222"/><line x1="{xa:.1}" y1="{:.1}" x2="{xa:.1}" y2="{:.1}" stroke="#222"/><line x1="{xb:.1}" y1="{:.1}" x2="{xb:.1}" y2="{:.1}" stroke="#222"/>"##,
            cy - 5.0,
            cy + 5.0,
            cy - 5.0,
            cy + 5.0
        );
        if let Some(tv) = b.target {
            let xt = x(tv);
            let _ = writeln!(
                s,
                r##"<line x1="{xt:.1}" y1="{:.1}" x2="{xt:.1}" y2="{:.1}" stroke="#c0392b" stroke-width="2"/>"##,
                y + 2.0,
                y + row - 2.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}">{:.1}</text>"##,
            label_w + chart_w + 8.0,
            cy + 4.0,
            b.stat.median
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="10" y="{:.1}" fill="#555" font-size="11">{}</text>"##,
        height - 10.0,
        xml_escape(footnote)
    );
    s.push_str("</svg>\n");
    s
}
