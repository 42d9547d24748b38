//! Results of the traffic sections of `cargo xtask bench` (through-edge
//! packets per second, connection rate, weight change through the API) and
//! how they are shown: terminal text, JSON, Markdown, targets. Pure, like
//! [`super::report`], which calls into this module.
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::stats::{Bar, Stat, Target, bar_chart_svg, fmt_stat, percentile, round2};

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn stat_json(s: Option<Stat>, round: fn(f64) -> f64) -> Value {
    s.map_or(
        Value::Null,
        |s| json!({ "min": round(s.min), "median": round(s.median), "max": round(s.max) }),
    )
}

fn fmt_ratio(s: Option<Stat>) -> String {
    s.map_or("-".into(), |s| {
        format!("{:.2}x ({:.2}..{:.2})", s.median, s.min, s.max)
    })
}

/// One edge and protocol of the throughput section.
#[derive(Debug, Clone)]
pub struct EdgeCase {
    /// `forward`, `nftables`, `xdp_min`, `splitter`.
    pub id: &'static str,
    /// `udp` or `tcp`.
    pub proto: &'static str,
    pub label: String,
    /// Frames counted at the backends, Mpps, one per round (NaN: failed).
    pub mpps: Vec<f64>,
    /// Frames generated over the same window, Mpps.
    pub gen_mpps: Vec<f64>,
    /// Share of the counted frames that went to the green backend.
    pub green_share: Vec<f64>,
    pub problems: Vec<String>,
}

/// The through-edge throughput section.
#[derive(Debug, Clone, Default)]
pub struct EdgeResults {
    pub rounds: usize,
    pub flows: u32,
    pub window_ms: u64,
    pub cases: Vec<EdgeCase>,
    pub notes: Vec<String>,
}

impl EdgeResults {
    pub fn case(&self, id: &str, proto: &str) -> Option<&EdgeCase> {
        self.cases.iter().find(|c| c.id == id && c.proto == proto)
    }

    /// `id / base` per round (both measured in that round), over rounds.
    pub fn ratio(&self, id: &str, base: &str, proto: &str) -> Option<Stat> {
        let (a, b) = (self.case(id, proto)?, self.case(base, proto)?);
        let per_round: Vec<f64> = a
            .mpps
            .iter()
            .zip(&b.mpps)
            .filter(|(x, y)| x.is_finite() && y.is_finite() && **y > 0.0)
            .map(|(x, y)| x / y)
            .collect();
        Stat::of(&per_round)
    }
}

/// One client-side case of the connection-rate section.
#[derive(Debug, Clone)]
pub struct ConnCase {
    /// `direct`, `splitter`, `haproxy`, `nftables`.
    pub id: &'static str,
    pub label: String,
    /// Connections (= requests, one per connection) per second, per round.
    pub cps: Vec<f64>,
    /// wrk's latency percentiles per round, ms.
    pub p50_ms: Vec<f64>,
    pub p99_ms: Vec<f64>,
    /// Share of responses from green, per round (from nginx's counters).
    pub green_share: Vec<f64>,
    /// wrk's socket errors and non-2xx responses, summed over rounds.
    pub errors: u64,
    /// SYN retransmits by the client during the runs, summed over rounds.
    pub syn_retrans: u64,
    /// SYNs the backends rejected by PAWS in TIME_WAIT, summed over rounds.
    pub paws_rejects: u64,
    pub problems: Vec<String>,
}

/// The connection-rate section.
#[derive(Debug, Clone, Default)]
pub struct ConnResults {
    pub rounds: usize,
    pub duration_s: u64,
    pub connections: u32,
    pub threads: u32,
    pub cases: Vec<ConnCase>,
    pub notes: Vec<String>,
}

impl ConnResults {
    pub fn case(&self, id: &str) -> Option<&ConnCase> {
        self.cases.iter().find(|c| c.id == id)
    }

    /// `id / base` connection rates per round, over rounds.
    pub fn ratio(&self, id: &str, base: &str) -> Option<Stat> {
        let (a, b) = (self.case(id)?, self.case(base)?);
        let per_round: Vec<f64> = a
            .cps
            .iter()
            .zip(&b.cps)
            .filter(|(x, y)| x.is_finite() && y.is_finite() && **y > 0.0)
            .map(|(x, y)| x / y)
            .collect();
        Stat::of(&per_round)
    }
}

/// Weight changes through the daemon's HTTP API, end to end.
#[derive(Debug, Clone, Default)]
pub struct ApiResults {
    /// ms from sending `PUT /v1/services/NAME/weights` to the answer.
    pub put_ms: Vec<f64>,
    /// ms from sending the PUT to the first new connection that landed on
    /// the version switched on.
    pub visible_ms: Vec<f64>,
    /// Flips whose new version was not seen in time.
    pub misses: usize,
    pub notes: Vec<String>,
}

/// The traffic sections; `None` where a section was not run.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    pub edge: Option<Result<EdgeResults, String>>,
    pub conn: Option<Result<ConnResults, String>>,
    pub api: Option<Result<ApiResults, String>>,
}

fn met(r: Option<Stat>, pred: impl Fn(f64) -> bool) -> Option<bool> {
    r.map(|s| pred(s.median))
}

impl Traffic {
    /// The targets these sections speak to (ratios: medians of the
    /// per-round ratios).
    pub fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let e = self.edge.as_ref().and_then(|r| r.as_ref().ok());
        for proto in ["udp", "tcp"] {
            let r = e.and_then(|e| e.ratio("splitter", "nftables", proto));
            t.push(Target {
                what: if proto == "udp" {
                    "through-edge Mpps, 64-byte UDP: splitter vs nftables DNAT+SNAT"
                } else {
                    "through-edge Mpps, 64-byte TCP: splitter vs nftables DNAT+SNAT"
                },
                limit: ">= 3x".into(),
                measured: r.map_or("-".into(), |s| format!("{:.2}x", s.median)),
                met: met(r, |m| m >= 3.0),
            });
            let r = e.and_then(|e| e.ratio("splitter", "xdp_min", proto));
            t.push(Target {
                what: if proto == "udp" {
                    "through-edge Mpps, 64-byte UDP: splitter vs minimal XDP rewrite+redirect"
                } else {
                    "through-edge Mpps, 64-byte TCP: splitter vs minimal XDP rewrite+redirect"
                },
                limit: ">= 0.7x".into(),
                measured: r.map_or("-".into(), |s| format!("{:.2}x", s.median)),
                met: met(r, |m| m >= 0.7),
            });
        }
        let c = self.conn.as_ref().and_then(|r| r.as_ref().ok());
        let r = c.and_then(|c| c.ratio("splitter", "direct"));
        t.push(Target {
            what: "connections/s (wrk, Connection: close): splitter vs direct to a backend",
            limit: ">= 0.9x".into(),
            measured: r.map_or("-".into(), |s| format!("{:.2}x", s.median)),
            met: met(r, |m| m >= 0.9),
        });
        let r = c.and_then(|c| c.ratio("splitter", "haproxy"));
        t.push(Target {
            what: "connections/s (wrk, Connection: close): splitter vs HAProxy mode tcp",
            limit: ">= 1.6x".into(),
            measured: r.map_or("-".into(), |s| format!("{:.2}x", s.median)),
            met: met(r, |m| m >= 1.6),
        });
        t
    }

    /// Items of `not_measured_yet` that this run did measure.
    pub fn measured(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if matches!(self.edge, Some(Ok(_))) {
            m.push("throughput");
        }
        if matches!(self.conn, Some(Ok(_))) {
            m.push("connrate");
        }
        if matches!(self.api, Some(Ok(_))) {
            m.push("api");
        }
        m
    }

    /// The terminal summary of these sections.
    pub fn text(&self) -> String {
        let mut o = String::new();
        match &self.edge {
            Some(Ok(e)) => {
                let _ = writeln!(
                    o,
                    "\nthrough-edge throughput (64-byte frames, {} flows, {} ms window, {} rounds; Mpps at the backends)",
                    e.flows, e.window_ms, e.rounds
                );
                let _ = writeln!(
                    o,
                    "  {:<4} {:<40} {:>22} {:>10} {:>7}",
                    "", "edge", "min / median / max", "generated", "green"
                );
                for c in &e.cases {
                    let _ = writeln!(
                        o,
                        "  {:<4} {:<40} {:>22} {:>10} {:>6.1}%{}",
                        c.proto,
                        c.label,
                        fmt_stat(Stat::of(&c.mpps), 2),
                        Stat::of(&c.gen_mpps).map_or("-".into(), |s| format!("{:.2}", s.median)),
                        Stat::of(&c.green_share).map_or(0.0, |s| s.median * 100.0),
                        if c.problems.is_empty() {
                            ""
                        } else {
                            "  (problems)"
                        }
                    );
                }
                for proto in ["udp", "tcp"] {
                    let _ = writeln!(
                        o,
                        "  {proto}: splitter / nftables {}   splitter / minimal XDP {}   splitter / forwarding {}",
                        fmt_ratio(e.ratio("splitter", "nftables", proto)),
                        fmt_ratio(e.ratio("splitter", "xdp_min", proto)),
                        fmt_ratio(e.ratio("splitter", "forward", proto))
                    );
                }
                for c in &e.cases {
                    for p in &c.problems {
                        let _ = writeln!(o, "  problem: {} {}: {p}", c.proto, c.label);
                    }
                }
                for n in &e.notes {
                    let _ = writeln!(o, "  note: {n}");
                }
            }
            Some(Err(e)) => {
                let _ = writeln!(o, "\nthrough-edge throughput: not measured: {e}");
            }
            None => {}
        }
        match &self.conn {
            Some(Ok(c)) => {
                let _ = writeln!(
                    o,
                    "\nconnection rate (wrk -t{} -c{} -d{}s, Connection: close, nginx backends; {} rounds)",
                    c.threads, c.connections, c.duration_s, c.rounds
                );
                let _ = writeln!(
                    o,
                    "  {:<40} {:>26} {:>9} {:>9} {:>7} {:>7} {:>8} {:>6}",
                    "path",
                    "conn/s min / median / max",
                    "p50 ms",
                    "p99 ms",
                    "green",
                    "errors",
                    "SYN rtx",
                    "PAWS"
                );
                for k in &c.cases {
                    let _ = writeln!(
                        o,
                        "  {:<40} {:>26} {:>9} {:>9} {:>6.1}% {:>7} {:>8} {:>6}",
                        k.label,
                        fmt_stat(Stat::of(&k.cps), 0),
                        Stat::of(&k.p50_ms).map_or("-".into(), |s| format!("{:.2}", s.median)),
                        Stat::of(&k.p99_ms).map_or("-".into(), |s| format!("{:.2}", s.median)),
                        Stat::of(&k.green_share).map_or(0.0, |s| s.median * 100.0),
                        k.errors,
                        k.syn_retrans,
                        k.paws_rejects
                    );
                }
                let _ = writeln!(
                    o,
                    "  splitter / direct {}   splitter / HAProxy {}   splitter / nftables {}   mirrored / splitter {}",
                    fmt_ratio(c.ratio("splitter", "direct")),
                    fmt_ratio(c.ratio("splitter", "haproxy")),
                    fmt_ratio(c.ratio("splitter", "nftables")),
                    fmt_ratio(c.ratio("splitter_mirrored", "splitter"))
                );
                for k in &c.cases {
                    for p in &k.problems {
                        let _ = writeln!(o, "  problem: {}: {p}", k.label);
                    }
                }
                for n in &c.notes {
                    let _ = writeln!(o, "  note: {n}");
                }
            }
            Some(Err(e)) => {
                let _ = writeln!(o, "\nconnection rate: not measured: {e}");
            }
            None => {}
        }
        match &self.api {
            Some(Ok(a)) => {
                let _ = writeln!(
                    o,
                    "\nweight change through the API (PUT over the daemon's socket, {} flips): answer p50 {} / p99 {} ms; first new flow on the new version p50 {} / p99 {} ms; {} misses",
                    a.visible_ms.len() + a.misses,
                    pct(&a.put_ms, 50.0),
                    pct(&a.put_ms, 99.0),
                    pct(&a.visible_ms, 50.0),
                    pct(&a.visible_ms, 99.0),
                    a.misses
                );
                for n in &a.notes {
                    let _ = writeln!(o, "  note: {n}");
                }
            }
            Some(Err(e)) => {
                let _ = writeln!(o, "\nweight change through the API: not measured: {e}");
            }
            None => {}
        }
        o
    }

    /// `results.json` members: `through_edge`, `connection_rate`, `api_weight_change`.
    pub fn json(&self) -> Vec<(&'static str, Value)> {
        let mut v = Vec::new();
        if let Some(r) = &self.edge {
            v.push((
                "through_edge",
                match r {
                    Ok(e) => {
                        let ratios: Vec<Value> = ["udp", "tcp"].iter().map(|p| json!({
                            "proto": p,
                            "splitter_to_nftables": stat_json(e.ratio("splitter", "nftables", p), round2),
                            "splitter_to_xdp_min": stat_json(e.ratio("splitter", "xdp_min", p), round2),
                            "splitter_to_forward": stat_json(e.ratio("splitter", "forward", p), round2),
                        })).collect();
                        json!({
                        "method": "BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on the client veth generates 60-byte frames (64 on the wire) over `flows` source ports; an XDP program on the backends' veth counts and drops them (answering SYNs with SYN-ACKs); Mpps = frames counted at the backends over the window; ratios are per round, then min/median/max over rounds",
                        "rounds": e.rounds,
                        "flows": e.flows,
                        "window_ms": e.window_ms,
                        "cases": e.cases.iter().map(|c| json!({
                            "id": c.id,
                            "proto": c.proto,
                            "label": c.label,
                            "mpps": stat_json(Stat::of(&c.mpps), round3),
                            "generated_mpps": stat_json(Stat::of(&c.gen_mpps), round3),
                            "green_share": stat_json(Stat::of(&c.green_share), round3),
                            "mpps_samples": c.mpps.iter().map(|x| if x.is_finite() { json!(round3(*x)) } else { Value::Null }).collect::<Vec<_>>(),
                            "problems": c.problems,
                        })).collect::<Vec<_>>(),
                        "ratios": ratios,
                        "notes": e.notes,
                    })
                    }
                    Err(e) => json!({ "error": e }),
                },
            ));
        }
        if let Some(r) = &self.conn {
            v.push((
                "connection_rate",
                match r {
                    Ok(c) => json!({
                        "method": "wrk with `Connection: close` (one request per connection) from the client namespace against two nginx backends (blue, green) through the edge; conn/s = wrk's requests/s",
                        "rounds": c.rounds,
                        "duration_s": c.duration_s,
                        "connections": c.connections,
                        "threads": c.threads,
                        "cases": c.cases.iter().map(|k| json!({
                            "id": k.id,
                            "label": k.label,
                            "conn_per_s": stat_json(Stat::of(&k.cps), round2),
                            "latency_p50_ms": stat_json(Stat::of(&k.p50_ms), round3),
                            "latency_p99_ms": stat_json(Stat::of(&k.p99_ms), round3),
                            "green_share": stat_json(Stat::of(&k.green_share), round3),
                            "errors": k.errors,
                            "client_syn_retransmits": k.syn_retrans,
                            "backend_paws_timewait_rejects": k.paws_rejects,
                            "problems": k.problems,
                        })).collect::<Vec<_>>(),
                        "ratios": {
                            "splitter_to_direct": stat_json(c.ratio("splitter", "direct"), round2),
                            "splitter_to_haproxy": stat_json(c.ratio("splitter", "haproxy"), round2),
                            "splitter_to_nftables": stat_json(c.ratio("splitter", "nftables"), round2),
                        },
                        "notes": c.notes,
                    }),
                    Err(e) => json!({ "error": e }),
                },
            ));
        }
        if let Some(r) = &self.api {
            v.push((
                "api_weight_change",
                match r {
                    Ok(a) => json!({
                        "flips": a.visible_ms.len() + a.misses,
                        "put_ms": { "p50": pctv(&a.put_ms, 50.0), "p99": pctv(&a.put_ms, 99.0), "max": pctv(&a.put_ms, 100.0) },
                        "first_new_flow_on_new_version_ms": { "p50": pctv(&a.visible_ms, 50.0), "p99": pctv(&a.visible_ms, 99.0), "max": pctv(&a.visible_ms, 100.0) },
                        "misses": a.misses,
                        "notes": a.notes,
                    }),
                    Err(e) => json!({ "error": e }),
                },
            ));
        }
        v
    }

    /// The generated Markdown of these sections.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        match &self.edge {
            Some(Ok(e)) => {
                let _ = writeln!(o, "### Through-edge throughput\n");
                let _ = writeln!(
                    o,
                    "64-byte frames (60 + FCS) over {} flows (source ports), counted at the backends over {} ms; {} rounds, every edge in every round. Mpps min / median / max over rounds; ratios are taken within each round, then median (min..max) over rounds. Generated: the generator's own rate in the same window (it shares one CPU with the edge and the receiver). The generator-only row is counted where the edge drops the frames.\n",
                    e.flows, e.window_ms, e.rounds
                );
                let _ = writeln!(
                    o,
                    "| protocol | edge | Mpps at the backends | generated, median | to green |\n|---|---|---|---|---|"
                );
                for c in &e.cases {
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} | {} |",
                        c.proto.to_uppercase(),
                        c.label,
                        fmt_stat(Stat::of(&c.mpps), 2),
                        Stat::of(&c.gen_mpps).map_or("-".into(), |s| format!("{:.2}", s.median)),
                        Stat::of(&c.green_share)
                            .map_or("-".into(), |s| format!("{:.1}%", s.median * 100.0))
                    );
                }
                let _ = writeln!(
                    o,
                    "\n| protocol | splitter / nftables | splitter / minimal XDP | splitter / forwarding |\n|---|---|---|---|"
                );
                for proto in ["udp", "tcp"] {
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} |",
                        proto.to_uppercase(),
                        fmt_ratio(e.ratio("splitter", "nftables", proto)),
                        fmt_ratio(e.ratio("splitter", "xdp_min", proto)),
                        fmt_ratio(e.ratio("splitter", "forward", proto))
                    );
                }
                let _ = writeln!(
                    o,
                    "\n![through-edge throughput](benchmarks/through-edge.svg)"
                );
                o.push('\n');
                problems_md(
                    &mut o,
                    e.cases.iter().flat_map(|c| {
                        c.problems
                            .iter()
                            .map(move |p| format!("{} {}: {p}", c.proto, c.label))
                    }),
                );
                for n in &e.notes {
                    let _ = writeln!(o, "Note: {n}\n");
                }
            }
            Some(Err(e)) => {
                let _ = writeln!(
                    o,
                    "### Through-edge throughput\n\nNot measured in this run: {e}\n"
                );
            }
            None => {}
        }
        match &self.conn {
            Some(Ok(c)) => {
                let _ = writeln!(o, "### Connection rate\n");
                let _ = writeln!(
                    o,
                    "wrk -t{} -c{} -d{}s with `Connection: close` (one request per connection) against nginx; {} rounds, every path in every round. Connections/s min / median / max over rounds; latency: medians over rounds of wrk's percentiles.\n",
                    c.threads, c.connections, c.duration_s, c.rounds
                );
                let _ = writeln!(
                    o,
                    "| path | connections/s | p50 ms | p99 ms | to green | errors | client SYN retransmits | backend PAWS rejects |\n|---|---|---|---|---|---|---|---|"
                );
                for k in &c.cases {
                    let _ = writeln!(
                        o,
                        "| {} | {} | {} | {} | {} | {} | {} | {} |",
                        k.label,
                        fmt_stat(Stat::of(&k.cps), 0),
                        Stat::of(&k.p50_ms).map_or("-".into(), |s| format!("{:.2}", s.median)),
                        Stat::of(&k.p99_ms).map_or("-".into(), |s| format!("{:.2}", s.median)),
                        Stat::of(&k.green_share)
                            .map_or("-".into(), |s| format!("{:.1}%", s.median * 100.0)),
                        k.errors,
                        k.syn_retrans,
                        k.paws_rejects
                    );
                }
                let _ = writeln!(
                    o,
                    "\nsplitter / direct: {}; splitter / HAProxy: {}; splitter / nftables: {}; splitter with 10% mirrored / splitter: {} (per round, median (min..max)).\n",
                    fmt_ratio(c.ratio("splitter", "direct")),
                    fmt_ratio(c.ratio("splitter", "haproxy")),
                    fmt_ratio(c.ratio("splitter", "nftables")),
                    fmt_ratio(c.ratio("splitter_mirrored", "splitter"))
                );
                problems_md(
                    &mut o,
                    c.cases
                        .iter()
                        .flat_map(|k| k.problems.iter().map(move |p| format!("{}: {p}", k.label))),
                );
                for n in &c.notes {
                    let _ = writeln!(o, "Note: {n}\n");
                }
            }
            Some(Err(e)) => {
                let _ = writeln!(o, "### Connection rate\n\nNot measured in this run: {e}\n");
            }
            None => {}
        }
        match &self.api {
            Some(Ok(a)) => {
                let _ = writeln!(o, "### Weight change through the API\n");
                let _ = writeln!(
                    o,
                    "{} flips of `PUT /v1/services/web/weights` over the daemon's Unix socket between blue=100 and green=100. Answer: p50 {} ms, p99 {} ms. Until the first new connection lands on the version switched on: p50 {} ms, p99 {} ms, max {} ms; {} flips not seen in time.\n",
                    a.visible_ms.len() + a.misses,
                    pct(&a.put_ms, 50.0),
                    pct(&a.put_ms, 99.0),
                    pct(&a.visible_ms, 50.0),
                    pct(&a.visible_ms, 99.0),
                    pct(&a.visible_ms, 100.0),
                    a.misses
                );
                for n in &a.notes {
                    let _ = writeln!(o, "Note: {n}\n");
                }
            }
            Some(Err(e)) => {
                let _ = writeln!(
                    o,
                    "### Weight change through the API\n\nNot measured in this run: {e}\n"
                );
            }
            None => {}
        }
        o
    }
}

impl Traffic {
    /// The through-edge chart: Mpps at the backends per edge and protocol.
    pub fn through_edge_svg(&self, machine: &str) -> Option<String> {
        let e = self.edge.as_ref()?.as_ref().ok()?;
        let bars: Vec<Bar> = e
            .cases
            .iter()
            .filter_map(|c| {
                Some(Bar {
                    label: format!("{} {}", c.proto.to_uppercase(), c.label),
                    stat: Stat::of(&c.mpps)?,
                    target: None,
                })
            })
            .collect();
        if bars.is_empty() {
            return None;
        }
        let note = format!(
            "median, whiskers min..max over {} rounds; generator, edge and receiver share one CPU. {machine}",
            e.rounds
        );
        Some(bar_chart_svg(
            "64-byte frames through the edge, counted at the backends",
            "Mpps",
            &bars,
            &note,
        ))
    }
}

fn pct(v: &[f64], p: f64) -> String {
    percentile(v, p).map_or("-".into(), |x| format!("{x:.2}"))
}

fn pctv(v: &[f64], p: f64) -> Value {
    percentile(v, p).map_or(Value::Null, |x| json!(round3(x)))
}

fn problems_md(o: &mut String, problems: impl Iterator<Item = String>) {
    let p: Vec<String> = problems.collect();
    if !p.is_empty() {
        let _ = writeln!(o, "Problems in this run:\n");
        for x in p {
            let _ = writeln!(o, "- {x}");
        }
        o.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge_case(id: &'static str, proto: &'static str, mpps: Vec<f64>) -> EdgeCase {
        EdgeCase {
            id,
            proto,
            label: id.into(),
            mpps,
            gen_mpps: vec![5.0],
            green_share: vec![0.1],
            problems: vec![],
        }
    }

    #[test]
    fn per_round_ratios_and_targets() {
        let e = EdgeResults {
            rounds: 3,
            flows: 4096,
            window_ms: 1000,
            cases: vec![
                edge_case("nftables", "udp", vec![1.0, 0.5, f64::NAN]),
                edge_case("xdp_min", "udp", vec![4.0, 4.0, 4.0]),
                edge_case("splitter", "udp", vec![3.0, 2.0, 3.0]),
            ],
            notes: vec![],
        };
        let r = e
            .ratio("splitter", "nftables", "udp")
            .unwrap_or_else(|| panic!("no ratio"));
        assert_eq!((r.min, r.max), (3.0, 4.0));
        let t = Traffic {
            edge: Some(Ok(e)),
            conn: None,
            api: Some(Err("skipped".into())),
        };
        let targets = t.targets();
        assert_eq!(targets[0].met, Some(true));
        assert_eq!(targets[1].met, Some(true)); // 0.75x
        assert_eq!(targets[2].met, None); // no TCP
        assert_eq!(t.measured(), vec!["throughput"]);
        assert!(t.markdown().contains("| UDP | splitter |"));
        assert!(t.text().contains("not measured: skipped"));
        assert_eq!(t.json().len(), 2);
    }
}
