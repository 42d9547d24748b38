//! Ethernet, IPv4, TCP and UDP header layouts and the offsets of an IPv4
//! frame without options. Fixed by the protocols, so shared: the splitter
//! program uses them through `parse`, the reference
//! programs of `cargo xtask bench` through `bench-ebpf/src/reference.rs`
//! (which includes this file by path and shares nothing else with the
//! splitter).

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
/// IPv4 without options: the only layout forwarded for a VIP.
pub const L4_OFF: usize = ETH_LEN + IPV4_LEN;
pub const ETH_P_IP: u16 = 0x0800;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub proto: u16,
}

#[repr(C)]
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

#[repr(C)]
pub struct UdpHdr {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub check: u16,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
