//! `splitter status`: the daemon's report as a table or as JSON.
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use hyper::Method;

use super::{CliError, Output};
use crate::{
    api::{ServiceReport, StatusReport},
    client,
};

/// Fetches and prints the status.
pub async fn run(socket: &Path, output: Output) -> Result<(), CliError> {
    let bytes = client::request(socket, Method::GET, "/v1/status", None).await?;
    match output {
        Output::Json => print!("{}", String::from_utf8_lossy(&bytes)),
        Output::Table => {
            let report: StatusReport =
                serde_json::from_slice(&bytes).map_err(|e| CliError::Other(e.into()))?;
            print!("{}", render(&report));
        }
    }
    Ok(())
}

/// The whole report for people.
pub fn render(r: &StatusReport) -> String {
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
    if let Some(n) = r.dataplane.conn_capacity {
        let _ = writeln!(out, "connection table: {n} entries (up to {} flows)", n / 2);
    }
    out.push('\n');
    out.push_str(&render_services(&r.services));
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

/// The non-zero counts as `name=count`, separated by spaces.
fn nonzero(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
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
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
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
