//! The splitter XDP program.
//!
//! One program, attached to the client-facing interface and (for replies) to
//! the backend-facing one. For each packet:
//! 1. [`parse`] reads Ethernet / IPv4 / TCP or UDP with bounds checks and
//!    decides what is not ours (passed untouched) and what is malformed
//!    (dropped and counted when it is addressed to a VIP);
//! 2. the connection table (`CONNS`) is looked up with the packet's own
//!    5-tuple: a hit is an established flow in either direction;
//! 3. otherwise, a packet to a service (`SERVICES`) starts a new flow
//!    ([`flow::new_flow`]): version by hash threshold, backend by Maglev table,
//!    SNAT port, and the two connection-table entries;
//! 4. [`nat`] rewrites addresses and ports with incremental checksums and
//!    [`fib`] sends the frame on with `XDP_TX` or `XDP_REDIRECT`.
#![no_std]
#![no_main]

mod fib;
mod flow;
mod headers;
mod maps;
mod nat;
mod parse;
mod shadow;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn splitter(ctx: XdpContext) -> u32 {
    flow::handle(&ctx)
}

/// The tc (clsact ingress) half of UDP mirroring: copies the datagrams
/// the XDP program marked (see `shadow`).
#[classifier]
pub fn splitter_shadow(ctx: TcContext) -> i32 {
    shadow::tc(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Re-exported so every module names actions the same way.
pub(crate) use xdp_action::{XDP_DROP, XDP_PASS, XDP_TX};
