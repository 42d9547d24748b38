//! systemd integration without libsystemd: `sd_notify` datagrams to
//! `$NOTIFY_SOCKET` (READY, STATUS, WATCHDOG, RELOADING, STOPPING) and the
//! watchdog interval from `$WATCHDOG_USEC`. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op.
use std::{
    os::unix::net::{SocketAddr, UnixDatagram},
    time::Duration,
};

/// Sends one notification (several `KEY=value` lines). Returns whether a
/// socket was there to send to; errors are logged, never fatal.
pub fn notify(message: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(&path)
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(message.as_bytes(), &a));
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(socket = %path, error = %e, "sd_notify failed");
            false
        }
    }
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, when the
/// watchdog is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim() != std::process::id().to_string()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("splitter-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only one touching NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        assert!(notify("READY=1\nSTATUS=testing"));
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=testing");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert!(!notify("READY=1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
