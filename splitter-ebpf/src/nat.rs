//! Address and port rewriting with incremental checksum updates
//! (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! All sums work on 16-bit words exactly as they lie in memory; the
//! one's-complement sum does not care about byte order (RFC 1071 §2(B)), so
//! nothing is byte-swapped here.
use aya_ebpf::programs::XdpContext;
use splitter_common::PROTO_TCP;

use crate::parse::{ETH_LEN, Ipv4Hdr, L4_OFF, TcpHdr, UdpHdr, ptr_at};

/// The tuple a packet leaves with. Addresses and ports in network order.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

#[inline(always)]
fn add32(sum: u32, old: u32, new: u32) -> u32 {
    sum + (!old & 0xffff) + ((!old) >> 16) + (new & 0xffff) + (new >> 16)
}

#[inline(always)]
fn add16(sum: u32, old: u16, new: u16) -> u32 {
    sum + (!old) as u32 + new as u32
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Rewrites the IPv4 and TCP/UDP headers of the frame from `old` to `new`,
/// and, with `dec_ttl`, decrements the TTL (the caller checked it is > 1).
/// Returns `None` only if the headers are no longer in bounds, which
/// `parse` already ruled out: the check is for the verifier.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, proto: u8, old: &Tuple, new: &Tuple, dec_ttl: bool) -> Option<()> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    unsafe {
        let mut sum = (!(*ip).check) as u32 & 0xffff;
        sum = add32(sum, old.saddr, new.saddr);
        sum = add32(sum, old.daddr, new.daddr);
        if dec_ttl {
            // TTL shares a 16-bit word with the protocol byte.
            let ttl = (*ip).ttl;
            let old_word = u16::from_ne_bytes([ttl, (*ip).proto]);
            let new_word = u16::from_ne_bytes([ttl - 1, (*ip).proto]);
            sum = add16(sum, old_word, new_word);
            (*ip).ttl = ttl - 1;
        }
        (*ip).check = !fold(sum);
        (*ip).saddr = new.saddr;
        (*ip).daddr = new.daddr;
    }
    // The L4 checksum covers the pseudo-header addresses and the ports.
    let mut l4 = 0u32;
    l4 = add32(l4, old.saddr, new.saddr);
    l4 = add32(l4, old.daddr, new.daddr);
    l4 = add16(l4, old.sport, new.sport);
    l4 = add16(l4, old.dport, new.dport);
    if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF)?;
        unsafe {
            let sum = l4 + ((!(*tcp).check) as u32 & 0xffff);
            (*tcp).check = !fold(sum);
            (*tcp).sport = new.sport;
            (*tcp).dport = new.dport;
        }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, L4_OFF)?;
        unsafe {
            // A zero UDP checksum means "none" (IPv4 only) and stays zero.
            if (*udp).check != 0 {
                let c = !fold(l4 + ((!(*udp).check) as u32 & 0xffff));
                (*udp).check = if c == 0 { 0xffff } else { c };
            }
            (*udp).sport = new.sport;
            (*udp).dport = new.dport;
        }
    }
    Some(())
}
