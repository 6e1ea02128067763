//! The users file, md5 and SCRAM exchanges with a client over an in-memory pipe.

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
fn md5_hashes_are_told_from_passwords_and_answer_as_libpq_computes() {
    let stored = md5_stored("alice", "pw");
    assert!(is_md5_hash(&stored), "{stored}");
    for not in [
        "pw",
        "md5",
        "md5ABCDEF0123456789abcdef0123456789",
        &stored[..34],
    ] {
        assert!(!is_md5_hash(not), "{not}");
    }
    let salt = [1, 2, 3, 250];
    // postgres-protocol's client computation, from the password.
    let libpq = postgres_protocol::authentication::md5_hash(b"alice", b"pw", salt);
    assert_eq!(md5_salted(&stored, salt), libpq);
    let u = Users::parse(&format!("\"alice\" \"{stored}\"\n\"bob\" \"pw\"")).unwrap();
    let alice = u.get("alice").unwrap();
    assert!(alice.password.is_none() && alice.scram.is_none());
    assert_eq!(alice.md5_for("alice").as_deref(), Some(stored.as_str()));
    // A plaintext password gives its hash for the user asking.
    let bob = u.get("bob").unwrap();
    assert_eq!(bob.md5_for("bob"), Some(md5_stored("bob", "pw")));
}

/// The next Authentication message's code and data.
async fn auth_request(b: &mut tokio::io::DuplexStream, buf: &mut BytesMut) -> (i32, Vec<u8>) {
    let f = loop {
        if let Some(f) = split_frame(buf, 1000).unwrap() {
            break f;
        }
        assert!(b.read_buf(buf).await.unwrap() > 0, "closed");
    };
    assert_eq!(f.tag(), b'R');
    let (code, data) = f.body().split_at(4);
    (i32::from_be_bytes(code.try_into().unwrap()), data.to_vec())
}

/// Logs in as `user` with SCRAM and a password: the outcome, and the
/// server-first-message the client got.
async fn scram_try(
    secret: Option<UserSecret>,
    user: &str,
) -> (Result<Option<[u8; 32]>, AuthError>, String) {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let (mut a, mut b) = tokio::io::duplex(4096);
    let user_owned = user.to_owned();
    let server = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let method = AuthMethod::ScramSha256;
        authenticate(
            &mut a,
            &mut buf,
            method,
            secret.as_ref(),
            true,
            &user_owned,
            None,
        )
        .await
    });
    let mut buf = BytesMut::new();
    assert_eq!(
        auth_request(&mut b, &mut buf).await.0,
        10,
        "AuthenticationSASL"
    );
    let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
    let mut out = BytesMut::new();
    msg::put_sasl_initial(&mut out, "SCRAM-SHA-256", client.message());
    b.write_all(&out).await.unwrap();
    let (code, first) = auth_request(&mut b, &mut buf).await;
    assert_eq!(code, 11, "AuthenticationSASLContinue");
    client.update(&first).unwrap();
    out.clear();
    msg::put_sasl_response(&mut out, client.message());
    b.write_all(&out).await.unwrap();
    let r = server.await.unwrap();
    (r, String::from_utf8(first).unwrap())
}

#[tokio::test]
async fn logins_that_cannot_succeed_run_the_whole_exchange_as_postgres_does() {
    let salt = |first: &str| {
        first
            .split(',')
            .find(|a| a.starts_with("s="))
            .unwrap()
            .to_owned()
    };
    // An md5 hash cannot check a SCRAM login.
    let users = Users::parse(&format!("\"alice\" \"{}\"", md5_stored("alice", "pw"))).unwrap();
    let (r, _) = scram_try(users.get("alice").cloned(), "alice").await;
    assert!(matches!(r, Err(AuthError::NoScramSecret)), "{r:?}");
    // An unknown user gets a salt like a real one, the same each time.
    let (r, first) = scram_try(None, "nobody").await;
    assert!(matches!(r, Err(AuthError::UnknownUser(_))), "{r:?}");
    let (_, again) = scram_try(None, "nobody").await;
    assert_eq!(salt(&first), salt(&again));
    let (_, other) = scram_try(None, "somebody").await;
    assert_ne!(salt(&first), salt(&other));
    // The right password of a real user gets in through the same steps.
    let users = Users::parse("\"bob\" \"pw\"").unwrap();
    let (r, _) = scram_try(users.get("bob").cloned(), "bob").await;
    assert!(r.unwrap().is_some());
    // md5: the challenge, then the refusal.
    let (mut a, mut b) = tokio::io::duplex(4096);
    let server = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        authenticate(
            &mut a,
            &mut buf,
            AuthMethod::Md5,
            None,
            true,
            "nobody",
            None,
        )
        .await
    });
    let mut buf = BytesMut::new();
    let (code, salt) = auth_request(&mut b, &mut buf).await;
    assert_eq!(code, 5, "AuthenticationMD5Password");
    let mut out = BytesMut::new();
    let salt: [u8; 4] = salt.try_into().unwrap();
    msg::put_password(&mut out, &md5_salted(&md5_stored("nobody", "pw"), salt));
    b.write_all(&out).await.unwrap();
    let r = server.await.unwrap();
    assert!(matches!(r, Err(AuthError::UnknownUser(_))), "{r:?}");
}

#[test]
fn debug_output_never_shows_a_secret() {
    let u = Users::parse("\"alice\" \"hunter2\"").unwrap();
    assert!(!format!("{u:?}").contains("hunter2"));
    // Nor a login's (pools are Debug and hold one).
    use crate::server::Secret;
    for secret in [
        Secret::Password("hunter2".into()),
        Secret::Md5(md5_stored("alice", "hunter2")),
        Secret::ScramKeys(Box::new(([7; 32], [9; 32]))),
    ] {
        let login = crate::server::Login {
            user: "alice".into(),
            database: "db".into(),
            options: String::new(),
            secret,
        };
        let text = format!("{login:?}");
        assert!(
            text.contains("alice") && !text.contains("hunter2"),
            "{text}"
        );
        assert!(!text.contains("md5") && !text.contains("7, 7"), "{text}");
    }
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
