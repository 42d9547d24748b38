//! Runs a loaded XDP program on one packet with `BPF_PROG_TEST_RUN`
//! (the `bpf(2)` command `BPF_PROG_TEST_RUN`, also called
//! `BPF_PROG_RUN`), and returns the action and the packet as the program
//! left it. Nothing is attached and no interface sees the packet: the
//! kernel builds an `xdp_buff` around a copy of the bytes, runs the program
//! and copies the result back.
//!
//! The run happens in the network namespace of the *calling thread*: the
//! `ingress_ifindex` is looked up there, and helpers such as
//! `bpf_fib_lookup` see that namespace's routes and neighbours. Without an
//! `ingress_ifindex`, the packet appears to arrive on that namespace's
//! loopback device (ifindex 1). To run in another namespace, call from a
//! thread that did `setns(fd, CLONE_NEWNET)` (or `unshare(CLONE_NEWNET)`).
//!
//! Needs `CAP_SYS_ADMIN` (or `CAP_BPF` + `CAP_NET_ADMIN`) and a program fd.
//! With [`test_run_xdp`], `XDP_REDIRECT` is reported as the action, but the
//! frame is not sent anywhere; [`test_run_xdp_live`] (the kernel's
//! `BPF_F_TEST_XDP_LIVE_FRAMES` mode) really sends the frames and reports
//! nothing back.
//!
//! ```no_run
//! use splitter_tests::testrun::{test_run_xdp, xdp_action};
//! # fn demo(prog_fd: std::os::fd::RawFd, frame: &[u8]) -> std::io::Result<()> {
//! let r = test_run_xdp(prog_fd, frame, None, 1)?;
//! assert_eq!(r.action, xdp_action::PASS);
//! // For a benchmark: 1 000 000 runs, mean time per run.
//! let b = test_run_xdp(prog_fd, frame, None, 1_000_000)?;
//! println!("{} ns/packet", b.duration_ns);
//! # Ok(()) }
//! ```
use std::{io, mem::size_of, os::fd::RawFd};

/// XDP actions (`enum xdp_action` of `linux/bpf.h`).
pub mod xdp_action {
    /// The program failed (also returned for unknown actions).
    pub const ABORTED: u32 = 0;
    /// Drop the frame.
    pub const DROP: u32 = 1;
    /// Hand the frame to the kernel network stack.
    pub const PASS: u32 = 2;
    /// Send the frame back out of the interface it came in on.
    pub const TX: u32 = 3;
    /// Send the frame out of another interface (`bpf_redirect*`).
    pub const REDIRECT: u32 = 4;

    /// The action's name, for assertion messages (`"XDP_PASS"`...).
    pub fn name(action: u32) -> &'static str {
        match action {
            ABORTED => "XDP_ABORTED",
            DROP => "XDP_DROP",
            PASS => "XDP_PASS",
            TX => "XDP_TX",
            REDIRECT => "XDP_REDIRECT",
            _ => "XDP_?",
        }
    }
}

/// The `bpf(2)` command number of `BPF_PROG_TEST_RUN`.
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Room left in the output buffer beyond the input length, for programs
/// that grow the frame (`bpf_xdp_adjust_head`/`_tail`). A frame that still
/// does not fit fails with `ENOSPC`.
const OUTPUT_SLACK: usize = 512;

/// The `test` member of `union bpf_attr` (Linux 5.10+ layout; older kernels
/// accept it as long as the fields they do not know are zero).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit tail padding to the union's 8-byte alignment.
    _pad: u32,
}

/// `struct xdp_md`, the XDP context. For a test run, `data` must be 0,
/// `data_end` the packet length, `data_meta` and `egress_ifindex` 0.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// What one test run returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// The program's return value: an `xdp_action` constant.
    pub action: u32,
    /// The frame after the program ran (rewritten in place, possibly
    /// resized by the program).
    pub data: Vec<u8>,
    /// Mean run time per repetition in nanoseconds, as measured by the
    /// kernel around the program only.
    pub duration_ns: u32,
}

/// Runs the XDP program `prog_fd` on a copy of `packet`.
///
/// - `packet`: a whole Ethernet frame, at least 14 bytes and at most about
///   a page minus XDP headroom (kernel limits).
/// - `ingress_ifindex`: the interface the frame appears to arrive on (its
///   first receive queue), looked up in the calling thread's network
///   namespace; `None` means that namespace's loopback device. This is what
///   the program sees as `ctx->ingress_ifindex`, and what `bpf_fib_lookup`
///   is asked about.
/// - `repeat`: how many times to run (0 counts as 1). The runs all work on
///   the same buffer, so a program that rewrites the frame sees its own
///   output from the second run on; `data` and `action` are those of the
///   last run and `duration_ns` is the mean over all runs.
///
/// Minimum kernel: 4.12 for XDP test runs, 5.15 for `ingress_ifindex`
/// (an XDP context in test runs).
///
/// # Errors
/// The `bpf(BPF_PROG_TEST_RUN)` error: `EPERM` without privileges,
/// `EINVAL` for a frame shorter than 14 bytes or too long, `ENODEV` for an
/// unknown `ingress_ifindex`, `ENOSPC` if the program grew the frame by more
/// than 512 bytes, `EBADF`/`EINVAL` for a bad program fd.
pub fn test_run_xdp(
    prog_fd: RawFd,
    packet: &[u8],
    ingress_ifindex: Option<u32>,
    repeat: u32,
) -> io::Result<RunResult> {
    let (prog_fd, data_size_in) = fd_and_len(prog_fd, packet)?;
    let mut out = vec![0u8; packet.len() + OUTPUT_SLACK];
    let ctx = XdpMd {
        data: 0,
        data_end: data_size_in,
        ingress_ifindex: ingress_ifindex.unwrap_or(0),
        ..XdpMd::default()
    };
    let mut attr = TestRunAttr {
        prog_fd,
        data_size_in,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    if ingress_ifindex.is_some() {
        attr.ctx_size_in = size_of::<XdpMd>() as u32;
        attr.ctx_in = &ctx as *const XdpMd as u64;
    }
    // SAFETY: the pointers refer to live buffers of the sizes given: the
    // kernel reads `data_size_in` bytes of `packet` and `ctx_size_in` bytes
    // of `ctx`, and writes at most `data_size_out` bytes into `out`. All
    // outlive the call.
    unsafe { prog_test_run(&mut attr)? };
    out.truncate(attr.data_size_out as usize);
    Ok(RunResult {
        action: attr.retval,
        data: out,
        duration_ns: attr.duration,
    })
}

/// `BPF_F_TEST_XDP_LIVE_FRAMES`: test-run frames really leave.
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// Runs the XDP program `prog_fd` on `repeat` live copies of `frame`
/// (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux 5.18+): a frame the program returns
/// `XDP_TX` for leaves through interface `ingress_ifindex` (looked up in
/// the calling thread's namespace), one it redirects leaves where it is
/// redirected to. The kernel's in-kernel traffic generator; nothing is
/// copied back.
///
/// # Errors
/// The `bpf(BPF_PROG_TEST_RUN)` error, as for [`test_run_xdp`].
pub fn test_run_xdp_live(
    prog_fd: RawFd,
    frame: &[u8],
    ingress_ifindex: u32,
    repeat: u32,
) -> io::Result<()> {
    let (prog_fd, data_size_in) = fd_and_len(prog_fd, frame)?;
    let ctx = XdpMd {
        data_end: data_size_in,
        ingress_ifindex,
        ..XdpMd::default()
    };
    let mut attr = TestRunAttr {
        prog_fd,
        data_size_in,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: &ctx as *const XdpMd as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..TestRunAttr::default()
    };
    // SAFETY: the kernel reads `data_size_in` bytes of `frame` and
    // `ctx_size_in` bytes of `ctx`, both alive for the call, and writes
    // nothing back (no output buffers).
    unsafe { prog_test_run(&mut attr) }
}

/// The program fd and the frame length as `bpf_attr.test` takes them.
fn fd_and_len(prog_fd: RawFd, frame: &[u8]) -> io::Result<(u32, u32)> {
    let len = u32::try_from(frame.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "packet too long"))?;
    let fd = u32::try_from(prog_fd)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative program fd"))?;
    Ok((fd, len))
}

/// `bpf(BPF_PROG_TEST_RUN, attr)`.
///
/// # Safety
/// `attr` is a fully initialised `bpf_attr.test` whose pointers refer to
/// buffers of the sizes it gives, alive for the call (the output ones
/// writable).
unsafe fn prog_test_run(attr: &mut TestRunAttr) -> io::Result<()> {
    // SAFETY: as the caller guarantees.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr as *mut TestRunAttr,
            size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        // `union bpf_attr`'s test member ends at batch_size (offset 72);
        // `struct xdp_md` is six u32.
        assert_eq!(size_of::<TestRunAttr>(), 80);
        assert_eq!(std::mem::offset_of!(TestRunAttr, batch_size), 72);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(size_of::<XdpMd>(), 24);
    }
}

/// `m` as `aa:bb:cc:dd:ee:ff`.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The index of interface `name` in the calling thread's namespace.
///
/// # Errors
/// No such interface there.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated string; looked up in this thread's netns.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        anyhow::bail!("no interface {name}: {}", io::Error::last_os_error());
    }
    Ok(i)
}

/// The MACs of a [`forwarding_ns`].
#[derive(Debug, Clone, Copy)]
pub struct ForwardingMacs {
    /// `sp-in`, the clients' side.
    pub sp_in: [u8; 6],
    /// `sp-out`, the backends' side.
    pub sp_out: [u8; 6],
    /// Neighbour 10.0.1.2 (the client), on `sp-in`.
    pub client: [u8; 6],
    /// Neighbour 10.0.2.2 (the blue backend), on `sp-out`.
    pub backend: [u8; 6],
}

/// A namespace (named `<run_prefix>-<tag>`) for test runs that reach the
/// forwarding path: the veth pair `sp-in` (10.0.1.1/24, clients) and
/// `sp-out` (10.0.2.1/24, backends), permanent neighbours for client
/// 10.0.1.2 and backend 10.0.2.2 only, a blackhole route to 10.0.9.0/24,
/// forwarding on. Removed on drop.
///
/// # Errors
/// A command failed.
pub fn forwarding_ns(tag: &str, macs: ForwardingMacs) -> anyhow::Result<crate::netns::Netns> {
    let ns = crate::netns::Netns::new(format!("{}-{tag}", crate::netns::run_prefix()))?;
    let (in_mac, out_mac) = (mac_str(macs.sp_in), mac_str(macs.sp_out));
    ns.ip(&[
        "link", "add", "sp-in", "address", &in_mac, "type", "veth", "peer", "name", "sp-out",
        "address", &out_mac,
    ])?;
    ns.ip(&["addr", "add", "10.0.1.1/24", "dev", "sp-in"])?;
    ns.ip(&["addr", "add", "10.0.2.1/24", "dev", "sp-out"])?;
    ns.ip(&["link", "set", "sp-in", "up"])?;
    ns.ip(&["link", "set", "sp-out", "up"])?;
    for (addr, mac, dev) in [
        ("10.0.2.2", macs.backend, "sp-out"),
        ("10.0.1.2", macs.client, "sp-in"),
    ] {
        let mac = mac_str(mac);
        ns.ip(&[
            "neigh",
            "replace",
            addr,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    ns.ip(&["route", "add", "blackhole", "10.0.9.0/24"])?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(ns)
}
