//! SCRAM-SHA-1 (RFC 5802), server and client side, with saslname escaping.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::{Digest, Sha1};

type HmacSha1 = Hmac<Sha1>;

/// Escape a username for the `n=` attribute (`,` → `=2C`, `=` → `=3D`).
pub(crate) fn escape_saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

/// Reverse [`escape_saslname`]; `None` for an invalid `=` sequence.
pub(crate) fn unescape_saslname(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.split('=');
    out.push_str(it.next().unwrap_or(""));
    for part in it {
        if let Some(rest) = part.strip_prefix("2C") {
            out.push(',');
            out.push_str(rest);
        } else if let Some(rest) = part.strip_prefix("3D") {
            out.push('=');
            out.push_str(rest);
        } else {
            return None;
        }
    }
    Some(out)
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 20] {
    // HMAC accepts keys of any length.
    let mut m = match HmacSha1::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 20],
    };
    m.update(data);
    m.finalize().into_bytes().into()
}

fn sha1(data: &[u8]) -> [u8; 20] {
    Sha1::digest(data).into()
}

/// `Hi(password, salt, i)` = PBKDF2-HMAC-SHA-1.
pub(crate) fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    pbkdf2::pbkdf2_hmac::<Sha1>(password.as_bytes(), salt, iterations.max(1), &mut out);
    out
}

/// Client-side cache of `Hi()` results keyed by (password, salt, iterations),
/// as RFC 5802 §5.1 allows: a load generator logging in thousands of times
/// must not pay the PBKDF2 cost on every login.
fn cached_salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 20] {
    type Cache = HashMap<(String, Vec<u8>, u32), [u8; 20]>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (password.to_owned(), salt.to_vec(), iterations);
    if let Some(sp) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return *sp;
    }
    let sp = salted_password(password, salt, iterations);
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if c.len() >= 4096 {
        c.clear();
    }
    c.insert(key, sp);
    sp
}

/// What the server stores for one password.
#[derive(Debug, Clone)]
pub(crate) struct ScramKeys {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 20],
    pub server_key: [u8; 20],
}

impl ScramKeys {
    /// Derive the stored and server keys.
    pub(crate) fn derive(password: &str, salt: &[u8], iterations: u32) -> Self {
        let sp = salted_password(password, salt, iterations);
        let client_key = hmac(&sp, b"Client Key");
        ScramKeys {
            salt: salt.to_vec(),
            iterations: iterations.max(1),
            stored_key: sha1(&client_key),
            server_key: hmac(&sp, b"Server Key"),
        }
    }
}

/// Errors of a SCRAM exchange, mapped to SASL failure conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScramError {
    /// Syntax error in a message.
    Malformed,
    /// Wrong proof / nonce / channel binding.
    NotAuthorized,
}

/// The parsed client-first message.
#[derive(Debug, Clone)]
pub(crate) struct ClientFirst {
    pub gs2_header: String,
    pub username: String,
    pub bare: String,
    pub cnonce: String,
}

/// Parse `gs2-header client-first-message-bare`.
pub(crate) fn parse_client_first(msg: &str) -> Result<ClientFirst, ScramError> {
    let mut parts = msg.splitn(3, ',');
    let cb = parts.next().ok_or(ScramError::Malformed)?;
    let authzid = parts.next().ok_or(ScramError::Malformed)?;
    let bare = parts.next().ok_or(ScramError::Malformed)?;
    match cb {
        "n" | "y" => {}
        c if c.starts_with("p=") => return Err(ScramError::NotAuthorized),
        _ => return Err(ScramError::Malformed),
    }
    if !(authzid.is_empty() || authzid.starts_with("a=")) {
        return Err(ScramError::Malformed);
    }
    let mut username = None;
    let mut cnonce = None;
    for (i, attr) in bare.split(',').enumerate() {
        if i == 0 && attr.starts_with("m=") {
            return Err(ScramError::Malformed);
        }
        if let Some(n) = attr.strip_prefix("n=") {
            username = Some(unescape_saslname(n).ok_or(ScramError::Malformed)?);
        } else if let Some(r) = attr.strip_prefix("r=") {
            cnonce = Some(r.to_owned());
        }
    }
    let username = username
        .filter(|u| !u.is_empty())
        .ok_or(ScramError::Malformed)?;
    let cnonce = cnonce
        .filter(|r| !r.is_empty() && !r.contains(','))
        .ok_or(ScramError::Malformed)?;
    Ok(ClientFirst {
        gs2_header: format!("{cb},{authzid},"),
        username,
        bare: bare.to_owned(),
        cnonce,
    })
}

/// Server-side state between the server-first and the client-final messages.
#[derive(Debug, Clone)]
pub(crate) struct ServerExchange {
    first: ClientFirst,
    nonce: String,
    server_first: String,
}

impl ServerExchange {
    /// Build the server-first message for `first` with the server's nonce part.
    pub(crate) fn new(first: ClientFirst, snonce: &str, keys: &ScramKeys) -> Self {
        let nonce = format!("{}{}", first.cnonce, snonce);
        let server_first = format!(
            "r={},s={},i={}",
            nonce,
            B64.encode(&keys.salt),
            keys.iterations
        );
        ServerExchange {
            first,
            nonce,
            server_first,
        }
    }

    /// The server-first message.
    pub(crate) fn server_first(&self) -> &str {
        &self.server_first
    }

    /// The authenticated username (valid once [`Self::finish`] succeeds).
    pub(crate) fn username(&self) -> &str {
        &self.first.username
    }

    /// Verify the client-final message; returns the server-final message (`v=...`).
    pub(crate) fn finish(&self, msg: &str, keys: &ScramKeys) -> Result<String, ScramError> {
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed)?;
        if proof.len() != 20 {
            return Err(ScramError::Malformed);
        }
        let mut cbind = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                cbind = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let cbind = B64
            .decode(cbind.ok_or(ScramError::Malformed)?)
            .map_err(|_| ScramError::Malformed)?;
        if cbind != self.first.gs2_header.as_bytes() || nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::NotAuthorized);
        }
        let auth_message = format!(
            "{},{},{}",
            self.first.bare, self.server_first, without_proof
        );
        let sig = hmac(&keys.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 20];
        for i in 0..20 {
            client_key[i] = proof[i] ^ sig[i];
        }
        if sha1(&client_key) != keys.stored_key {
            return Err(ScramError::NotAuthorized);
        }
        let server_sig = hmac(&keys.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_sig)))
    }
}

/// Client side of SCRAM-SHA-1 (no channel binding).
#[derive(Debug, Clone)]
pub(crate) struct ScramClient {
    password: String,
    bare: String,
    cnonce: String,
    server_sig: Option<[u8; 20]>,
}

impl ScramClient {
    /// Start an exchange with the given client nonce.
    pub(crate) fn new(user: &str, password: &str, cnonce: &str) -> Self {
        ScramClient {
            password: password.to_owned(),
            bare: format!("n={},r={}", escape_saslname(user), cnonce),
            cnonce: cnonce.to_owned(),
            server_sig: None,
        }
    }

    /// The client-first message (with the `n,,` GS2 header).
    pub(crate) fn client_first(&self) -> String {
        format!("n,,{}", self.bare)
    }

    /// Answer the server-first message with the client-final message.
    pub(crate) fn client_final(&mut self, server_first: &str) -> Result<String, ScramError> {
        let mut nonce = None;
        let mut salt = None;
        let mut iters = None;
        for attr in server_first.split(',') {
            if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            } else if let Some(s) = attr.strip_prefix("s=") {
                salt = Some(B64.decode(s).map_err(|_| ScramError::Malformed)?);
            } else if let Some(i) = attr.strip_prefix("i=") {
                iters = Some(i.parse::<u32>().map_err(|_| ScramError::Malformed)?);
            } else if attr.starts_with("m=") {
                return Err(ScramError::Malformed);
            }
        }
        let (nonce, salt, iters) = match (nonce, salt, iters) {
            (Some(n), Some(s), Some(i)) if i > 0 => (n, s, i),
            _ => return Err(ScramError::Malformed),
        };
        if !nonce.starts_with(&self.cnonce) || nonce.len() <= self.cnonce.len() {
            return Err(ScramError::NotAuthorized);
        }
        let sp = cached_salted_password(&self.password, &salt, iters);
        let client_key = hmac(&sp, b"Client Key");
        let stored = sha1(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{},{}", self.bare, server_first, without_proof);
        let sig = hmac(&stored, auth_message.as_bytes());
        let mut proof = [0u8; 20];
        for i in 0..20 {
            proof[i] = client_key[i] ^ sig[i];
        }
        let server_key = hmac(&sp, b"Server Key");
        self.server_sig = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Check the server-final message (`v=...`).
    pub(crate) fn verify_server_final(&self, msg: &str) -> bool {
        let Some(v) = msg.split(',').find_map(|a| a.strip_prefix("v=")) else {
            return false;
        };
        match (B64.decode(v), self.server_sig) {
            (Ok(v), Some(s)) => v == s,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CNONCE: &str = "fyko+d2lbbFgONRv9qkxdawL";
    const SFIRST: &str = "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
    const CFINAL: &str =
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
    const SFINAL: &str = "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=";

    #[test]
    fn rfc5802_client_vector() {
        let mut c = ScramClient::new("user", "pencil", CNONCE);
        assert_eq!(c.client_first(), "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL");
        assert_eq!(c.client_final(SFIRST).expect("final"), CFINAL);
        assert!(c.verify_server_final(SFINAL));
        assert!(!c.verify_server_final("v=AAAA"));
    }

    #[test]
    fn rfc5802_server_vector() {
        let salt = B64.decode("QSXCR+Q6sek8bf92").expect("salt");
        let keys = ScramKeys::derive("pencil", &salt, 4096);
        let first = parse_client_first("n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL").expect("first");
        assert_eq!(first.username, "user");
        let ex = ServerExchange::new(first, "3rfcNHYJY1ZVvWVs7j", &keys);
        assert_eq!(ex.server_first(), SFIRST);
        assert_eq!(ex.finish(CFINAL, &keys).expect("ok"), SFINAL);
        let bad = CFINAL.replace("p=v0X8", "p=v1X8");
        assert_eq!(
            ex.finish(&bad, &keys).unwrap_err(),
            ScramError::NotAuthorized
        );
        assert!(ex.finish("garbage", &keys).is_err());
    }

    #[test]
    fn saslname_escaping() {
        assert_eq!(escape_saslname("a,b=c"), "a=2Cb=3Dc");
        assert_eq!(unescape_saslname("a=2Cb=3Dc").as_deref(), Some("a,b=c"));
        assert_eq!(unescape_saslname("a=4"), None);
        assert!(parse_client_first("p=tls-unique,,n=u,r=x").is_err());
        assert!(parse_client_first("n,,r=x").is_err());
        assert!(parse_client_first("").is_err());
    }
}
