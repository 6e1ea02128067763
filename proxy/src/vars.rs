//! Session settings carried across server connections, as PgBouncer's
//! varcache: the parameters a server reports with ParameterStatus that a
//! client sets in its startup packet or with `SET` (time zone, date style,
//! encoding, application name...). In transaction mode a client runs each
//! transaction on whichever server is free; before its first message
//! there, the proxy sets what differs, in a Query whose replies the
//! client never sees (ParameterStatus excepted: the client may always
//! learn a server's canonical spelling of its own value).
//!
//! The session keeps the client's wanted values, each server connection
//! what its server last reported. Values are interned, so the check made
//! on every transaction is six pointer comparisons. May call: nothing.

use std::sync::{Arc, Mutex, OnceLock};

/// Distinct values kept for sharing; past this the set starts afresh
/// (values already handed out stay valid, and are then compared by
/// content), so clients inventing new values cannot grow it for ever.
const MAX_INTERNED: usize = 10_000;

/// The one shared copy of `value`, the value tracked at `slot`: each
/// thread remembers the last one per slot, so a stream of clients with
/// the same settings (one application's) takes no lock.
fn intern_at(slot: usize, value: &str) -> Arc<str> {
    type Last = std::cell::RefCell<[Option<Arc<str>>; TRACKED.len()]>;
    thread_local! {
        static LAST: Last = const { std::cell::RefCell::new([const { None }; TRACKED.len()]) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &last[slot] {
            Some(v) if **v == *value => v.clone(),
            _ => {
                let v = intern(value);
                last[slot] = Some(v.clone());
                v
            }
        }
    })
}

/// The one shared copy of `value`.
fn intern(value: &str) -> Arc<str> {
    // foldhash: fast on short strings and seeded per process, so clients
    // cannot choose values that collide (the set is shared by all).
    type Set = std::collections::HashSet<Arc<str>, foldhash::fast::RandomState>;
    static SET: OnceLock<Mutex<Set>> = OnceLock::new();
    let mut set = crate::lock(SET.get_or_init(Mutex::default));
    if let Some(v) = set.get(value) {
        return v.clone();
    }
    if set.len() >= MAX_INTERNED {
        set.clear();
    }
    let v: Arc<str> = value.into();
    set.insert(v.clone());
    v
}

fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The tracked parameters, as servers spell them in ParameterStatus.
pub const TRACKED: [&str; 6] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
];

/// Values of the tracked parameters (`None`: unknown or not wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vars([Option<Arc<str>>; TRACKED.len()]);

/// Where `name` (in any letter case, as startup packets may spell it) is
/// in [`TRACKED`].
pub(crate) fn index(name: &str) -> Option<usize> {
    // Their lengths differ (the test checks each name finds itself): one
    // string comparison at most, on every startup parameter of every
    // client.
    let i = TRACKED.iter().position(|t| t.len() == name.len())?;
    TRACKED[i].eq_ignore_ascii_case(name).then_some(i)
}

/// A string literal that means the same whatever the server's
/// `standard_conforming_strings`.
fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    out.push_str("E'");
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

impl Vars {
    pub fn is_tracked(name: &str) -> bool {
        index(name).is_some()
    }

    /// Records `name = value` if it is tracked.
    pub fn set(&mut self, name: &str, value: &str) {
        if let Some(i) = index(name) {
            if self.0[i].as_deref() != Some(value) {
                self.0[i] = Some(intern_at(i, value));
            }
        }
    }

    /// The tracked ones among `params` (name, value pairs).
    pub fn from_params<K: AsRef<str>, V: AsRef<str>>(
        params: impl IntoIterator<Item = (K, V)>,
    ) -> Vars {
        let mut v = Vars::default();
        for (k, val) in params {
            v.set(k.as_ref(), val.as_ref());
        }
        v
    }

    /// The tracked settings of a startup packet, where its parse found
    /// them.
    pub fn from_startup(params: &crate::protocol::StartupParams) -> Vars {
        let mut v = Vars::default();
        for (slot, value) in v.0.iter_mut().enumerate() {
            *value = params.tracked(slot).map(|s| intern_at(slot, s));
        }
        v
    }

    /// Takes every value `other` has.
    pub fn update(&mut self, other: &Vars) {
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            if theirs.is_some() && mine != theirs {
                mine.clone_from(theirs);
            }
        }
    }

    /// The tracked values, by their canonical names.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        TRACKED
            .iter()
            .zip(&self.0)
            .filter_map(|(k, v)| v.as_deref().map(|v| (*k, v)))
    }

    /// The `SET` statements that give a server holding `server` the
    /// values wanted here; `None` when it has them all.
    pub fn set_sql(&self, server: &Vars) -> Option<String> {
        // The common case, once per transaction: the same interned values.
        let agree = self.0.iter().zip(&server.0).all(|pair| match pair {
            (None, _) => true,
            (Some(w), Some(h)) => Arc::ptr_eq(w, h),
            (Some(_), None) => false,
        });
        if agree {
            return None;
        }
        let mut sql = String::new();
        for ((name, want), have) in TRACKED.iter().zip(&self.0).zip(&server.0) {
            let differs = match (want, have) {
                (Some(w), Some(h)) => !same(w, h),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if let (true, Some(want)) = (differs, want) {
                sql.push_str(&format!("SET {name} = {};", literal(want)));
            }
        }
        (!sql.is_empty()).then_some(sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_differing_wanted_values_are_set_with_safe_literals() {
        let want = Vars::from_params([
            ("timezone", "Europe/Berlin"),
            ("application_name", "it's \\ mine"),
            ("user", "app"),
        ]);
        let mut server = Vars::from_params([
            ("TimeZone", "UTC"),
            ("application_name", "pgha-proxy"),
            ("DateStyle", "ISO, MDY"),
        ]);
        assert_eq!(
            want.set_sql(&server).as_deref(),
            Some("SET application_name = E'it''s \\\\ mine';SET TimeZone = E'Europe/Berlin';")
        );
        server.update(&want);
        assert_eq!(want.set_sql(&server), None);
        assert_eq!(server.iter().count(), 3, "DateStyle kept, nothing added");
        assert!(Vars::is_tracked("datestyle") && !Vars::is_tracked("search_path"));
        for (i, name) in TRACKED.iter().enumerate() {
            assert_eq!(index(name), Some(i));
            assert_eq!(index(&name.to_ascii_uppercase()), Some(i));
        }
        assert_eq!(index("timezonE"), Some(4));
        assert_eq!(index("xxxxxxxx"), None, "the length alone decides nothing");
    }
}
