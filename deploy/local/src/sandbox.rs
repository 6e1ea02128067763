//! The directory everything a harness run starts lives in.
//!
//! Tests get a fresh temporary directory, removed when the last handle to it
//! is dropped (after the processes in it, which hold a handle each); set
//! `PGHA_KEEP_SANDBOX=1` to keep it for a post-mortem. `pgha up` uses a
//! persistent directory instead, so a second run resumes the same cluster.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::Error;

#[derive(Debug)]
enum Root {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

/// A shared handle to the run's directory.
#[derive(Debug, Clone)]
pub struct Sandbox {
    root: Arc<Root>,
}

impl Sandbox {
    /// A fresh temporary directory named after `label`.
    pub fn new(label: &str) -> Result<Sandbox, Error> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pgha-{label}-"))
            .tempdir()
            .map_err(Error::io("create sandbox dir"))?;
        open_up(dir.path())?;
        let root = if std::env::var_os("PGHA_KEEP_SANDBOX").is_some() {
            Root::Kept(dir.keep())
        } else {
            Root::Temp(dir)
        };
        Ok(Sandbox {
            root: Arc::new(root),
        })
    }

    /// A persistent directory (created if missing), kept after the run.
    /// Fails if the user postgres runs as cannot reach it.
    pub fn persistent(dir: &Path) -> Result<Sandbox, Error> {
        fs::create_dir_all(dir).map_err(Error::io(format!("create {dir:?}")))?;
        let dir = dir
            .canonicalize()
            .map_err(Error::io(format!("resolve {dir:?}")))?;
        open_up(&dir)?;
        let pg_user = crate::RunAs::for_postgres()?;
        if !pg_user.can_enter(&dir) {
            return Err(Error::Command {
                what: format!("use {} as the state directory", dir.display()),
                detail: format!(
                    "postgres runs as user {:?}, which cannot enter it (a parent directory is not searchable by others); choose one it can reach, e.g. /var/lib/pgha",
                    pg_user.name
                ),
            });
        }
        Ok(Sandbox {
            root: Arc::new(Root::Kept(dir)),
        })
    }

    pub fn path(&self) -> &Path {
        match &*self.root {
            Root::Temp(t) => t.path(),
            Root::Kept(p) => p,
        }
    }

    /// `<root>/<name>`, created if missing.
    pub fn subdir(&self, name: &str) -> Result<PathBuf, Error> {
        let p = self.path().join(name);
        fs::create_dir_all(&p).map_err(Error::io(format!("create {p:?}")))?;
        Ok(p)
    }
}

/// Lets the unprivileged postgres user traverse into the sandbox.
fn open_up(dir: &Path) -> Result<(), Error> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(Error::io(format!("chmod {dir:?}")))
}
