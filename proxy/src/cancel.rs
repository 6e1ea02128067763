//! CancelRequest routing: each client gets the proxy's own key, mapped to
//! the backend connection running that client's query right now.
//!
//! A session publishes its server's key while it holds the connection and
//! clears it before giving the connection back, so a late cancel is dropped
//! instead of hitting the next client's query. A cancel for a client that
//! still waits for a server wakes that wait. May call: `server` (to send the
//! cancel), tokio sync.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;
use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::lock;
use crate::router::Backend;

/// The backend and its BackendKeyData.
type Target = (Arc<Backend>, (i32, i32));

/// What one client's cancel key points at. Attaching and detaching, twice
/// per transaction, are an atomic store each: the backend, which changes
/// only when the client moves to another one, is kept apart from the key.
#[derive(Debug, Default)]
pub struct CancelSlot {
    /// The attached server's BackendKeyData (see [`pack`]); 0: none.
    key: AtomicU64,
    /// The backend of the last server attached.
    backend: Mutex<Option<Arc<Backend>>>,
    /// Where `backend`'s `Backend` lives, so attaching to the same one
    /// again takes no lock. Written by the session only, under the lock;
    /// the Arc held in `backend` keeps the address from being reused.
    backend_at: AtomicUsize,
    /// Signalled when a cancel arrives while no server is attached.
    pub waiting: Notify,
}

/// A key as one word: the process id high, the secret low. Never 0 for a
/// key PostgreSQL hands out (process ids are positive).
fn pack((pid, secret): (i32, i32)) -> u64 {
    (u64::from(pid as u32) << 32) | u64::from(secret as u32)
}

fn unpack(k: u64) -> (i32, i32) {
    ((k >> 32) as u32 as i32, k as u32 as i32)
}

impl CancelSlot {
    /// The client now runs on this server connection.
    pub fn attach(&self, backend: &Arc<Backend>, key: (i32, i32)) {
        let at = Arc::as_ptr(backend) as usize;
        if self.backend_at.load(Ordering::Relaxed) != at {
            *lock(&self.backend) = Some(backend.clone());
            self.backend_at.store(at, Ordering::Relaxed);
        }
        self.key.store(pack(key), Ordering::Release);
    }

    /// The client released its server connection.
    pub fn detach(&self) {
        self.key.store(0, Ordering::Release);
    }

    /// The server running the client's query now. `None` also when the
    /// key changed while the backend was read: that query is over, and
    /// a cancel now would be late.
    fn target(&self) -> Option<Target> {
        let key = self.key.load(Ordering::Acquire);
        if key == 0 {
            return None;
        }
        let backend = lock(&self.backend).clone()?;
        (self.key.load(Ordering::Acquire) == key).then(|| (backend, unpack(key)))
    }
}

/// Every connected client's cancel key.
#[derive(Debug, Default)]
pub struct Cancels {
    /// FxHash, not SipHash: the proxy draws the keys at random itself, and
    /// a client can only look one up, never insert one.
    slots: Mutex<FxHashMap<(i32, i32), Arc<CancelSlot>>>,
}

/// Removes the client's key when the session ends.
#[derive(Debug)]
pub struct Registration {
    cancels: Arc<Cancels>,
    pub key: (i32, i32),
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.cancels.slots).remove(&self.key);
    }
}

impl Cancels {
    /// A fresh random key for a new client.
    pub fn register(self: &Arc<Self>) -> Registration {
        let slot = Arc::new(CancelSlot::default());
        let mut rng = rand::thread_rng();
        let mut slots = lock(&self.slots);
        let key = loop {
            let k = (rng.gen_range(1..i32::MAX), rng.gen());
            if !slots.contains_key(&k) {
                break k;
            }
        };
        slots.insert(key, slot.clone());
        Registration {
            cancels: self.clone(),
            key,
            slot,
        }
    }

    /// Forwards a client's cancel to the server running its query, if any.
    pub async fn cancel(&self, key: (i32, i32)) {
        let Some(slot) = lock(&self.slots).get(&key).cloned() else {
            tracing::debug!("cancel request with unknown key dropped");
            return;
        };
        match slot.target() {
            Some((backend, server_key)) => {
                if let Err(e) = crate::server::send_cancel(&backend, server_key).await {
                    tracing::warn!(error = %e, "cancel request to server failed");
                }
            }
            // Only a client waiting right now; no permit is kept for later.
            None => slot.waiting.notify_waiters(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_removed_when_the_client_leaves() {
        let c = Arc::new(Cancels::default());
        let a = c.register();
        let b = c.register();
        assert_ne!(a.key, b.key);
        let key = a.key;
        drop(a);
        assert!(!lock(&c.slots).contains_key(&key));
        assert!(lock(&c.slots).contains_key(&b.key));
    }

    #[test]
    fn a_released_server_is_no_longer_a_cancel_target() {
        let slot = CancelSlot::default();
        let be = Arc::new(Backend {
            name: "a".into(),
            host: "h".into(),
            port: 1,
        });
        slot.attach(&be, (1, 2));
        assert!(slot.target().is_some());
        slot.detach();
        assert!(slot.target().is_none());
        // The next server, on another backend, with a negative secret.
        let other = Arc::new(Backend {
            name: "b".into(),
            host: "h".into(),
            port: 2,
        });
        slot.attach(&other, (77, -5));
        let (b, key) = slot.target().unwrap();
        assert!(Arc::ptr_eq(&b, &other));
        assert_eq!(key, (77, -5));
        slot.detach();
        slot.attach(&be, (i32::MAX, i32::MIN));
        let (b, key) = slot.target().unwrap();
        assert!(Arc::ptr_eq(&b, &be));
        assert_eq!(key, (i32::MAX, i32::MIN));
    }
}
