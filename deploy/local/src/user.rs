//! Which OS user runs PostgreSQL.
//!
//! Postgres refuses to run as root. When the harness runs as root (CI, the
//! quick start), postgres processes and their directories belong to the
//! `postgres` user that Debian's package creates (or `nobody` without it);
//! otherwise everything runs as the current user.

use std::path::Path;
use std::process::Command;

use nix::unistd::{Gid, Uid, User};

use crate::Error;

/// An OS identity to run a child process as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// The current user, unless that is root: then `postgres` or `nobody`.
    pub fn for_postgres() -> Result<RunAs, Error> {
        let me = Uid::current();
        if !me.is_root() {
            return Ok(RunAs {
                name: User::from_uid(me)
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_default(),
                uid: me.as_raw(),
                gid: Gid::current().as_raw(),
            });
        }
        for name in ["postgres", "nobody"] {
            if let Ok(Some(u)) = User::from_name(name) {
                return Ok(RunAs {
                    name: u.name,
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                });
            }
        }
        Err(Error::Missing(
            "an unprivileged user to run postgres as (postgres or nobody)".into(),
        ))
    }

    /// Whether this is a different identity than the current process.
    pub fn is_other(&self) -> bool {
        Uid::current().as_raw() != self.uid
    }

    /// Makes `cmd` run as this user (no-op when it is the current one).
    pub fn apply(&self, cmd: &mut Command) {
        if self.is_other() {
            use std::os::unix::process::CommandExt;
            cmd.uid(self.uid).gid(self.gid);
            if let Ok(Some(u)) = User::from_uid(Uid::from_raw(self.uid)) {
                cmd.env("HOME", u.dir).env("USER", &self.name);
            }
        }
    }

    /// Whether this user can enter directory `path` (every ancestor
    /// searchable): postgres must reach its data directory.
    pub fn can_enter(&self, path: &Path) -> bool {
        if !self.is_other() {
            return true;
        }
        let mut cmd = Command::new("test");
        cmd.arg("-x").arg(path);
        self.apply(&mut cmd);
        cmd.status().is_ok_and(|s| s.success())
    }

    /// Hands `path` (recursively) to this user.
    pub fn own(&self, path: &Path) -> Result<(), Error> {
        if !self.is_other() {
            return Ok(());
        }
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", self.uid, self.gid))
            .arg(path)
            .status()
            .map_err(Error::io("run chown"))?;
        if !status.success() {
            return Err(Error::Command {
                what: format!("chown {path:?}"),
                detail: status.to_string(),
            });
        }
        Ok(())
    }
}
