//! Telling from a statement's text what it may leave on its server (see
//! the parent module): the common statement by its first word and one
//! SIMD pass, anything else split into statements and read word by word.
//! May call: `vars`, `aho-corasick`, `memchr`.

use std::sync::OnceLock;

use aho_corasick::AhoCorasick;

use super::Leaves;
use crate::vars::Vars;

/// The words any of these statements must contain, in any letter case.
const WORDS: [&str; 4] = ["set", "temp", "hold", "advisory_lock"];
const SET: usize = 0;
const TEMP: usize = 1;
const HOLD: usize = 2;
const ADVISORY: usize = 3;

const TEMP_OBJECT: &str = "a temporary object";
const HELD_CURSOR: &str = "a WITH HOLD cursor";
pub(super) const ADVISORY_LOCK: &str = "a session advisory lock";

fn words() -> &'static AhoCorasick {
    static AC: OnceLock<AhoCorasick> = OnceLock::new();
    AC.get_or_init(|| {
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(WORDS)
            .expect("four fixed words build")
    })
}

/// What `sql` (one or several statements) may leave on its server. The
/// common statement is told by its first word (`plain_start`) and by
/// having no `;` but at its end; other text is split into statements (at
/// semicolons outside quotes and comments) and looked at word by word. A
/// text the splitter cannot follow leaves whatever its words say it might.
pub fn leaves(sql: &[u8]) -> Leaves {
    let Some(rest) = plain_start(sql) else {
        return leaves_any(sql);
    };
    // One scan for both: a `;` before the end, and advisory_lock's `v`.
    let mut lock = false;
    for i in memchr::memchr3_iter(b';', b'v', b'V', rest) {
        if rest[i] == b';' {
            if !rest[i..]
                .iter()
                .all(|b| *b == b';' || b.is_ascii_whitespace())
            {
                return leaves_any(sql);
            }
            break;
        }
        lock = lock || advisory_at(rest, i);
    }
    Leaves {
        setting: false,
        state: lock.then_some(ADVISORY_LOCK),
    }
}

/// [`leaves`] for the text of a Parse, one statement by the protocol's rule
/// (the server refuses more).
pub fn statement_leaves_state(sql: &[u8]) -> Leaves {
    match plain_start(sql) {
        Some(rest) => plain(rest),
        None => leaves_any(sql),
    }
}

/// A plain statement leaves state only through the advisory lock functions.
fn plain(sql: &[u8]) -> Leaves {
    Leaves {
        setting: false,
        state: advisory_lock(sql).then_some(ADVISORY_LOCK),
    }
}

/// The common statement, told cheaply by its first word: not a comment and
/// not `SET`, `CREATE` or `DECLARE`, the only statements that can leave
/// state but for the advisory lock functions. Returns it from that word
/// on; `None` for anything else.
fn plain_start(sql: &[u8]) -> Option<&[u8]> {
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    let sql = &sql[start..];
    if sql.starts_with(b"--") || sql.starts_with(b"/*") {
        return None;
    }
    let word_end = sql
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(sql.len());
    let first = &sql[..word_end];
    let keyword = [&b"set"[..], b"create", b"declare"]
        .iter()
        .any(|k| first.eq_ignore_ascii_case(k));
    (!keyword).then_some(sql)
}

/// `advisory_lock` in any letter case (pg_advisory_lock, pg_try_advisory_lock
/// and their _shared forms; not advisory_xact_lock or advisory_unlock),
/// found from its rare `v`.
fn advisory_lock(sql: &[u8]) -> bool {
    memchr::memchr2_iter(b'v', b'V', sql).any(|i| advisory_at(sql, i))
}

/// `advisory_lock` around the `v` at `i`.
fn advisory_at(sql: &[u8], i: usize) -> bool {
    i >= 2
        && sql
            .get(i - 2..i + 11)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"advisory_lock"))
}

/// [`leaves`] for any text: the words found in one scan, and only then the
/// statements looked at one by one.
fn leaves_any(sql: &[u8]) -> Leaves {
    let mut found = [false; WORDS.len()];
    for m in words().find_iter(sql) {
        found[m.pattern().as_usize()] = true;
    }
    if !found.iter().any(|&f| f) {
        return Leaves::default();
    }
    // pg_advisory_lock, pg_try_advisory_lock and their _shared forms; the
    // transaction-scoped ones are spelled advisory_xact_lock.
    let advisory = Leaves {
        setting: false,
        state: found[ADVISORY].then_some(ADVISORY_LOCK),
    };
    let unsure = Leaves {
        setting: found[SET],
        state: if found[TEMP] {
            Some(TEMP_OBJECT)
        } else if found[HOLD] {
            Some(HELD_CURSOR)
        } else {
            None
        },
    };
    let Ok(sql) = std::str::from_utf8(sql) else {
        return unsure.or(advisory);
    };
    let mut out = advisory;
    let followed = each_statement(sql, |stmt| out = out.or(statement_leaves(stmt)));
    if followed {
        out
    } else {
        unsure.or(advisory)
    }
}

/// Calls `f` with each statement of `sql`, comments blanked out; false
/// (having stopped) when the text has what this splitter cannot follow
/// (nested comments, backslashes, an unterminated quote or comment).
/// Follows single and double quotes, dollar quotes and `$1` parameters.
fn each_statement(sql: &str, mut f: impl FnMut(&str)) -> bool {
    let b = sql.as_bytes();
    let mut stmt = String::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => match b[i + 1..].iter().position(|&c| c == q) {
                // A doubled quote inside is two quoted runs back to back.
                Some(n) if !b[i + 1..i + 1 + n].contains(&b'\\') => i += n + 2,
                _ => return false,
            },
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => i += 1,
            b'$' => {
                let tag_len = b[i + 1..]
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_'))
                    .filter(|&n| b.get(i + 1 + n) == Some(&b'$'));
                let Some(n) = tag_len else { return false };
                let tag = &sql[i..i + n + 2];
                match sql[i + n + 2..].find(tag) {
                    Some(m) => i += n + 2 + m + tag.len(),
                    None => return false,
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n);
                stmt.push_str(&sql[start..i]);
                stmt.push(' ');
                (start, i) = (end, end);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let Some(n) = sql[i + 2..].find("*/") else {
                    return false;
                };
                if sql[i + 2..i + 2 + n].contains("/*") {
                    return false;
                }
                stmt.push_str(&sql[start..i]);
                stmt.push(' ');
                i += n + 4;
                start = i;
            }
            b';' => {
                stmt.push_str(&sql[start..i]);
                f(&stmt);
                stmt.clear();
                i += 1;
                start = i;
            }
            b'\\' => return false,
            _ => i += 1,
        }
    }
    stmt.push_str(&sql[start..]);
    f(&stmt);
    true
}

/// What one statement (no comments, no semicolon) may leave.
fn statement_leaves(stmt: &str) -> Leaves {
    let mut words = stmt.split_whitespace();
    let first = words.next().unwrap_or_default();
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    let nothing = Leaves::default();
    if is(first, "set") {
        return Leaves {
            setting: !harmless_set(stmt),
            state: None,
        };
    }
    let rest: Vec<&str> = words.collect();
    let has = |k: &str| rest.iter().any(|w| is(w, k));
    let has_run = |ks: &[&str]| {
        rest.windows(ks.len())
            .any(|w| w.iter().zip(ks).all(|(a, b)| is(a, b)))
    };
    if is(first, "create") {
        // CREATE [OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY} ...
        let temp = rest
            .iter()
            .take(4)
            .any(|w| is(w, "temp") || is(w, "temporary"));
        return Leaves {
            setting: false,
            state: (temp && !has_run(&["on", "commit", "drop"])).then_some(TEMP_OBJECT),
        };
    }
    if is(first, "declare") && has("hold") && !has_run(&["without", "hold"]) {
        return Leaves {
            setting: false,
            state: Some(HELD_CURSOR),
        };
    }
    nothing
}

/// `SET LOCAL ...`, `SET TRANSACTION ...`, or `SET [SESSION] name {TO|=}
/// ...` / `SET TIME ZONE` / `SET NAMES` for a setting `vars` carries. A
/// quoted name is not harmless.
fn harmless_set(sql: &str) -> bool {
    // One statement, without comments (see `each_statement`).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(sql: &str) -> bool {
        leaves(sql.as_bytes()).setting
    }

    fn state(sql: &str) -> Option<&'static str> {
        leaves(sql.as_bytes()).state
    }

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
            "/* x */ SET search_path = a",
            "-- why\nSET search_path = a",
            "select $$;$$; set work_mem = '1GB'",
            "select 'a\\'; set local x = 1",
            "SET LOCAL a = 'unterminated",
            "/* /* nested */ */ SET LOCAL a = 1",
            "SET \"TimeZone\" = 'UTC'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "sEt\tapplication_name_x = 'a'",
        ] {
            assert!(setting(sql), "{sql}");
        }
    }

    #[test]
    fn statements_that_cannot_leave_a_setting() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "UPDATE t SET x = 1",
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
            "select 1",
            "/* x */ SET LOCAL a = 1",
            "SET LOCAL a = 1 -- why",
            "SET LOCAL a = $$x;y$$",
            "SET LOCAL a = $q$x$q$; select $1",
            "select \"set\"; SET LOCAL a = 'b'",
        ] {
            assert!(!setting(sql), "{sql}");
        }
    }

    #[test]
    fn temporary_objects_held_cursors_and_session_advisory_locks() {
        for (sql, what) in [
            ("create temp table t (x int)", TEMP_OBJECT),
            ("CREATE TEMPORARY TABLE t AS SELECT 1", TEMP_OBJECT),
            ("create or replace temp view v as select 1", TEMP_OBJECT),
            ("CREATE LOCAL TEMP SEQUENCE s", TEMP_OBJECT),
            ("begin; create temp table t (x int); commit", TEMP_OBJECT),
            ("declare c cursor with hold for select 1", HELD_CURSOR),
            (
                "DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT 1",
                HELD_CURSOR,
            ),
            ("select pg_advisory_lock(1)", ADVISORY_LOCK),
            ("SELECT PG_TRY_ADVISORY_LOCK(1, 2)", ADVISORY_LOCK),
            ("select pg_advisory_lock_shared(1)", ADVISORY_LOCK),
            ("/* a */ create temp table t (x int)", TEMP_OBJECT),
            ("/* /* nested */ create temp table t (x int)", TEMP_OBJECT),
        ] {
            assert_eq!(state(sql), Some(what), "{sql}");
        }
        for sql in [
            "create temp table t (x int) on commit drop",
            "create table temperatures (x int)",
            "select * from temp_readings",
            "declare c cursor for select 1",
            "declare c cursor without hold for select 1",
            "select pg_advisory_xact_lock(1)",
            "select pg_try_advisory_xact_lock(1)",
            "select pg_advisory_unlock(1)",
            "select holders from t",
            "select \"holdings\".* from \"holdings\" /* template */",
            "select 1 -- temp",
        ] {
            assert_eq!(state(sql), None, "{sql}");
        }
    }
}
