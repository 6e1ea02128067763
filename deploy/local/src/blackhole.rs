//! Cutting the network to one loopback port, for tests of peers that vanish
//! without a FIN or RST (power-off, partition): iptables DROP rules on `lo`
//! for packets to and from the port, removed again when the guard drops,
//! also when the test panics.
//!
//! Only ever used on the harness's own free ports (see `ports`), so the
//! rules cut no traffic of another test. Needs root and the iptables
//! binary. May run: `iptables`.

use std::path::PathBuf;
use std::process::Command;

use crate::Error;

/// Packets to and from a loopback TCP port are dropped while this lives.
#[derive(Debug)]
pub struct Blackhole {
    iptables: PathBuf,
    port: u16,
    /// The rules inserted so far: `--dport` and `--sport`.
    rules: Vec<&'static str>,
}

impl Blackhole {
    /// Drops every TCP packet on `lo` to or from `port` until dropped.
    /// Established connections through the port see their peer vanish.
    pub fn port(port: u16) -> Result<Blackhole, Error> {
        let mut hole = Blackhole {
            iptables: crate::etcd::which("iptables")?,
            port,
            rules: Vec::new(),
        };
        for dir in ["--dport", "--sport"] {
            // On failure the rules inserted so far go with `hole`.
            hole.run("-I", dir)?;
            hole.rules.push(dir);
        }
        Ok(hole)
    }

    /// `iptables -w <action> INPUT -i lo -p tcp <dir> <port> -j DROP`.
    fn run(&self, action: &str, dir: &str) -> Result<(), Error> {
        let port = self.port.to_string();
        let args = ["-w", action, "INPUT", "-i", "lo", "-p", "tcp", dir, &port];
        let what = format!("iptables {} -j DROP", args.join(" "));
        let out = Command::new(&self.iptables)
            .args(args)
            .args(["-j", "DROP"])
            .output()
            .map_err(Error::io(format!("run {what}")))?;
        if out.status.success() {
            return Ok(());
        }
        Err(Error::Command {
            what,
            detail: format!(
                "{} (blackholing a port needs root and a working iptables): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        for dir in std::mem::take(&mut self.rules) {
            if let Err(e) = self.run("-D", dir) {
                eprintln!(
                    "pgha-local: could not lift the blackhole on port {}: {e}",
                    self.port
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn rules_for(port: u16) -> usize {
        let out = Command::new(crate::etcd::which("iptables").unwrap())
            .args(["-w", "-S", "INPUT"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&format!("port {port} ")))
            .count()
    }

    #[test]
    fn a_blackholed_port_drops_traffic_and_the_rules_go_with_the_guard() {
        let reserved = crate::reserve_port().unwrap();
        let listener = TcpListener::bind(("127.0.0.1", reserved.get())).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();

        let hole = Blackhole::port(reserved.get()).unwrap();
        assert_eq!(rules_for(reserved.get()), 2);
        server.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        assert!(
            client.read(&mut byte).is_err(),
            "a byte crossed the blackhole"
        );

        drop(hole);
        assert_eq!(rules_for(reserved.get()), 0, "the rules must be removed");
        // The byte held back is retransmitted once the path is open again.
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(client.read(&mut byte).unwrap(), 1);
    }
}
