//! Many idle clients: what holding them costs a pooler in memory.
//!
//! Opens `n` connections that complete the startup handshake (trust auth)
//! and then sit idle, as an application's connection pool does between
//! requests, and reads the pooler's resident set size from /proc.

use std::io::{Read, Write};
use std::net::TcpStream;

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// A StartupMessage for `user` into database `db` (protocol 3.0).
fn startup(user: &str, db: &str) -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// Opens `n` clients to 127.0.0.1:`port` and logs each in (until its first
/// ReadyForQuery); returns them, idle.
pub fn open_idle_clients(
    port: u16,
    user: &str,
    db: &str,
    n: usize,
) -> Result<Vec<TcpStream>, String> {
    let hello = startup(user, db);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s =
            TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("client {i}: {e}"))?;
        s.write_all(&hello)
            .map_err(|e| format!("client {i}: {e}"))?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        // ReadyForQuery, idle: 'Z', length 5, 'I'.
        while !seen.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
            let k = s.read(&mut buf).map_err(|e| format!("client {i}: {e}"))?;
            if k == 0 {
                return Err(format!(
                    "client {i}: closed during login: {:?}",
                    String::from_utf8_lossy(&seen)
                ));
            }
            seen.extend_from_slice(&buf[..k]);
        }
        conns.push(s);
    }
    Ok(conns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_message_is_length_prefixed_protocol_3() {
        let m = startup("u", "d");
        assert_eq!(
            u32::from_be_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(&m[4..8], &[0, 3, 0, 0]);
        assert!(m.ends_with(b"database\0d\0\0"));
    }

    #[test]
    fn own_rss_is_positive() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
