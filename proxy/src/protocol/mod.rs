//! The Postgres wire codec: splits a byte stream into whole frames and gives
//! typed views of the few messages the proxy must look inside.
//!
//! No I/O here, only `BytesMut` in and `Bytes` out, as in rust-postgres's
//! `postgres-protocol`: [`split_frame`] returns `Ok(None)` when more bytes are
//! needed. The hot path moves whole frames (tag, length and body) without
//! re-encoding; [`messages`] reads fields out of a frame and encodes the
//! handful of messages the proxy writes itself. May call: `bytes`, `pgwire`
//! (encoding only; its decoders assume well-formed input).

pub mod messages;

use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};

/// Protocol version 3.0 in a startup packet.
pub const PROTOCOL_V3: i32 = 196_608;
/// Special "versions" of packets that come before a startup message.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Largest startup packet accepted (Postgres itself allows 10000 bytes).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// The peer sent bytes that are not a valid message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message length {len} is invalid (minimum {min}, maximum {max})")]
    BadLength { len: i64, min: usize, max: usize },
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
}

/// One whole tagged message: tag byte, length and body, as on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
}

impl Frame {
    /// Wraps bytes that are already one whole message (tag + length + body).
    pub fn from_wire(bytes: Bytes) -> Option<Frame> {
        if bytes.len() < 5 {
            return None;
        }
        let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        (usize::try_from(len).ok()? + 1 == bytes.len()).then_some(Frame { bytes })
    }

    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    /// The body after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }

    /// The whole message as sent on the wire.
    pub fn wire(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_wire(self) -> Bytes {
        self.bytes
    }
}

/// The tag and total wire length of the next complete tagged message in
/// `buf`, without consuming it; `Ok(None)` when more bytes are needed.
pub fn peek_frame(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let len_ok = usize::try_from(len)
        .ok()
        .filter(|l| *l >= 4 && *l <= max_len);
    let Some(len) = len_ok else {
        return Err(ProtocolError::BadLength {
            len: i64::from(len),
            min: 4,
            max: max_len,
        });
    };
    if buf.len() < len + 1 {
        return Ok(None);
    }
    Ok(Some((buf[0], len + 1)))
}

/// Splits the next complete tagged message off the front of `buf`.
pub fn split_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    Ok(peek_frame(buf, max_len)?.map(|(_, n)| Frame {
        bytes: buf.split_to(n).freeze(),
    }))
}

/// The first packet a client sends: untagged, length-prefixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// Protocol 3 startup with its parameters (user, database, options...).
    Startup(StartupParams),
    SslRequest,
    GssEncRequest,
    /// Cancel the query running for the connection with this key.
    Cancel {
        pid: i32,
        secret: i32,
    },
}

/// The parameters of a startup message, in the order sent: the block as
/// one string (one allocation per client), checked when parsed to be
/// NUL-separated key/value pairs with no empty key, and where the user,
/// database and options values lie in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupParams {
    /// `key\0value\0` for each pair.
    text: String,
    user: Span,
    database: Span,
    options: Span,
    /// Where the value of each tracked session setting lies (see `vars`),
    /// found in the same pass, so the session needs no second one.
    tracked: [Span; crate::vars::TRACKED.len()],
    /// Other parameters were sent (see [`StartupParams::others`]).
    others: bool,
    /// The minor protocol version asked for (major is always 3).
    minor: u16,
}

/// Where a value lies in a startup block, compact (the block is at most
/// `MAX_STARTUP_LEN` bytes) so the parsed packet moves cheaply; start 0
/// is "not sent": a value never starts the block, its key does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span(u16, u16);

impl Span {
    fn new(value: Range<usize>) -> Span {
        // Both ends are below MAX_STARTUP_LEN, which fits.
        const _: () = assert!(MAX_STARTUP_LEN <= u16::MAX as usize);
        Span(value.start as u16, value.end as u16)
    }

    fn get(self, text: &str) -> Option<&str> {
        (self.0 != 0).then(|| &text[usize::from(self.0)..usize::from(self.1)])
    }
}

impl StartupParams {
    /// (key, value) pairs in the order sent.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut rest = self.text.as_str();
        let mut next = move || {
            let end = nul(rest.as_bytes())?;
            let part = &rest[..end];
            rest = &rest[end + 1..];
            Some(part)
        };
        std::iter::from_fn(move || Some((next()?, next()?)))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The user name (required by the protocol).
    pub fn user(&self) -> &str {
        self.user.get(&self.text).unwrap_or_default()
    }

    /// The `options` value (command-line settings for the backend), if
    /// given.
    pub fn options(&self) -> Option<&str> {
        self.options.get(&self.text)
    }

    /// The value sent for the tracked setting `slot` (its index in
    /// `vars::TRACKED`), the last one if sent twice.
    pub fn tracked(&self, slot: usize) -> Option<&str> {
        self.tracked[slot].get(&self.text)
    }

    /// The database, defaulting to the user name as Postgres does.
    pub fn database(&self) -> &str {
        self.database.get(&self.text).unwrap_or_else(|| self.user())
    }

    /// Whether parameters besides user, database, options and the
    /// tracked settings were sent (most clients send none).
    pub fn has_others(&self) -> bool {
        self.others
    }

    /// Protocol options asked for (`_pq_.name`): none is supported.
    pub fn protocol_options(&self) -> impl Iterator<Item = &str> {
        // Not even one pass over the block when only the usual keys came.
        let pairs = if self.others { usize::MAX } else { 0 };
        self.iter()
            .take(pairs)
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("_pq_."))
    }

    /// Whether the client must be told, as a PostgreSQL 15 server tells
    /// it, that it gets protocol 3.0 without those options.
    pub fn needs_negotiation(&self) -> bool {
        self.minor > 0 || self.protocol_options().next().is_some()
    }

    /// Those other parameters (`search_path`, `statement_timeout`,
    /// `extra_float_digits`, `replication`...), in the order sent.
    pub fn others(&self) -> impl Iterator<Item = (&str, &str)> {
        let pairs = if self.others { usize::MAX } else { 0 };
        self.iter().take(pairs).filter(|(k, _)| {
            !matches!(*k, "user" | "database" | "options") && crate::vars::index(k).is_none()
        })
    }
}

/// Splits the next startup-phase packet off `buf`; `Ok(None)` when more
/// bytes are needed.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| (8..=MAX_STARTUP_LEN).contains(l))
        .ok_or(ProtocolError::BadLength {
            len: i64::from(len),
            min: 8,
            max: MAX_STARTUP_LEN,
        })?;
    if buf.len() < len {
        return Ok(None);
    }
    let code = i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let packet = match code {
        SSL_REQUEST_CODE if len == 8 => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if len == 8 => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE if len == 16 => {
            let mut key = &buf[8..16];
            Ok(StartupPacket::Cancel {
                pid: key.get_i32(),
                secret: key.get_i32(),
            })
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            Err(ProtocolError::Malformed { what: "startup" })
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            parse_params(&buf[8..len], minor).map(StartupPacket::Startup)
        }
    };
    buf.advance(len);
    packet.map(Some)
}

/// Where the first NUL is. Keys and values are a few bytes long: a plain
/// loop beats a vectorised search's setup on them.
fn nul(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == 0)
}

fn parse_params(body: &[u8], minor: u16) -> Result<StartupParams, ProtocolError> {
    let bad = || ProtocolError::Malformed { what: "startup" };
    // NUL never occurs inside a multi-byte sequence: checking the whole
    // block checks every key and value.
    let text = std::str::from_utf8(body).map_err(|_| bad())?;
    let nul_from = |from: usize| {
        let rest = body.get(from..).unwrap_or_default();
        nul(rest).map(|i| from + i).ok_or_else(bad)
    };
    let mut pos = 0;
    let (mut user, mut database, mut options) = (None, Span::default(), Span::default());
    let mut tracked = [Span::default(); crate::vars::TRACKED.len()];
    let mut others = false;
    loop {
        let key_end = nul_from(pos)?;
        if key_end == pos {
            // The empty key ends the list, and the packet.
            if key_end + 1 != text.len() {
                return Err(bad());
            }
            break;
        }
        let value_end = nul_from(key_end + 1)?;
        let value = Span::new(key_end + 1..value_end);
        match &text[pos..key_end] {
            "user" => user = Some(value),
            "database" => database = value,
            "options" => options = value,
            key => match crate::vars::index(key) {
                Some(slot) => tracked[slot] = value,
                None => others = true,
            },
        }
        pos = value_end + 1;
    }
    Ok(StartupParams {
        // Without the terminating empty key's NUL.
        text: text[..pos].to_owned(),
        user: user.ok_or_else(bad)?,
        database,
        options,
        tracked,
        others,
        minor,
    })
}

/// Runs every parser over `data` as if it came from the network; used by
/// the fuzz target and the random-input test. Must never panic.
pub fn fuzz_all(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = split_startup(&mut buf) {}
    let _ = crate::sets::leaves(data);
    let _ = crate::prepared::sql_deallocate(data);
    let mut sets = crate::sets::SetWatch::default();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = split_frame(&mut buf, 1 << 20) {
        let body = f.body();
        sets.client_message(f.tag(), body);
        let _ = messages::ready_status(body);
        let _ = messages::backend_key(body);
        let _ = messages::error_fields(body);
        let _ = messages::parse_msg(body);
        let _ = messages::bind_msg(body);
        let _ = messages::target_msg(body);
        let _ = messages::parameter_status(body);
        let _ = messages::sasl_initial(body);
    }
    let mut tracker = crate::tracker::Tracker::default();
    let mut fakes = Vec::new();
    for chunk in data.chunks(2) {
        if let [tag, body @ ..] = chunk {
            tracker.client_message(*tag);
            tracker.server_message(*tag, body, &mut fakes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn split_frame_waits_for_whole_message_then_returns_it() {
        let wire = tagged(b'Q', b"select 1\0");
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            assert_eq!(split_frame(&mut buf, 1 << 20).unwrap(), None, "at {i}");
            buf.put_u8(*b);
        }
        let f = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag(), b'Q');
        assert_eq!(f.body(), b"select 1\0");
        assert_eq!(f.wire().as_ref(), &wire[..]);
        assert!(buf.is_empty());
    }

    #[test]
    fn two_frames_in_one_buffer_split_in_order() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&tagged(b'S', b""));
        buf.extend_from_slice(&tagged(b'H', b""));
        assert_eq!(split_frame(&mut buf, 100).unwrap().unwrap().tag(), b'S');
        assert_eq!(split_frame(&mut buf, 100).unwrap().unwrap().tag(), b'H');
        assert_eq!(split_frame(&mut buf, 100).unwrap(), None);
    }

    #[test]
    fn oversized_and_negative_lengths_are_errors() {
        let mut buf = BytesMut::from(&tagged(b'Q', &[b'x'; 200])[..]);
        assert!(matches!(
            split_frame(&mut buf, 100),
            Err(ProtocolError::BadLength { .. })
        ));
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(split_frame(&mut buf, 100).is_err());
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(split_frame(&mut buf, 100).is_err());
    }

    fn startup_bytes(code: i32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i32(8 + body.len() as i32);
        b.put_i32(code);
        b.put_slice(body);
        b
    }

    #[test]
    fn startup_params_are_parsed_and_database_defaults_to_user() {
        let mut buf = startup_bytes(PROTOCOL_V3, b"user\0alice\0application_name\0x\0\0");
        let partial = buf.split_to(6);
        let mut p = partial.clone();
        assert_eq!(split_startup(&mut p).unwrap(), None);
        let mut whole = partial;
        whole.unsplit(buf);
        let Some(StartupPacket::Startup(p)) = split_startup(&mut whole).unwrap() else {
            panic!("not a startup")
        };
        assert_eq!(p.user(), "alice");
        assert_eq!(p.database(), "alice");
        assert_eq!(p.get("application_name"), Some("x"));
        assert_eq!(p.options(), None);
        // The tracked settings, found in the same pass: any letter case,
        // the last one sent.
        let mut buf = startup_bytes(
            PROTOCOL_V3,
            b"user\0u\0timezone\0UTC\0application_name\0a\0TimeZone\0CET\0\0",
        );
        let Some(StartupPacket::Startup(p)) = split_startup(&mut buf).unwrap() else {
            panic!("not a startup")
        };
        let vars = crate::vars::Vars::from_startup(&p);
        assert_eq!(vars, crate::vars::Vars::from_params(p.iter()));
        let got: Vec<_> = vars.iter().collect();
        assert_eq!(got, [("application_name", "a"), ("TimeZone", "CET")]);
    }

    #[test]
    fn startup_params_keep_their_order_and_bad_blocks_are_refused() {
        let mut ok = startup_bytes(PROTOCOL_V3, b"database\0db\0user\0bob\0options\0\0\0");
        let Some(StartupPacket::Startup(p)) = split_startup(&mut ok).unwrap() else {
            panic!("not a startup")
        };
        let pairs: Vec<_> = p.iter().collect();
        assert_eq!(
            pairs,
            [("database", "db"), ("user", "bob"), ("options", "")]
        );
        assert_eq!(p.database(), "db");
        assert_eq!(p.options(), Some(""));
        // A key sent twice: the last value counts, as in Postgres.
        let mut twice = startup_bytes(
            PROTOCOL_V3,
            b"user\0a\0database\0x\0user\0b\0database\0y\0\0",
        );
        let Some(StartupPacket::Startup(p)) = split_startup(&mut twice).unwrap() else {
            panic!("not a startup")
        };
        assert_eq!((p.user(), p.database()), ("b", "y"));
        for body in [
            &b"user\0bob\0"[..], // no terminator
            b"user\0bob\0\0x",   // bytes after it
            b"user\0bob",        // value not ended
            b"database\0db\0\0", // no user
            b"user\0b\xffb\0\0", // not UTF-8
            b"\0",               // nothing at all
        ] {
            let mut b = startup_bytes(PROTOCOL_V3, body);
            assert!(split_startup(&mut b).is_err(), "{body:?} accepted");
        }
    }

    #[test]
    fn ssl_and_cancel_requests_are_recognised() {
        let mut b = startup_bytes(SSL_REQUEST_CODE, b"");
        assert_eq!(
            split_startup(&mut b).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        let mut body = BytesMut::new();
        body.put_i32(42);
        body.put_i32(-7);
        let mut b = startup_bytes(CANCEL_REQUEST_CODE, &body);
        assert_eq!(
            split_startup(&mut b).unwrap(),
            Some(StartupPacket::Cancel {
                pid: 42,
                secret: -7
            })
        );
    }

    #[test]
    fn random_input_never_panics_any_parser() {
        // A cheap deterministic stand-in for the fuzz target in every test run.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..3000usize {
            let data: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Bias towards small lengths and known tags.
                    match x % 4 {
                        0 => 0,
                        1 => b"QPBDESZCXdcf1238"[(x >> 8) as usize % 16],
                        _ => (x >> 16) as u8,
                    }
                })
                .collect();
            fuzz_all(&data);
        }
    }

    #[test]
    fn malformed_startup_packets_are_rejected_not_panicking() {
        for body in [
            &b"user\0alice"[..],
            b"user\0alice\0\0junk",
            b"\0",
            b"database\0d\0\0",
        ] {
            let mut b = startup_bytes(PROTOCOL_V3, body);
            assert!(split_startup(&mut b).is_err(), "{body:?}");
        }
        let mut b = startup_bytes(0x0002_0000, b"user\0a\0\0");
        assert!(matches!(
            split_startup(&mut b),
            Err(ProtocolError::UnsupportedVersion { major: 2, .. })
        ));
        let mut b = BytesMut::from(&[0u8, 0, 0x7f, 0][..]);
        assert!(split_startup(&mut b).is_err());
        let mut b = startup_bytes(CANCEL_REQUEST_CODE, b"1234");
        assert!(split_startup(&mut b).is_err());
    }
}
