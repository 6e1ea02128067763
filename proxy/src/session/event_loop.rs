//! The session's message loop: waits for the next event (client bytes,
//! server bytes, a routing change, a drain request), hands it to the
//! session's handlers, and decides when the session ends.
//!
//! Idle clients wait without holding a read buffer (but for a few busy
//! ones, see `buffers::Keep`): their first read lands on the stack, and a
//! buffer is taken only for bytes to keep. May call: the session's
//! handlers, tokio I/O.

use std::sync::Arc;

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::ReadBuf;
use tokio_util::io::poll_read_buf;

use super::buffers::{self, make_room, unpark_buffer};
use super::{ClientError, ClientIo, Flow, Session, SessionError};
use crate::bell::Doorbell;
use crate::metrics::ErrorKind;
use crate::protocol::messages as msg;

/// Bytes an idle client's first read takes on the stack: a whole typical
/// request, so most transactions start with one read.
const FIRST_READ: usize = 1024;

/// What woke the session. Bytes read; 0: the peer closed or the read
/// failed, which end alike (and an `io::Error` kept here would cost a drop
/// check per event).
enum Ev {
    Client(usize),
    Server(usize),
    /// The routing table changed or the proxy drains.
    Bell,
}

/// Loop state that is not part of the session.
#[derive(Default)]
struct LoopState {
    drain_noted: bool,
    /// The waker this session left at its bell (see `Doorbell::poll_rung`).
    bell_waker: Option<std::task::Waker>,
    /// What the bell was last told of the session's idleness (see
    /// `Session::idleness`); `None`: nothing yet, or the client has sent
    /// something since.
    idle_told: Option<Idle>,
}

/// Whether the session waits for its client and nothing else.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idle {
    Busy,
    BetweenTransactions,
    InTransaction,
}

fn server_lost() -> ClientError {
    ClientError {
        code: "08006",
        message: "server connection lost".into(),
    }
}

impl<C: ClientIo> Session<C> {
    /// Waits for the next event. Polls the sockets directly, in a fixed
    /// order (server replies first, so a server is never left blocked on a
    /// full socket), with no per-turn futures to build.
    async fn next_event(
        &mut self,
        bell: &Doorbell,
        bell_waker: &mut Option<std::task::Waker>,
    ) -> Ev {
        let Session {
            client,
            cbuf,
            server,
            awaits_server,
            keep,
            ..
        } = self;
        // While the server owes a synced reply, the client is read after
        // it: saves a readiness registration per request. A client that
        // pipelines is read as soon as the first reply arrives.
        let read_client = !(*awaits_server && server.is_some()) || bell.watching();
        let idle = server.is_none() && cbuf.is_empty();
        if idle {
            buffers::idle(cbuf, keep);
        } else {
            make_room(cbuf);
        }
        if let Some(co) = server.as_mut() {
            make_room(&mut co.conn.rbuf);
        }
        std::future::poll_fn(|cx| {
            if let Some(co) = server.as_mut() {
                let stream = Pin::new(&mut co.conn.stream);
                if let Poll::Ready(r) = poll_read_buf(stream, cx, &mut co.conn.rbuf) {
                    return Poll::Ready(Ev::Server(r.unwrap_or(0)));
                }
            }
            if !read_client {
                // Only the server and the bell.
            } else if cbuf.capacity() == 0 {
                // Parked: read into the stack, and take a buffer only once
                // there is something to keep.
                let mut first = [MaybeUninit::<u8>::uninit(); FIRST_READ];
                let mut rb = ReadBuf::uninit(&mut first);
                if let Poll::Ready(r) = Pin::new(&mut *client).poll_read(cx, &mut rb) {
                    let n = rb.filled().len();
                    if r.is_ok() && n > 0 {
                        unpark_buffer(cbuf);
                        cbuf.extend_from_slice(rb.filled());
                    }
                    return Poll::Ready(Ev::Client(if r.is_ok() { n } else { 0 }));
                }
            } else if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut *client), cx, cbuf) {
                return Poll::Ready(Ev::Client(r.unwrap_or(0)));
            }
            bell.poll_rung(cx, bell_waker).map(|()| Ev::Bell)
        })
        .await
    }

    /// Handles one event.
    async fn handle(&mut self, ev: Ev, st: &mut LoopState) -> Result<Flow, SessionError> {
        match ev {
            Ev::Client(0) => Ok(Flow::Quit),
            Ev::Client(n) => {
                self.shared.metrics.bytes_in.increment(n as u64);
                // Activity, even if this turn ends idle again: the bell
                // learns it now, before a wait for a server. Only a whole
                // message counts (as PostgreSQL's idle timers): a client
                // that sends a few bytes and stalls stays idle since its
                // last one.
                if st.idle_told.is_some_and(|i| i != Idle::Busy) && self.whole_message_kept() {
                    st.idle_told = None;
                    self.bell.busy();
                }
                self.on_client_data().await
            }
            Ev::Server(0) => Ok(self.lose_server(server_lost())),
            Ev::Server(_) => self.on_server_data().await.map(|_| Flow::Continue),
            Ev::Bell => {
                st.drain_noted = self.shared.draining.is_cancelled();
                self.cfg = self.shared.cfg();
                if let Some(kind) = self.bell.take_idle_expired() {
                    if let Some(flow) = self.idle_expired(kind) {
                        return Ok(flow);
                    }
                    // It was busy again before the ring came: tell anew.
                    st.idle_told = None;
                }
                Ok(self.on_topology())
            }
        }
    }

    /// Waiting for the client and nothing else: no request outstanding at
    /// the server, no client bytes kept (inside a transaction when it
    /// holds a server whose last ReadyForQuery was not idle).
    fn idleness(&self) -> Idle {
        if self.whole_message_kept() {
            return Idle::Busy;
        }
        match &self.server {
            None => Idle::BetweenTransactions,
            Some(co) if !co.conn.tracker.is_quiet() => Idle::Busy,
            Some(co) if co.conn.tracker.status() == b'I' => Idle::BetweenTransactions,
            Some(_) => Idle::InTransaction,
        }
    }

    /// Client bytes kept that make a whole message (or a malformed one,
    /// which ends the session anyway), not just the start of one.
    fn whole_message_kept(&self) -> bool {
        !self.cbuf.is_empty()
            && !matches!(
                crate::protocol::peek_frame(&self.cbuf, self.cfg.max_message_size),
                Ok(None)
            )
    }

    /// Tells the bell when the session starts waiting for its client, for
    /// `client_idle_timeout` and `idle_transaction_timeout` (only when one
    /// is set: two relaxed stores per transaction otherwise saved).
    fn tell_idleness(&self, st: &mut LoopState) {
        if self.cfg.client_idle_timeout.is_zero() && self.cfg.idle_transaction_timeout.is_zero() {
            return;
        }
        let now = self.idleness();
        if st.idle_told == Some(now) {
            return;
        }
        match now {
            Idle::Busy => self.bell.busy(),
            Idle::BetweenTransactions | Idle::InTransaction => self
                .bell
                .idle_from(self.shared.bells.tick(), now == Idle::InTransaction),
        }
        st.idle_told = Some(now);
    }

    /// The sweeper found the client idle past a limit: the session ends
    /// with PostgreSQL's error for it, if the client is still idle that
    /// way; `None` if it is not (it sent something meanwhile). Its server,
    /// inside a transaction, is closed by `finish` (which rolls the
    /// transaction back), never pooled.
    fn idle_expired(&mut self, kind: u64) -> Option<Flow> {
        let (want, code, text, limit) = if kind == crate::bell::IDLE_IN_TRANSACTION {
            (
                Idle::InTransaction,
                "25P03",
                "terminating connection due to idle-in-transaction timeout",
                self.cfg.idle_transaction_timeout,
            )
        } else {
            (
                Idle::BetweenTransactions,
                "57P05",
                "terminating connection due to idle-session timeout",
                self.cfg.client_idle_timeout,
            )
        };
        if self.idleness() != want || limit.is_zero() {
            return None;
        }
        tracing::info!(user = self.login.user, ?limit, "{text}");
        self.shared.metrics.error(ErrorKind::IdleTimeout);
        msg::put_error(&mut self.out_client, "FATAL", code, text);
        Some(Flow::Quit)
    }

    /// Turns a handler error into what happens next; `None`: end now.
    fn recover(&mut self, r: Result<Flow, SessionError>) -> Option<Flow> {
        match r {
            Ok(f) => Some(f),
            Err(SessionError::Protocol(e)) => {
                self.shared.metrics.error(ErrorKind::Protocol);
                msg::put_error(&mut self.out_client, "FATAL", "08P01", &e.to_string());
                Some(Flow::Quit)
            }
            Err(SessionError::ServerIo(_)) => Some(self.lose_server(server_lost())),
            Err(SessionError::ClientIo(_)) => None,
        }
    }

    /// Draining: a client leaves between transactions, never inside one.
    async fn drained(&mut self, st: &LoopState) -> bool {
        let between = self
            .server
            .as_ref()
            .is_none_or(|co| co.conn.tracker.is_free());
        if !(st.drain_noted && between && self.cbuf.is_empty()) {
            return false;
        }
        msg::put_error(
            &mut self.out_client,
            "FATAL",
            "57P01",
            "terminating connection due to administrator command: pgha-proxy is shutting down",
        );
        let _ = self.flush().await;
        true
    }

    /// The message loop, until the client leaves or the proxy stops.
    pub(super) async fn run(&mut self) {
        // The bell is rung after the routing table changed or the drain
        // began; a drain that began before this session registered its
        // bell is seen here.
        let bell: Arc<Doorbell> = self.bell.clone();
        let mut st = LoopState {
            drain_noted: self.shared.draining.is_cancelled(),
            ..LoopState::default()
        };
        loop {
            self.tell_idleness(&mut st);
            let ev = self.next_event(&bell, &mut st.bell_waker).await;
            let r = self.handle(ev, &mut st).await;
            let Some(flow) = self.recover(r) else { break };
            let flushed = match self.flush_now() {
                Ok(true) => Ok(()),
                Ok(false) => self.flush_rest().await,
                Err(e) => Err(e),
            };
            if flushed.is_err() {
                break;
            }
            if matches!(flow, Flow::Quit) || self.drained(&st).await {
                break;
            }
        }
        self.finish().await;
    }
}
