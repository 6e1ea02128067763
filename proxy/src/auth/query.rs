//! `auth_query`: looks up a user's secret on the current leader, for users
//! not in the users file (as PgBouncer does).
//!
//! The user name goes into the query as a quoted literal (the proxy's
//! simple-protocol helper has no parameters); quotes are doubled, which is
//! safe with `standard_conforming_strings = on`, Postgres's default. May
//! call: `server` (one short-lived connection), `topology`.

use super::{AuthError, UserSecret};
use crate::server::{Login, Secret, ServerConn};
use crate::Shared;

/// `'name'` with embedded quotes doubled.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The user's secret from the leader (a SCRAM verifier or an md5 hash),
/// `None` if unknown or neither.
pub async fn lookup(shared: &Shared, user: &str) -> Result<Option<UserSecret>, AuthError> {
    let cfg = shared.cfg();
    let Some(query) = cfg.auth_query.as_deref() else {
        return Ok(None);
    };
    let fail = |e: String| AuthError::Protocol(format!("auth_query: {e}"));
    let leader = shared
        .topology
        .load()
        .leader
        .clone()
        .ok_or_else(|| fail("no leader".into()))?;
    let users = shared.users.load_full();
    let auth_user = &cfg.auth_user;
    let secret = users.as_deref().and_then(|u| u.get(auth_user));
    let login = Login {
        user: auth_user.clone(),
        database: cfg.auth_database.clone(),
        options: String::new(),
        secret: secret.map_or(Secret::None, |s| s.for_servers(None)),
    };
    let opts = shared.pools.connect_opts();
    let mut conn = Box::pin(ServerConn::connect(leader, &login, &opts))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let sql = query.replace("$1", &quote_literal(user));
    let rows = conn
        .query_rows(&sql)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let passwd = rows.first().and_then(|r| r.last().cloned().flatten());
    Ok(passwd.as_deref().and_then(UserSecret::from_shadow))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted_so_names_cannot_break_out() {
        assert_eq!(quote_literal("app"), "'app'");
        assert_eq!(quote_literal("x' or '1'='1"), "'x'' or ''1''=''1'");
    }
}
