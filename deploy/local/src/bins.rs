//! Finding pgha's own binaries: next to the running executable (a sibling in
//! `target/<profile>/`, also from `target/<profile>/deps/` where test
//! binaries live), then on PATH.

use std::path::PathBuf;

use crate::Error;

/// The path of pgha binary `name` (e.g. `pgha-agent`).
pub fn sibling_binary(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(Error::io("find the running executable"))?;
    let mut dirs = Vec::new();
    if let Some(dir) = exe.parent() {
        dirs.push(dir.to_owned());
        if dir.ends_with("deps") {
            if let Some(up) = dir.parent() {
                dirs.push(up.to_owned());
            }
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    dirs.extend(std::env::split_paths(&path));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Command {
            what: format!("find {name}"),
            detail: format!(
                "not next to {} nor on PATH; build it with `cargo build --workspace`",
                exe.display()
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_on_path_and_names_the_missing_ones() {
        assert!(sibling_binary("sh").unwrap().is_file());
        let e = sibling_binary("pgha-no-such-binary")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cargo build --workspace"), "{e}");
    }
}
