//! Client authentication: the users file, md5 and SCRAM-SHA-256 checks, and
//! the message exchange with a connecting client.
//!
//! Secrets never appear in logs or error texts: a wrong password is
//! reported as "password authentication failed for user X", as Postgres
//! does. May call: `protocol`, `scram`, tokio I/O on the client stream.

pub mod query;
pub mod scram;

use std::collections::HashMap;
use std::path::Path;

use bytes::BytesMut;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::AuthMethod;
use crate::protocol::{messages as msg, split_frame, ProtocolError};
use scram::{ScramKeys, ScramServer};

/// Why a client was not let in.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    UnknownUser(String),
    #[error("password authentication failed")]
    WrongPassword,
    /// PostgreSQL refuses this too: an md5 hash cannot check a SCRAM proof.
    #[error("the user has only an md5 password hash, which cannot check a SCRAM login (auth_method = \"md5\" accepts it)")]
    NoScramSecret,
    #[error("authentication protocol error: {0}")]
    Protocol(String),
    #[error("client closed the connection during authentication")]
    Closed,
    #[error("I/O error during authentication: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot read users file {path}: {reason}")]
    UsersFile { path: String, reason: String },
}

impl From<ProtocolError> for AuthError {
    fn from(e: ProtocolError) -> Self {
        AuthError::Protocol(e.to_string())
    }
}

/// What the proxy knows about one user: a plaintext password (SCRAM keys
/// derived from it too), a SCRAM verifier, or an md5 hash.
#[derive(Clone)]
pub struct UserSecret {
    /// Plaintext password: checks md5 and SCRAM clients and logs in to
    /// servers whatever they ask.
    pub password: Option<String>,
    /// `md5` and hex(md5(password || user)), as `pg_shadow` and
    /// PgBouncer's auth_file hold an md5 user's password: it checks md5
    /// clients and answers a server's md5 challenge, but not SCRAM.
    pub md5: Option<String>,
    /// SCRAM keys derived once at load, so a login costs no PBKDF2.
    pub scram: Option<ScramKeys>,
}

impl std::fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserSecret(..)")
    }
}

/// The users file: `"name" "secret"` per line, secret plaintext, a
/// `SCRAM-SHA-256$...` verifier or an `md5...` hash (PgBouncer's
/// auth_file format); `;` and `#` start comments.
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: HashMap<String, UserSecret>,
}

fn quoted(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if s[i + 1..].starts_with('"') {
                out.push('"');
                chars.next();
            } else {
                return Some((out, &s[i + 1..]));
            }
        } else {
            out.push(c);
        }
    }
    None
}

impl Users {
    pub fn load(path: &Path) -> Result<Users, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::UsersFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Users::parse(&text).map_err(|line| AuthError::UsersFile {
            path: path.display().to_string(),
            reason: format!("line {line} is not `\"user\" \"password\"`"),
        })
    }

    /// Parses the file's text; on error, the 1-based bad line number.
    pub fn parse(text: &str) -> Result<Users, usize> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with(';') || t.starts_with('#') {
                continue;
            }
            let (name, rest) = quoted(t).ok_or(i + 1)?;
            let (secret, _) = quoted(rest).ok_or(i + 1)?;
            let hex = secret.strip_prefix("md5").map(str::as_bytes);
            if hex.is_some_and(|h| h.len() == 32 && h.iter().all(u8::is_ascii_hexdigit))
                && !is_md5_hash(&secret)
            {
                tracing::warn!(
                    user = name,
                    "users file: this secret looks like an md5 hash with capital letters, which PostgreSQL and the proxy take for a plaintext password: write the hash in lowercase"
                );
            }
            users.insert(name, UserSecret::new(&secret));
        }
        Ok(Users { users })
    }

    pub fn get(&self, name: &str) -> Option<&UserSecret> {
        self.users.get(name)
    }
}

impl UserSecret {
    fn new(secret: &str) -> UserSecret {
        if let Some(s) = UserSecret::from_shadow(secret) {
            return s;
        }
        let salt: [u8; 16] = rand::thread_rng().gen();
        UserSecret {
            password: Some(secret.to_owned()),
            md5: None,
            scram: Some(ScramKeys::from_password(secret, salt.to_vec(), 4096)),
        }
    }

    /// A secret from a `pg_shadow.passwd` value (or a users file entry)
    /// that is not the password itself: a SCRAM verifier or an md5 hash.
    pub fn from_shadow(passwd: &str) -> Option<UserSecret> {
        if is_md5_hash(passwd) {
            return Some(UserSecret {
                password: None,
                md5: Some(passwd.to_owned()),
                scram: None,
            });
        }
        ScramKeys::from_verifier(passwd).map(|k| UserSecret {
            password: None,
            md5: None,
            scram: Some(k),
        })
    }

    /// What the proxy logs in to servers with: the password, else the md5
    /// hash, else the keys recovered from the client's SCRAM login
    /// (`client_key`) with this verifier's ServerKey.
    pub fn for_servers(&self, client_key: Option<[u8; 32]>) -> crate::server::Secret {
        use crate::server::Secret;
        match (&self.password, &self.md5, client_key, &self.scram) {
            (Some(pw), ..) => Secret::Password(pw.clone()),
            (None, Some(hash), ..) => Secret::Md5(hash.clone()),
            (None, None, Some(ck), Some(keys)) => {
                Secret::ScramKeys(Box::new((ck, keys.server_key)))
            }
            _ => Secret::None,
        }
    }

    /// The md5 hash of `user`'s password, if the proxy knows it.
    pub fn md5_for(&self, user: &str) -> Option<String> {
        let from_password = || self.password.as_deref().map(|p| md5_stored(user, p));
        self.md5.clone().or_else(from_password)
    }
}

/// Whether `s` is an md5 password hash, as PostgreSQL decides: `md5` and
/// 32 lowercase hex digits.
pub fn is_md5_hash(s: &str) -> bool {
    s.strip_prefix("md5").is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn md5_hex(parts: &[&[u8]]) -> String {
    use md5::Digest;
    use std::fmt::Write;
    let mut h = md5::Md5::new();
    for p in parts {
        h.update(p);
    }
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for b in h.finalize() {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `md5` and hex(md5(password || user)): the stored form of an md5 password.
pub fn md5_stored(user: &str, password: &str) -> String {
    md5_hex(&[password.as_bytes(), user.as_bytes()])
}

/// The answer to an md5 challenge with `salt`, from the stored hash
/// (`md5` and hex(md5(hash's hex digits || salt))): what a client sends
/// and a server expects.
pub fn md5_salted(stored: &str, salt: [u8; 4]) -> String {
    let hex = stored.strip_prefix("md5").unwrap_or(stored);
    md5_hex(&[hex.as_bytes(), &salt])
}

/// Reads the next password-family message ('p') body from the client.
async fn read_password_msg<C: AsyncRead + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
) -> Result<bytes::Bytes, AuthError> {
    loop {
        if let Some(f) = split_frame(buf, 16 * 1024)? {
            if f.tag() != b'p' {
                return Err(AuthError::Protocol(format!(
                    "expected a password message, got {:?}",
                    char::from(f.tag())
                )));
            }
            return Ok(f.into_wire().slice(5..));
        }
        if client.read_buf(buf).await? == 0 {
            return Err(AuthError::Closed);
        }
    }
}

fn random_nonce() -> String {
    use base64::Engine;
    let raw: [u8; 18] = rand::thread_rng().gen();
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// Runs the configured method with a client that sent a startup message
/// for `user`, whose secret the caller looked up (users file or
/// auth_query). `known_only`: trust admits only users with a secret.
/// Writes the challenges, not the final AuthenticationOk. For SCRAM,
/// returns the client's ClientKey (for logging in to servers with it);
/// `binding`: the TLS connection's channel binding data, which SCRAM then
/// offers to bind to (-PLUS).
pub async fn authenticate<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
    method: AuthMethod,
    secret: Option<&UserSecret>,
    known_only: bool,
    user: &str,
    binding: Option<&[u8]>,
) -> Result<Option<[u8; 32]>, AuthError> {
    let secret = match (method, secret) {
        (AuthMethod::Trust, s) => return trust(s, known_only, user),
        (_, Some(s)) => s,
        // The exchange runs as for a user that exists and fails at its
        // end, as PostgreSQL's mock authentication: a client cannot tell
        // which users exist.
        (AuthMethod::Md5, None) => {
            let r = md5(client, buf, None).await;
            return Err(refused(r, AuthError::UnknownUser(user.to_owned())));
        }
        (AuthMethod::ScramSha256, None) => {
            let r = scram(client, buf, mock_scram_keys(user), binding).await;
            return Err(refused(r, AuthError::UnknownUser(user.to_owned())));
        }
    };
    match (method, &secret.scram) {
        // Answered above.
        (AuthMethod::Trust, _) => Ok(None),
        // A user known only by a SCRAM verifier logs in with SCRAM, as
        // PostgreSQL's md5 method does for such users.
        (AuthMethod::Md5, Some(keys)) if secret.password.is_none() && secret.md5.is_none() => {
            scram(client, buf, keys.clone(), binding).await.map(Some)
        }
        (AuthMethod::Md5, _) => md5(client, buf, secret.md5_for(user)).await.map(|_| None),
        (AuthMethod::ScramSha256, Some(keys)) => {
            scram(client, buf, keys.clone(), binding).await.map(Some)
        }
        // Only an md5 hash: refused at the end of a mock exchange, as
        // PostgreSQL refuses it.
        (AuthMethod::ScramSha256, None) => {
            let r = scram(client, buf, mock_scram_keys(user), binding).await;
            Err(refused(r, AuthError::NoScramSecret))
        }
    }
}

/// Why a mock exchange (see `authenticate`) ends in a refusal: the client
/// went away or broke the protocol, or else the real `reason`.
fn refused<T>(exchange: Result<T, AuthError>, reason: AuthError) -> AuthError {
    match exchange {
        Err(e @ (AuthError::Closed | AuthError::Io(_) | AuthError::Protocol(_))) => e,
        _ => reason,
    }
}

/// A SCRAM verifier no password matches, for a user whose login cannot
/// succeed. Its salt is the same for a name on every try, as a real
/// user's is (a hash of a secret drawn once per process and the name), so
/// a client cannot tell it from a real one by asking twice.
fn mock_scram_keys(user: &str) -> ScramKeys {
    use sha2::{Digest, Sha256};
    static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let secret = SECRET.get_or_init(|| rand::thread_rng().gen());
    let salt = Sha256::new()
        .chain_update(secret)
        .chain_update(user.as_bytes())
        .finalize();
    ScramKeys {
        iterations: 4096,
        salt: salt[..16].to_vec(),
        stored_key: rand::thread_rng().gen(),
        server_key: rand::thread_rng().gen(),
    }
}

/// `trust`: any user is let in without a password, unless a users file
/// exists (`known_only`) and does not name it.
pub fn trust(
    secret: Option<&UserSecret>,
    known_only: bool,
    user: &str,
) -> Result<Option<[u8; 32]>, AuthError> {
    match secret {
        None if known_only => Err(AuthError::UnknownUser(user.to_owned())),
        _ => Ok(None),
    }
}

/// The md5 exchange against `stored` (the user's md5 hash); with none,
/// the exchange runs and fails.
async fn md5<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
    stored: Option<String>,
) -> Result<(), AuthError> {
    let mut out = BytesMut::new();
    let salt: [u8; 4] = rand::thread_rng().gen();
    msg::put_auth_md5(&mut out, salt);
    client.write_all(&out).await?;
    let body = read_password_msg(client, buf).await?;
    let (answer, _) = msg::cstr(&body).ok_or(AuthError::Protocol("bad md5".into()))?;
    match stored {
        Some(stored) if answer == md5_salted(&stored, salt) => Ok(()),
        _ => Err(AuthError::WrongPassword),
    }
}

async fn scram<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
    keys: ScramKeys,
    binding: Option<&[u8]>,
) -> Result<[u8; 32], AuthError> {
    let mut out = BytesMut::new();
    let offered: &[&str] = match binding {
        Some(_) => &[scram::PLUS, scram::PLAIN],
        None => &[scram::PLAIN],
    };
    msg::put_auth_sasl(&mut out, offered);
    client.write_all(&out).await?;
    let body = read_password_msg(client, buf).await?;
    let (mech, data) =
        msg::sasl_initial(&body).ok_or(AuthError::Protocol("bad SASL initial".into()))?;
    if !offered.contains(&mech) {
        return Err(AuthError::Protocol(format!("unsupported mechanism {mech}")));
    }
    let channel = scram::Channel {
        offered: binding.is_some(),
        bound: (mech == scram::PLUS)
            .then_some(binding)
            .flatten()
            .map(<[u8]>::to_vec),
    };
    let mut server = ScramServer::new(keys, random_nonce(), channel);
    let first = server.client_first(data)?;
    out.clear();
    msg::put_auth_sasl_continue(&mut out, &first);
    client.write_all(&out).await?;
    let body = read_password_msg(client, buf).await?;
    let fin = server.client_final(&body)?;
    out.clear();
    msg::put_auth_sasl_final(&mut out, &fin);
    client.write_all(&out).await?;
    server.client_key().ok_or(AuthError::WrongPassword)
}

/// A fresh nonce for a SCRAM exchange the proxy starts with a server.
pub fn nonce() -> String {
    random_nonce()
}

#[cfg(test)]
mod tests;
