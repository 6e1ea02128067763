//! Read and write buffers of a session: how much room a read gets, when a
//! large buffer is let go, and the per-thread shelf of read buffers idle
//! clients give back. May call: `bytes`.

use bytes::BytesMut;

/// Buffers above this are released after use, so a large result does not
/// pin memory for the life of the connection.
const KEEP_BUFFER: usize = 64 * 1024;

/// Read buffer reserved when a client or server has data.
const READ_CHUNK: usize = 8 * 1024;

/// Read buffers parked per thread while their clients are idle.
const PARKED_BUFFERS: usize = 64;

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
