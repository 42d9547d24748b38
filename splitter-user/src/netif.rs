//! Network interfaces as the controller needs them: does an interface
//! exist (its index), and what is its first IPv4 address (the default SNAT
//! source).
use std::{ffi::CString, net::Ipv4Addr};

/// Interface look-up errors.
#[derive(Debug, thiserror::Error)]
pub enum NetifError {
    /// No interface of that name in this network namespace.
    #[error("interface `{0}` does not exist (in this network namespace); check `ip link`")]
    Missing(String),
    /// The interface has no IPv4 address to use as SNAT source.
    #[error("interface `{0}` has no IPv4 address; set dataplane.snat_address or add an address")]
    NoAddress(String),
    /// `getifaddrs` failed.
    #[error("getifaddrs failed: {0}")]
    Sys(#[source] std::io::Error),
}

/// Index of the interface `name`.
///
/// # Errors
/// [`NetifError::Missing`] when it does not exist.
pub fn ifindex(name: &str) -> Result<u32, NetifError> {
    let c = CString::new(name).map_err(|_| NetifError::Missing(name.to_string()))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(NetifError::Missing(name.to_string()))
    } else {
        Ok(idx)
    }
}

/// First IPv4 address configured on `name`.
///
/// # Errors
/// [`NetifError::Missing`] or [`NetifError::NoAddress`].
pub fn first_ipv4(name: &str) -> Result<Ipv4Addr, NetifError> {
    ifindex(name)?;
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(NetifError::Sys(std::io::Error::last_os_error()));
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` walks the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: non-null C string from the kernel.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: non-null sockaddr.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        if ifname.to_bytes() == name.as_bytes() && family == libc::AF_INET {
            // SAFETY: AF_INET means the sockaddr is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            break;
        }
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    found.ok_or_else(|| NetifError::NoAddress(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_exists_and_has_127_0_0_1() {
        assert!(ifindex("lo").is_ok());
        assert_eq!(first_ipv4("lo").ok(), Some(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn missing_interface_is_named_in_the_error() {
        let err = ifindex("nosuchif0")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("nosuchif0"), "{err}");
    }
}
