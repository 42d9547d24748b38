//! What the reference programs of `cargo xtask bench` (`bin/baseline.rs`,
//! `bin/edgebench.rs`) share: header layouts
//! (`splitter-ebpf/src/headers.rs`, the one file they share with the
//! splitter: the protocols fix it), bounds-checked access and RFC 1624
//! checksum arithmetic. The code is written apart from the splitter's own
//! `parse` and `nat` on purpose, so that work on the splitter never moves
//! the yardsticks it is measured against. Included by `#[path]` into each
//! program.
use aya_ebpf::programs::XdpContext;

#[path = "../../splitter-ebpf/src/headers.rs"]
mod headers;
pub use headers::*;

/// A pointer to a `T` at `offset` if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// RFC 1624 eqn. 3 over one 32-bit field, on words as they lie in memory.
#[inline(always)]
pub fn add32(sum: u32, old: u32, new: u32) -> u32 {
    sum + (!old & 0xffff) + ((!old) >> 16) + (new & 0xffff) + (new >> 16)
}

#[inline(always)]
pub fn add16(sum: u32, old: u16, new: u16) -> u32 {
    sum + (!old) as u32 + new as u32
}

#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
