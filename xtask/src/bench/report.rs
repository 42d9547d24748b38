//! The results of `cargo xtask bench` and every way they are shown: the
//! terminal table, `docs/benchmarks/results.json`, the SVG chart and the
//! generated part of `docs/benchmarks.md`. Pure: no measuring, no I/O, so
//! it compiles (and is tested) without the `bench` feature.
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{
    edge_report::Traffic,
    stats::{Bar, Stat, Target, bar_chart_svg, fmt_stat, percentile, round2},
};

/// Where and on what the benchmark ran.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
    /// UTC, ISO 8601.
    pub date: String,
    /// `git rev-parse --short HEAD`, with `-dirty` for uncommitted changes.
    pub commit: String,
    /// `release` or `debug` (timings of the table builder mean little in debug).
    pub profile: &'static str,
    /// The CPU the measuring thread was pinned to, if pinning worked.
    pub pinned_cpu: Option<usize>,
}

/// One per-packet case: the program under test on a ring of frames.
#[derive(Debug, Clone)]
pub struct PacketCase {
    /// Stable key in the JSON (`established`, `syn_full`...).
    pub id: &'static str,
    pub label: String,
    /// The XDP program under test.
    pub program: &'static str,
    /// Distinct frames cycled through.
    pub frames: u32,
    /// Iterations per test run.
    pub repeat: u32,
    /// Connection-table entries before the case's first round (splitter cases).
    pub conn_entries: Option<u64>,
    /// Mean ns per iteration of each round, harness included.
    pub gross: Vec<f64>,
    /// The harness (wrapper + empty program) on the same frames, each round.
    pub harness: Vec<f64>,
    /// The action of the last iteration (`XDP_TX`...).
    pub action: String,
    /// Path checks that failed (wrong action, counters that moved unexpectedly).
    pub problems: Vec<String>,
}

impl PacketCase {
    /// Each round's gross minus the least disturbed (smallest) harness
    /// figure of the run: contention on a shared machine only ever adds
    /// time, so the minimum is the harness's own cost.
    pub fn net(&self) -> Vec<f64> {
        let h = Stat::of(&self.harness).map_or(0.0, |s| s.min);
        self.gross.iter().map(|g| g - h).collect()
    }
    pub fn net_stat(&self) -> Option<Stat> {
        Stat::of(&self.net())
    }
    pub fn gross_stat(&self) -> Option<Stat> {
        Stat::of(&self.gross)
    }
}

/// A cross-check by the other method: many distinct frames, one run each.
#[derive(Debug, Clone)]
pub struct SingleRun {
    pub id: &'static str,
    pub label: String,
    pub runs: usize,
    /// Mean of the kernel's per-run durations.
    pub mean_ns: f64,
    /// `mean_ns` minus the empty program's mean measured the same way.
    pub net_ns: f64,
}

/// Size of a loaded program, from `bpf_prog_info`.
#[derive(Debug, Clone)]
pub struct ProgramSize {
    pub name: String,
    pub xlated_bytes: Option<u32>,
    pub jited_bytes: u32,
    pub verified_insns: Option<u32>,
}

/// Everything measured through `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone, Default)]
pub struct PacketResults {
    pub rounds: usize,
    pub flows: u32,
    /// The empty program run directly: the test loop's own cost per iteration.
    pub test_loop: Vec<f64>,
    /// The harness (ring copy + tail call into the empty program), gross.
    pub harness: Vec<f64>,
    pub cases: Vec<PacketCase>,
    pub single_runs: Vec<SingleRun>,
    pub programs: Vec<ProgramSize>,
    pub notes: Vec<String>,
}

impl PacketResults {
    pub fn case(&self, id: &str) -> Option<&PacketCase> {
        self.cases.iter().find(|c| c.id == id)
    }

    fn median_net(&self, id: &str) -> Option<f64> {
        self.case(id)
            .and_then(PacketCase::net_stat)
            .map(|s| s.median)
    }

    fn min_net(&self, id: &str) -> Option<f64> {
        self.case(id).and_then(PacketCase::net_stat).map(|s| s.min)
    }

    /// Best-round net cost of `id` over that of `base`: the ratio least
    /// disturbed by other work on the machine (the one targets use).
    pub fn ratio(&self, id: &str, base: &str) -> Option<f64> {
        let (a, b) = (self.min_net(id)?, self.min_net(base)?);
        (b > 0.0).then_some(a / b)
    }

    /// Median net cost of `id` over that of `base`.
    pub fn ratio_median(&self, id: &str, base: &str) -> Option<f64> {
        let (a, b) = (self.median_net(id)?, self.median_net(base)?);
        (b > 0.0).then_some(a / b)
    }
}

/// One map of the loaded splitter program.
#[derive(Debug, Clone)]
pub struct MapMemory {
    pub name: String,
    pub kind: String,
    pub max_entries: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// The kernel's own figure (`memlock` in `/proc/self/fdinfo`).
    pub memlock: Option<u64>,
    /// `max_entries * (key + value)`, values times possible CPUs for per-CPU maps.
    pub payload: u64,
}

/// Control-plane figures that need no traffic.
#[derive(Debug, Clone)]
pub struct ControlResults {
    pub services: usize,
    pub backends_per_service: usize,
    /// Milliseconds to build every service's table, one sample per round.
    pub maglev_ms: Vec<f64>,
    /// Microseconds of `Dataplane::apply` for a weight change, each verified
    /// by the next SYN.
    pub apply_us: Vec<f64>,
    /// Weight changes whose next SYN went to the wrong version.
    pub apply_misses: usize,
    /// Microseconds from a failed verdict to the rollback published.
    pub rollback_us: Vec<f64>,
    /// Rollbacks after which a new flow still reached the canary.
    pub rollback_misses: usize,
    /// Milliseconds to count live flows over the full connection table.
    pub live_scan_ms: Vec<f64>,
    /// Live flows that count found.
    pub live_scan_flows: u64,
    /// Milliseconds from a backend's death to its removal from new-flow
    /// selection with default health settings, per round; or why not.
    pub health_removal_ms: Result<Vec<f64>, String>,
    pub maps: Vec<MapMemory>,
}

impl Default for ControlResults {
    fn default() -> Self {
        Self {
            services: 0,
            backends_per_service: 0,
            maglev_ms: Vec::new(),
            apply_us: Vec::new(),
            rollback_us: Vec::new(),
            rollback_misses: 0,
            apply_misses: 0,
            live_scan_ms: Vec::new(),
            live_scan_flows: 0,
            health_removal_ms: Err("not run".into()),
            maps: Vec::new(),
        }
    }
}

/// A whole run. A section that failed holds its error instead.
#[derive(Debug, Clone)]
pub struct Results {
    pub machine: Machine,
    pub packet: Result<PacketResults, String>,
    pub control: Result<ControlResults, String>,
    /// Through-edge throughput, connection rate, API weight change.
    pub traffic: Traffic,
}

impl Results {
    /// The targets this run can speak to.
    pub fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let p = self.packet.as_ref().ok();
        let ratio = |id: &str| p.and_then(|p| p.ratio(id, "slot"));
        let fmt = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
        let est = ratio("established");
        t.push(Target {
            what: "established-flow packet (64Ki live flows) vs minimal slot-table program",
            limit: "<= 3x".into(),
            measured: fmt(est),
            met: est.map(|r| r <= 3.0),
        });
        let syn = ratio("syn_full");
        t.push(Target {
            what: "SYN into a full connection table vs minimal slot-table program",
            limit: "<= 8x".into(),
            measured: fmt(syn),
            met: syn.map(|r| r <= 8.0),
        });
        let c = self.control.as_ref().ok();
        let maglev = c.and_then(|c| Stat::of(&c.maglev_ms)).map(|s| s.median);
        t.push(Target {
            what: "Maglev rebuild, 1,000 services x 100 backends",
            limit: "< 1 s".into(),
            measured: maglev.map_or("-".into(), |m| format!("{m:.0} ms")),
            met: maglev.map(|m| m < 1000.0),
        });
        let p99 = c.and_then(|c| percentile(&c.apply_us, 99.0));
        t.push(Target {
            what: "weight change visible to the next packet (apply only, no API)",
            limit: "< 1 ms p99".into(),
            measured: p99.map_or("-".into(), |v| format!("{v:.0} us p99")),
            met: p99.map(|v| v < 1000.0 && c.is_some_and(|c| c.apply_misses == 0)),
        });
        let rb = c.and_then(|c| percentile(&c.rollback_us, 99.0));
        t.push(Target {
            what: "failed analysis verdict to the first new flow on the stable version",
            limit: "< 10 ms p99".into(),
            measured: rb.map_or("-".into(), |v| format!("{:.2} ms p99", v / 1000.0)),
            met: rb.map(|v| v < 10_000.0 && c.is_some_and(|c| c.rollback_misses == 0)),
        });
        t.extend(self.traffic.targets());
        t
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

fn fmt_bytes(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if b as f64 >= MIB {
        format!("{:.1} MiB", b as f64 / MIB)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

/// The plain-text summary printed at the end of a run.
pub fn text(r: &Results) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(
        o,
        "machine: {} CPUs ({}), kernel {}, {} build, commit {}, {}",
        m.nproc, m.cpu_model, m.kernel, m.profile, m.commit, m.date
    );
    match &r.packet {
        Ok(p) => {
            let _ = writeln!(
                o,
                "\nper-packet cost (BPF_PROG_TEST_RUN, {} rounds, ns/packet net of the harness)",
                p.rounds
            );
            let _ = writeln!(
                o,
                "  test loop alone {}   harness gross {}",
                fmt_stat(Stat::of(&p.test_loop), 1),
                fmt_stat(Stat::of(&p.harness), 1)
            );
            let _ = writeln!(
                o,
                "  {:<38} {:>24} {:>8} {:>8} {:>9}",
                "case", "min / median / max", "x floor", "x slot", "(medians)"
            );
            for c in &p.cases {
                let _ = writeln!(
                    o,
                    "  {:<38} {:>24} {:>8} {:>8} {:>9}{}",
                    c.label,
                    fmt_stat(c.net_stat(), 1),
                    fmt_ratio(p.ratio(c.id, "floor")),
                    fmt_ratio(p.ratio(c.id, "slot")),
                    fmt_ratio(p.ratio_median(c.id, "slot")),
                    if c.problems.is_empty() {
                        ""
                    } else {
                        "  (path check failed)"
                    }
                );
            }
            for s in &p.single_runs {
                let _ = writeln!(
                    o,
                    "  cross-check, single runs: {:<26} {:.1} ns net ({} runs)",
                    s.label, s.net_ns, s.runs
                );
            }
            for c in &p.cases {
                for pr in &c.problems {
                    let _ = writeln!(o, "  problem: {}: {pr}", c.label);
                }
            }
        }
        Err(e) => {
            let _ = writeln!(o, "\nper-packet cost: not measured: {e}");
        }
    }
    match &r.control {
        Ok(c) => {
            let _ = writeln!(o, "\ncontrol plane");
            let _ = writeln!(
                o,
                "  Maglev tables {} x {} backends: {} ms",
                c.services,
                c.backends_per_service,
                fmt_stat(Stat::of(&c.maglev_ms), 1)
            );
            let _ = writeln!(
                o,
                "  weight change (Dataplane::apply): p50 {} us, p99 {} us, max {} us ({} changes, {} misses)",
                percentile(&c.apply_us, 50.0).map_or("-".into(), |v| format!("{v:.0}")),
                percentile(&c.apply_us, 99.0).map_or("-".into(), |v| format!("{v:.0}")),
                percentile(&c.apply_us, 100.0).map_or("-".into(), |v| format!("{v:.0}")),
                c.apply_us.len(),
                c.apply_misses
            );
            let _ = writeln!(
                o,
                "  rollback (failed verdict -> stable at 100% published): p50 {} us, p99 {} us, max {} us ({} rollbacks, {} with a new flow on the canary after)",
                percentile(&c.rollback_us, 50.0).map_or("-".into(), |v| format!("{v:.0}")),
                percentile(&c.rollback_us, 99.0).map_or("-".into(), |v| format!("{v:.0}")),
                percentile(&c.rollback_us, 100.0).map_or("-".into(), |v| format!("{v:.0}")),
                c.rollback_us.len(),
                c.rollback_misses
            );
            let _ = writeln!(
                o,
                "  live-flow count over the full table: {} ms ({} live flows)",
                fmt_stat(Stat::of(&c.live_scan_ms), 1),
                c.live_scan_flows
            );
            let _ = writeln!(
                o,
                "  backend death to removal (default health checks): {}",
                match &c.health_removal_ms {
                    Ok(v) => format!("{} ms", fmt_stat(Stat::of(v), 1)),
                    Err(e) => format!("not measured: {e}"),
                }
            );
            let total: u64 = c.maps.iter().filter_map(|m| m.memlock).sum();
            let _ = writeln!(o, "  map memory (kernel memlock): {}", fmt_bytes(total));
            for m in &c.maps {
                let _ = writeln!(
                    o,
                    "    {:<14} {:<14} {:>8} entries  {:>10}",
                    m.name,
                    m.kind,
                    m.max_entries,
                    m.memlock.map_or("-".into(), fmt_bytes)
                );
            }
        }
        Err(e) => {
            let _ = writeln!(o, "\ncontrol plane: not measured: {e}");
        }
    }
    o.push_str(&r.traffic.text());
    let _ = writeln!(o, "\ntargets (reported, never enforced)");
    for t in r.targets() {
        let _ = writeln!(
            o,
            "  {:<8} {:<72} {} (target {})",
            met_word(t.met),
            t.what,
            t.measured,
            t.limit
        );
    }
    o
}

fn met_word(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "n/a",
    }
}

/// `docs/benchmarks/results.json`.
pub fn to_json(r: &Results) -> Value {
    let m = &r.machine;
    let machine = json!({
        "nproc": m.nproc,
        "kernel": m.kernel,
        "cpu_model": m.cpu_model,
        "date": m.date,
        "commit": m.commit,
        "profile": m.profile,
        "pinned_cpu": m.pinned_cpu,
    });
    let packet = match &r.packet {
        Ok(p) => {
            let cases: Vec<Value> = p
                .cases
                .iter()
                .map(|c| {
                    json!({
                        "id": c.id,
                        "label": c.label,
                        "program": c.program,
                        "frames": c.frames,
                        "repeat": c.repeat,
                        "conn_entries_before": c.conn_entries,
                        "net_ns": c.net_stat().map(|s| s.json()),
                        "gross_ns": c.gross_stat().map(|s| s.json()),
                        "ratio_to_floor": p.ratio(c.id, "floor").map(round2),
                        "ratio_to_floor_of_medians": p.ratio_median(c.id, "floor").map(round2),
                        "ratio_to_slot_table": p.ratio(c.id, "slot").map(round2),
                        "ratio_to_slot_table_of_medians": p.ratio_median(c.id, "slot").map(round2),
                        "gross_samples_ns": c.gross,
                        "harness_samples_ns": c.harness,
                        "action": c.action,
                        "problems": c.problems,
                    })
                })
                .collect();
            json!({
                "method": "BPF_PROG_TEST_RUN; a wrapper XDP program copies the next frame of a ring of distinct prepared frames over the buffer and tail-calls the program under test; net = each round's gross minus the smallest gross of the wrapper tail-calling an empty program on the same frames; ratio_* are of the best rounds' net costs, ratio_*_of_medians of the medians",
                "rounds": p.rounds,
                "live_flows": p.flows,
                "test_loop_ns": Stat::of(&p.test_loop).map(|s| s.json()),
                "harness_ns": Stat::of(&p.harness).map(|s| s.json()),
                "cases": cases,
                "single_runs": p.single_runs.iter().map(|s| json!({
                    "id": s.id, "label": s.label, "runs": s.runs,
                    "mean_ns": round2(s.mean_ns), "net_ns": round2(s.net_ns),
                })).collect::<Vec<_>>(),
                "programs": p.programs.iter().map(|s| json!({
                    "name": s.name, "xlated_bytes": s.xlated_bytes,
                    "jited_bytes": s.jited_bytes, "verified_insns": s.verified_insns,
                })).collect::<Vec<_>>(),
                "notes": p.notes,
            })
        }
        Err(e) => json!({ "error": e }),
    };
    let control = match &r.control {
        Ok(c) => json!({
            "maglev": {
                "services": c.services,
                "backends_per_service": c.backends_per_service,
                "build_ms": Stat::of(&c.maglev_ms).map(|s| s.json()),
            },
            "weight_change_apply_us": {
                "p50": percentile(&c.apply_us, 50.0).map(round2),
                "p99": percentile(&c.apply_us, 99.0).map(round2),
                "max": percentile(&c.apply_us, 100.0).map(round2),
                "changes": c.apply_us.len(),
                "next_syn_on_old_table": c.apply_misses,
            },
            "rollback_us": {
                "p50": percentile(&c.rollback_us, 50.0).map(round2),
                "p99": percentile(&c.rollback_us, 99.0).map(round2),
                "max": percentile(&c.rollback_us, 100.0).map(round2),
                "rollbacks": c.rollback_us.len(),
                "new_flow_on_canary_after": c.rollback_misses,
            },
            "live_flow_count_full_table_ms": Stat::of(&c.live_scan_ms).map(|s| s.json()),
            "live_flow_count_flows": c.live_scan_flows,
            "backend_death_to_removal_ms": match &c.health_removal_ms {
                Ok(v) => json!({ "stat": Stat::of(v).map(|s| s.json()), "samples": v, "settings": "interval 1000 ms, timeout 1000 ms, fall 3" }),
                Err(e) => json!({ "error": e }),
            },
            "maps": c.maps.iter().map(|m| json!({
                "name": m.name, "type": m.kind, "max_entries": m.max_entries,
                "key_size": m.key_size, "value_size": m.value_size,
                "memlock_bytes": m.memlock, "payload_bytes": m.payload,
            })).collect::<Vec<_>>(),
            "maps_memlock_total_bytes": c.maps.iter().filter_map(|m| m.memlock).sum::<u64>(),
        }),
        Err(e) => json!({ "error": e }),
    };
    let targets: Vec<Value> = r
        .targets()
        .iter()
        .map(|t| json!({ "what": t.what, "target": t.limit, "measured": t.measured, "met": t.met }))
        .collect();
    let measured = r.traffic.measured();
    let mut not_measured: Vec<&str> = Vec::new();
    if !measured.contains(&"throughput") {
        not_measured.push(
            "through-edge packets per second vs plain forwarding and nftables DNAT (issue item 2)",
        );
    }
    if !measured.contains(&"connrate") {
        not_measured.push("connections per second vs HAProxy mode tcp and nftables (issue item 3)");
    }
    if measured.contains(&"throughput") {
        not_measured.push(
            "the edge's own packet rate apart from the generator and receiver, which share its CPU",
        );
    }
    if !measured.contains(&"api") {
        not_measured.push("weight change through the HTTP API and CLI end to end (item 4)");
    }
    if !matches!(&r.control, Ok(c) if c.health_removal_ms.is_ok()) {
        not_measured.push("backend death to removal (item 4)");
    }
    let mut out = json!({
        "machine": machine,
        "per_packet": packet,
        "control_plane": control,
    });
    for (k, v) in r.traffic.json() {
        out[k] = v;
    }
    out["targets"] = json!(targets);
    out["not_measured_yet"] = json!(not_measured);
    out
}

/// The per-packet chart: net ns per case, targets as red ticks.
pub fn per_packet_svg(r: &Results) -> Option<String> {
    let p = r.packet.as_ref().ok()?;
    let slot = p.median_net("slot");
    let bars: Vec<Bar> = p
        .cases
        .iter()
        .filter_map(|c| {
            let target = match c.id {
                "established" => slot.map(|s| 3.0 * s),
                "syn_full" => slot.map(|s| 8.0 * s),
                _ => None,
            };
            Some(Bar {
                label: c.label.clone(),
                stat: c.net_stat()?,
                target,
            })
        })
        .collect();
    if bars.is_empty() {
        return None;
    }
    let m = &r.machine;
    let note = format!(
        "median, whiskers min..max over {} rounds; red: target (3x / 8x the slot-table program). {} CPUs, {}, kernel {}, {}",
        p.rounds, m.nproc, m.cpu_model, m.kernel, m.date
    );
    Some(bar_chart_svg(
        "XDP program cost per packet, net of the test harness",
        "ns per packet",
        &bars,
        &note,
    ))
}

/// The generated part of `docs/benchmarks.md` (between the markers).
pub fn markdown(r: &Results) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(
        o,
        "Generated by `cargo xtask bench` on {}: {} CPUs ({}), kernel {}, {} build of commit `{}`{}.\n",
        m.date,
        m.nproc,
        m.cpu_model,
        m.kernel,
        m.profile,
        m.commit,
        m.pinned_cpu.map_or(String::new(), |c| format!(
            ", measuring thread pinned to CPU {c}"
        ))
    );
    match &r.packet {
        Ok(p) => {
            let _ = writeln!(o, "### Per-packet cost\n");
            let _ = writeln!(
                o,
                "{} rounds; {} live flows before the first round. ns per packet net of the harness, min / median / max over rounds. Ratios are of the best rounds (least disturbed by other work), with the ratio of medians beside.\n",
                p.rounds, p.flows
            );
            let _ = writeln!(
                o,
                "| case | program | frames x passes | net ns | x floor | x slot table | x slot table, medians |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|");
            for c in &p.cases {
                let _ = writeln!(
                    o,
                    "| {}{} | `{}` | {} x {} | {} | {} | {} | {} |",
                    c.label,
                    c.conn_entries
                        .map_or(String::new(), |n| format!(" ({n} table entries)")),
                    c.program,
                    c.frames,
                    c.repeat / c.frames.max(1),
                    fmt_stat(c.net_stat(), 1),
                    fmt_ratio(p.ratio(c.id, "floor")),
                    fmt_ratio(p.ratio(c.id, "slot")),
                    fmt_ratio(p.ratio_median(c.id, "slot"))
                );
            }
            let _ = writeln!(
                o,
                "\nThe test loop alone (empty program, run directly): {} ns per iteration; the harness (ring copy + tail call into the empty program): {} ns gross.\n",
                fmt_stat(Stat::of(&p.test_loop), 1),
                fmt_stat(Stat::of(&p.harness), 1)
            );
            let _ = writeln!(o, "![per-packet cost](benchmarks/per-packet.svg)\n");
            if !p.single_runs.is_empty() {
                let _ = writeln!(
                    o,
                    "Cross-check by the other method (one run per distinct frame, net of the empty program run the same way; includes the timer's own reads, so noisier):\n"
                );
                for s in &p.single_runs {
                    let _ = writeln!(
                        o,
                        "- {}: {:.1} ns net ({} runs, {:.1} ns gross)",
                        s.label, s.net_ns, s.runs, s.mean_ns
                    );
                }
                o.push('\n');
            }
            let _ = writeln!(
                o,
                "| program | verified insns | xlated bytes | jited bytes |\n|---|---|---|---|"
            );
            for s in &p.programs {
                let _ = writeln!(
                    o,
                    "| `{}` | {} | {} | {} |",
                    s.name,
                    s.verified_insns.map_or("-".into(), |v| v.to_string()),
                    s.xlated_bytes.map_or("-".into(), |v| v.to_string()),
                    s.jited_bytes
                );
            }
            o.push('\n');
            let problems: Vec<String> = p
                .cases
                .iter()
                .flat_map(|c| {
                    c.problems
                        .iter()
                        .map(move |x| format!("- {}: {x}", c.label))
                })
                .collect();
            if !problems.is_empty() {
                let _ = writeln!(o, "Path checks that failed in this run:\n");
                for x in problems {
                    let _ = writeln!(o, "{x}");
                }
                o.push('\n');
            }
            for n in &p.notes {
                let _ = writeln!(o, "Note: {n}\n");
            }
        }
        Err(e) => {
            let _ = writeln!(o, "### Per-packet cost\n\nNot measured in this run: {e}\n");
        }
    }
    match &r.control {
        Ok(c) => {
            let _ = writeln!(o, "### Control plane\n");
            let _ = writeln!(
                o,
                "- Maglev tables for {} services x {} backends (`splitter::table::maglev_table`, one thread): {} ms (min / median / max over {} rounds).",
                c.services,
                c.backends_per_service,
                fmt_stat(Stat::of(&c.maglev_ms), 1),
                c.maglev_ms.len()
            );
            let _ = writeln!(
                o,
                "- Weight change through `Dataplane::apply` (what the API calls; no HTTP), each checked by the next SYN: p50 {} us, p99 {} us, max {} us over {} changes; {} SYNs still saw the old weights.",
                percentile(&c.apply_us, 50.0).map_or("-".into(), |v| format!("{v:.0}")),
                percentile(&c.apply_us, 99.0).map_or("-".into(), |v| format!("{v:.0}")),
                percentile(&c.apply_us, 100.0).map_or("-".into(), |v| format!("{v:.0}")),
                c.apply_us.len(),
                c.apply_misses
            );
            let _ = writeln!(
                o,
                "- Counting live flows over the full connection table (`Dataplane::live_flows`, what `splitter status`, the metrics and `backend set --state drain --wait` read; `BPF_MAP_LOOKUP_BATCH`): {} ms (min / median / max over {} reads), {} live flows found.",
                fmt_stat(Stat::of(&c.live_scan_ms), 1),
                c.live_scan_ms.len(),
                c.live_scan_flows
            );
            let _ = writeln!(
                o,
                "- Backend death to removal from new-flow selection, default `[service.health]` (TCP connect every 1000 ms, timeout 1000 ms, out after 3 failures; the backend's server stopped, so connects are refused): {}.",
                match &c.health_removal_ms {
                    Ok(v) => format!(
                        "{} ms (min / median / max over {} rounds)",
                        fmt_stat(Stat::of(v), 1),
                        v.len()
                    ),
                    Err(e) => format!("not measured: {e}"),
                }
            );
            let total: u64 = c.maps.iter().filter_map(|m| m.memlock).sum();
            let payload: u64 = c.maps.iter().map(|m| m.payload).sum();
            let _ = writeln!(
                o,
                "- Map memory at default capacities: {} as the kernel accounts it (`memlock`), {} of keys and values.\n",
                fmt_bytes(total),
                fmt_bytes(payload)
            );
            let _ = writeln!(
                o,
                "| map | type | max entries | key + value bytes | memlock | keys + values |\n|---|---|---|---|---|---|"
            );
            for m in &c.maps {
                let _ = writeln!(
                    o,
                    "| `{}` | {} | {} | {} + {} | {} | {} |",
                    m.name,
                    m.kind,
                    m.max_entries,
                    m.key_size,
                    m.value_size,
                    m.memlock.map_or("-".into(), fmt_bytes),
                    fmt_bytes(m.payload)
                );
            }
            o.push('\n');
        }
        Err(e) => {
            let _ = writeln!(o, "### Control plane\n\nNot measured in this run: {e}\n");
        }
    }
    o.push_str(&r.traffic.markdown());
    let _ = writeln!(
        o,
        "### Targets\n\n| target | limit | measured | |\n|---|---|---|---|"
    );
    for t in r.targets() {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            t.what,
            t.limit,
            t.measured,
            met_word(t.met)
        );
    }
    o
}

/// Marker lines around the generated part of `docs/benchmarks.md`.
pub const BEGIN_MARKER: &str = "<!-- bench:results:begin -->";
/// See [`BEGIN_MARKER`].
pub const END_MARKER: &str = "<!-- bench:results:end -->";

/// `doc` with the text between the markers replaced by `generated`, or
/// `None` if the markers are missing or out of order.
pub fn replace_generated(doc: &str, generated: &str) -> Option<String> {
    let b = doc.find(BEGIN_MARKER)?;
    let e = doc.find(END_MARKER)?;
    if e < b {
        return None;
    }
    let head = &doc[..b + BEGIN_MARKER.len()];
    let tail = &doc[e..];
    Some(format!("{head}\n{}\n{tail}", generated.trim_end()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_percentiles() {
        let s = Stat::of(&[3.0, 1.0, 2.0, 10.0]).unwrap_or_else(|| panic!("no stat"));
        assert_eq!((s.min, s.median, s.max), (1.0, 2.5, 10.0));
        assert_eq!(Stat::of(&[]), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(super::super::stats::tick_step(100.0), 20.0);
        assert_eq!(super::super::stats::tick_step(7.0), 2.0);
        assert_eq!(super::super::stats::tick_step(640.0), 200.0);
    }

    #[test]
    fn generated_section_is_replaced_between_markers() {
        let doc = format!("intro\n{BEGIN_MARKER}\nold\n{END_MARKER}\nafter\n");
        let new = replace_generated(&doc, "new table\n").unwrap_or_default();
        assert_eq!(
            new,
            format!("intro\n{BEGIN_MARKER}\nnew table\n{END_MARKER}\nafter\n")
        );
        assert_eq!(replace_generated("no markers", "x"), None);
    }

    fn sample() -> Results {
        let case = |id: &'static str, net: f64| PacketCase {
            id,
            label: format!("{id} <&>"),
            program: "p",
            frames: 4,
            repeat: 8,
            conn_entries: None,
            gross: vec![net + 29.0, net + 30.0, net + 31.0],
            harness: vec![31.0, 30.0, 29.0],
            action: "XDP_TX".into(),
            problems: vec![],
        };
        Results {
            machine: Machine::default(),
            packet: Ok(PacketResults {
                rounds: 3,
                cases: vec![
                    case("floor", 7.0),
                    case("slot", 40.0),
                    case("established", 100.0),
                ],
                ..PacketResults::default()
            }),
            control: Err("skipped".into()),
            traffic: Traffic::default(),
        }
    }

    #[test]
    fn ratios_targets_and_outputs() {
        let r = sample();
        let p = r.packet.as_ref().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.ratio("established", "slot"), Some(2.5));
        let t = r.targets();
        assert_eq!(t[0].met, Some(true));
        assert_eq!(t[1].met, None);
        let svg = per_packet_svg(&r).unwrap_or_default();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("&lt;&amp;&gt;") && !svg.contains("<&>"));
        let j = to_json(&r);
        assert_eq!(
            j["per_packet"]["cases"][2]["ratio_to_slot_table"].as_f64(),
            Some(2.5)
        );
        assert_eq!(j["control_plane"]["error"].as_str(), Some("skipped"));
        assert!(markdown(&r).contains("| established <&> | `p` | 4 x 2 |"));
        assert!(text(&r).contains("established"));
    }
}
