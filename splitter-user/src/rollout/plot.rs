//! The rollout report's picture: an SVG of the target's share of new
//! flows, the error rates and the connect latency (p99) of the target and
//! its baseline over the rollout, with each step and verdict marked.
//! Drawn with `plotters` from a rollout's [`Book`]; pure (a string out).
use plotters::prelude::*;

use crate::rollout::{
    driver::{Book, Sample},
    machine::HistoryKind,
};

/// Size of the picture in pixels.
const SIZE: (u32, u32) = (960, 720);

/// The report of `service`'s rollout as an SVG document. A rollout without
/// samples yet gives a picture that says so.
pub fn svg(service: &str, book: &Book) -> String {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        if draw(&root, service, book).is_err() {
            // Drawing into a string fails only on bad geometry; say so.
            let _ = root.fill(&WHITE);
            let _ = root.draw(&Text::new(
                format!("rollout {service}: no plot"),
                (20, 20),
                ("sans-serif", 16),
            ));
        }
        let _ = root.present();
    }
    out
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw(root: &Area<'_>, service: &str, book: &Book) -> Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let r = &book.rollout;
    let t0 = r.started_at_ms.unwrap_or(r.created_at_ms);
    let secs = |at: u64| at.saturating_sub(t0) as f64 / 1000.0;
    let end = book
        .samples
        .back()
        .map(|s| s.at_ms)
        .into_iter()
        .chain(book.timeline.back().map(|e| e.at_ms))
        .max()
        .unwrap_or(t0);
    let x_max = secs(end).max(1.0) * 1.02;
    let title = format!(
        "rollout of {service}: {} -> {} ({} analyses)",
        r.spec.from,
        r.spec.to,
        book.samples.len()
    );
    let (top, rest) = root.split_vertically(40);
    top.draw(&Text::new(title, (10, 10), ("sans-serif", 18)))?;
    let panels = rest.split_evenly((3, 1));
    let samples: Vec<&Sample> = book.samples.iter().collect();

    // 1. The target's share of new flows, from the timeline (every step).
    let mut share: Vec<(f64, f64)> = Vec::new();
    for e in &book.timeline {
        if let Some(w) = e.weights {
            share.push((secs(e.at_ms), f64::from(w.target_percent)));
        }
    }
    share.push((x_max, f64::from(r.weights.target_percent)));
    let mut c = ChartBuilder::on(&panels[0])
        .margin(8)
        .x_label_area_size(20)
        .y_label_area_size(50)
        .caption(
            format!("share of new flows to {} (%)", r.spec.to),
            ("sans-serif", 14),
        )
        .build_cartesian_2d(0.0..x_max, 0.0..105.0)?;
    c.configure_mesh().disable_x_mesh().draw()?;
    c.draw_series(LineSeries::new(steps_of(&share), BLUE.stroke_width(2)))?;
    marks(&mut c, book, &secs, 105.0)?;

    // 2. Error rates.
    let canary_err: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| s.canary.error_rate.map(|e| (secs(s.at_ms), 100.0 * e)))
        .collect();
    let base_err: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| {
            s.baseline
                .as_ref()
                .and_then(|b| b.error_rate)
                .map(|e| (secs(s.at_ms), 100.0 * e))
        })
        .collect();
    let y_err = canary_err
        .iter()
        .chain(&base_err)
        .map(|p| p.1)
        .fold(1.0_f64, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(&panels[1])
        .margin(8)
        .x_label_area_size(20)
        .y_label_area_size(50)
        .caption(
            "error rate (%): target red, baseline grey",
            ("sans-serif", 14),
        )
        .build_cartesian_2d(0.0..x_max, 0.0..y_err)?;
    c.configure_mesh().disable_x_mesh().draw()?;
    c.draw_series(LineSeries::new(base_err, BLACK.mix(0.4).stroke_width(2)))?;
    c.draw_series(LineSeries::new(canary_err.clone(), RED.stroke_width(2)))?;
    c.draw_series(samples.iter().filter(|s| s.verdict != "pass").map(|s| {
        let y = s.canary.error_rate.map_or(0.0, |e| 100.0 * e);
        let colour = if s.verdict == "fail" { RED } else { MAGENTA };
        Circle::new((secs(s.at_ms), y), 4, colour.filled())
    }))?;
    marks(&mut c, book, &secs, y_err)?;

    // 3. Connect latency p99.
    let canary_lat: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| s.canary.latency_p99_ms.map(|l| (secs(s.at_ms), l)))
        .collect();
    let base_lat: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| {
            s.baseline
                .as_ref()
                .and_then(|b| b.latency_p99_ms)
                .map(|l| (secs(s.at_ms), l))
        })
        .collect();
    let y_lat = canary_lat
        .iter()
        .chain(&base_lat)
        .map(|p| p.1)
        .fold(0.1_f64, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(&panels[2])
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .caption(
            "connect latency p99 (ms): target red, baseline grey; x: seconds",
            ("sans-serif", 14),
        )
        .build_cartesian_2d(0.0..x_max, 0.0..y_lat)?;
    c.configure_mesh().disable_x_mesh().draw()?;
    c.draw_series(LineSeries::new(base_lat, BLACK.mix(0.4).stroke_width(2)))?;
    c.draw_series(LineSeries::new(canary_lat, RED.stroke_width(2)))?;
    marks(&mut c, book, &secs, y_lat)?;
    Ok(())
}

/// A step line through `points` (each value holds until the next point).
fn steps_of(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len() * 2);
    for (i, p) in points.iter().enumerate() {
        if i > 0 {
            out.push((p.0, points[i - 1].1));
        }
        out.push(*p);
    }
    out
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Vertical marks: a step began (grey), a rollback or abort (red), the
/// completion (green), each labelled.
fn marks(
    c: &mut Chart<'_, '_>,
    book: &Book,
    secs: &dyn Fn(u64) -> f64,
    y_max: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    for e in &book.timeline {
        let (colour, label) = match e.kind {
            HistoryKind::Step => (BLACK.mix(0.3), format!("step {}", e.step + 1)),
            HistoryKind::RolledBack => (RED.mix(0.9), "rolled back".to_string()),
            HistoryKind::Aborted => (RED.mix(0.9), "aborted".to_string()),
            HistoryKind::Completed => (GREEN.mix(0.9), "completed".to_string()),
            HistoryKind::Paused => (MAGENTA.mix(0.7), "paused".to_string()),
            _ => continue,
        };
        let x = secs(e.at_ms);
        c.draw_series(LineSeries::new([(x, 0.0), (x, y_max)], colour))?;
        c.draw_series(std::iter::once(Text::new(
            label,
            (x, y_max * 0.95),
            ("sans-serif", 11),
        )))?;
    }
    Ok(())
}
