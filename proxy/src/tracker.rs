//! Request/response accounting for one server connection: decides when the
//! connection is free, and where replies the proxy invented belong.
//!
//! Every request message that the server will answer is queued; each reply
//! that ends a request pops it. A server connection is free only when the
//! queue is empty, no extended-protocol message waits for a Sync, and the
//! last ReadyForQuery said idle (`I`). After an error in the extended
//! protocol the server skips everything up to the next Sync, so those
//! requests are dropped from the queue too. Pure code, no I/O.

use std::collections::VecDeque;

/// A request sent to the server (or answered by the proxy) whose reply is
/// still due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Parse; `hidden` when the proxy sent it on its own, `stmt` is the
    /// server-side name it creates.
    Parse {
        hidden: bool,
        stmt: Option<String>,
    },
    Bind,
    /// Describe of a statement (`t` then `T`/`n`) or a portal (`T`/`n`).
    Describe,
    Execute,
    /// Close; `hidden` when the proxy sent it to evict a statement.
    Close {
        hidden: bool,
    },
    Sync,
    /// Simple Query or FunctionCall: everything up to ReadyForQuery.
    Query,
    /// A simple Query the proxy sent itself (session settings, see
    /// `vars`): its replies up to and including ReadyForQuery are not
    /// forwarded, ParameterStatus excepted.
    HiddenQuery,
    /// A reply the proxy gives itself (`1` or `3`) when it reaches the front.
    Fake(u8),
    /// The client ended a COPY (CopyDone or CopyFail): no reply of its
    /// own, it marks where the server left copy-in mode, so that the Syncs
    /// sent before it, which a server in copy-in mode ignores, are not
    /// waited for (see [`Tracker::copy_started`]). Never at the front.
    CopyEnd,
}

/// What to do with one server message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Send it on to the client (false for replies to the proxy's own requests).
    pub forward: bool,
    /// Server-side statements that turned out not to exist (their Parse
    /// failed or was skipped after an error).
    pub unprepared: Vec<String>,
}

/// The accounting for one server connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    queue: VecDeque<Pending>,
    /// How many `Pending::Fake` are queued: none in the common case, which
    /// then skips looking for them.
    fakes: usize,
    unsynced: bool,
    /// The server is in copy-in mode and the client has not ended the
    /// COPY yet: its Syncs are ignored by the server.
    copying: bool,
    status: u8,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            queue: VecDeque::new(),
            fakes: 0,
            unsynced: false,
            copying: false,
            status: b'I',
        }
    }
}

impl Tracker {
    /// Last ReadyForQuery status: `I`, `T` or `E`.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Nothing outstanding and the server is idle: it may go back to the pool.
    pub fn is_free(&self) -> bool {
        self.queue.is_empty() && !self.unsynced && self.status == b'I'
    }

    /// Nothing outstanding (a transaction may still be open).
    pub fn is_quiet(&self) -> bool {
        self.queue.is_empty() && !self.unsynced
    }

    /// Nothing outstanding but the proxy's own queries (a settings sync,
    /// which leaves the transaction status as it was): the last status
    /// is the one the next request meets.
    pub fn settled_for_client(&self) -> bool {
        !self.unsynced && self.queue.iter().all(|p| matches!(p, Pending::HiddenQuery))
    }

    /// Every request is synced (a Query or Sync ends the queue): the
    /// server will answer without waiting for more from the client.
    pub fn reply_due(&self) -> bool {
        !self.unsynced && matches!(self.queue.back(), Some(Pending::Query | Pending::Sync))
    }

    /// What the client still waits for if the server vanished now: how many
    /// ReadyForQuery (one per outstanding Sync or simple query), and whether
    /// requests after the last Sync wait for a Sync still to come.
    pub fn owed_ready(&self) -> (usize, bool) {
        let readies = self
            .queue
            .iter()
            .filter(|p| matches!(p, Pending::Sync | Pending::Query))
            .count();
        (readies, self.unsynced)
    }

    /// A client message of type `tag` was forwarded (not Parse/Close, which
    /// the caller records with [`Tracker::push`]).
    pub fn client_message(&mut self, tag: u8) {
        let p = match tag {
            b'Q' | b'F' => Pending::Query,
            b'P' => Pending::Parse {
                hidden: false,
                stmt: None,
            },
            b'B' => Pending::Bind,
            b'D' => Pending::Describe,
            b'E' => Pending::Execute,
            b'C' => Pending::Close { hidden: false },
            b'S' if self.copying => return,
            b'S' => Pending::Sync,
            b'c' | b'f' => {
                // Nothing ahead: the COPY it ended is over (the server
                // ignores COPY messages outside copy-in mode).
                if !std::mem::take(&mut self.copying) && !self.queue.is_empty() {
                    self.queue.push_back(Pending::CopyEnd);
                }
                return;
            }
            _ => return,
        };
        self.push(p);
    }

    /// The server entered copy-in mode (CopyInResponse) for the request
    /// at the front. It ignores the Syncs the client sent before ending
    /// the COPY: those already queued go, and the ones still to come are
    /// not counted (PostgreSQL answers tokio-postgres's Bind, Execute,
    /// Sync, CopyData, CopyDone, Sync with one ReadyForQuery).
    fn copy_started(&mut self) {
        let mut i = 1;
        let mut ended = false;
        while i < self.queue.len() {
            match self.queue[i] {
                Pending::Sync => {
                    self.queue.remove(i);
                }
                Pending::CopyEnd => {
                    self.queue.remove(i);
                    ended = true;
                    break;
                }
                _ => i += 1,
            }
        }
        self.copying = !ended;
        if !ended && !matches!(self.queue.front(), Some(Pending::Query)) {
            // An extended-protocol COPY: its end and the Sync after it
            // are still to come.
            self.unsynced = true;
        }
    }

    /// Records a request; returns the fake replies that are due now (when
    /// the queue ahead of them is empty).
    #[inline]
    pub fn push(&mut self, p: Pending) -> Vec<u8> {
        match &p {
            Pending::Sync => self.unsynced = false,
            Pending::Query | Pending::HiddenQuery => {}
            Pending::Fake(_) => {
                self.fakes += 1;
                self.unsynced = true;
            }
            _ => self.unsynced = true,
        }
        self.queue.push_back(p);
        self.drain_fakes()
    }

    fn pop_front(&mut self) -> Option<Pending> {
        let p = self.queue.pop_front();
        if let Some(Pending::Fake(_)) = p {
            self.fakes -= 1;
        }
        // The end of a COPY that never started (its request failed) or
        // is over: nothing answers it.
        while let Some(Pending::CopyEnd) = self.queue.front() {
            self.queue.pop_front();
        }
        p
    }

    #[inline]
    fn drain_fakes(&mut self) -> Vec<u8> {
        if self.fakes == 0 {
            return Vec::new();
        }
        self.drain_fakes_slow()
    }

    fn drain_fakes_slow(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(Pending::Fake(tag)) = self.queue.front() {
            out.push(*tag);
            self.pop_front();
        }
        out
    }

    fn pop(&mut self, v: &mut Verdict) {
        if let Some(Pending::Parse { hidden: true, .. } | Pending::Close { hidden: true }) =
            self.pop_front()
        {
            v.forward = false;
        }
    }

    /// The server is answering a query the proxy sent itself (a settings
    /// sync): its replies are not the client's.
    pub fn in_hidden_query(&self) -> bool {
        matches!(self.queue.front(), Some(Pending::HiddenQuery))
    }

    /// Whether a server message of type `tag` needs no accounting and goes
    /// to the client as is: rows, notices and the like, outside the
    /// replies to the proxy's own queries. The common case, kept cheap.
    #[inline]
    pub fn passes(&self, tag: u8) -> bool {
        match tag {
            b'D' | b'N' | b'A' | b'd' | b't' | b'K' | b'H' | b'W' | b'c' => !self.in_hidden_query(),
            b'T' => !matches!(
                self.queue.front(),
                Some(Pending::HiddenQuery | Pending::Describe)
            ),
            // Inside a simple query, only its ReadyForQuery counts.
            b'C' | b'I' | b's' => matches!(self.queue.front(), Some(Pending::Query)),
            _ => false,
        }
    }

    /// Accounts for the plain reply to the request at the front (ParseComplete
    /// to a client's Parse, BindComplete, a Describe's row description or
    /// NoData, an Execute's completion, CloseComplete) when no fake reply is
    /// queued: it goes to the client as is. `false`: take
    /// [`Tracker::server_message`]. The extended protocol's common case.
    #[inline]
    pub fn settles(&mut self, tag: u8) -> bool {
        if self.fakes != 0 {
            return false;
        }
        let plain = matches!(
            (tag, self.queue.front()),
            (b'1', Some(Pending::Parse { hidden: false, .. }))
                | (b'2', Some(Pending::Bind))
                | (b'3', Some(Pending::Close { hidden: false }))
                | (b'n' | b'T', Some(Pending::Describe))
                | (b'C' | b's' | b'I', Some(Pending::Execute))
        );
        if plain {
            self.pop_front();
        }
        plain
    }

    /// The ReadyForQuery that ends the only request outstanding, with no
    /// fake reply queued: accounts for it and returns its status. `None`:
    /// take [`Tracker::server_message`]. The common end of a transaction,
    /// kept cheap.
    #[inline]
    pub fn last_ready(&mut self, body: &[u8]) -> Option<u8> {
        if self.fakes != 0 || self.queue.len() != 1 {
            return None;
        }
        if !matches!(self.queue.front(), Some(Pending::Query | Pending::Sync)) {
            return None;
        }
        let status = crate::protocol::messages::ready_status(body)?;
        self.status = status;
        self.queue.clear();
        self.copying = false;
        Some(status)
    }

    /// Accounts for one server message; fake replies due after it are
    /// appended to `fakes`.
    pub fn server_message(&mut self, tag: u8, body: &[u8], fakes: &mut Vec<u8>) -> Verdict {
        if let Some(Pending::HiddenQuery) = self.queue.front() {
            if tag == b'Z' {
                if let Some(s) = crate::protocol::messages::ready_status(body) {
                    self.status = s;
                }
                self.pop_front();
                fakes.extend(self.drain_fakes());
            }
            return Verdict {
                forward: tag == b'S',
                unprepared: Vec::new(),
            };
        }
        let mut v = Verdict {
            forward: true,
            unprepared: Vec::new(),
        };
        let front_is_query = matches!(self.queue.front(), Some(Pending::Query));
        if matches!(tag, b'E' | b'Z') {
            // The server left copy-in mode (an error ends a COPY).
            self.copying = false;
        }
        match tag {
            b'1' | b'2' | b'3' | b'n' => self.pop(&mut v),
            b'T' if matches!(self.queue.front(), Some(Pending::Describe)) => self.pop(&mut v),
            b'C' | b'I' | b's' if !front_is_query => self.pop(&mut v),
            b'E' if !front_is_query => self.error_skip(&mut v),
            b'G' => {
                self.copy_started();
                return v;
            }
            b'Z' => {
                if let Some(s) = crate::protocol::messages::ready_status(body) {
                    self.status = s;
                }
                while let Some(p) = self.pop_front() {
                    if matches!(p, Pending::Sync | Pending::Query) {
                        break;
                    }
                }
            }
            _ => return v,
        }
        fakes.extend(self.drain_fakes());
        v
    }

    /// The server skips to the next Sync: drop those requests; any Parse
    /// among them (including the failed one) created no statement.
    fn error_skip(&mut self, v: &mut Verdict) {
        while let Some(p) = self.queue.front() {
            if matches!(p, Pending::Sync) {
                break;
            }
            if let Some(Pending::Parse {
                stmt: Some(name), ..
            }) = self.pop_front()
            {
                v.unprepared.push(name);
            }
        }
    }
}

#[cfg(test)]
mod tests;
