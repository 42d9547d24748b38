//! The header layouts (from `headers`) and the one bounds-checked accessor
//! the program reads packets through. [`parse`] turns a frame into a
//! [`Packet`] or a verdict.
use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use splitter_common::{PROTO_TCP, PROTO_UDP, counter};

use crate::{XDP_PASS, maps};

pub use crate::headers::{
    ETH_LEN, ETH_P_IP, EthHdr, Ipv4Hdr, L4_OFF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpHdr, UdpHdr,
};

/// Returns a pointer to a `T` at `offset` if the whole `T` lies inside the
/// packet. Every packet access goes through here.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// What the rest of the program needs from a parsed IPv4 TCP/UDP packet.
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Frame length, for byte counters.
    pub len: u32,
}

/// Parses the frame. `Err(action)` is the final verdict for packets that
/// are not ours or are malformed (counted where they were addressed to a VIP).
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, u32> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(XDP_PASS)?;
    if u16::from_be(unsafe { (*eth).proto }) != ETH_P_IP {
        return Err(XDP_PASS);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        // Shorter than an IPv4 header: the kernel would drop it too.
        return Err(maps::drop_with(counter::DROP_TRUNCATED_IP));
    };
    let (ver_ihl, frag_off, proto, saddr, daddr) = unsafe {
        (
            (*ip).ver_ihl,
            (*ip).frag_off,
            (*ip).proto,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    if ver_ihl >> 4 != 4 {
        return Err(XDP_PASS);
    }
    let ihl = ver_ihl & 0x0f;
    if ihl < 5 {
        return Err(maps::drop_with(counter::DROP_BAD_IHL));
    }
    let len = (ctx.data_end() - ctx.data()) as u32;
    if ETH_LEN as u32 + ihl as u32 * 4 > len {
        return Err(maps::drop_with(counter::DROP_TRUNCATED_IP));
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(XDP_PASS);
    }
    // Fragments (MF set or a non-zero offset) and options: not forwarded
    // for a VIP (their ports are missing or the layout differs); anyone
    // else's are the kernel's business.
    if u16::from_be(frag_off) & 0x3fff != 0 {
        return Err(drop_if_vip(daddr, counter::DROP_FRAGMENT));
    }
    if ihl != 5 {
        return Err(drop_if_vip(daddr, counter::DROP_IP_OPTIONS));
    }
    let (sport, dport, tcp_flags) = if proto == PROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, L4_OFF) else {
            return Err(drop_if_vip(daddr, counter::DROP_TRUNCATED_L4));
        };
        unsafe { ((*tcp).sport, (*tcp).dport, (*tcp).flags) }
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(ctx, L4_OFF) else {
            return Err(drop_if_vip(daddr, counter::DROP_TRUNCATED_L4));
        };
        unsafe { ((*udp).sport, (*udp).dport, 0) }
    };
    Ok(Packet {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        len,
    })
}

#[inline(always)]
fn drop_if_vip(daddr: u32, reason: u32) -> u32 {
    if maps::is_vip(daddr) {
        maps::drop_with(reason)
    } else {
        XDP_PASS
    }
}

/// Options a TCP header is scanned through for the timestamp, at most.
const TCP_OPTION_STEPS: u32 = 8;

/// The timestamp value (TSval, host order) of the TCP segment at
/// `L4_OFF`, if it carries the timestamp option within its first
/// `TCP_OPTION_STEPS` options (Linux puts it third on a SYN and on every
/// later segment, macOS sixth on a SYN).
#[inline(always)]
pub fn tcp_tsval(ctx: &XdpContext) -> Option<u32> {
    let tcp = ptr_at::<TcpHdr>(ctx, L4_OFF)?;
    let opts_end = L4_OFF + ((unsafe { (*tcp).doff } >> 4) as usize) * 4;
    let mut off = L4_OFF + size_of::<TcpHdr>();
    let mut i = 0;
    while i < TCP_OPTION_STEPS {
        // Bounded for the verifier: options end before L4_OFF + 60 < 128.
        off &= 0x7f;
        if off + 2 > opts_end {
            return None;
        }
        // Kind and length read together: a one-byte read's bounds check
        // compiles to a form the verifier cannot use.
        let [kind, len] = unsafe { *ptr_at::<[u8; 2]>(ctx, off)? };
        match kind {
            // End of options.
            0 => return None,
            // No-op.
            1 => off += 1,
            _ => {
                let len = len as usize;
                if kind == 8 {
                    if len != 10 || off + 10 > opts_end {
                        return None;
                    }
                    let v = ptr_at::<[u8; 4]>(ctx, off + 2)?;
                    return Some(u32::from_be_bytes(unsafe { *v }));
                }
                if len < 2 {
                    return None;
                }
                off += len;
            }
        }
        i += 1;
    }
    None
}
