//! Typed views of the messages the proxy looks inside, and encoders for the
//! messages it writes itself.
//!
//! Views borrow from a frame's body and return `None` on malformed input
//! instead of panicking: everything here may come from the network.
//! Backend messages are encoded with `pgwire`; the few frontend messages the
//! proxy sends to servers are encoded by hand (pgwire's frontend side needs
//! its client feature). May call: `bytes`, `pgwire::messages`.

use bytes::{BufMut, BytesMut};
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, SecretKey,
};
use pgwire::messages::Message;

/// Splits a NUL-terminated UTF-8 string off the front of `buf`.
pub fn cstr(buf: &[u8]) -> Option<(&str, &[u8])> {
    let end = buf.iter().position(|b| *b == 0)?;
    let s = std::str::from_utf8(&buf[..end]).ok()?;
    Some((s, &buf[end + 1..]))
}

/// ReadyForQuery's transaction status: `I` idle, `T` in a transaction,
/// `E` in a failed transaction.
pub fn ready_status(body: &[u8]) -> Option<u8> {
    match body {
        [s @ (b'I' | b'T' | b'E')] => Some(*s),
        _ => None,
    }
}

/// BackendKeyData: (process id, secret key).
pub fn backend_key(body: &[u8]) -> Option<(i32, i32)> {
    let b: &[u8; 8] = body.try_into().ok()?;
    Some((
        i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    ))
}

/// The fields of an ErrorResponse or NoticeResponse that the proxy uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn error_fields(body: &[u8]) -> Option<ErrorFields> {
    let mut out = ErrorFields::default();
    let mut rest = body;
    loop {
        let (&code, r) = rest.split_first()?;
        if code == 0 {
            return Some(out);
        }
        let (value, r) = cstr(r)?;
        match code {
            b'S' => out.severity = value.to_owned(),
            b'C' => out.code = value.to_owned(),
            b'M' => out.message = value.to_owned(),
            _ => {}
        }
        rest = r;
    }
}

/// An ErrorResponse body with severity FATAL or PANIC.
pub fn is_fatal(body: &[u8]) -> bool {
    error_fields(body).is_some_and(|e| matches!(e.severity.as_str(), "FATAL" | "PANIC"))
}

/// Re-encodes an ErrorResponse body with severity ERROR, keeping every
/// other field: a server's FATAL must not end a pooled client's session.
pub fn put_downgraded_error(buf: &mut BytesMut, body: &[u8]) {
    put_tagged(buf, b'E', |b| {
        let mut rest = body;
        while let Some((&code, r)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let Some((value, r)) = cstr(r) else { break };
            b.put_u8(code);
            put_cstr(
                b,
                if matches!(code, b'S' | b'V') {
                    "ERROR"
                } else {
                    value
                },
            );
            rest = r;
        }
        b.put_u8(0);
    });
}

/// Parse: statement name and everything after it (query and parameter
/// types), which identifies the statement's content.
pub fn parse_msg(body: &[u8]) -> Option<(&str, &[u8])> {
    let (name, rest) = cstr(body)?;
    cstr(rest)?;
    Some((name, rest))
}

/// Bind: portal name, statement name, and the rest (formats and values).
pub fn bind_msg(body: &[u8]) -> Option<(&str, &str, &[u8])> {
    let (portal, rest) = cstr(body)?;
    let (stmt, rest) = cstr(rest)?;
    Some((portal, stmt, rest))
}

/// Describe or Close: `S` (statement) or `P` (portal) and the name.
pub fn target_msg(body: &[u8]) -> Option<(u8, &str)> {
    let (&kind, rest) = body.split_first()?;
    let (name, rest) = cstr(rest)?;
    (matches!(kind, b'S' | b'P') && rest.is_empty()).then_some((kind, name))
}

/// ParameterStatus: name and value.
pub fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = cstr(body)?;
    let (value, _) = cstr(rest)?;
    Some((name, value))
}

fn put_pgwire<M: Message>(buf: &mut BytesMut, m: &M) {
    // pgwire only fails on messages larger than the protocol allows; the
    // proxy's own messages are small, so a failure writes nothing.
    let mark = buf.len();
    if m.encode(buf).is_err() {
        buf.truncate(mark);
    }
}

/// ErrorResponse with severity, SQLSTATE and message.
pub fn put_error(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    let fields = vec![
        (b'S', severity.to_owned()),
        (b'V', severity.to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ];
    put_pgwire(buf, &ErrorResponse::new(fields));
}

pub fn put_auth_ok(buf: &mut BytesMut) {
    put_pgwire(buf, &Authentication::Ok);
}

pub fn put_auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    put_pgwire(buf, &Authentication::MD5Password(salt.to_vec()));
}

pub fn put_auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let m = mechanisms.iter().map(|s| (*s).to_owned()).collect();
    put_pgwire(buf, &Authentication::SASL(m));
}

pub fn put_auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put_pgwire(
        buf,
        &Authentication::SASLContinue(bytes::Bytes::copy_from_slice(data)),
    );
}

pub fn put_auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put_pgwire(
        buf,
        &Authentication::SASLFinal(bytes::Bytes::copy_from_slice(data)),
    );
}

/// ParameterStatus. Written in place: pgwire's type wants two owned
/// strings, and this goes out on every connect and settings change.
pub fn put_parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_tagged(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

/// NegotiateProtocolVersion: protocol 3.0, without the `unsupported`
/// options, as a PostgreSQL 15 server answers a client asking for more
/// (the whole version number, as it sends it; clients read its minor).
pub fn put_negotiate_protocol(buf: &mut BytesMut, unsupported: &[&str]) {
    let unsupported_options = unsupported.iter().map(|s| (*s).to_owned()).collect();
    put_pgwire(
        buf,
        &NegotiateProtocolVersion::new(super::PROTOCOL_V3, unsupported_options),
    );
}

pub fn put_backend_key(buf: &mut BytesMut, pid: i32, secret: i32) {
    put_pgwire(buf, &BackendKeyData::new(pid, SecretKey::I32(secret)));
}

pub fn put_ready(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    put_pgwire(buf, &ReadyForQuery::new(status));
}

/// A tagged message with a body written by `body`.
fn put_tagged(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// A body-less message such as ParseComplete (`1`), CloseComplete (`3`),
/// Sync (`S`), Terminate (`X`).
pub fn put_empty(buf: &mut BytesMut, tag: u8) {
    put_tagged(buf, tag, |_| {});
}

/// Startup message (protocol 3.0) to a server.
pub fn put_startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.put_i32(0);
    buf.put_i32(super::PROTOCOL_V3);
    for (k, v) in params {
        put_cstr(buf, k);
        put_cstr(buf, v);
    }
    buf.put_u8(0);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// CancelRequest to a server.
pub fn put_cancel(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_i32(16);
    buf.put_i32(super::CANCEL_REQUEST_CODE);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

/// PasswordMessage (cleartext or md5 answer).
pub fn put_password(buf: &mut BytesMut, password: &str) {
    put_tagged(buf, b'p', |b| put_cstr(b, password));
}

pub fn put_sasl_initial(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    put_tagged(buf, b'p', |b| {
        put_cstr(b, mechanism);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

pub fn put_sasl_response(buf: &mut BytesMut, data: &[u8]) {
    put_tagged(buf, b'p', |b| b.put_slice(data));
}

/// Simple Query.
pub fn put_query(buf: &mut BytesMut, sql: &str) {
    put_tagged(buf, b'Q', |b| put_cstr(b, sql));
}

/// Parse with a new statement name and the original query and types.
pub fn put_parse(buf: &mut BytesMut, name: &str, rest: &[u8]) {
    put_tagged(buf, b'P', |b| {
        put_cstr(b, name);
        b.put_slice(rest);
    });
}

/// Bind with a new statement name and the original portal and values.
pub fn put_bind(buf: &mut BytesMut, portal: &str, stmt: &str, rest: &[u8]) {
    put_tagged(buf, b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, stmt);
        b.put_slice(rest);
    });
}

/// Describe or Close (`tag`) of a statement or portal (`kind`).
pub fn put_target(buf: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    put_tagged(buf, tag, |b| {
        b.put_u8(kind);
        put_cstr(b, name);
    });
}

/// Execute a portal (`max_rows` 0: all).
pub fn put_execute(buf: &mut BytesMut, portal: &str, max_rows: i32) {
    put_tagged(buf, b'E', |b| {
        put_cstr(b, portal);
        b.put_i32(max_rows);
    });
}

/// Bind with no parameters and text results.
pub fn put_bind_simple(buf: &mut BytesMut, portal: &str, stmt: &str) {
    put_bind(buf, portal, stmt, &[0, 0, 0, 0, 0, 0]);
}

/// CopyData, or CopyFail with a reason.
pub fn put_copy_data(buf: &mut BytesMut, data: &[u8]) {
    put_tagged(buf, b'd', |b| b.put_slice(data));
}

pub fn put_copy_fail(buf: &mut BytesMut, reason: &str) {
    put_tagged(buf, b'f', |b| put_cstr(b, reason));
}

/// Parses a client's SASLInitialResponse: mechanism and data.
pub fn sasl_initial(body: &[u8]) -> Option<(&str, &[u8])> {
    let (mech, rest) = cstr(body)?;
    let (len, data) = rest.split_first_chunk::<4>()?;
    let len = i32::from_be_bytes(*len);
    (usize::try_from(len).ok()? == data.len()).then_some((mech, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{split_frame, Frame};

    fn one_frame(buf: &mut BytesMut) -> Frame {
        let f = split_frame(buf, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty(), "exactly one frame expected");
        f
    }

    #[test]
    fn parameter_status_is_encoded_as_pgwire_encodes_it() {
        let mut ours = BytesMut::new();
        put_parameter_status(&mut ours, "TimeZone", "Europe/Berlin");
        let mut theirs = BytesMut::new();
        put_pgwire(
            &mut theirs,
            &pgwire::messages::startup::ParameterStatus::new(
                "TimeZone".into(),
                "Europe/Berlin".into(),
            ),
        );
        assert_eq!(ours, theirs);
    }

    #[test]
    fn error_response_round_trips_through_the_view() {
        let mut buf = BytesMut::new();
        put_error(&mut buf, "FATAL", "53300", "too many clients");
        let f = one_frame(&mut buf);
        assert_eq!(f.tag(), b'E');
        let e = error_fields(f.body()).unwrap();
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "53300");
        assert_eq!(e.message, "too many clients");
    }

    #[test]
    fn ready_and_key_data_views_read_what_encoders_wrote() {
        let mut buf = BytesMut::new();
        put_ready(&mut buf, b'T');
        assert_eq!(ready_status(one_frame(&mut buf).body()), Some(b'T'));
        put_backend_key(&mut buf, 77, -5);
        assert_eq!(backend_key(one_frame(&mut buf).body()), Some((77, -5)));
        assert_eq!(ready_status(b"X"), None);
        assert_eq!(backend_key(b"short"), None);
    }

    #[test]
    fn parse_bind_describe_close_views_and_rewrites() {
        let mut buf = BytesMut::new();
        put_parse(&mut buf, "P_0", b"select $1\0\0\x01\0\0\0\x17");
        let f = one_frame(&mut buf);
        let (name, rest) = parse_msg(f.body()).unwrap();
        assert_eq!(name, "P_0");
        assert!(rest.starts_with(b"select $1\0"));
        put_bind(&mut buf, "", "P_0", b"\0\0\0\0\0\0");
        let f = one_frame(&mut buf);
        assert_eq!(
            bind_msg(f.body()).unwrap(),
            ("", "P_0", &b"\0\0\0\0\0\0"[..])
        );
        put_target(&mut buf, b'D', b'S', "s1");
        assert_eq!(target_msg(one_frame(&mut buf).body()), Some((b'S', "s1")));
        assert_eq!(target_msg(b"Xname\0"), None);
        assert_eq!(parse_msg(b"no-terminator"), None);
        assert_eq!(bind_msg(b"portal\0"), None);
    }

    #[test]
    fn a_fatal_error_is_downgraded_keeping_code_and_message() {
        let mut buf = BytesMut::new();
        put_error(&mut buf, "FATAL", "57P01", "terminating connection");
        let f = one_frame(&mut buf);
        assert!(is_fatal(f.body()));
        put_downgraded_error(&mut buf, f.body());
        let g = one_frame(&mut buf);
        let e = error_fields(g.body()).unwrap();
        assert_eq!((e.severity.as_str(), e.code.as_str()), ("ERROR", "57P01"));
        assert_eq!(e.message, "terminating connection");
        assert!(!is_fatal(g.body()));
    }

    #[test]
    fn malformed_error_bodies_give_none() {
        assert_eq!(error_fields(b"Sunterminated"), None);
        assert_eq!(error_fields(b""), None);
        assert!(error_fields(b"\0").is_some());
    }

    #[test]
    fn sasl_initial_response_length_is_checked() {
        let mut buf = BytesMut::new();
        put_sasl_initial(&mut buf, "SCRAM-SHA-256", b"n,,n=,r=abc");
        let f = one_frame(&mut buf);
        assert_eq!(
            sasl_initial(f.body()),
            Some(("SCRAM-SHA-256", &b"n,,n=,r=abc"[..]))
        );
        assert_eq!(sasl_initial(b"SCRAM-SHA-256\0\0\0\0\x09abc"), None);
    }

    #[test]
    fn startup_message_encodes_params() {
        let mut buf = BytesMut::new();
        put_startup(&mut buf, &[("user", "u"), ("database", "d")]);
        let Some(crate::protocol::StartupPacket::Startup(p)) =
            crate::protocol::split_startup(&mut buf).unwrap()
        else {
            panic!("not a startup")
        };
        assert_eq!(p.database(), "d");
    }
}
