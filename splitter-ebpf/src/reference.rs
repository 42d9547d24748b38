//! What the reference programs of `cargo xtask bench` (`bin/baseline.rs`,
//! `bin/edgebench.rs`) share: header layouts, bounds-checked access and
//! RFC 1624 checksum arithmetic. Written apart from the splitter's own
//! `parse` and `nat` on purpose, so that work on the splitter never moves
//! the yardsticks it is measured against. Included by `#[path]` into each
//! program.
use aya_ebpf::programs::XdpContext;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_LEN: usize = 14;
pub const L4_OFF: usize = ETH_LEN + 20;

#[repr(C)]
#[allow(dead_code)] // layout: not every field is read
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
#[allow(dead_code)] // layout: not every field is read
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
#[allow(dead_code)] // layout: not every field is read
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

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
