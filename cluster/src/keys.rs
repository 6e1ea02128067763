//! Key names under `/pgha/<cluster>/`.
//!
//! [`Keys`] builds every key; [`Keys::parse`] maps a key seen in a watch event
//! back to what it is, so watchers never split strings themselves.

/// The cluster name is unusable as a key segment.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("name {0:?} is empty")]
    Empty(String),
    #[error("name {0:?} may only contain letters, digits, '-', '_' and '.'")]
    BadChar(String),
}

/// Checks a cluster, member or proxy name: it becomes one key segment.
pub fn validate_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty() {
        return Err(KeyError::Empty(name.to_owned()));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(KeyError::BadChar(name.to_owned()));
    }
    Ok(())
}

/// What a key under the cluster prefix refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Initialize,
    Config,
    Leader,
    Member(String),
    Sync,
    Status,
    Switchover,
    Proxy(String),
    History,
}

/// Key builder for one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys for cluster `name` (validated: it becomes a key segment).
    pub fn new(cluster: &str) -> Result<Self, KeyError> {
        validate_name(cluster)?;
        Ok(Keys {
            prefix: format!("/pgha/{cluster}/"),
        })
    }

    /// `/pgha/<cluster>/`: watch this prefix to see everything.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub fn initialize(&self) -> String {
        self.key("initialize")
    }
    pub fn config(&self) -> String {
        self.key("config")
    }
    pub fn leader(&self) -> String {
        self.key("leader")
    }
    /// Prefix of all member records.
    pub fn members(&self) -> String {
        self.key("members/")
    }
    pub fn member(&self, name: &str) -> String {
        self.key(&format!("members/{name}"))
    }
    pub fn sync(&self) -> String {
        self.key("sync")
    }
    pub fn status(&self) -> String {
        self.key("status")
    }
    pub fn switchover(&self) -> String {
        self.key("switchover")
    }
    /// Prefix of all proxy acknowledgements.
    pub fn proxies(&self) -> String {
        self.key("proxies/")
    }
    pub fn proxy(&self, id: &str) -> String {
        self.key(&format!("proxies/{id}"))
    }
    pub fn history(&self) -> String {
        self.key("history")
    }

    /// What `key` is, or `None` for keys outside this cluster or unknown to
    /// this version (ignored, so newer components can add keys).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?;
        let named = |p: &str| {
            rest.strip_prefix(p)
                .filter(|n| validate_name(n).is_ok())
                .map(str::to_owned)
        };
        Some(match rest {
            "initialize" => Key::Initialize,
            "config" => Key::Config,
            "leader" => Key::Leader,
            "sync" => Key::Sync,
            "status" => Key::Status,
            "switchover" => Key::Switchover,
            "history" => Key::History,
            _ => {
                if let Some(n) = named("members/") {
                    Key::Member(n)
                } else if let Some(n) = named("proxies/") {
                    Key::Proxy(n)
                } else {
                    return None;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_back_to_itself() {
        let k = Keys::new("main").unwrap();
        let cases = [
            (k.initialize(), Key::Initialize),
            (k.config(), Key::Config),
            (k.leader(), Key::Leader),
            (k.member("node-1"), Key::Member("node-1".into())),
            (k.sync(), Key::Sync),
            (k.status(), Key::Status),
            (k.switchover(), Key::Switchover),
            (k.proxy("p1"), Key::Proxy("p1".into())),
            (k.history(), Key::History),
        ];
        for (key, want) in cases {
            assert!(key.starts_with("/pgha/main/"), "{key}");
            assert_eq!(k.parse(key.as_bytes()), Some(want), "{key}");
        }
        assert!(k.member("a").starts_with(&k.members()));
        assert!(k.proxy("a").starts_with(&k.proxies()));
    }

    #[test]
    fn foreign_and_unknown_keys_are_ignored() {
        let k = Keys::new("main").unwrap();
        assert_eq!(k.parse(b"/pgha/other/leader"), None);
        assert_eq!(k.parse(b"/pgha/main/something-new"), None);
        assert_eq!(k.parse(b"/pgha/main/members/"), None);
        assert_eq!(k.parse(b"/pgha/main/members/a/b"), None);
        assert_eq!(k.parse(&[0xff, 0xfe]), None);
    }

    #[test]
    fn cluster_names_are_validated() {
        assert_eq!(Keys::new(""), Err(KeyError::Empty(String::new())));
        assert!(matches!(Keys::new("a/b"), Err(KeyError::BadChar(_))));
        assert!(Keys::new("prod-eu.1_a").is_ok());
    }
}
