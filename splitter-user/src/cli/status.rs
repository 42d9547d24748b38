//! `splitter status`: the daemon's report as a table or as JSON.
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use hyper::Method;

use super::{CliError, Output};
use crate::{
    api::{ServiceReport, StatusReport},
    client,
    signals::Window,
};

/// Fetches and prints the status, with signal windows of `window_ms`.
pub async fn run(
    socket: &Path,
    output: Output,
    window_ms: u64,
    backends: bool,
) -> Result<(), CliError> {
    let path = format!("/v1/status?window={}ms", window_ms);
    let bytes = client::request(socket, Method::GET, &path, None).await?;
    match output {
        Output::Json => print!("{}", String::from_utf8_lossy(&bytes)),
        Output::Table => {
            let report: StatusReport =
                serde_json::from_slice(&bytes).map_err(|e| CliError::Other(e.into()))?;
            print!("{}", render(&report, window_ms, backends));
        }
    }
    Ok(())
}

/// The whole report for people; the signals over `window_ms`, per backend
/// too with `backends`.
pub fn render(r: &StatusReport, window_ms: u64, backends: bool) -> String {
    let mut out = String::new();
    let attached: Vec<String> = r
        .dataplane
        .attachments
        .iter()
        .map(|a| format!("{} ({})", a.interface, a.mode))
        .collect();
    let _ = writeln!(
        out,
        "data plane: mode {}{}, attached to {}",
        r.dataplane.mode,
        r.dataplane
            .snat_address
            .as_deref()
            .map(|a| format!(" via {a}"))
            .unwrap_or_default(),
        if attached.is_empty() {
            "nothing".to_string()
        } else {
            attached.join(", ")
        }
    );
    if let Some(p) = &r.dataplane.program {
        let _ = writeln!(
            out,
            "kernel program: id {}, tag {} ({})",
            p.id, p.tag, p.source
        );
    }
    if r.dataplane.ephemeral_pins.is_some() {
        let _ = writeln!(
            out,
            "WARNING: the pins are private to this daemon (--ephemeral-pins): the data plane and every established connection end with it, even on kill -9"
        );
    }
    if let Some(n) = r.dataplane.conn_capacity {
        let _ = writeln!(out, "connection table: {n} entries (up to {} flows)", n / 2);
    }
    out.push('\n');
    out.push_str(&render_services(&r.services));
    if !r.services.is_empty() {
        let _ = writeln!(
            out,
            "\nsignals over the last {}:",
            humantime::format_duration(std::time::Duration::from_millis(window_ms))
        );
        out.push_str(&render_signals(&r.services, backends));
    }
    for s in &r.services {
        if let Some(sh) = &s.shadow {
            let _ = writeln!(out, "{}", shadow_line(&s.name, sh));
            if let Some(t) = &sh.tee {
                let _ = writeln!(out, "{}", tee_line(&s.name, t));
            }
        }
    }
    for s in &r.services {
        let drops = nonzero(&s.drops);
        if !drops.is_empty() {
            let _ = writeln!(out, "drops of {}: {drops}", s.name);
        }
    }
    let counters = nonzero(&r.counters);
    let _ = writeln!(
        out,
        "\ncounters: {}",
        if counters.is_empty() {
            "all zero"
        } else {
            &counters
        }
    );
    out
}

/// One line per mirrored service: where its copies go and how the shadow
/// answers (answers are dropped at the edge, never sent to clients).
pub fn shadow_line(service: &str, sh: &crate::report::ShadowReport) -> String {
    if sh.tee.is_some() {
        // TCP: the tee's lines say how both sides did.
        return format!(
            "shadow of {service}: {}% of new flows to {} through the tee",
            sh.percent, sh.version
        );
    }
    format!(
        "shadow of {service}: {}% to {}: {} copies in {} flows, {} answered, {} timeouts, {} answers dropped ({} bytes), first answer {}",
        sh.percent,
        sh.version,
        sh.copies,
        sh.flows,
        sh.answered,
        sh.timeouts,
        sh.answers_dropped,
        sh.answer_bytes,
        sh.first_answer_mean_us
            .map(|us| format!("{:.2} ms mean", us as f64 / 1000.0))
            .unwrap_or_else(|| "-".to_string())
    )
}

/// The TCP tee of a mirrored service: its flows, and the stable and the
/// shadow side of the same flows.
pub fn tee_line(service: &str, t: &crate::tee::TeeReport) -> String {
    let side = |s: &crate::tee::Side| {
        format!(
            "{} connected, {} errors (refused {}, timeouts {}, resets {}), {} answered, {} response bytes, first byte {}",
            s.connected,
            s.errors(),
            s.refused,
            s.timeouts,
            s.resets,
            s.answered,
            s.response_bytes,
            s.ttfb_mean_us()
                .map(|us| format!("{:.2} ms mean", us as f64 / 1000.0))
                .unwrap_or_else(|| "-".to_string())
        )
    };
    let state = match (&t.error, t.listening) {
        (Some(e), _) => format!("NOT LISTENING: {e}"),
        (None, true) => "listening".to_string(),
        (None, false) => "not listening yet".to_string(),
    };
    format!(
        "tee of {service}: {} flows ({} open), {state}; fell behind {}, no shadow {}\n  stable: {}\n  shadow: {}",
        t.flows,
        t.open,
        t.fell_behind,
        t.no_shadow,
        side(&t.stable),
        side(&t.shadow)
    )
}

/// The non-zero counts as `name=count`, separated by spaces.
fn nonzero(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Per version (and per backend with `backends`): new flows/s, error
/// rate with its parts, connect latency, the external metric.
pub fn render_signals(services: &[ServiceReport], backends: bool) -> String {
    let mut rows = vec![
        [
            "SERVICE",
            "VERSION",
            "BACKEND",
            "NEW/S",
            "ERRORS",
            "REFUSED",
            "TIMEOUTS",
            "RESETS",
            "CONNECT P50",
            "P99",
            "METRIC",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}ms"));
    let cells = |w: Option<&Window>| -> Vec<String> {
        match w {
            None => vec!["(no history yet)".into()],
            Some(w) => vec![
                format!("{:.1}", w.attempts_per_sec),
                w.error_rate
                    .map_or("-".to_string(), |r| format!("{:.1}%", 100.0 * r)),
                w.refused.to_string(),
                w.timeouts.to_string(),
                w.reset_by_backend.to_string(),
                ms(w.latency_p50_ms),
                ms(w.latency_p99_ms),
            ],
        }
    };
    for s in services {
        for v in &s.versions {
            let mut row = vec![s.name.clone(), v.name.clone(), String::new()];
            row.extend(cells(v.window.as_ref()));
            row.resize(10, String::new());
            row.push(match &v.metric {
                None => "-".into(),
                Some(m) => match (m.value, &m.error) {
                    (Some(x), _) => format!("{x:.4}"),
                    (None, Some(e)) => format!("error: {e}"),
                    (None, None) => "-".into(),
                },
            });
            rows.push(row);
            if backends {
                for b in &v.backends {
                    let mut row = vec![String::new(), String::new(), b.address.clone()];
                    row.extend(cells(b.window.as_ref()));
                    row.resize(11, String::new());
                    rows.push(row);
                }
            }
        }
    }
    align(rows)
}

/// Rows as columns padded to their widest cell.
fn align(rows: Vec<Vec<String>>) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// Services, versions and backends as aligned rows.
pub fn render_services(services: &[ServiceReport]) -> String {
    let mut rows = vec![
        [
            "SERVICE",
            "VIP",
            "VERSION",
            "WEIGHT",
            "SHARE",
            "BACKEND",
            "LIVE FLOWS",
            "NEW FLOWS",
            "PACKETS",
            "BYTES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for s in services {
        for v in &s.versions {
            rows.push(vec![
                s.name.clone(),
                format!("{}/{} ({})", s.vip, s.protocol, s.affinity),
                v.name.clone(),
                v.weight.to_string(),
                format!("{:.1}%", v.share_percent),
                format!("{} backend(s)", v.backends.len()),
                v.live_flows.to_string(),
                v.new_flows.to_string(),
                v.packets.to_string(),
                v.bytes.to_string(),
            ]);
            for b in &v.backends {
                rows.push(vec![
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    if b.health == "up" || b.health == "down" {
                        format!("{} w={} {} {}", b.address, b.weight, b.state, b.health)
                    } else {
                        format!("{} w={} {}", b.address, b.weight, b.state)
                    },
                    b.live_flows.to_string(),
                    b.new_flows.to_string(),
                    b.packets.to_string(),
                    b.bytes.to_string(),
                ]);
            }
        }
    }
    if services.is_empty() {
        return "no services configured\n".into();
    }
    let mut out = align(rows);
    for s in services.iter().filter(|s| !s.targets.is_empty()) {
        out.push_str(&target_line(s));
    }
    out
}

/// One line on a service's source-CIDR rules: how many, how many are
/// inactive, and up to five of them (`splitter target list` shows all).
fn target_line(s: &ServiceReport) -> String {
    const SHOWN: usize = 5;
    let inactive = s.targets.iter().filter(|t| !t.active).count();
    let mut list: Vec<String> = s
        .targets
        .iter()
        .take(SHOWN)
        .map(|t| {
            format!(
                "{} -> {}{}",
                t.cidr,
                t.version,
                if t.active { "" } else { " (inactive)" }
            )
        })
        .collect();
    if s.targets.len() > SHOWN {
        list.push(format!("... (splitter target list {})", s.name));
    }
    format!(
        "{}: {} target rule(s){}: {}\n",
        s.name,
        s.targets.len(),
        if inactive > 0 {
            format!(", {inactive} inactive")
        } else {
            String::new()
        },
        list.join(", ")
    )
}
