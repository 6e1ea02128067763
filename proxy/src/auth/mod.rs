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

/// What the proxy knows about one user.
#[derive(Clone)]
pub struct UserSecret {
    /// Plaintext password: needed for md5 clients and to log in to servers.
    pub password: Option<String>,
    /// SCRAM keys derived once at load, so a login costs no PBKDF2.
    pub scram: Option<ScramKeys>,
}

impl std::fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserSecret(..)")
    }
}

/// The users file: `"name" "secret"` per line, secret plaintext or a
/// `SCRAM-SHA-256$...` verifier; `;` and `#` start comments.
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
        if let Some(keys) = ScramKeys::from_verifier(secret) {
            return UserSecret {
                password: None,
                scram: Some(keys),
            };
        }
        let salt: [u8; 16] = rand::thread_rng().gen();
        UserSecret {
            password: Some(secret.to_owned()),
            scram: Some(ScramKeys::from_password(secret, salt.to_vec(), 4096)),
        }
    }
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
        (_, None) => return Err(AuthError::UnknownUser(user.to_owned())),
    };
    match method {
        // Answered above.
        AuthMethod::Trust => Ok(None),
        AuthMethod::Md5 => md5(client, buf, secret, user).await.map(|_| None),
        AuthMethod::ScramSha256 => scram(client, buf, secret, binding).await.map(Some),
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

async fn md5<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
    secret: &UserSecret,
    user: &str,
) -> Result<(), AuthError> {
    let mut out = BytesMut::new();
    let salt: [u8; 4] = rand::thread_rng().gen();
    msg::put_auth_md5(&mut out, salt);
    client.write_all(&out).await?;
    let body = read_password_msg(client, buf).await?;
    let (answer, _) = msg::cstr(&body).ok_or(AuthError::Protocol("bad md5".into()))?;
    let Some(pw) = &secret.password else {
        return Err(AuthError::WrongPassword);
    };
    let want = postgres_protocol::authentication::md5_hash(user.as_bytes(), pw.as_bytes(), salt);
    if answer == want {
        Ok(())
    } else {
        Err(AuthError::WrongPassword)
    }
}

async fn scram<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
    secret: &UserSecret,
    binding: Option<&[u8]>,
) -> Result<[u8; 32], AuthError> {
    let keys = secret.scram.clone().ok_or(AuthError::WrongPassword)?;
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

impl UserSecret {
    /// A secret from a `pg_shadow.passwd` value: only SCRAM verifiers can
    /// be used without the password.
    pub fn from_shadow(passwd: &str) -> Option<UserSecret> {
        ScramKeys::from_verifier(passwd).map(|k| UserSecret {
            password: None,
            scram: Some(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file_reads_quoted_names_and_secrets() {
        let u = Users::parse("; comment\n\"alice\" \"pa\"\"ss\"\n\n\"bob\" \"x\" extra\n").unwrap();
        assert_eq!(u.get("alice").unwrap().password.as_deref(), Some("pa\"ss"));
        assert!(u.get("bob").is_some());
        assert!(u.get("carol").is_none());
        assert_eq!(Users::parse("\"alice\" nopw").unwrap_err(), 1);
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let u = Users::parse("\"alice\" \"hunter2\"").unwrap();
        assert!(!format!("{u:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn md5_client_with_right_password_is_accepted_over_duplex() {
        let users = Users::parse("\"alice\" \"pw\"").unwrap();
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let secret = users.get("alice");
            authenticate(
                &mut a,
                &mut buf,
                AuthMethod::Md5,
                secret,
                true,
                "alice",
                None,
            )
            .await
        });
        let mut buf = BytesMut::new();
        let f = loop {
            if let Some(f) = split_frame(&mut buf, 1000).unwrap() {
                break f;
            }
            b.read_buf(&mut buf).await.unwrap();
        };
        let salt: [u8; 4] = f.body()[4..8].try_into().unwrap();
        let mut out = BytesMut::new();
        msg::put_password(
            &mut out,
            &postgres_protocol::authentication::md5_hash(b"alice", b"pw", salt),
        );
        b.write_all(&out).await.unwrap();
        server.await.unwrap().unwrap();
    }
}
