//! Which client statements may leave a session setting behind on a server.
//!
//! In transaction mode a server goes to the next client after each
//! transaction; a plain `SET search_path = tenant_a` or `SET app.tenant =
//! 'a'` would go with it (PgBouncer's documented leak). The proxy pins a
//! client whose `SET` may have left state the proxy does not carry itself
//! (see `relay::pins`). What it carries, or what cannot outlive the
//! transaction, is told apart from the statement text, conservatively: a
//! statement counts as harmless only when it is one lone `SET LOCAL`,
//! `SET TRANSACTION`, or `SET` of a setting `vars` carries; anything else
//! that spells "set" and completes with a `SET` tag pins. May call:
//! `vars`, `memchr`.

use crate::vars::Vars;

/// Whether `sql` (one or several statements) could leave a session
/// setting the proxy does not carry: some statement in it is a `SET` and
/// not a harmless one. Statements are split at semicolons outside
/// single quotes; text this simple splitter cannot follow (double quotes,
/// dollar quotes, backslashes, comments) counts as leaving one. Cheap for
/// the common statement: one SIMD scan finds no "set".
pub fn may_leave_setting(sql: &[u8]) -> bool {
    if !spells_set(sql) {
        return false;
    }
    let Ok(sql) = std::str::from_utf8(sql) else {
        return true;
    };
    // Only a statement that starts with SET can complete with a SET tag.
    let leaves = |stmt: &str| {
        let first = stmt.split_whitespace().next().unwrap_or_default();
        first.eq_ignore_ascii_case("set") && !harmless_set(stmt)
    };
    let bytes = sql.as_bytes();
    let (mut start, mut quoted) = (0, false);
    for (i, &b) in bytes.iter().enumerate() {
        let next = bytes.get(i + 1).copied();
        match b {
            b'\'' => quoted = !quoted,
            b'"' | b'$' | b'\\' => return true,
            b'-' if !quoted && next == Some(b'-') => return true,
            b'/' if !quoted && next == Some(b'*') => return true,
            b';' if !quoted => {
                if leaves(&sql[start..i]) {
                    return true;
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    quoted || leaves(&sql[start..])
}

/// "set" in any letter case, anywhere: a SET statement cannot be written
/// without it.
fn spells_set(sql: &[u8]) -> bool {
    memchr::memchr2_iter(b's', b'S', sql).any(|i| {
        sql.get(i + 1..i + 3)
            .is_some_and(|et| et.eq_ignore_ascii_case(b"et"))
    })
}

/// `SET LOCAL ...`, `SET TRANSACTION ...`, or `SET [SESSION] name {TO|=}
/// ...` / `SET TIME ZONE` / `SET NAMES` for a setting `vars` carries. A
/// quoted name is not harmless.
fn harmless_set(sql: &str) -> bool {
    // One statement, without comments (see `may_leave_setting`).
    let body = sql.trim_end_matches(|c: char| c.is_whitespace() || c == '\0');
    let mut words = body.split_whitespace();
    if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("set")) {
        return false;
    }
    let Some(mut word) = words.next() else {
        return false;
    };
    if word.eq_ignore_ascii_case("local") || word.eq_ignore_ascii_case("transaction") {
        return true;
    }
    if word.eq_ignore_ascii_case("session") {
        match words.next() {
            Some(w) => word = w,
            None => return false,
        }
    }
    if word.eq_ignore_ascii_case("names") {
        return true;
    }
    if word.eq_ignore_ascii_case("time") {
        return words.next().is_some_and(|w| w.eq_ignore_ascii_case("zone"));
    }
    // `name=value`, `name =value`, `name = value`, `name TO value`.
    let name = word.split('=').next().unwrap_or_default();
    Vars::is_tracked(name)
        && (word.contains('=')
            || words
                .next()
                .is_some_and(|w| w.starts_with('=') || w.eq_ignore_ascii_case("to")))
}

/// What the client has in flight that may leave a setting behind, in
/// transaction mode. Judged per message as it goes to the server; cleared
/// only once the server has answered everything (so a `SET` tag is always
/// judged against every message that could have produced it).
#[derive(Debug, Default)]
pub struct SetWatch {
    /// A message since the server was last free may leave a setting.
    in_flight: bool,
    /// The client's unnamed statement may (Bind runs it again later).
    unnamed: bool,
    /// Some named statement of the client's may.
    named: bool,
}

impl SetWatch {
    /// Notes a client message on its way to the server.
    pub fn client_message(&mut self, tag: u8, body: &[u8]) {
        match tag {
            b'Q' => self.in_flight |= may_leave_setting(body.strip_suffix(b"\0").unwrap_or(body)),
            b'P' => {
                let (name, sql) = parse_sql(body);
                let leaves = may_leave_setting(sql);
                if name.is_empty() {
                    self.unnamed = leaves;
                } else {
                    self.named |= leaves;
                }
                self.in_flight |= leaves;
            }
            b'B' if self.unnamed || self.named => {
                let unclear = if bind_statement(body).is_empty() {
                    self.unnamed
                } else {
                    self.named
                };
                self.in_flight |= unclear;
            }
            _ => {}
        }
    }

    /// A `SET` completed: whether it may have left a setting behind.
    pub fn set_may_linger(&self) -> bool {
        self.in_flight
    }

    /// The server has answered everything the client sent.
    pub fn settled(&mut self) {
        self.in_flight = false;
    }
}

/// The SQL of a Parse body (statement name, then the text).
pub fn parse_sql(body: &[u8]) -> (&[u8], &[u8]) {
    let name_end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let rest = body.get(name_end + 1..).unwrap_or_default();
    let sql_end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    (&body[..name_end], &rest[..sql_end])
}

/// The statement name of a Bind body (portal name, then the statement's).
pub fn bind_statement(body: &[u8]) -> &[u8] {
    let portal_end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let rest = body.get(portal_end + 1..).unwrap_or_default();
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    &rest[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_may_leave_a_setting() {
        for sql in [
            "SET search_path = tenant_a",
            "set app.tenant = 'a'",
            "SET SESSION statement_timeout TO '1s'",
            "SET ROLE reporting",
            "SET SESSION AUTHORIZATION bob",
            "begin; set work_mem = '64MB'; commit",
            "SET LOCAL a = 1; SET b = 2",
            "select 'it''s'; set b = 'x;y'",
            "/* x */ SET LOCAL a = 1",
            "SET LOCAL a = 1 -- why",
            "SET LOCAL a = $$x$$",
            "SET LOCAL a = 'unterminated",
            "SET \"TimeZone\" = 'UTC'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "sEt\tapplication_name_x = 'a'",
        ] {
            assert!(may_leave_setting(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn statements_that_cannot() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "SET LOCAL statement_timeout = '1s'",
            "set local app.tenant = 'a';",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET TimeZone = 'UTC'",
            "SET SESSION timezone TO 'UTC'",
            "set application_name='x'",
            "SET application_name ='x'",
            "SET TIME ZONE 'Europe/Paris'",
            "SET NAMES 'UTF8'",
            "SET DateStyle = ISO, MDY",
            "SET LOCAL app.x = 'a;b'",
            "begin; set local app.tenant = 'a'; select 1; commit",
            "BEGIN;SET LOCAL search_path = t;UPDATE x SET y = 'it''s';COMMIT;",
        ] {
            assert!(!may_leave_setting(sql.as_bytes()), "{sql}");
        }
        assert!(!may_leave_setting(b"UPDATE t SET x = 1"));
        assert!(!may_leave_setting(b"select 1"));
    }

    #[test]
    fn a_set_tag_is_judged_by_everything_in_flight() {
        let mut w = SetWatch::default();
        w.client_message(b'Q', b"SET LOCAL statement_timeout = 1\0");
        assert!(!w.set_may_linger());
        w.client_message(b'Q', b"SET app.tenant = 'a'\0");
        assert!(w.set_may_linger(), "a later SET in flight counts");
        w.settled();
        assert!(!w.set_may_linger());
        // Parsed once, run again by a later Bind.
        w.client_message(b'P', b"\0SET app.tenant = $1\0\0\0");
        w.settled();
        w.client_message(b'B', b"\0\0\0\0\0\0\0\0");
        assert!(w.set_may_linger(), "the unnamed SET bound again");
        w.settled();
        w.client_message(b'P', b"\0select 1\0\0\0");
        w.client_message(b'B', b"\0\0\0\0\0\0\0\0");
        assert!(!w.set_may_linger(), "the unnamed statement was replaced");
        w.client_message(b'P', b"s1\0SET work_mem = '1GB'\0\0\0");
        w.settled();
        w.client_message(b'B', b"\0s1\0\0\0\0\0\0\0");
        assert!(w.set_may_linger(), "a named SET bound again");
    }

    #[test]
    fn parse_and_bind_bodies_are_split() {
        assert_eq!(
            parse_sql(b"s1\0SET x = 1\0\0\0"),
            (&b"s1"[..], &b"SET x = 1"[..])
        );
        assert_eq!(parse_sql(b"\0select 1\0\0\0").0, b"");
        assert_eq!(parse_sql(b"").1, b"");
        assert_eq!(bind_statement(b"\0s1\0\0\0"), b"s1");
        assert_eq!(bind_statement(b"p\0\0"), b"");
        assert_eq!(bind_statement(b""), b"");
    }
}
