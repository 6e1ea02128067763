//! Moving one client message to the server, rewriting statement names in
//! transaction mode, and one server message to the client.
//!
//! Synchronous: the session hands in the frame and the buffers, these
//! functions decide what bytes go where and keep the tracker and the
//! prepared-statement caches in step. May call: `protocol`, `tracker`,
//! `prepared`.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;

use crate::prepared::ServerCache;
use crate::prepared::{Registry, Statement};
use crate::protocol::messages as msg;
use crate::server::ServerConn;
use crate::tracker::{Pending, Tracker};

/// Client-side prepared statements, by the client's names.
pub type ClientStatements = HashMap<String, Arc<Statement>>;

/// Output buffers of one pass.
pub struct Out<'a> {
    pub server: &'a mut BytesMut,
    pub client: &'a mut BytesMut,
}

fn put_fakes(out: &mut BytesMut, tags: Vec<u8>) {
    for t in tags {
        msg::put_empty(out, t);
    }
}

/// Makes sure `stmt` exists on the server, queueing a hidden Parse (and the
/// Close of an evicted statement) ahead of whatever uses it.
fn ensure_prepared(conn: &mut ServerConn, stmt: &Statement, out: &mut Out<'_>, hidden: bool) {
    if conn.prepared.touch(&stmt.server_name) {
        return;
    }
    if let Some(evicted) = conn.prepared.insert(&stmt.server_name) {
        msg::put_target(out.server, b'C', b'S', &evicted);
        put_fakes(
            out.client,
            conn.tracker.push(Pending::Close { hidden: true }),
        );
    }
    // Close first (a no-op if absent): whatever the cache believes, the
    // Parse can never fail with "already exists".
    msg::put_target(out.server, b'C', b'S', &stmt.server_name);
    put_fakes(
        out.client,
        conn.tracker.push(Pending::Close { hidden: true }),
    );
    msg::put_parse(out.server, &stmt.server_name, &stmt.body);
    put_fakes(
        out.client,
        conn.tracker.push(Pending::Parse {
            hidden,
            stmt: Some(stmt.server_name.clone()),
        }),
    );
}

/// Forwards one client frame as is.
pub fn pass(conn: &mut ServerConn, tag: u8, frame: &[u8], out: &mut Out<'_>) {
    out.server.extend_from_slice(frame);
    conn.tracker.client_message(tag);
}

/// Whether a frame may name a prepared statement, which transaction mode
/// renames: a cheap look at the first bytes, so unnamed statements (every
/// `-M extended` query) and portals pass without being parsed.
pub fn names_a_statement(tag: u8, body: &[u8]) -> bool {
    match tag {
        b'P' => body.first().is_some_and(|&b| b != 0),
        // Portal name, then the statement's.
        b'B' => body
            .iter()
            .position(|&b| b == 0)
            .and_then(|end| body.get(end + 1))
            .is_some_and(|&b| b != 0),
        b'D' | b'C' => body.first() == Some(&b'S') && body.get(1).is_some_and(|&b| b != 0),
        // An SQL DEALLOCATE may name one (see `transaction_mode`).
        b'Q' => body
            .trim_ascii_start()
            .get(..10)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"deallocate")),
        _ => false,
    }
}

/// The stand-in the proxy prepares and drops in place of a client's
/// statement named in an SQL DEALLOCATE.
const PREPARE_STAND_IN: &str = "PREPARE pgha_deallocate AS SELECT";
const DEALLOCATE_STAND_IN: &str = "DEALLOCATE pgha_deallocate";

/// Forwards one client frame in transaction mode, where named statements
/// are renamed to their proxy-wide names and prepared on demand.
pub fn transaction_mode(
    conn: &mut ServerConn,
    stmts: &mut ClientStatements,
    registry: &Registry,
    frame: &[u8],
    out: &mut Out<'_>,
) {
    let tag = frame[0];
    let body = &frame[5..];
    if !names_a_statement(tag, body) {
        pass(conn, tag, frame, out);
        return;
    }
    match tag {
        b'P' => {
            if let Some((name, rest)) = msg::parse_msg(body).filter(|(n, _)| !n.is_empty()) {
                let stmt = registry.intern(rest);
                stmts.insert(name.to_owned(), stmt.clone());
                if conn.prepared.touch(&stmt.server_name) {
                    put_fakes(out.client, conn.tracker.push(Pending::Fake(b'1')));
                } else {
                    ensure_prepared(conn, &stmt, out, false);
                }
                return;
            }
        }
        b'B' => {
            if let Some((portal, name, rest)) = msg::bind_msg(body) {
                if let Some(stmt) = stmts.get(name).filter(|_| !name.is_empty()) {
                    ensure_prepared(conn, stmt, out, true);
                    msg::put_bind(out.server, portal, &stmt.server_name, rest);
                    conn.tracker.client_message(b'B');
                    return;
                }
            }
        }
        b'D' => {
            if let Some((b'S', name)) = msg::target_msg(body) {
                if let Some(stmt) = stmts.get(name).filter(|_| !name.is_empty()) {
                    ensure_prepared(conn, stmt, out, true);
                    msg::put_target(out.server, b'D', b'S', &stmt.server_name);
                    conn.tracker.client_message(b'D');
                    return;
                }
            }
        }
        // An SQL DEALLOCATE of the client's protocol-level statement,
        // which the server knows under another name (and keeps for other
        // clients): the client forgets it, and the server drops a
        // stand-in prepared just before, so the reply is the server's own
        // (the status of an open transaction). Only with none of the
        // client's requests outstanding, so that status is known:
        // otherwise (rare) and in an aborted transaction it goes as sent,
        // and the server refuses it or answers 26000, the statement kept
        // (an earlier request could yet fail and make the stand-in fail
        // unseen).
        b'Q' if conn.tracker.settled_for_client() && conn.tracker.status() != b'E' => {
            if let Some(name) = crate::prepared::sql_deallocate(body) {
                if stmts.remove(&name).is_some() {
                    msg::put_query(out.server, PREPARE_STAND_IN);
                    put_fakes(out.client, conn.tracker.push(Pending::HiddenQuery));
                    msg::put_query(out.server, DEALLOCATE_STAND_IN);
                    conn.tracker.client_message(b'Q');
                    return;
                }
            }
        }
        b'C' => {
            if let Some((b'S', name)) = msg::target_msg(body) {
                if !name.is_empty() {
                    // The server keeps it cached for other clients.
                    stmts.remove(name);
                    put_fakes(out.client, conn.tracker.push(Pending::Fake(b'3')));
                    return;
                }
            }
        }
        _ => {}
    }
    pass(conn, tag, frame, out);
}

/// What to do with one server frame.
pub struct ServerStep {
    /// Send it on to the client.
    pub forward: bool,
    /// Replies the proxy owes the client right after it.
    pub fakes: Vec<u8>,
    /// ReadyForQuery's status, if it is one.
    pub ready: Option<u8>,
    /// The server says a cached statement no longer fits the table (DDL):
    /// the connection's statements are stale.
    pub stale_plan: bool,
    /// A FATAL from the server (it is about to close).
    pub fatal: bool,
}

/// Accounts for one server frame (the tracker and the statement cache of
/// its connection); the caller copies the bytes.
pub fn server_frame(tracker: &mut Tracker, prepared: &mut ServerCache, frame: &[u8]) -> ServerStep {
    let mut fakes = Vec::new();
    let v = tracker.server_message(frame[0], &frame[5..], &mut fakes);
    for name in &v.unprepared {
        prepared.remove(name);
    }
    let stale_plan = frame[0] == b'E'
        && msg::error_fields(&frame[5..]).is_some_and(|e| {
            e.code == "0A000"
                && e.message
                    .starts_with("cached plan must not change result type")
        });
    ServerStep {
        forward: v.forward,
        fakes,
        ready: (frame[0] == b'Z').then(|| frame.get(5).copied()).flatten(),
        stale_plan,
        fatal: frame[0] == b'E' && msg::is_fatal(&frame[5..]),
    }
}

/// Appends the fake replies (`1`, `3`) to the client's buffer.
pub fn put_fake_replies(out: &mut BytesMut, tags: Vec<u8>) {
    put_fakes(out, tags);
}
