//! Server side of SCRAM-SHA-256 (RFC 5802 / 7677) as Postgres speaks it, as a
//! state machine: message in, next message (or a verdict) out. No I/O.
//!
//! Over TLS, SCRAM-SHA-256-PLUS binds the exchange to the client's TLS
//! connection to the proxy (`tls-server-end-point`, see `tls`). May call:
//! `hmac`, `sha2`, `base64`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::AuthError;

type HmacSha256 = Hmac<Sha256>;

/// What the server keeps to verify a SCRAM client: never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    m.update(data);
    m.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block ("Hi" in the RFC).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        out.iter_mut().zip(u.iter()).for_each(|(o, x)| *o ^= x);
    }
    out
}

impl ScramKeys {
    /// Derives the keys from a plaintext password (SASLprep is skipped:
    /// ASCII passwords are unaffected by it).
    pub fn from_password(password: &str, salt: Vec<u8>, iterations: u32) -> ScramKeys {
        let salted = hi(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        ScramKeys {
            iterations,
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Parses a Postgres verifier `SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>`.
    pub fn from_verifier(v: &str) -> Option<ScramKeys> {
        let rest = v.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramKeys {
            iterations: iter.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

enum State {
    Initial,
    SentFirst {
        /// The `c=` value expected in client-final-message.
        binding: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    Done,
}

/// One SCRAM exchange with one client.
pub struct ScramServer {
    keys: ScramKeys,
    server_nonce: String,
    channel: Channel,
    state: State,
    client_key: Option<[u8; 32]>,
}

/// The mechanisms, as SASL names them.
pub const PLAIN: &str = "SCRAM-SHA-256";
pub const PLUS: &str = "SCRAM-SHA-256-PLUS";

/// What the exchange may bind to.
#[derive(Debug, Clone, Default)]
pub struct Channel {
    /// -PLUS was offered (the client is on TLS with a usable certificate).
    pub offered: bool,
    /// The client chose -PLUS: the `tls-server-end-point` data its proof
    /// must include.
    pub bound: Option<Vec<u8>>,
}

fn bad(what: &str) -> AuthError {
    AuthError::Protocol(format!("malformed SCRAM {what}"))
}

impl ScramServer {
    /// `server_nonce` must be fresh random printable ASCII without commas.
    pub fn new(keys: ScramKeys, server_nonce: String, channel: Channel) -> ScramServer {
        ScramServer {
            keys,
            server_nonce,
            channel,
            state: State::Initial,
            client_key: None,
        }
    }

    /// Takes client-first-message, returns server-first-message.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let msg = std::str::from_utf8(msg).map_err(|_| bad("client-first"))?;
        let (header, bare) = self.gs2_header(msg)?;
        let nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("client-first"))?;
        let nonce = format!("{nonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.keys.salt),
            self.keys.iterations
        );
        let out = server_first.as_bytes().to_vec();
        self.state = State::SentFirst {
            binding: self.binding_attr(header),
            client_first_bare: bare.to_owned(),
            server_first,
            nonce,
        };
        Ok(out)
    }

    /// The GS2 header of client-first-message and the rest, checked
    /// against the mechanism chosen: `p=tls-server-end-point` only with
    /// -PLUS, and `y` (the client could bind but thinks the server
    /// cannot) refused when -PLUS was offered, which means someone
    /// removed it on the way (RFC 5802, 6).
    fn gs2_header<'m>(&self, msg: &'m str) -> Result<(&'m str, &'m str), AuthError> {
        let refuse = |why: &str| Err(AuthError::Protocol(format!("SCRAM channel binding: {why}")));
        let split = |prefix: &str| {
            msg.strip_prefix(prefix)
                .map(|bare| (&msg[..prefix.len()], bare))
        };
        if let Some(parts) = split("p=tls-server-end-point,,") {
            return match self.channel.bound {
                Some(_) => Ok(parts),
                None => refuse("tls-server-end-point without SCRAM-SHA-256-PLUS"),
            };
        }
        if self.channel.bound.is_some() {
            return refuse("SCRAM-SHA-256-PLUS chosen without binding");
        }
        if msg.starts_with("p=") {
            return refuse("unsupported binding type");
        }
        if let Some(parts) = split("y,,") {
            return match self.channel.offered {
                false => Ok(parts),
                true => refuse("the client was told the proxy offers no binding"),
            };
        }
        split("n,,").ok_or_else(|| bad("client-first"))
    }

    /// The `c=` value client-final-message must carry: the GS2 header and
    /// the binding data, base64.
    fn binding_attr(&self, header: &str) -> String {
        let mut data = header.as_bytes().to_vec();
        if let Some(bound) = &self.channel.bound {
            data.extend_from_slice(bound);
        }
        B64.encode(data)
    }

    /// Takes client-final-message, returns server-final-message on success.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let State::SentFirst {
            binding: want,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(bad("exchange order"));
        };
        let msg = std::str::from_utf8(msg).map_err(|_| bad("client-final"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or_else(|| bad("client-final"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs.next().and_then(|a| a.strip_prefix("c="));
        if binding != Some(want.as_str()) {
            return Err(AuthError::Protocol(
                "SCRAM channel binding check failed".into(),
            ));
        }
        if attrs.next().and_then(|a| a.strip_prefix("r=")) != Some(nonce.as_str()) {
            return Err(bad("nonce"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| bad("proof"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&self.keys.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        client_key
            .iter_mut()
            .zip(signature.iter())
            .for_each(|(k, s)| *k ^= s);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if stored != self.keys.stored_key {
            return Err(AuthError::WrongPassword);
        }
        self.client_key = Some(client_key);
        let server_sig = hmac(&self.keys.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_sig)).into_bytes())
    }

    /// After a successful exchange: the client's ClientKey, recovered from
    /// its proof. With it the proxy can log in to a server that holds the
    /// same verifier without knowing the password.
    pub fn client_key(&self) -> Option<[u8; 32]> {
        self.client_key
    }
}

/// Client side of SCRAM-SHA-256 from keys instead of a password (the
/// ClientKey recovered from a client's proof and the verifier's ServerKey).
pub struct KeyClient {
    client_key: [u8; 32],
    server_key: [u8; 32],
    nonce: String,
    auth_message: Option<String>,
}

impl KeyClient {
    /// `nonce`: fresh random printable ASCII without commas.
    pub fn new(client_key: [u8; 32], server_key: [u8; 32], nonce: String) -> KeyClient {
        KeyClient {
            client_key,
            server_key,
            nonce,
            auth_message: None,
        }
    }

    /// client-first-message.
    pub fn first(&self) -> Vec<u8> {
        format!("n,,n=,r={}", self.nonce).into_bytes()
    }

    /// Takes server-first-message, returns client-final-message.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<Vec<u8>, AuthError> {
        let sf = std::str::from_utf8(server_first).map_err(|_| bad("server-first"))?;
        let nonce = sf
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| n.starts_with(&self.nonce))
            .ok_or_else(|| bad("server nonce"))?;
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=,r={},{sf},{without_proof}", self.nonce);
        let stored_key: [u8; 32] = Sha256::digest(self.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = self.client_key;
        proof
            .iter_mut()
            .zip(signature.iter())
            .for_each(|(p, s)| *p ^= s);
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks server-final-message (the server knows the verifier too).
    pub fn verify(&self, server_final: &[u8]) -> Result<(), AuthError> {
        let am = self
            .auth_message
            .as_deref()
            .ok_or_else(|| bad("exchange order"))?;
        let want = format!("v={}", B64.encode(hmac(&self.server_key, am.as_bytes())));
        if server_final == want.as_bytes() {
            Ok(())
        } else {
            Err(AuthError::Protocol("server signature mismatch".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(server_pw: &str, client_pw: &str) -> Result<(), AuthError> {
        let keys = ScramKeys::from_password(server_pw, b"0123456789abcdef".to_vec(), 4096);
        let mut server = ScramServer::new(keys, "srvnonce".into(), Channel::default());
        let mut client = ScramSha256::new(client_pw.as_bytes(), ChannelBinding::unsupported());
        let first = server.client_first(client.message())?;
        client.update(&first).unwrap();
        let fin = server.client_final(client.message())?;
        client.finish(&fin).unwrap();
        Ok(())
    }

    /// An exchange over a channel: what the server offers and binds to,
    /// and what the client (rust-postgres's SCRAM) says about binding.
    fn bound_exchange(channel: Channel, client_binding: ChannelBinding) -> Result<(), AuthError> {
        let keys = ScramKeys::from_password("pw", b"0123456789abcdef".to_vec(), 4096);
        let mut server = ScramServer::new(keys, "srvnonce".into(), channel);
        let mut client = ScramSha256::new(b"pw", client_binding);
        let first = server.client_first(client.message())?;
        client.update(&first).unwrap();
        let fin = server.client_final(client.message())?;
        client.finish(&fin).unwrap();
        Ok(())
    }

    #[test]
    fn plus_binds_the_login_to_the_certificate_hash_and_refuses_downgrades() {
        let plus = |hash: &[u8]| Channel {
            offered: true,
            bound: Some(hash.to_vec()),
        };
        let offered = Channel {
            offered: true,
            bound: None,
        };
        bound_exchange(
            plus(b"cert-hash"),
            ChannelBinding::tls_server_end_point(b"cert-hash".to_vec()),
        )
        .unwrap();
        // The client saw another certificate: someone relayed its TLS.
        assert!(bound_exchange(
            plus(b"cert-hash"),
            ChannelBinding::tls_server_end_point(b"other".to_vec())
        )
        .is_err());
        // -PLUS chosen, then no binding sent; a binding without -PLUS.
        assert!(bound_exchange(plus(b"h"), ChannelBinding::unsupported()).is_err());
        assert!(bound_exchange(
            offered.clone(),
            ChannelBinding::tls_server_end_point(b"h".to_vec())
        )
        .is_err());
        // A client that could bind was told the proxy cannot: a downgrade
        // when -PLUS was offered, fine when it was not.
        assert!(bound_exchange(offered.clone(), ChannelBinding::unrequested()).is_err());
        bound_exchange(Channel::default(), ChannelBinding::unrequested()).unwrap();
        // A client without binding support logs in either way.
        bound_exchange(offered, ChannelBinding::unsupported()).unwrap();
    }

    #[test]
    fn rust_postgres_client_authenticates_with_the_right_password() {
        exchange("s3cret", "s3cret").unwrap();
    }

    #[test]
    fn a_recovered_client_key_logs_in_to_a_server_with_the_same_verifier() {
        let keys = ScramKeys::from_password("pw", b"salty".to_vec(), 4096);
        // A client logs in to the proxy with the password ...
        let mut proxy_side = ScramServer::new(keys.clone(), "p1".into(), Channel::default());
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let first = proxy_side.client_first(client.message()).unwrap();
        client.update(&first).unwrap();
        let fin = proxy_side.client_final(client.message()).unwrap();
        client.finish(&fin).unwrap();
        // ... and the proxy logs in to the server from the recovered key.
        let ck = proxy_side.client_key().unwrap();
        let mut server = ScramServer::new(keys.clone(), "s1".into(), Channel::default());
        let mut kc = KeyClient::new(ck, keys.server_key, "k1".into());
        let sf = server.client_first(&kc.first()).unwrap();
        let cf = kc.respond(&sf).unwrap();
        let done = server.client_final(&cf).unwrap();
        kc.verify(&done).unwrap();
        // A wrong key is refused by the server.
        let mut server = ScramServer::new(keys.clone(), "s2".into(), Channel::default());
        let mut kc = KeyClient::new([7; 32], keys.server_key, "k2".into());
        let sf = server.client_first(&kc.first()).unwrap();
        let cf = kc.respond(&sf).unwrap();
        assert!(server.client_final(&cf).is_err());
    }

    #[test]
    fn wrong_password_is_rejected_as_such() {
        assert!(matches!(
            exchange("s3cret", "guess"),
            Err(AuthError::WrongPassword)
        ));
    }

    #[test]
    fn verifier_text_parses_to_the_same_keys() {
        let k = ScramKeys::from_password("pw", b"salt".to_vec(), 4096);
        let text = format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            k.iterations,
            B64.encode(&k.salt),
            B64.encode(k.stored_key),
            B64.encode(k.server_key)
        );
        assert_eq!(ScramKeys::from_verifier(&text), Some(k));
        assert_eq!(ScramKeys::from_verifier("SCRAM-SHA-256$x"), None);
    }

    #[test]
    fn garbage_and_out_of_order_messages_are_errors() {
        let keys = ScramKeys::from_password("pw", b"s".to_vec(), 1);
        let mut s = ScramServer::new(keys.clone(), "n".into(), Channel::default());
        assert!(s.client_final(b"c=biws,r=x,p=AAAA").is_err());
        let mut s = ScramServer::new(keys.clone(), "n".into(), Channel::default());
        assert!(s.client_first(b"\xff\xfe").is_err());
        let mut s = ScramServer::new(keys, "n".into(), Channel::default());
        assert!(s.client_first(b"p=tls-server-end-point,,n=,r=x").is_err());
    }
}
