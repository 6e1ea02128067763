//! Which client statements may leave session state behind on a server.
//!
//! In transaction mode a server goes to the next client after each
//! transaction; session state made there would go with it (PgBouncer's
//! documented leak): a plain `SET search_path = tenant_a` or `SET
//! app.tenant = 'a'`, a temporary table, a session advisory lock, a `WITH
//! HOLD` cursor. The proxy pins a client whose statements may have left
//! such state (see `relay::pins`): the client keeps its server, and the
//! server is reset when it leaves. What cannot outlive its transaction, or
//! what the proxy carries itself (`vars`), pins nothing, told apart from
//! the statement text, conservatively: `SET LOCAL`, `SET TRANSACTION`, a
//! `SET` of a setting `vars` carries, `CREATE TEMP ... ON COMMIT DROP`,
//! cursors without `HOLD`, `pg_advisory_xact_lock`. Text the simple
//! statement splitter here cannot follow counts as leaving state.
//! The text itself is judged in `text`. May call: `protocol`, `memchr`.

use crate::protocol::messages as msg;

mod text;

pub use text::{leaves, statement_leaves_state};

/// What a client message may leave on its server.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Leaves {
    /// A setting the proxy does not carry, once its `SET` completes.
    pub setting: bool,
    /// Other session state (its name, for the log), once any of the
    /// message's statements completes.
    pub state: Option<&'static str>,
}

impl Leaves {
    fn or(self, other: Leaves) -> Leaves {
        Leaves {
            setting: self.setting || other.setting,
            state: self.state.or(other.state),
        }
    }
}

/// What the client has in flight that may leave session state, in
/// transaction mode. Judged per message as it goes to the server; cleared
/// only once the server has answered everything (so a completion is
/// always judged against every message that could have produced it).
#[derive(Debug, Default)]
pub struct SetWatch {
    /// Messages since the server was last free.
    in_flight: Leaves,
    /// The client's unnamed statement (Bind runs it again later).
    unnamed: Leaves,
    /// Some named statement of the client's.
    named: Leaves,
    /// The text (NUL ended) of the last unnamed Parse, whose verdict is
    /// `unnamed`: drivers send the same one for every execution.
    last_unnamed: Vec<u8>,
}

impl SetWatch {
    /// Notes a client message on its way to the server.
    pub fn client_message(&mut self, tag: u8, body: &[u8]) {
        let none = Leaves::default();
        match tag {
            b'Q' => {
                let l = leaves(body.strip_suffix(b"\0").unwrap_or(body));
                self.in_flight = self.in_flight.or(l);
            }
            b'P' => {
                let again = body.first() == Some(&0)
                    && !self.last_unnamed.is_empty()
                    && body[1..].starts_with(&self.last_unnamed);
                if again {
                    self.in_flight = self.in_flight.or(self.unnamed);
                    return;
                }
                let (name, sql) = parse_sql(body);
                let l = statement_leaves_state(sql);
                if name.is_empty() {
                    self.unnamed = l;
                    self.last_unnamed.clear();
                    self.last_unnamed.extend_from_slice(sql);
                    self.last_unnamed.push(0);
                } else {
                    self.named = self.named.or(l);
                }
                self.in_flight = self.in_flight.or(l);
            }
            b'B' if self.unnamed != none || self.named != none => {
                let l = match msg::bind_msg(body) {
                    Some((_, "", _)) => self.unnamed,
                    Some(_) => self.named,
                    // Malformed: the server refuses it; judged as either.
                    None => self.unnamed.or(self.named),
                };
                self.in_flight = self.in_flight.or(l);
            }
            _ => {}
        }
    }

    /// A statement completed with `tag` (CommandComplete's, NUL ended):
    /// the session state it may have left, if any.
    pub fn completed(&self, tag: &[u8]) -> Option<&'static str> {
        if tag == b"SET\0" && self.in_flight.setting {
            return Some("SET");
        }
        self.in_flight.state
    }

    /// The server has answered everything the client sent.
    pub fn settled(&mut self) {
        self.in_flight = Leaves::default();
    }
}

/// The SQL of a Parse body (statement name, then the text). Bytes, not
/// `msg::parse_msg`'s checked text: it runs on every Parse, and a text
/// that is not UTF-8 must still be judged (as leaving state).
pub fn parse_sql(body: &[u8]) -> (&[u8], &[u8]) {
    let name_end = memchr::memchr(0, body).unwrap_or(body.len());
    let rest = body.get(name_end + 1..).unwrap_or_default();
    let sql_end = memchr::memchr(0, rest).unwrap_or(rest.len());
    (&body[..name_end], &rest[..sql_end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use text::ADVISORY_LOCK;

    #[test]
    fn a_completion_is_judged_by_everything_in_flight() {
        let mut w = SetWatch::default();
        w.client_message(b'Q', b"SET LOCAL statement_timeout = 1\0");
        assert_eq!(w.completed(b"SET\0"), None);
        w.client_message(b'Q', b"SET app.tenant = 'a'\0");
        assert_eq!(w.completed(b"SET\0"), Some("SET"), "a later SET in flight");
        assert_eq!(w.completed(b"SELECT 1\0"), None, "only a SET tag sets");
        w.settled();
        assert_eq!(w.completed(b"SET\0"), None);
        // Parsed once, run again by a later Bind.
        w.client_message(b'P', b"\0SET app.tenant = $1\0\0\0");
        w.settled();
        w.client_message(b'B', b"\0\0\0\0\0\0\0\0");
        assert_eq!(
            w.completed(b"SET\0"),
            Some("SET"),
            "the unnamed SET bound again"
        );
        w.settled();
        w.client_message(b'P', b"\0select 1\0\0\0");
        w.client_message(b'B', b"\0\0\0\0\0\0\0\0");
        assert_eq!(
            w.completed(b"SET\0"),
            None,
            "the unnamed statement was replaced"
        );
        w.client_message(b'P', b"\0select 1\0\0\0");
        assert_eq!(w.completed(b"SET\0"), None, "the same text again");
        w.client_message(b'P', b"\0select 1 + pg_advisory_lock(1)\0\0\0");
        assert_eq!(
            w.completed(b"SELECT 1\0"),
            Some(ADVISORY_LOCK),
            "a text that starts alike is not the same"
        );
        w.settled();
        w.client_message(b'P', b"s1\0select pg_advisory_lock($1)\0\0\0");
        w.settled();
        w.client_message(b'B', b"\0s1\0\0\0\0\0\0\0");
        assert_eq!(
            w.completed(b"SELECT 1\0"),
            Some(ADVISORY_LOCK),
            "a named lock bound again"
        );
    }

    /// Every mix of the characters the splitter cares about, short texts
    /// (it indexes only at ASCII bytes, so multi-byte text is in the mix).
    #[test]
    fn no_text_makes_it_panic() {
        use rand::{Rng, SeedableRng};
        let alphabet = [
            "'",
            "\"",
            "$",
            "$1",
            "$q$",
            "-",
            "--",
            "/*",
            "*/",
            "*",
            "/",
            ";",
            "\\",
            "\n",
            " ",
            "set ",
            "SET LOCAL ",
            "temp",
            "create ",
            "declare ",
            "hold",
            "advisory_lock",
            "é",
            "x",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..12);
            let text: String = (0..n)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let _ = leaves(text.as_bytes());
        }
    }

    #[test]
    fn parse_bodies_are_split() {
        assert_eq!(
            parse_sql(b"s1\0SET x = 1\0\0\0"),
            (&b"s1"[..], &b"SET x = 1"[..])
        );
        assert_eq!(parse_sql(b"\0select 1\0\0\0").0, b"");
        assert_eq!(parse_sql(b"").1, b"");
    }
}
