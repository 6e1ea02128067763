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
    status: u8,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            queue: VecDeque::new(),
            fakes: 0,
            unsynced: false,
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
            b'S' => Pending::Sync,
            _ => return,
        };
        self.push(p);
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
            b'D' | b'N' | b'A' | b'd' | b't' | b'K' | b'G' | b'H' | b'W' | b'c' => {
                !self.in_hidden_query()
            }
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
            self.queue.pop_front();
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
        match tag {
            b'1' | b'2' | b'3' | b'n' => self.pop(&mut v),
            b'T' if matches!(self.queue.front(), Some(Pending::Describe)) => self.pop(&mut v),
            b'C' | b'I' | b's' if !front_is_query => self.pop(&mut v),
            b'E' if !front_is_query => self.error_skip(&mut v),
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
mod tests {
    use super::*;

    #[test]
    fn a_hidden_query_is_answered_to_nobody_but_its_parameter_status() {
        let mut t = Tracker::default();
        t.push(Pending::HiddenQuery);
        t.client_message(b'Q');
        let (fwd, _) = reply(
            &mut t,
            &[
                (b'C', b"SET\0"),
                (b'S', b"TimeZone\0UTC\0"),
                (b'Z', b"I"),
                (b'T', b""),
                (b'C', b"SELECT 1\0"),
                (b'Z', b"I"),
            ],
        );
        assert_eq!(fwd, vec![false, true, false, true, true, true]);
        assert!(t.is_free());
    }

    #[test]
    fn what_passes_unaccounted_is_exactly_what_accounting_would_forward_untouched() {
        let states: Vec<Vec<Pending>> = vec![
            vec![],
            vec![Pending::Query],
            vec![Pending::HiddenQuery, Pending::Query],
            vec![Pending::Describe, Pending::Sync],
            vec![
                Pending::Parse {
                    hidden: true,
                    stmt: Some("s1".into()),
                },
                Pending::Bind,
                Pending::Execute,
                Pending::Sync,
            ],
            vec![
                Pending::Close { hidden: true },
                Pending::Fake(b'1'),
                Pending::Sync,
            ],
        ];
        let mut passing = 0;
        for queue in states {
            let mut t = Tracker::default();
            for p in queue {
                t.push(p);
            }
            for tag in 0..=255u8 {
                if !t.passes(tag) {
                    continue;
                }
                passing += 1;
                let mut after = t.clone();
                let mut fakes = Vec::new();
                let v = after.server_message(tag, b"I", &mut fakes);
                assert!(
                    v.forward && v.unprepared.is_empty() && fakes.is_empty(),
                    "{}",
                    tag as char
                );
                assert_eq!(after, t, "{} changed the accounting", tag as char);
            }
        }
        assert!(passing > 20, "the fast path covers rows and notices");
    }

    #[test]
    fn what_settles_quickly_is_exactly_what_accounting_would_forward_alone() {
        let parse = |hidden: bool| Pending::Parse {
            hidden,
            stmt: hidden.then(|| "s1".to_owned()),
        };
        let states: Vec<Vec<Pending>> = vec![
            vec![],
            vec![Pending::Query],
            vec![
                parse(false),
                Pending::Bind,
                Pending::Describe,
                Pending::Execute,
                Pending::Sync,
            ],
            vec![
                Pending::Bind,
                Pending::Describe,
                Pending::Execute,
                Pending::Sync,
            ],
            vec![Pending::Describe, Pending::Execute, Pending::Sync],
            vec![Pending::Execute, Pending::Sync],
            vec![Pending::Close { hidden: false }, Pending::Sync],
            vec![parse(true), Pending::Bind, Pending::Sync],
            vec![Pending::Close { hidden: true }, parse(true), Pending::Sync],
            vec![Pending::Bind, Pending::Fake(b'1'), Pending::Sync],
            vec![Pending::HiddenQuery, Pending::Query],
        ];
        let mut settled = 0;
        for queue in states {
            let mut t = Tracker::default();
            for p in queue.clone() {
                t.push(p);
            }
            for tag in 0..=255u8 {
                let mut quick = t.clone();
                if !quick.settles(tag) {
                    assert_eq!(quick, t, "{} changed the accounting", tag as char);
                    continue;
                }
                settled += 1;
                let mut general = t.clone();
                let mut fakes = Vec::new();
                let v = general.server_message(tag, b"", &mut fakes);
                let tag = tag as char;
                assert!(
                    v.forward && v.unprepared.is_empty() && fakes.is_empty(),
                    "{tag}"
                );
                assert_eq!(quick, general, "{tag} after {queue:?}");
            }
        }
        assert_eq!(
            settled, 8,
            "1, 2, 3, n and T, C s and I, each at its request"
        );
    }

    #[test]
    fn the_last_ready_fast_path_accounts_exactly_as_the_general_one() {
        let states: Vec<Vec<Pending>> = vec![
            vec![],
            vec![Pending::Query],
            vec![Pending::Sync],
            vec![Pending::HiddenQuery],
            vec![Pending::HiddenQuery, Pending::Query],
            vec![Pending::Query, Pending::Query],
            vec![Pending::Bind, Pending::Sync],
            vec![Pending::Bind, Pending::Fake(b'3'), Pending::Sync],
        ];
        let mut taken = 0;
        for queue in states {
            for body in [&b"I"[..], b"T", b"E", b"", b"IX"] {
                let mut t = Tracker::default();
                for p in queue.clone() {
                    t.push(p);
                }
                let mut general = t.clone();
                let mut fakes = Vec::new();
                let v = general.server_message(b'Z', body, &mut fakes);
                let Some(status) = t.last_ready(body) else {
                    continue;
                };
                taken += 1;
                assert!(v.forward && v.unprepared.is_empty() && fakes.is_empty());
                assert_eq!(t, general, "{queue:?} {body:?}");
                assert_eq!(Some(status), body.first().copied());
            }
        }
        assert_eq!(taken, 6, "a lone Query or Sync, with each valid status");
    }

    fn reply(t: &mut Tracker, msgs: &[(u8, &[u8])]) -> (Vec<bool>, Vec<u8>) {
        let mut fakes = Vec::new();
        let fwd = msgs
            .iter()
            .map(|(tag, body)| {
                let v = t.server_message(*tag, body, &mut fakes).forward;
                let queued = t.queue.iter().filter(|p| matches!(p, Pending::Fake(_)));
                assert_eq!(t.fakes, queued.count(), "fake count out of step");
                v
            })
            .collect();
        (fwd, fakes)
    }

    #[test]
    fn simple_query_frees_the_server_only_on_idle_ready() {
        let mut t = Tracker::default();
        t.client_message(b'Q');
        assert!(!t.is_free());
        reply(&mut t, &[(b'T', b""), (b'D', b""), (b'C', b"")]);
        assert!(!t.is_free(), "results are not the end");
        reply(&mut t, &[(b'Z', b"T")]);
        assert!(!t.is_free(), "open transaction keeps the server");
        assert!(t.is_quiet());
        t.client_message(b'Q');
        reply(&mut t, &[(b'E', b""), (b'Z', b"E")]);
        assert_eq!(t.status(), b'E');
        assert!(!t.is_free(), "failed transaction keeps the server");
        t.client_message(b'Q');
        reply(&mut t, &[(b'C', b""), (b'Z', b"I")]);
        assert!(t.is_free());
    }

    #[test]
    fn pipeline_with_several_syncs_is_free_only_after_the_last_ready() {
        let mut t = Tracker::default();
        for tag in [b'P', b'B', b'E', b'S', b'B', b'E', b'S'] {
            t.client_message(tag);
        }
        reply(
            &mut t,
            &[(b'1', b""), (b'2', b""), (b'C', b""), (b'Z', b"I")],
        );
        assert!(!t.is_free(), "second Sync still outstanding");
        reply(&mut t, &[(b'2', b""), (b'C', b""), (b'Z', b"I")]);
        assert!(t.is_free());
    }

    #[test]
    fn flush_without_sync_keeps_the_client_attached() {
        let mut t = Tracker::default();
        for tag in [b'P', b'D', b'H'] {
            t.client_message(tag);
        }
        reply(&mut t, &[(b'1', b""), (b't', b""), (b'T', b"")]);
        assert!(t.is_quiet() || !t.is_free());
        assert!(!t.is_free(), "no Sync yet: implicit transaction open");
        t.client_message(b'S');
        reply(&mut t, &[(b'Z', b"I")]);
        assert!(t.is_free());
    }

    #[test]
    fn error_mid_pipeline_skips_to_the_next_sync_and_forgets_failed_parses() {
        let mut t = Tracker::default();
        t.push(Pending::Parse {
            hidden: false,
            stmt: Some("a".into()),
        });
        t.push(Pending::Parse {
            hidden: true,
            stmt: Some("b".into()),
        });
        t.client_message(b'B');
        t.client_message(b'E');
        t.client_message(b'S');
        t.client_message(b'B');
        t.client_message(b'S');
        let mut fakes = Vec::new();
        let v = t.server_message(b'E', b"", &mut fakes);
        assert!(v.forward);
        assert_eq!(v.unprepared, vec!["a".to_string(), "b".to_string()]);
        reply(&mut t, &[(b'Z', b"I")]);
        assert!(!t.is_free());
        reply(&mut t, &[(b'2', b""), (b'Z', b"I")]);
        assert!(t.is_free());
    }

    #[test]
    fn hidden_parse_reply_is_not_forwarded_and_fakes_come_in_order() {
        let mut t = Tracker::default();
        assert_eq!(
            t.push(Pending::Fake(b'1')),
            vec![b'1'],
            "nothing ahead: at once"
        );
        t.push(Pending::Parse {
            hidden: true,
            stmt: Some("s".into()),
        });
        t.client_message(b'B');
        assert!(t.push(Pending::Fake(b'3')).is_empty(), "must wait its turn");
        t.client_message(b'S');
        let (fwd, fakes) = reply(&mut t, &[(b'1', b"")]);
        assert_eq!((fwd, fakes), (vec![false], vec![]));
        let (fwd, fakes) = reply(&mut t, &[(b'2', b"")]);
        assert_eq!((fwd, fakes), (vec![true], vec![b'3']));
        reply(&mut t, &[(b'Z', b"I")]);
        assert!(t.is_free());
    }

    #[test]
    fn copy_keeps_the_server_until_ready() {
        let mut t = Tracker::default();
        t.client_message(b'Q');
        reply(&mut t, &[(b'G', b"")]);
        for tag in [b'd', b'd', b'c'] {
            t.client_message(tag);
        }
        assert!(!t.is_free());
        reply(&mut t, &[(b'C', b"")]);
        assert!(!t.is_free());
        reply(&mut t, &[(b'Z', b"I")]);
        assert!(t.is_free());
    }

    #[test]
    fn notices_and_notifications_change_nothing() {
        let mut t = Tracker::default();
        t.client_message(b'Q');
        let (fwd, _) = reply(&mut t, &[(b'N', b""), (b'A', b""), (b'S', b"")]);
        assert_eq!(fwd, vec![true; 3]);
        assert!(!t.is_free());
    }
}
