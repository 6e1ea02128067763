//! The message relay: client frames to the server (counted by the
//! tracker, statement names rewritten in transaction mode) and server
//! frames to the client (requests settled, ParameterStatus followed, the
//! server released once free). May call: `forward`, `tracker`, `protocol`.

use bytes::{Buf, BytesMut};

use super::forward::{self, Out};
use super::{ClientIo, Flow, Session, SessionError, MAX_SERVER_MESSAGE};
use crate::config::PoolMode;
use crate::protocol::messages as msg;
use crate::protocol::peek_frame;

impl<C: ClientIo> Session<C> {
    /// Handles every whole message the client has sent. Frames that go to
    /// the server unchanged (all but statement-naming ones in transaction
    /// mode) are counted as they come and copied in one run, not one by
    /// one: a `-M extended` request is five of them.
    pub(super) async fn on_client_data(&mut self) -> Result<Flow, SessionError> {
        let max = self.cfg.max_message_size;
        let tx = self.mode == PoolMode::Transaction;
        let mut last = 0;
        // Bytes at the front of `cbuf`: whole frames the tracker has
        // counted, owed to `out_server` before anything else goes there.
        let mut held = 0;
        loop {
            let (tag, len) = match peek_frame(&self.cbuf[held..], max) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    put_held(&mut self.out_server, &mut self.cbuf, &mut held);
                    return Err(e.into());
                }
            };
            tracing::trace!(route = self.route.label(), tag = %(tag as char), len, attached = self.server.is_some(), skipping = self.skipping, "client frame");
            if tag == b'X' {
                put_held(&mut self.out_server, &mut self.cbuf, &mut held);
                return Ok(Flow::Quit);
            }
            // The table changed since this server was chosen (the bell may
            // not have rung yet): nothing more goes to a server off its
            // role, and no new transaction to a kept one during a pause.
            if self.server.is_some()
                && !self.skipping
                && (self.shared.topology.epoch() != self.seen_epoch || self.is_parked())
            {
                put_held(&mut self.out_server, &mut self.cbuf, &mut held);
                // Only a request waits for the end of a pause: a Flush,
                // or COPY messages a failed COPY left coming, start
                // nothing, and an idle server ignores them.
                let r = if matches!(tag, b'H' | b'd' | b'c' | b'f') {
                    Ok(self.on_topology())
                } else {
                    // Boxed: rare, and its wait must not grow every session.
                    Box::pin(self.hold_while_paused()).await
                };
                match r {
                    Ok(Flow::Quit) => return Ok(Flow::Quit),
                    Ok(Flow::Continue) => {}
                    Err(e) => {
                        self.refuse(tag, &e);
                        self.cbuf.advance(len);
                        continue;
                    }
                }
            }
            if self.skipping {
                put_held(&mut self.out_server, &mut self.cbuf, &mut held);
                if tag == b'S' {
                    self.skipping = false;
                    msg::put_ready(&mut self.out_client, b'I');
                }
                self.cbuf.advance(len);
                continue;
            }
            if self.server.is_none() {
                put_held(&mut self.out_server, &mut self.cbuf, &mut held);
                // COPY messages after the server ended the COPY (an error,
                // then ReadyForQuery) while the client kept streaming: a
                // server drops them, so the proxy does too, instead of
                // taking a server for messages nothing will answer.
                if matches!(tag, b'd' | b'c' | b'f') {
                    self.cbuf.advance(len);
                    continue;
                }
                let attached = match self.owed.take() {
                    Some(e) => Err(e),
                    None => self.attach().await,
                };
                if let Err(e) = attached {
                    self.refuse(tag, &e);
                    self.cbuf.advance(len);
                    continue;
                }
                self.sync_vars();
            }
            let Some(co) = self.server.as_mut() else {
                continue;
            };
            last = tag;
            let frame = &self.cbuf[held..held + len];
            // `tx_mode()` by hand: `co` holds the server borrowed.
            if tx && !self.pinned && matches!(tag, b'Q' | b'P' | b'B') {
                self.sets.client_message(tag, &frame[5..]);
            }
            if !tx || !forward::names_a_statement(tag, &frame[5..]) {
                co.conn.tracker.client_message(tag);
                held += len;
                continue;
            }
            put_held(&mut self.out_server, &mut self.cbuf, &mut held);
            let mut out = Out {
                server: &mut self.out_server,
                client: &mut self.out_client,
            };
            let reg = &self.shared.statements;
            forward::transaction_mode(
                &mut co.conn,
                &mut self.stmts,
                reg,
                &self.cbuf[..len],
                &mut out,
            );
            self.cbuf.advance(len);
        }
        put_held(&mut self.out_server, &mut self.cbuf, &mut held);
        self.awaits_server = matches!(last, b'Q' | b'S')
            && self
                .server
                .as_ref()
                .is_some_and(|co| co.conn.tracker.reply_due());
        if self.awaits_server {
            self.bell.awaiting_reply(self.shared.bells.tick());
        }
        if !self.flush_now()? {
            self.flush_rest().await?;
        }
        Ok(Flow::Continue)
    }

    /// Handles every whole message the server has sent; releases the server
    /// in transaction mode once it is free.
    pub(super) async fn on_server_data(&mut self) -> Result<(), SessionError> {
        if self.awaits_server {
            self.awaits_server = false;
            self.bell.reply_came();
        }
        let tx = self.tx_mode();
        let mut pin = None;
        let mut deallocated = false;
        if let Some(co) = self.server.as_mut() {
            let m = self.shared.metrics.route(self.route);
            let conn = &mut co.conn;
            // Forwarded frames are copied in runs, not one by one.
            let (mut pos, mut run) = (0, 0);
            while let Some((tag, len)) = peek_frame(&conn.rbuf[pos..], MAX_SERVER_MESSAGE)? {
                if tag == b'C' {
                    let done = &conn.rbuf[pos + 5..pos + len];
                    deallocated |= matches!(done, b"DISCARD ALL\0" | b"DEALLOCATE ALL\0");
                    // The proxy's own queries (a settings sync, a
                    // DEALLOCATE's stand-in) are not the client's.
                    if tx && pin.is_none() && !conn.tracker.in_hidden_query() {
                        pin = pins(done).or_else(|| self.sets.completed(done));
                    }
                }
                if conn.tracker.passes(tag) || conn.tracker.settles(tag) {
                    pos += len;
                    continue;
                }
                if tag == b'Z' {
                    if let Some(status) = conn.tracker.last_ready(&conn.rbuf[pos + 5..pos + len]) {
                        m.ready(status);
                        pos += len;
                        continue;
                    }
                }
                let frame = &conn.rbuf[pos..pos + len];
                let step = forward::server_frame(&mut conn.tracker, &mut conn.prepared, frame);
                if frame[0] == b'S' {
                    if let Some((k, v)) = msg::parameter_status(&frame[5..]) {
                        conn.vars.set(k, v);
                        if step.forward {
                            self.vars.set(k, v);
                        }
                        if k == "in_hot_standby" {
                            co.pool.server_reported(&mut conn.params, k, v);
                        }
                    }
                }
                tracing::trace!(route = self.route.label(), tag = %(frame[0] as char), forward = step.forward, fakes = ?step.fakes, "server frame");
                if step.stale_plan {
                    // Same statement text maps to the same server name: a
                    // re-prepare would hit the stale one, here or on any
                    // other server that prepared it. Start afresh.
                    conn.prepared.clear();
                    conn.discard = true;
                    self.shared.statements.renew_all();
                }
                // In transaction mode a server's FATAL ends that server, not
                // the client's session: it is passed on as an ERROR.
                let downgrade = step.fatal && tx;
                if !step.forward || !step.fakes.is_empty() || downgrade {
                    self.out_client.extend_from_slice(&conn.rbuf[run..pos]);
                    if downgrade {
                        msg::put_downgraded_error(&mut self.out_client, &frame[5..]);
                    } else if step.forward {
                        self.out_client.extend_from_slice(frame);
                    }
                    forward::put_fake_replies(&mut self.out_client, step.fakes);
                    run = pos + len;
                }
                if let Some(status) = step.ready {
                    m.ready(status);
                }
                pos += len;
            }
            self.out_client.extend_from_slice(&conn.rbuf[run..pos]);
            conn.rbuf.advance(pos);
            if deallocated {
                // The client's `DISCARD ALL` or `DEALLOCATE ALL` dropped
                // every statement on this server, the ones the proxy
                // prepared for other clients too: they are prepared again
                // on demand. The client's own are gone, as on a direct
                // connection.
                conn.prepared.clear();
                self.stmts.clear();
            }
        }
        if let Some(what) = pin {
            tracing::info!(
                user = self.login.user,
                "{what}: the client keeps its server connection from now on (reset when it leaves)"
            );
            self.shared.metrics.pinned.increment(1);
            self.pinned = true;
        }
        let free = self
            .server
            .as_ref()
            .is_some_and(|c| c.conn.tracker.is_free());
        if free {
            self.sets.settled();
        }
        // The client's cancel key lets go of this server before the client
        // can see its ReadyForQuery: a cancel it sends after that must not
        // reach the server's next user.
        if free && self.tx_mode() {
            self.cancel.slot.detach();
        }
        if !self.flush_now()? {
            self.flush_rest().await?;
        }
        if free && self.tx_mode() {
            self.check_in();
        } else if free && self.shared.topology.paused() {
            // Kept between transactions: parked until the pause ends.
            self.park_if_free();
        }
        Ok(())
    }
}

/// Whether a command that completed leaves state on the server that later
/// transactions of the same client need, and the reason: then the client
/// keeps that server, as in session mode (and it is reset with `DISCARD
/// ALL` when the client leaves). Told by the server's CommandComplete tag,
/// not guessed from SQL text: `LISTEN` (notifications come on that
/// server), SQL-level `PREPARE` (`EXECUTE` needs that server). Any
/// completion pins too when the statements in flight may have left other
/// session state (a setting the proxy does not carry, a temporary table,
/// an advisory lock, a held cursor: see `sets`).
fn pins(tag: &[u8]) -> Option<&'static str> {
    match tag {
        b"LISTEN\0" => Some("LISTEN"),
        b"PREPARE\0" => Some("PREPARE"),
        _ => None,
    }
}

/// Moves the counted frames at the front of the client's buffer to the
/// server's (see `on_client_data`).
fn put_held(out_server: &mut BytesMut, cbuf: &mut BytesMut, held: &mut usize) {
    if *held > 0 {
        out_server.extend_from_slice(&cbuf[..*held]);
        cbuf.advance(*held);
        *held = 0;
    }
}
