//! A tiny Ethernet / IPv4 / TCP / UDP packet builder and an independent
//! checksum verifier, for exact packet-in / packet-out tests of the kernel
//! program.
//!
//! Every checksum here is computed from scratch over the whole header or
//! segment (RFC 1071), never incrementally, so an expected frame built with
//! [`Packet::build`] checks the kernel's incremental updates (RFC 1624)
//! independently. The builder can also produce the malformed shapes the
//! parser must reject: a chosen IHL, IP options, fragments, and frames cut
//! short at any byte.
//!
//! ```
//! use splitter_tests::packet::{Packet, verify_checksums, TCP_SYN};
//! let syn = Packet::tcp("10.0.1.2:40000".parse().unwrap(), "10.0.0.10:80".parse().unwrap(), TCP_SYN)
//!     .build();
//! assert_eq!(syn.len(), 14 + 20 + 20);
//! verify_checksums(&syn).unwrap();
//! let view = splitter_tests::packet::parse(&syn).unwrap();
//! assert_eq!(view.dport, Some(80));
//! ```
use std::net::{Ipv4Addr, SocketAddrV4};

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// TCP flag FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP flag SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag RST.
pub const TCP_RST: u8 = 0x04;
/// TCP flag PSH.
pub const TCP_PSH: u8 = 0x08;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options.
pub const IPV4_LEN: usize = 20;
/// TCP header length without options.
pub const TCP_LEN: usize = 20;
/// UDP header length.
pub const UDP_LEN: usize = 8;

/// Default source MAC of built frames (a locally administered address).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Default destination MAC of built frames.
pub const EDGE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xee];

/// The RFC 1071 Internet checksum of `data`: the one's-complement of the
/// one's-complement sum of its big-endian 16-bit words (an odd last byte is
/// padded with zero). Returned in host order; write it with `to_be_bytes`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data))
}

/// One's-complement sum of the big-endian 16-bit words of `data`, unfolded.
fn sum_words(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

/// Folds the carries back in (end-around carry) down to 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The TCP/UDP pseudo-header of RFC 793 / RFC 768 followed by the segment.
fn with_pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + segment.len());
    v.extend_from_slice(&src.octets());
    v.extend_from_slice(&dst.octets());
    v.push(0);
    v.push(proto);
    v.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    v.extend_from_slice(segment);
    v
}

/// The transport part of a [`Packet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number.
        ack: u32,
        /// `TCP_*` flags.
        flags: u8,
        /// Receive window.
        window: u16,
        /// TCP options (padded with zeros to a 4-byte multiple).
        options: Vec<u8>,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A UDP datagram.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Payload.
        payload: Vec<u8>,
        /// Send checksum 0 ("no checksum", RFC 768) instead of computing it.
        zero_checksum: bool,
    },
    /// Any other protocol: these bytes follow the IP header verbatim.
    Raw {
        /// IP protocol number.
        proto: u8,
        /// Bytes after the IP header.
        bytes: Vec<u8>,
    },
}

/// An Ethernet + IPv4 + TCP/UDP frame under construction. Fields are public
/// so a test can change anything; the setters below cover the usual cases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Destination MAC.
    pub eth_dst: [u8; 6],
    /// Source MAC.
    pub eth_src: [u8; 6],
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Type of service byte.
    pub tos: u8,
    /// Identification.
    pub id: u16,
    /// Time to live.
    pub ttl: u8,
    /// Don't-fragment flag.
    pub dont_fragment: bool,
    /// More-fragments flag.
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units (13 bits).
    pub fragment_offset: u16,
    /// IHL to write instead of the true header length (for malformed
    /// headers). The checksum still covers the bytes actually written.
    pub ihl_override: Option<u8>,
    /// IP options (padded with zeros to a 4-byte multiple).
    pub ip_options: Vec<u8>,
    /// The transport part.
    pub l4: L4,
    /// Cut the finished frame to this many bytes (after all checksums).
    pub truncate: Option<usize>,
}

impl Packet {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            eth_dst: EDGE_MAC,
            eth_src: CLIENT_MAC,
            src,
            dst,
            tos: 0,
            id: 0x1234,
            ttl: 64,
            dont_fragment: true,
            more_fragments: false,
            fragment_offset: 0,
            ihl_override: None,
            ip_options: Vec::new(),
            l4,
            truncate: None,
        }
    }

    /// A TCP segment without payload, `seq` 1000, `ack` 0 (2000 if `ACK` is set).
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        let ack = if flags & TCP_ACK != 0 { 2000 } else { 0 };
        Self::new(
            *src.ip(),
            *dst.ip(),
            L4::Tcp {
                sport: src.port(),
                dport: dst.port(),
                seq: 1000,
                ack,
                flags,
                window: 64240,
                options: Vec::new(),
                payload: Vec::new(),
            },
        )
    }

    /// A UDP datagram with a computed checksum.
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self::new(
            *src.ip(),
            *dst.ip(),
            L4::Udp {
                sport: src.port(),
                dport: dst.port(),
                payload: payload.to_vec(),
                zero_checksum: false,
            },
        )
    }

    /// An IPv4 packet of another protocol carrying `bytes`.
    pub fn raw(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, bytes: &[u8]) -> Self {
        Self::new(
            src,
            dst,
            L4::Raw {
                proto,
                bytes: bytes.to_vec(),
            },
        )
    }

    /// Sets the MACs.
    pub fn macs(mut self, dst: [u8; 6], src: [u8; 6]) -> Self {
        self.eth_dst = dst;
        self.eth_src = src;
        self
    }

    /// Sets source and destination (addresses and ports).
    pub fn endpoints(mut self, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        self.src = *src.ip();
        self.dst = *dst.ip();
        match &mut self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => {
                *sport = src.port();
                *dport = dst.port();
            }
            L4::Raw { .. } => {}
        }
        self
    }

    /// Sets the TTL.
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the IP identification.
    pub fn ip_id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    /// Sets the type-of-service byte.
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    /// Writes `ihl` into the header instead of the true length.
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl_override = Some(ihl);
        self
    }

    /// Adds IP options (padded to a 4-byte multiple; the IHL follows).
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        self.ip_options = options.to_vec();
        self
    }

    /// Makes this a fragment: `offset` in 8-byte units, and the MF flag.
    /// Clears DF.
    pub fn fragment(mut self, offset: u16, more_fragments: bool) -> Self {
        self.fragment_offset = offset;
        self.more_fragments = more_fragments;
        self.dont_fragment = false;
        self
    }

    /// Cuts the finished frame to `len` bytes.
    pub fn truncate(mut self, len: usize) -> Self {
        self.truncate = Some(len);
        self
    }

    /// Sets the TCP or UDP payload.
    pub fn payload(mut self, data: &[u8]) -> Self {
        match &mut self.l4 {
            L4::Tcp { payload, .. } | L4::Udp { payload, .. } => *payload = data.to_vec(),
            L4::Raw { bytes, .. } => *bytes = data.to_vec(),
        }
        self
    }

    /// Sets TCP sequence and acknowledgment numbers (no-op for UDP).
    pub fn seq_ack(mut self, seq_v: u32, ack_v: u32) -> Self {
        if let L4::Tcp { seq, ack, .. } = &mut self.l4 {
            *seq = seq_v;
            *ack = ack_v;
        }
        self
    }

    /// Sets TCP options, e.g. `[2, 4, 0x05, 0xb4]` for MSS 1460 (no-op for UDP).
    pub fn tcp_options(mut self, opts: &[u8]) -> Self {
        if let L4::Tcp { options, .. } = &mut self.l4 {
            *options = opts.to_vec();
        }
        self
    }

    /// Sends UDP checksum 0 ("none") instead of computing it.
    pub fn udp_zero_checksum(mut self) -> Self {
        if let L4::Udp { zero_checksum, .. } = &mut self.l4 {
            *zero_checksum = true;
        }
        self
    }

    /// The IP protocol number of the transport part.
    pub fn protocol(&self) -> u8 {
        match &self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    /// The transport bytes with a freshly computed checksum.
    fn l4_bytes(&self) -> Vec<u8> {
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                window,
                options,
                payload,
            } => {
                let opts = pad4(options);
                let doff = ((TCP_LEN + opts.len()) / 4) as u8;
                let mut s = Vec::with_capacity(TCP_LEN + opts.len() + payload.len());
                s.extend_from_slice(&sport.to_be_bytes());
                s.extend_from_slice(&dport.to_be_bytes());
                s.extend_from_slice(&seq.to_be_bytes());
                s.extend_from_slice(&ack.to_be_bytes());
                s.push(doff << 4);
                s.push(*flags);
                s.extend_from_slice(&window.to_be_bytes());
                s.extend_from_slice(&[0, 0]); // checksum, below
                s.extend_from_slice(&[0, 0]); // urgent pointer
                s.extend_from_slice(&opts);
                s.extend_from_slice(payload);
                let c = internet_checksum(&with_pseudo_header(self.src, self.dst, IPPROTO_TCP, &s));
                s[16..18].copy_from_slice(&c.to_be_bytes());
                s
            }
            L4::Udp {
                sport,
                dport,
                payload,
                zero_checksum,
            } => {
                let len = (UDP_LEN + payload.len()) as u16;
                let mut s = Vec::with_capacity(len as usize);
                s.extend_from_slice(&sport.to_be_bytes());
                s.extend_from_slice(&dport.to_be_bytes());
                s.extend_from_slice(&len.to_be_bytes());
                s.extend_from_slice(&[0, 0]);
                s.extend_from_slice(payload);
                if !zero_checksum {
                    let c =
                        internet_checksum(&with_pseudo_header(self.src, self.dst, IPPROTO_UDP, &s));
                    // RFC 768: a computed 0 is sent as all ones.
                    let c = if c == 0 { 0xffff } else { c };
                    s[6..8].copy_from_slice(&c.to_be_bytes());
                }
                s
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }

    /// The finished frame, all checksums computed from scratch.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let opts = pad4(&self.ip_options);
        let hlen = IPV4_LEN + opts.len();
        let ihl = self.ihl_override.unwrap_or((hlen / 4) as u8);
        let tot_len = (hlen + l4.len()) as u16;
        let frag = (u16::from(self.dont_fragment) << 14)
            | (u16::from(self.more_fragments) << 13)
            | (self.fragment_offset & 0x1fff);

        let mut f = Vec::with_capacity(ETH_LEN + tot_len as usize);
        f.extend_from_slice(&self.eth_dst);
        f.extend_from_slice(&self.eth_src);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let ip_start = f.len();
        f.push(0x40 | (ihl & 0x0f));
        f.push(self.tos);
        f.extend_from_slice(&tot_len.to_be_bytes());
        f.extend_from_slice(&self.id.to_be_bytes());
        f.extend_from_slice(&frag.to_be_bytes());
        f.push(self.ttl);
        f.push(self.protocol());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&opts);
        let c = internet_checksum(&f[ip_start..ip_start + hlen]);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&l4);
        if let Some(n) = self.truncate {
            f.truncate(n);
        }
        f
    }
}

fn pad4(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    v.resize(b.len().div_ceil(4) * 4, 0);
    v
}

/// An ARP request (`who-has target tell sender`) in an Ethernet broadcast.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target_ip.octets());
    f
}

/// The fields of a frame a test needs to read back (for example the SNAT
/// port the kernel chose). `None` where the frame does not hold the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// Destination MAC.
    pub eth_dst: [u8; 6],
    /// Source MAC.
    pub eth_src: [u8; 6],
    /// EtherType.
    pub ethertype: u16,
    /// IPv4 source.
    pub src: Option<Ipv4Addr>,
    /// IPv4 destination.
    pub dst: Option<Ipv4Addr>,
    /// TTL.
    pub ttl: Option<u8>,
    /// IP protocol.
    pub proto: Option<u8>,
    /// TCP/UDP source port.
    pub sport: Option<u16>,
    /// TCP/UDP destination port.
    pub dport: Option<u16>,
    /// TCP flags.
    pub tcp_flags: Option<u8>,
}

impl View {
    /// Source address and port, if both are present.
    pub fn source(&self) -> Option<SocketAddrV4> {
        Some(SocketAddrV4::new(self.src?, self.sport?))
    }

    /// Destination address and port, if both are present.
    pub fn destination(&self) -> Option<SocketAddrV4> {
        Some(SocketAddrV4::new(self.dst?, self.dport?))
    }
}

/// Reads the Ethernet, IPv4 and TCP/UDP fields that are present.
///
/// # Errors
/// A frame shorter than an Ethernet header.
pub fn parse(frame: &[u8]) -> Result<View, String> {
    if frame.len() < ETH_LEN {
        return Err(format!(
            "frame of {} bytes has no Ethernet header",
            frame.len()
        ));
    }
    let mut v = View {
        eth_dst: mac(&frame[0..6]),
        eth_src: mac(&frame[6..12]),
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        src: None,
        dst: None,
        ttl: None,
        proto: None,
        sport: None,
        dport: None,
        tcp_flags: None,
    };
    let ip = &frame[ETH_LEN..];
    if v.ethertype != ETH_P_IP || ip.len() < IPV4_LEN {
        return Ok(v);
    }
    v.ttl = Some(ip[8]);
    v.proto = Some(ip[9]);
    v.src = Some(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
    v.dst = Some(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    let first_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
    if hlen < IPV4_LEN || !first_fragment {
        return Ok(v);
    }
    let l4 = ip.get(hlen..).unwrap_or_default();
    if l4.len() >= 4 && (ip[9] == IPPROTO_TCP || ip[9] == IPPROTO_UDP) {
        v.sport = Some(u16::from_be_bytes([l4[0], l4[1]]));
        v.dport = Some(u16::from_be_bytes([l4[2], l4[3]]));
    }
    if ip[9] == IPPROTO_TCP && l4.len() >= 14 {
        v.tcp_flags = Some(l4[13]);
    }
    Ok(v)
}

fn mac(b: &[u8]) -> [u8; 6] {
    let mut m = [0; 6];
    m.copy_from_slice(b);
    m
}

/// Checks every checksum of an Ethernet/IPv4 frame from scratch: the IPv4
/// header checksum, and for an unfragmented TCP or UDP packet the transport
/// checksum over the pseudo-header and the whole segment (as long as
/// `tot_len` says). A UDP checksum of 0 ("none") is accepted. Non-IPv4
/// frames pass trivially.
///
/// # Errors
/// A description of the first problem: a header cut short, an inconsistent
/// length, or a checksum that does not sum to `0xffff`.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let view = parse(frame)?;
    if view.ethertype != ETH_P_IP {
        return Ok(());
    }
    let ip = &frame[ETH_LEN..];
    if ip.len() < IPV4_LEN {
        return Err(format!("IPv4 header cut short: {} bytes", ip.len()));
    }
    if ip[0] >> 4 != 4 {
        return Err(format!("IP version {} is not 4", ip[0] >> 4));
    }
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    if hlen < IPV4_LEN || hlen > ip.len() {
        return Err(format!(
            "IHL {} does not fit a {}-byte packet",
            hlen / 4,
            ip.len()
        ));
    }
    let ip_sum = fold(sum_words(&ip[..hlen]));
    if ip_sum != 0xffff {
        return Err(format!(
            "IPv4 header checksum {:#06x} is wrong (should be {:#06x})",
            u16::from_be_bytes([ip[10], ip[11]]),
            expected_field(&ip[..hlen], 10)
        ));
    }
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if tot_len < hlen || tot_len > ip.len() {
        return Err(format!(
            "tot_len {tot_len} does not fit {} bytes of IP packet",
            ip.len()
        ));
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        // A fragment's transport checksum covers the reassembled datagram.
        return Ok(());
    }
    let (src, dst) = (
        view.src.unwrap_or(Ipv4Addr::UNSPECIFIED),
        view.dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
    );
    let seg = &ip[hlen..tot_len];
    let (name, check_at, min) = match ip[9] {
        IPPROTO_TCP => ("TCP", 16, TCP_LEN),
        IPPROTO_UDP => ("UDP", 6, UDP_LEN),
        _ => return Ok(()),
    };
    if seg.len() < min {
        return Err(format!("{name} header cut short: {} bytes", seg.len()));
    }
    if ip[9] == IPPROTO_UDP {
        let ulen = usize::from(u16::from_be_bytes([seg[4], seg[5]]));
        if ulen != seg.len() {
            return Err(format!(
                "UDP length {ulen} differs from the IP payload {}",
                seg.len()
            ));
        }
        if seg[6..8] == [0, 0] {
            return Ok(());
        }
    }
    let pseudo = with_pseudo_header(src, dst, ip[9], seg);
    if fold(sum_words(&pseudo)) != 0xffff {
        return Err(format!(
            "{name} checksum {:#06x} is wrong (should be {:#06x})",
            u16::from_be_bytes([seg[check_at], seg[check_at + 1]]),
            expected_field(&pseudo, 12 + check_at)
        ));
    }
    Ok(())
}

/// The value a checksum field at `at` should hold, for error messages.
fn expected_field(data: &[u8], at: usize) -> u16 {
    let mut d = data.to_vec();
    d[at] = 0;
    d[at + 1] = 0;
    internet_checksum(&d)
}

/// A readable description of where two frames differ (offset, field name
/// for the usual Ethernet/IPv4/L4 layout, both bytes), for assertion
/// messages. Empty if they are equal.
pub fn diff(actual: &[u8], expected: &[u8]) -> String {
    let mut out = String::new();
    if actual.len() != expected.len() {
        out.push_str(&format!(
            "length {} != expected {}\n",
            actual.len(),
            expected.len()
        ));
    }
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        if a != e {
            out.push_str(&format!(
                "  byte {i:3} ({}): {a:#04x} != expected {e:#04x}\n",
                field_name(i)
            ));
        }
    }
    out
}

fn field_name(off: usize) -> &'static str {
    match off {
        0..=5 => "eth dst",
        6..=11 => "eth src",
        12..=13 => "ethertype",
        14 => "ip ver/ihl",
        15 => "ip tos",
        16..=17 => "ip tot_len",
        18..=19 => "ip id",
        20..=21 => "ip frag",
        22 => "ip ttl",
        23 => "ip proto",
        24..=25 => "ip check",
        26..=29 => "ip saddr",
        30..=33 => "ip daddr",
        34..=35 => "l4 sport",
        36..=37 => "l4 dport",
        38..=39 => "l4 (udp len / tcp seq)",
        40..=41 => "l4 (udp check / tcp seq)",
        50..=51 => "tcp check",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_words(&data)), 0xddf2);
        assert_eq!(internet_checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A textbook header (Wikipedia "IPv4 header checksum") with checksum b861.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&hdr), 0xb861);
    }

    #[test]
    fn built_frames_verify_and_corruption_is_caught() {
        let tcp = Packet::tcp(sa("10.0.1.2:40000"), sa("10.0.0.10:80"), TCP_SYN)
            .tcp_options(&[2, 4, 5, 0xb4])
            .payload(b"abc")
            .build();
        assert_eq!(verify_checksums(&tcp), Ok(()));
        let udp = Packet::udp(sa("10.0.1.2:5000"), sa("10.0.0.53:53"), b"hello").build();
        assert_eq!(verify_checksums(&udp), Ok(()));
        let opts = Packet::tcp(sa("1.2.3.4:1"), sa("5.6.7.8:2"), TCP_ACK)
            .ip_options(&[1, 1, 1])
            .build();
        assert_eq!(opts[14], 0x46);
        assert_eq!(verify_checksums(&opts), Ok(()));
        for (frame, at) in [(&tcp, 26), (&tcp, 60), (&udp, 36), (&udp, 45)] {
            let mut bad = frame.clone();
            bad[at] ^= 0x40;
            assert!(verify_checksums(&bad).is_err(), "flip at {at} not caught");
        }
    }

    #[test]
    fn zero_udp_checksum_is_kept_and_accepted() {
        let udp = Packet::udp(sa("10.0.1.2:5000"), sa("10.0.0.53:53"), b"x")
            .udp_zero_checksum()
            .build();
        assert_eq!(&udp[40..42], &[0, 0]);
        assert_eq!(verify_checksums(&udp), Ok(()));
    }

    #[test]
    fn malformed_shapes() {
        let base = Packet::tcp(sa("10.0.1.2:40000"), sa("10.0.0.10:80"), TCP_SYN);
        assert_eq!(base.clone().ihl(4).build()[14], 0x44);
        let frag = base.clone().fragment(185, true).build();
        assert_eq!(&frag[20..22], &[0x20, 185]);
        assert_eq!(base.clone().truncate(30).build().len(), 30);
        let v = parse(&base.build()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.source(), Some(sa("10.0.1.2:40000")));
        assert_eq!(v.tcp_flags, Some(TCP_SYN));
    }
}
