//! Free loopback ports that no other test process can take.
//!
//! Binding port 0 and closing the socket races with every other test process
//! doing the same, and with outgoing connections that the kernel gives
//! ephemeral ports from the same range. So ports are drawn at random from
//! below Linux's ephemeral range (32768+), checked by binding, and claimed
//! with an exclusive lock on a file named after the port in a directory
//! shared by all users. The lock lives as long as the [`Port`], so two
//! harnesses in different processes never hand out the same port.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::Error;

/// Ports this process reserved and handed over by number (see
/// [`Port::hand_over`]), still locked until [`claim_port`] takes them back.
static HANDED_OVER: Mutex<Option<HashMap<u16, Port>>> = Mutex::new(None);

const RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A reserved loopback port; released when dropped.
#[derive(Debug)]
pub struct Port {
    port: u16,
    _lock: File,
}

impl Port {
    pub fn get(&self) -> u16 {
        self.port
    }

    /// Keeps the port locked for this process and returns its number, for
    /// code that plans ports by number before it starts the servers: the
    /// next [`claim_port`] of that number in this process takes the lock
    /// over, so no other harness can grab the port in between.
    pub fn hand_over(self) -> u16 {
        let port = self.port;
        let mut held = HANDED_OVER.lock().unwrap_or_else(|e| e.into_inner());
        held.get_or_insert_with(HashMap::new).insert(port, self);
        port
    }
}

fn lock_dir() -> Result<PathBuf, Error> {
    let dir = std::env::temp_dir().join("pgha-ports");
    if !dir.exists() {
        fs::create_dir_all(&dir).map_err(Error::io(format!("create {dir:?}")))?;
        // Shared by every user that runs tests here (sticky, like /tmp).
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777));
    }
    Ok(dir)
}

/// Claims a specific port (for `pgha up`, whose ports must stay the same
/// across runs): fails if another harness holds it or something listens there.
pub fn claim_port(port: u16) -> Result<Port, Error> {
    let handed = HANDED_OVER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .and_then(|held| held.remove(&port));
    if let Some(held) = handed {
        return Ok(held);
    }
    let path = lock_dir()?.join(port.to_string());
    let busy = |why: &str| Error::Command {
        what: format!("claim port {port}"),
        detail: why.to_owned(),
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::io(format!("open {path:?}")))?;
    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o666));
    file.try_lock()
        .map_err(|_| busy("held by another pgha process on this machine"))?;
    TcpListener::bind(("127.0.0.1", port))
        .map_err(|e| busy(&format!("cannot bind 127.0.0.1:{port}: {e}")))?;
    Ok(Port { port, _lock: file })
}

/// Reserves a free port on 127.0.0.1.
pub fn reserve_port() -> Result<Port, Error> {
    let dir = lock_dir()?;
    let seed = RandomState::new();
    for attempt in 0u64..1000 {
        let span = u64::from(RANGE.end - RANGE.start);
        let port = RANGE.start + (seed.hash_one(attempt) % span) as u16;
        let path = dir.join(port.to_string());
        let Ok(file) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o666));
        if file.try_lock().is_err() {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(Port { port, _lock: file });
        }
    }
    Err(Error::Command {
        what: "reserve a free port".into(),
        detail: format!("no free port in {RANGE:?} after 1000 attempts"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_distinct_and_bindable() {
        let ports: Vec<Port> = (0..50).map(|_| reserve_port().unwrap()).collect();
        let mut nums: Vec<u16> = ports.iter().map(Port::get).collect();
        nums.sort_unstable();
        nums.dedup();
        assert_eq!(nums.len(), 50);
        for p in &ports {
            TcpListener::bind(("127.0.0.1", p.get())).unwrap();
        }
    }

    #[test]
    fn a_claimed_port_cannot_be_claimed_twice() {
        let free = reserve_port().unwrap();
        let n = free.get();
        drop(free);
        let first = claim_port(n).unwrap();
        assert!(claim_port(n).is_err());
        drop(first);
        let listener = TcpListener::bind(("127.0.0.1", n)).unwrap();
        let e = claim_port(n).unwrap_err().to_string();
        assert!(e.contains(&format!("cannot bind 127.0.0.1:{n}")), "{e}");
        drop(listener);
    }

    #[test]
    fn a_handed_over_port_stays_locked_until_claimed_back() {
        let n = reserve_port().unwrap().hand_over();
        let lock = lock_dir().unwrap().join(n.to_string());
        let other = File::open(&lock).unwrap();
        assert!(
            other.try_lock().is_err(),
            "a handed-over port must stay locked"
        );
        let claimed = claim_port(n).unwrap();
        assert_eq!(claimed.get(), n);
        assert!(other.try_lock().is_err(), "the claim keeps the lock");
        drop(claimed);
        assert!(other.try_lock().is_ok(), "dropping the claim releases it");
    }

    #[test]
    fn a_held_port_is_not_handed_out_again_until_dropped() {
        let held = reserve_port().unwrap();
        let lock = lock_dir().unwrap().join(held.get().to_string());
        let other = File::open(&lock).unwrap();
        assert!(other.try_lock().is_err(), "lock must be exclusive");
        drop(held);
        assert!(other.try_lock().is_ok(), "lock must be released on drop");
    }
}
