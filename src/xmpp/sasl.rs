//! Who is logging in: the bare JID from a SASL `<auth>` initial response.
//!
//! Only the identity is read; passwords and proofs are never decoded beyond
//! what finding the name needs, never stored and never logged.

use base64::Engine;

/// Why the user could not be identified from an `<auth>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifyError {
    /// The initial response is missing: the proxy has to ask for it.
    #[error("no initial response")]
    NoInitialResponse,
    /// The mechanism does not carry a user name the proxy can read.
    #[error("mechanism {0} does not name the user")]
    UnsupportedMechanism(String),
    /// The response does not decode as the mechanism says it must.
    #[error("malformed {0} initial response")]
    Malformed(&'static str),
    /// The payload is not base64 (`<incorrect-encoding/>`, RFC 6120 §6.5.2).
    #[error("the SASL payload is not valid base64")]
    Encoding,
    /// The identity is not a valid JID (RFC 7622).
    #[error(transparent)]
    InvalidJid(#[from] crate::jid::JidError),
}

/// Mechanisms whose initial response names the user.
pub fn names_user(mechanism: &str) -> bool {
    mechanism == "PLAIN" || is_scram(mechanism)
}

fn is_scram(mechanism: &str) -> bool {
    mechanism.starts_with("SCRAM-") && !mechanism.ends_with("-PLUS")
}

/// Decodes the base64 payload of `<auth>` / `<response>` (`=` is empty).
pub fn decode_payload(text: &str) -> Result<Vec<u8>, IdentifyError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(IdentifyError::NoInitialResponse);
    }
    if t == "=" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(t)
        .map_err(|_| IdentifyError::Encoding)
}

/// Reads the bare JID from a mechanism's initial response, normalised by
/// [`crate::jid::normalize_bare`]. `domain` completes a bare user name.
pub fn identify(mechanism: &str, response: &[u8], domain: &str) -> Result<String, IdentifyError> {
    let name = if mechanism == "PLAIN" {
        plain_identity(response)?
    } else if is_scram(mechanism) {
        scram_identity(response)?
    } else {
        return Err(IdentifyError::UnsupportedMechanism(mechanism.to_string()));
    };
    bare_jid(&name, domain)
}

/// Turns a SASL identity into a normalised bare JID
/// ([`crate::jid::normalize_bare`]): `Alice` → `alice@domain`,
/// `Alice@Other.Example` → `alice@other.example`, a resource is dropped.
/// An identity that is no valid JID is [`IdentifyError::InvalidJid`].
pub fn bare_jid(name: &str, domain: &str) -> Result<String, IdentifyError> {
    let name = name.split('/').next().unwrap_or(name);
    let normalized = if name.contains('@') {
        crate::jid::normalize_bare(name)
    } else {
        crate::jid::normalize_bare(&format!("{name}@{domain}"))
    };
    normalized.map_err(IdentifyError::InvalidJid)
}

/// PLAIN: `[authzid] NUL authcid NUL passwd` (RFC 4616). The user is the
/// authentication identity, the one whose password the node checks and
/// (as Prosody does) logs in; an authorization identity is the node's to
/// honour or refuse, and the bound JID is checked against the routed one
/// after login, so an authzid the node honours differently ends the stream.
fn plain_identity(resp: &[u8]) -> Result<String, IdentifyError> {
    let mut parts = resp.splitn(3, |b| *b == 0);
    let authzid = parts.next().ok_or(IdentifyError::Malformed("PLAIN"))?;
    let authcid = parts.next().ok_or(IdentifyError::Malformed("PLAIN"))?;
    if parts.next().is_none() {
        return Err(IdentifyError::Malformed("PLAIN"));
    }
    let _ = authzid;
    let s = std::str::from_utf8(authcid).map_err(|_| IdentifyError::Malformed("PLAIN"))?;
    if s.is_empty() {
        return Err(IdentifyError::Malformed("PLAIN"));
    }
    Ok(s.to_string())
}

/// SCRAM client-first-message: `gs2-header n=saslname,r=nonce[,…]`
/// (RFC 5802 §7) where gs2-header is `(n|y|p=cb),[a=authzid],`. As for
/// PLAIN, the user is the authentication identity (`n=`).
fn scram_identity(resp: &[u8]) -> Result<String, IdentifyError> {
    let s = std::str::from_utf8(resp).map_err(|_| IdentifyError::Malformed("SCRAM"))?;
    let mut fields = s.splitn(3, ',');
    let cb = fields.next().ok_or(IdentifyError::Malformed("SCRAM"))?;
    if !(cb == "n" || cb == "y" || cb.starts_with("p=")) {
        return Err(IdentifyError::Malformed("SCRAM"));
    }
    let authzid = fields.next().ok_or(IdentifyError::Malformed("SCRAM"))?;
    let bare = fields.next().ok_or(IdentifyError::Malformed("SCRAM"))?;
    if !authzid.is_empty() && !authzid.starts_with("a=") {
        return Err(IdentifyError::Malformed("SCRAM"));
    }
    let first = bare.split(',').next().unwrap_or("");
    let name = first
        .strip_prefix("n=")
        .ok_or(IdentifyError::Malformed("SCRAM"))?;
    if name.is_empty() {
        return Err(IdentifyError::Malformed("SCRAM"));
    }
    unescape_saslname(name)
}

/// RFC 5802 saslname: `=2C` is `,` and `=3D` is `=`; any other `=` is an error.
pub fn unescape_saslname(s: &str) -> Result<String, IdentifyError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(k) = rest.find('=') {
        out.push_str(&rest[..k]);
        let esc = rest
            .get(k..k + 3)
            .ok_or(IdentifyError::Malformed("SCRAM"))?;
        match esc {
            "=2C" => out.push(','),
            "=3D" => out.push('='),
            _ => return Err(IdentifyError::Malformed("SCRAM")),
        }
        rest = &rest[k + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn plain() {
        let r = decode_payload(&b64(b"\0alice\0secret")).unwrap();
        assert_eq!(
            identify("PLAIN", &r, "example.com").unwrap(),
            "alice@example.com"
        );
        let r = decode_payload(&b64(b"\0Alice@Other.Example\0secret")).unwrap();
        assert_eq!(
            identify("PLAIN", &r, "example.com").unwrap(),
            "alice@other.example"
        );
        // The authentication identity is the user, whatever the authzid.
        let r = decode_payload(&b64(b"admin@example.com\0alice\0pw")).unwrap();
        assert_eq!(
            identify("PLAIN", &r, "example.com").unwrap(),
            "alice@example.com"
        );
        for bad in [&b"alice"[..], b"\0\0pw", b"\0alice"] {
            let r = decode_payload(&b64(bad)).unwrap();
            assert!(identify("PLAIN", &r, "example.com").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn scram_from_the_captures() {
        // alice-scram-sha1.c2s.xml's <auth> initial response.
        let r = decode_payload("biwsbj1hbGljZSxyPTU4NjgwMTk2NjcwNTcyMDI=").unwrap();
        assert_eq!(
            identify("SCRAM-SHA-1", &r, "example.com").unwrap(),
            "alice@example.com"
        );
    }

    #[test]
    fn scram_escaping_and_gs2_headers() {
        let cases = [
            ("n,,n=user,r=abc", "user@example.com"),
            ("y,,n=a=2Cb=3Dc,r=abc", "a,b=c@example.com"),
            ("n,a=boss@example.com,n=user,r=x", "user@example.com"),
            ("p=tls-exporter,,n=u,r=x", "u@example.com"),
        ];
        for (msg, want) in cases {
            assert_eq!(
                identify("SCRAM-SHA-256", msg.as_bytes(), "example.com").unwrap(),
                want
            );
        }
        for bad in [
            "n,,n=a=2Xb,r=x",
            "x,,n=u,r=x",
            "n,,r=x",
            "n,,n=,r=x",
            "n,b,n=u",
        ] {
            assert!(
                identify("SCRAM-SHA-1", bad.as_bytes(), "example.com").is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn identities_are_normalised_jids() {
        assert_eq!(
            bare_jid("ÄRGER", "Example.COM").as_deref(),
            Ok("ärger@example.com")
        );
        assert_eq!(
            bare_jid("Ärger@Bücher.example/phone", "example.com").as_deref(),
            Ok("ärger@xn--bcher-kva.example")
        );
        assert_eq!(
            bare_jid("Alice/res", "example.com").as_deref(),
            Ok("alice@example.com")
        );
        for bad in ["a b", "o'hara", "a@", "@b", "a\u{1}", "ﬀ"] {
            assert!(
                matches!(
                    bare_jid(bad, "example.com"),
                    Err(IdentifyError::InvalidJid(_))
                ),
                "{bad:?}"
            );
        }
        let r = decode_payload(&b64("\0ÄRGER\0pw".as_bytes())).unwrap();
        assert_eq!(
            identify("PLAIN", &r, "example.com").unwrap(),
            "ärger@example.com"
        );
        let r = "n,,n=ÄRGER,r=x".as_bytes();
        assert_eq!(
            identify("SCRAM-SHA-256", r, "example.com").unwrap(),
            "ärger@example.com"
        );
        let e = identify("SCRAM-SHA-1", b"n,,n=a b,r=x", "example.com").unwrap_err();
        assert!(matches!(e, IdentifyError::InvalidJid(_)));
        assert!(
            e.to_string()
                .starts_with(r#"the localpart of "a b@example.com" is not a valid username"#),
            "{e}"
        );
    }

    #[test]
    fn other_mechanisms_and_payloads() {
        assert!(matches!(
            identify("EXTERNAL", b"", "x"),
            Err(IdentifyError::UnsupportedMechanism(_))
        ));
        assert_eq!(decode_payload(""), Err(IdentifyError::NoInitialResponse));
        assert_eq!(decode_payload("="), Ok(Vec::new()));
        assert_eq!(decode_payload("!!!"), Err(IdentifyError::Encoding));
        assert!(names_user("SCRAM-SHA-1") && names_user("PLAIN"));
        assert!(!names_user("SCRAM-SHA-1-PLUS"));
    }
}
