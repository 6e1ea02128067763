//! Read and write buffers of a session: how much room a read gets, when a
//! large buffer is let go, and the per-thread shelf of read buffers idle
//! clients give back. May call: `bytes`.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;

/// Buffers above this are released after use, so a large result does not
/// pin memory for the life of the connection.
const KEEP_BUFFER: usize = 64 * 1024;

/// Read buffer reserved when a client or server has data.
const READ_CHUNK: usize = 8 * 1024;

/// Read buffers parked per thread while their clients are idle.
const PARKED_BUFFERS: usize = 64;

/// Idle clients that keep their read buffer between transactions, so a
/// busy client skips a park and an unpark per transaction (and reads
/// straight into its buffer). At 8 KiB each they cost 2 MiB at most, also
/// with 10,000 idle clients.
const KEPT_BUFFERS: usize = 256;

/// Claims taken on [`KEPT_BUFFERS`], proxy-wide.
static KEPT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static PARKED: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Gives an idle client's empty read buffer back, so 10,000 idle clients
/// hold no buffers while a busy one reuses the same few without a malloc
/// per transaction.
pub(super) fn park_buffer(buf: &mut BytesMut) {
    let mut b = std::mem::take(buf);
    b.clear();
    // Reclaims the space consumed by `advance` (no allocation: unique).
    b.reserve(READ_CHUNK);
    if b.capacity() > KEEP_BUFFER {
        return;
    }
    PARKED.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < PARKED_BUFFERS {
            p.push(b);
        }
    });
}

/// A session's claim on one of the [`KEPT_BUFFERS`]; given back when the
/// session ends.
#[derive(Debug, Default)]
pub(super) struct Keep(bool);

impl Keep {
    /// Whether the session may keep its read buffer while idle: it holds
    /// a claim, or takes one now.
    fn claim(&mut self) -> bool {
        if !self.0 {
            self.0 = take_claim(&KEPT, KEPT_BUFFERS);
        }
        self.0
    }
}

/// Counts one more claim on `kept` unless `limit` are taken.
fn take_claim(kept: &AtomicUsize, limit: usize) -> bool {
    kept.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        (n < limit).then_some(n + 1)
    })
    .is_ok()
}

impl Drop for Keep {
    fn drop(&mut self) {
        if self.0 {
            KEPT.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The empty read buffer of a client going idle: kept with room for the
/// next request when the session holds a [`Keep`] claim or gets one (a
/// large one is let go first), else parked.
pub(super) fn idle(buf: &mut BytesMut, keep: &mut Keep) {
    if buf.capacity() == 0 {
        return;
    }
    if buf.capacity() <= KEEP_BUFFER && keep.claim() {
        make_room(buf);
    } else {
        park_buffer(buf);
    }
}

/// A read buffer with room for at least [`READ_CHUNK`] bytes.
pub(super) fn unpark_buffer(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        if let Some(b) = PARKED.with(|p| p.borrow_mut().pop()) {
            *buf = b;
            return;
        }
    }
    buf.reserve(READ_CHUNK);
}

/// Room for a read: at least 1 KiB free, else another [`READ_CHUNK`].
pub(super) fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
}

/// Empties a written buffer, letting a large one go.
pub(super) fn clear(buf: &mut BytesMut) {
    buf.clear();
    if buf.capacity() > KEEP_BUFFER {
        *buf = BytesMut::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_on_kept_buffers_stop_at_the_limit() {
        let kept = AtomicUsize::new(0);
        assert!(take_claim(&kept, 2));
        assert!(take_claim(&kept, 2));
        assert!(!take_claim(&kept, 2), "a third claim is refused");
        assert_eq!(kept.load(Ordering::Relaxed), 2);
        kept.fetch_sub(1, Ordering::Relaxed);
        assert!(take_claim(&kept, 2), "a claim given back can be taken");
    }

    #[test]
    fn an_idle_client_keeps_a_small_buffer_with_room_but_lets_a_large_one_go() {
        let mut keep = Keep::default();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        buf.extend_from_slice(&[7; 8000]);
        let _ = buf.split_to(8000);
        idle(&mut buf, &mut keep);
        assert!(keep.0, "the proxy's few claims are free in this test");
        assert!(
            buf.capacity() - buf.len() >= 1024,
            "room for the next request"
        );

        let mut big = BytesMut::with_capacity(4 * KEEP_BUFFER);
        idle(&mut big, &mut keep);
        assert_eq!(big.capacity(), 0, "a large buffer is not kept");
    }
}
