//! Protocol-level prepared statements in transaction mode.
//!
//! A client's statement names mean nothing on a shared server connection,
//! so each distinct statement (query text plus parameter types) gets one
//! proxy-wide server name `pgha_<n>`. A client's Parse is recorded under its
//! own name; the statement is prepared on whichever server connection runs
//! the Bind or Describe that uses it. Each server connection keeps a bounded
//! cache of what it has prepared (least recently used is closed first).
//! Pure code, no I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// One distinct statement.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    /// Its name on every server connection.
    pub server_name: String,
    /// The Parse body after the name: query text and parameter types.
    pub body: Bytes,
}

/// Statements the registry keeps before it forgets those no client holds.
const KEPT_STATEMENTS: usize = 10_000;

/// Proxy-wide interning of statements by content. Bounded: past its limit
/// it forgets the statements no client holds any more (a client that
/// prepares endless distinct texts must not grow the proxy for ever); a
/// text seen again then gets a new server name, which is as correct.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Interned>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Interned {
    by_body: HashMap<Bytes, Arc<Statement>>,
    /// The size that starts the next clean-up: twice what a clean-up
    /// kept, so clients holding many statements cost one pass per
    /// doubling, not one per Parse.
    limit: usize,
    floor: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::with_limit(KEPT_STATEMENTS)
    }
}

impl Registry {
    pub fn with_limit(limit: usize) -> Registry {
        Registry {
            inner: Mutex::new(Interned {
                by_body: HashMap::new(),
                limit,
                floor: limit,
            }),
            next: AtomicU64::new(0),
        }
    }

    /// The statement with this Parse body, created on first sight.
    pub fn intern(&self, body: &[u8]) -> Arc<Statement> {
        let mut inner = crate::lock(&self.inner);
        if let Some(s) = inner.by_body.get(body) {
            return s.clone();
        }
        if inner.by_body.len() >= inner.limit {
            inner.by_body.retain(|_, s| Arc::strong_count(s) > 1);
            inner.limit = inner.floor.max(2 * inner.by_body.len());
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let body = Bytes::copy_from_slice(body);
        let s = Arc::new(Statement {
            server_name: format!("pgha_{n}"),
            body: body.clone(),
        });
        inner.by_body.insert(body, s.clone());
        s
    }

    /// Forgets every text, so that each is prepared afresh, under a new
    /// server name, wherever it runs next: after DDL made a plan stale
    /// ("cached plan must not change result type"), every server that
    /// prepared the text before holds the stale plan, not only the one
    /// that reported it. Statements clients hold keep their names.
    pub fn renew_all(&self) {
        crate::lock(&self.inner).by_body.clear();
    }

    /// Statements it holds now.
    pub fn count(&self) -> usize {
        crate::lock(&self.inner).by_body.len()
    }
}

/// What one server connection has prepared, bounded.
#[derive(Debug)]
pub struct ServerCache {
    capacity: usize,
    clock: u64,
    used: HashMap<String, u64>,
}

impl ServerCache {
    pub fn new(capacity: usize) -> ServerCache {
        ServerCache {
            capacity: capacity.max(1),
            clock: 0,
            used: HashMap::new(),
        }
    }

    /// Whether `name` is prepared; marks it used.
    pub fn touch(&mut self, name: &str) -> bool {
        self.clock += 1;
        match self.used.get_mut(name) {
            Some(t) => {
                *t = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records `name` as prepared; returns the statement to close to stay
    /// within capacity, if any.
    pub fn insert(&mut self, name: &str) -> Option<String> {
        self.clock += 1;
        let mut evicted = None;
        if self.used.len() >= self.capacity && !self.used.contains_key(name) {
            let oldest = self
                .used
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(n, _)| n.clone());
            if let Some(o) = oldest {
                self.used.remove(&o);
                evicted = Some(o);
            }
        }
        self.used.insert(name.to_owned(), self.clock);
        evicted
    }

    /// The statement does not exist on the server after all.
    pub fn remove(&mut self, name: &str) {
        self.used.remove(name);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// The statement an SQL `DEALLOCATE [PREPARE] name` drops, if `query` (a
/// simple Query's body) is exactly that one command: ActiveRecord drops
/// the statements it prepared over the protocol this way. The name as
/// the server reads it: unquoted folded to lower case, quoted as written.
/// `None` for anything else, `DEALLOCATE ALL` included.
pub fn sql_deallocate(query: &[u8]) -> Option<String> {
    let sql = query.strip_suffix(b"\0").unwrap_or(query);
    let rest = keyword(sql, b"deallocate")?;
    let (mut name, mut quoted, mut rest) = identifier(rest)?;
    // `PREPARE` is optional before the name (and a name itself).
    if !quoted && name == "prepare" {
        if let Some(next) = identifier(rest) {
            (name, quoted, rest) = next;
        }
    }
    let ends = rest.iter().all(|&b| b == b';' || b.is_ascii_whitespace());
    (ends && (quoted || name != "all")).then_some(name)
}

/// What follows `word` (any letter case) and white space at the start of
/// `sql`, after white space.
fn keyword<'a>(sql: &'a [u8], word: &[u8]) -> Option<&'a [u8]> {
    let sql = sql.trim_ascii_start();
    let head = sql.get(..word.len())?;
    let rest = &sql[word.len()..];
    let spaced = rest.first().is_some_and(u8::is_ascii_whitespace);
    (head.eq_ignore_ascii_case(word) && spaced).then_some(rest)
}

/// The SQL identifier at the start of `sql` (after white space): its
/// name, whether it was quoted, and the rest.
fn identifier(sql: &[u8]) -> Option<(String, bool, &[u8])> {
    let sql = sql.trim_ascii_start();
    if let Some(body) = sql.strip_prefix(b"\"") {
        let mut name = Vec::new();
        let mut i = 0;
        loop {
            match (body.get(i)?, body.get(i + 1)) {
                (b'"', Some(b'"')) => {
                    name.push(b'"');
                    i += 2;
                }
                (b'"', _) => break,
                (&b, _) => {
                    name.push(b);
                    i += 1;
                }
            }
        }
        let name = String::from_utf8(name).ok().filter(|n| !n.is_empty())?;
        return Some((name, true, &body[i + 1..]));
    }
    let first = *sql.first()?;
    if !(first.is_ascii_alphabetic() || first == b'_' || first >= 0x80) {
        return None;
    }
    let end = sql
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80))
        .unwrap_or(sql.len());
    let name = std::str::from_utf8(&sql[..end]).ok()?.to_ascii_lowercase();
    Some((name, false, &sql[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_gets_the_same_server_name_different_content_another() {
        let r = Registry::default();
        let a = r.intern(b"select 1\0\0\0");
        let b = r.intern(b"select 1\0\0\0");
        let c = r.intern(b"select 2\0\0\0");
        assert_eq!(a.server_name, b.server_name);
        assert_ne!(a.server_name, c.server_name);
    }

    #[test]
    fn the_registry_forgets_statements_no_client_holds_once_past_its_limit() {
        let r = Registry::with_limit(4);
        let held: Vec<_> = (0..3)
            .map(|i| r.intern(format!("select {i}\0\0\0").as_bytes()))
            .collect();
        for i in 3..100 {
            r.intern(format!("select {i}\0\0\0").as_bytes());
            assert!(r.count() <= 6, "{} statements kept", r.count());
        }
        // Those a client holds keep their server name.
        for (i, h) in held.iter().enumerate() {
            let again = r.intern(format!("select {i}\0\0\0").as_bytes());
            assert_eq!(again.server_name, h.server_name);
        }
        // Held statements past the limit make it grow, not loop.
        let many: Vec<_> = (0..50)
            .map(|i| r.intern(format!("held {i}\0\0\0").as_bytes()))
            .collect();
        assert!(r.count() >= many.len());
    }

    #[test]
    fn cache_is_bounded_and_evicts_the_least_recently_used() {
        let mut c = ServerCache::new(2);
        assert_eq!(c.insert("a"), None);
        assert_eq!(c.insert("b"), None);
        assert!(c.touch("a"));
        assert_eq!(c.insert("c"), Some("b".into()));
        assert!(!c.touch("b"));
        assert!(c.touch("a") && c.touch("c"));
        assert_eq!(c.len(), 2);
        c.remove("a");
        assert!(!c.touch("a"));
    }

    #[test]
    fn sql_deallocate_names_the_statement_as_the_server_reads_it() {
        let name = |sql: &str| sql_deallocate(format!("{sql}\0").as_bytes());
        assert_eq!(name("DEALLOCATE a1"), Some("a1".into()));
        assert_eq!(name("  deallocate prepare S_12 ;\n"), Some("s_12".into()));
        assert_eq!(
            name("DEALLOCATE \"Mixed \"\"q\"\"\";"),
            Some("Mixed \"q\"".into())
        );
        assert_eq!(name("deallocate prepare"), Some("prepare".into()));
        assert_eq!(name("DEALLOCATE \"all\""), Some("all".into()));
        for other in [
            "DEALLOCATE ALL",
            "deallocate prepare all",
            "DEALLOCATE a; select 1",
            "DEALLOCATE",
            "DEALLOCATE \"\"",
            "DEALLOCATE \"open",
            "deallocatex a",
            "select 1",
            "DEALLOCATE 1a",
        ] {
            assert_eq!(name(other), None, "{other}");
        }
    }
}
