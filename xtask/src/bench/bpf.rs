//! What the kernel says about loaded programs and maps: ids and `memlock`
//! from `/proc/self/fdinfo`, sizes and instruction counts from
//! `bpf_prog_info`, the maps a program uses from `bpf_map_info`.
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use anyhow::{Context, Result, anyhow};
use aya::{
    maps::{MapInfo, MapType},
    programs::{ProgramFd, ProgramInfo, loaded_programs},
};

use super::report::{MapMemory, ProgramSize};

/// A numeric field (`prog_id`, `memlock`...) of `/proc/self/fdinfo/FD`.
pub fn fdinfo_value(fd: BorrowedFd<'_>, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().parse().ok())?
    })
}

/// The kernel's record of the program behind `fd`.
///
/// # Errors
/// `fd` is no BPF program, or the program list cannot be read.
pub fn program_info(fd: BorrowedFd<'_>) -> Result<ProgramInfo> {
    let id = fdinfo_value(fd, "prog_id")
        .with_context(|| format!("fd {} is not a BPF program", fd.as_raw_fd()))?;
    loaded_programs()
        .filter_map(Result::ok)
        .find(|p| u64::from(p.id()) == id)
        .ok_or_else(|| anyhow!("BPF program id {id} is not in the kernel's list"))
}

/// An owned [`ProgramFd`] for a program known only by a raw descriptor
/// (what `Dataplane::program_fd` returns), for `ProgramArray::set`.
///
/// # Errors
/// As [`program_info`], or `BPF_PROG_GET_FD_BY_ID` failed.
pub fn program_fd(fd: BorrowedFd<'_>) -> Result<ProgramFd> {
    program_info(fd)?.fd().context("BPF_PROG_GET_FD_BY_ID")
}

/// Translated and JIT-compiled size and verified instructions of a program.
///
/// # Errors
/// As [`program_info`].
pub fn program_size(name: &str, fd: &ProgramFd) -> Result<ProgramSize> {
    let info = program_info(fd.as_fd())?;
    Ok(ProgramSize {
        name: name.to_string(),
        xlated_bytes: info.size_translated(),
        jited_bytes: info.size_jitted(),
        verified_insns: info.verified_instruction_count(),
    })
}

/// CPUs the kernel sizes per-CPU maps for (`/sys/devices/system/cpu/possible`).
fn possible_cpus() -> u64 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let n: u64 = text
        .trim()
        .split(',')
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some(b.parse::<u64>().ok()? - a.parse::<u64>().ok()? + 1),
            None => r.parse::<u64>().ok().map(|_| 1),
        })
        .sum();
    n.max(1)
}

/// Every map the program uses: its shape, the kernel's `memlock` figure,
/// and the bytes of its keys and values at full capacity.
///
/// # Errors
/// The program's map ids cannot be read.
pub fn map_memory(fd: &ProgramFd) -> Result<Vec<MapMemory>> {
    let info = program_info(fd.as_fd())?;
    let ids = info
        .map_ids()
        .context("reading the program's map ids")?
        .unwrap_or_default();
    let cpus = possible_cpus();
    let mut out = Vec::new();
    for id in ids {
        let m = MapInfo::from_id(id).with_context(|| format!("map id {id}"))?;
        let kind = m.map_type().ok();
        let per_cpu = matches!(
            kind,
            Some(MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash)
        );
        let value = u64::from(m.value_size()) * if per_cpu { cpus } else { 1 };
        let memlock = m.fd().ok().and_then(|f| fdinfo_value(f.as_fd(), "memlock"));
        out.push(MapMemory {
            name: m.name_as_str().unwrap_or("?").to_string(),
            kind: kind.map_or("?".into(), |k| format!("{k:?}")),
            max_entries: m.max_entries(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            memlock,
            payload: u64::from(m.max_entries()) * (u64::from(m.key_size()) + value),
        });
    }
    out.sort_by(|a, b| b.memlock.cmp(&a.memlock).then(a.name.cmp(&b.name)));
    Ok(out)
}
