//! Bare JIDs normalised per RFC 7622: the one key under which a user is
//! routed, tracked and assigned.
//!
//! Two spellings of the same account (`Ärger@example.com`, `ärger@Example.COM`,
//! `ÄRGER@example.com/phone`) normalise to the same string, so a user has one
//! routing home and one tracker entry however the client or node wrote the
//! address.
//!
//! # Canonical form
//!
//! `localpart@domainpart`, with:
//!
//! - **localpart**: enforced with the PRECIS *UsernameCaseMapped* profile
//!   (RFC 8265 §3.3, as RFC 7622 §3.3 requires): full-width characters mapped
//!   to their narrow forms, Unicode lower case, NFC, the bidi rule; characters
//!   outside the PRECIS IdentifierClass (spaces, controls, compatibility forms
//!   such as `ﬀ`, …) are errors. RFC 7622 §3.3.1 then forbids
//!   `"` `&` `'` `/` `:` `<` `>` `@` in the result.
//! - **domainpart**: UTS #46 *ToASCII* (the `idna` crate, non-transitional,
//!   so `ß` stays `ß`), giving lower-case ASCII with IDN labels as A-labels:
//!   `Bücher.Example` and `xn--bcher-kva.example` are both
//!   `xn--bcher-kva.example`. The ASCII deny list is the WHATWG URL one
//!   (space, controls and `%#/:<>?@[\]^|` are errors; `_` is allowed, as
//!   real deployments use it); hyphen positions and DNS label lengths are not
//!   checked. One trailing dot is removed (RFC 7622 §3.2) and empty labels
//!   are errors. An IPv6 literal `[…]` must parse as an IPv6 address and is
//!   only ASCII-lower-cased.
//!
//! Each part is at most 1023 bytes once normalised (RFC 7622 §3.1).
//!
//! # Pure-ASCII input
//!
//! The A-label domain form is chosen so that a valid pure-ASCII JID
//! normalises to exactly its ASCII lower case — the key the proxy used
//! before — and no existing user's routing home moves. The one exception is
//! a trailing dot on the domain, which RFC 7622 says to strip before
//! comparison. An ASCII localpart skips the PRECIS machinery: for ASCII,
//! the profile accepts exactly `!`..=`~` and maps them to ASCII lower case,
//! so the fast path checks those bytes (minus RFC 7622's forbidden eight)
//! and lower-cases; anything else takes the full path, which reports the
//! error.
//!
//! Nothing here panics, whatever the input.

use std::net::Ipv6Addr;

use precis_core::profile::PrecisFastInvocation;
use precis_profiles::UsernameCaseMapped;

/// The longest localpart or domainpart, in bytes after normalisation
/// (RFC 7622 §3.1).
pub const MAX_PART_BYTES: usize = 1023;

/// Characters RFC 7622 §3.3.1 forbids in a localpart, although the
/// UsernameCaseMapped profile allows them.
const FORBIDDEN_IN_LOCALPART: &[char] = &['"', '&', '\'', '/', ':', '<', '>', '@'];

/// How much of an offending JID an error message quotes, in bytes.
const SHOWN_BYTES: usize = 128;

/// Why a string is not a valid bare (or full) JID.
///
/// Each variant carries the JID as given (cut to its first 128 bytes, with
/// `…` appended when longer); messages quote it with control characters
/// escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    /// No `@` before the resource: a domain alone names no user.
    #[error("{jid:?} has no localpart: a user's JID is local@domain")]
    MissingLocalpart {
        /// The JID as given.
        jid: String,
    },
    /// Nothing before the `@`.
    #[error("the localpart of {jid:?} is empty")]
    EmptyLocalpart {
        /// The JID as given.
        jid: String,
    },
    /// The localpart breaks the UsernameCaseMapped profile or RFC 7622 §3.3.1.
    #[error("the localpart of {jid:?} is not a valid username (RFC 7622): {reason}")]
    InvalidLocalpart {
        /// The JID as given.
        jid: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Nothing after the `@` (or only a dot).
    #[error("the domainpart of {jid:?} is empty")]
    EmptyDomain {
        /// The JID as given.
        jid: String,
    },
    /// The domainpart is not a domain name or IPv6 literal UTS #46 accepts.
    #[error("the domainpart of {jid:?} is not a valid domain (RFC 7622): {reason}")]
    InvalidDomain {
        /// The JID as given.
        jid: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The normalised localpart is longer than [`MAX_PART_BYTES`].
    #[error(
        "the localpart of {jid:?} is {len} bytes once normalised; \
         RFC 7622 allows at most {MAX_PART_BYTES}"
    )]
    LocalpartTooLong {
        /// The JID as given.
        jid: String,
        /// Bytes after normalisation.
        len: usize,
    },
    /// The normalised domainpart is longer than [`MAX_PART_BYTES`].
    #[error(
        "the domainpart of {jid:?} is {len} bytes once normalised; \
         RFC 7622 allows at most {MAX_PART_BYTES}"
    )]
    DomainpartTooLong {
        /// The JID as given.
        jid: String,
        /// Bytes after normalisation.
        len: usize,
    },
}

/// Normalises a user's JID, `local@domain`, to its canonical bare form (see
/// the [module documentation](self)). A resource after the first `/` is
/// dropped unchecked; a JID without `@` before it is an error.
///
/// ```
/// use prg_proxy::jid::normalize_bare;
/// assert_eq!(normalize_bare("ÄRGER@Example.COM").unwrap(), "ärger@example.com");
/// assert_eq!(normalize_bare("Alice@Bücher.example/phone").unwrap(),
///            "alice@xn--bcher-kva.example");
/// assert!(normalize_bare("a b@example.com").is_err());
/// ```
pub fn normalize_bare(jid: &str) -> Result<String, JidError> {
    let bare = jid.split_once('/').map_or(jid, |(b, _)| b);
    let Some((local, domain)) = bare.split_once('@') else {
        return Err(JidError::MissingLocalpart { jid: shown(jid) });
    };
    let local = localpart(local, jid)?;
    let domain = domainpart(domain, jid)?;
    let mut out = String::with_capacity(local.len() + 1 + domain.len());
    out.push_str(&local);
    out.push('@');
    out.push_str(&domain);
    Ok(out)
}

/// The canonical bare JID of a full JID `local@domain/resource`, such as a
/// node's resource-binding result. The resource takes no part in routing or
/// tracking and is not checked; the rest is normalised as by
/// [`normalize_bare`].
pub fn normalize_full_to_bare(full: &str) -> Result<String, JidError> {
    normalize_bare(full)
}

/// The localpart, enforced; `jid` is for error messages.
fn localpart(local: &str, jid: &str) -> Result<String, JidError> {
    if local.is_empty() {
        return Err(JidError::EmptyLocalpart { jid: shown(jid) });
    }
    let out = match ascii_localpart(local) {
        Some(fast) => fast,
        None => precis_localpart(local).map_err(|reason| JidError::InvalidLocalpart {
            jid: shown(jid),
            reason,
        })?,
    };
    if out.len() > MAX_PART_BYTES {
        return Err(JidError::LocalpartTooLong {
            jid: shown(jid),
            len: out.len(),
        });
    }
    Ok(out)
}

/// The fast path: an ASCII localpart made only of characters the profile
/// allows (`!`..=`~`) and RFC 7622 does not forbid, lower-cased — exactly
/// what [`precis_localpart`] returns for it. `None` sends anything else
/// (non-ASCII, or ASCII that is an error) down the full path.
fn ascii_localpart(local: &str) -> Option<String> {
    let fast = local
        .bytes()
        .all(|b| (b'!'..=b'~').contains(&b) && !FORBIDDEN_IN_LOCALPART.contains(&char::from(b)));
    fast.then(|| local.to_ascii_lowercase())
}

/// The full path: UsernameCaseMapped enforcement, then RFC 7622 §3.3.1.
fn precis_localpart(local: &str) -> Result<String, String> {
    let enforced = UsernameCaseMapped::enforce(local).map_err(|e| precis_reason(&e))?;
    if let Some(c) = enforced
        .chars()
        .find(|c| FORBIDDEN_IN_LOCALPART.contains(c))
    {
        return Err(format!("{c:?} is not allowed in a localpart"));
    }
    Ok(enforced.into_owned())
}

/// A PRECIS error in words.
fn precis_reason(e: &precis_core::Error) -> String {
    match e {
        precis_core::Error::BadCodepoint(info) => format!(
            "code point U+{:04X} at character index {} is not allowed by the \
             UsernameCaseMapped profile (RFC 8265)",
            info.cp, info.position
        ),
        precis_core::Error::Invalid => "the UsernameCaseMapped profile (RFC 8265) rejects it \
             (the bidi rule, or nothing left after mapping)"
            .to_string(),
        other => format!("the UsernameCaseMapped profile (RFC 8265) rejects it: {other}"),
    }
}

/// The domainpart, in canonical form; `jid` is for error messages.
fn domainpart(domain: &str, jid: &str) -> Result<String, JidError> {
    let invalid = |reason: &str| JidError::InvalidDomain {
        jid: shown(jid),
        reason: reason.to_string(),
    };
    if domain.is_empty() {
        return Err(JidError::EmptyDomain { jid: shown(jid) });
    }
    if let Some(inner) = domain.strip_prefix('[') {
        let ok = inner
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<Ipv6Addr>().is_ok());
        if !ok {
            return Err(invalid("a `[…]` domainpart must be an IPv6 address"));
        }
        // At most 41 bytes: no length check needed.
        return Ok(domain.to_ascii_lowercase());
    }
    let ascii =
        idna::domain_to_ascii_cow(domain.as_bytes(), idna::AsciiDenyList::URL).map_err(|_| {
            invalid(
                "IDNA (UTS #46) processing rejects it: a disallowed character, \
                 a malformed A-label, or a bidi or joiner rule",
            )
        })?;
    let mut out = ascii.into_owned();
    if out.ends_with('.') {
        out.pop();
    }
    if out.is_empty() {
        return Err(JidError::EmptyDomain { jid: shown(jid) });
    }
    if out.split('.').any(str::is_empty) {
        return Err(invalid("it has an empty label"));
    }
    if out.len() > MAX_PART_BYTES {
        return Err(JidError::DomainpartTooLong {
            jid: shown(jid),
            len: out.len(),
        });
    }
    Ok(out)
}

/// `s` for an error message: its first [`SHOWN_BYTES`] bytes (on a
/// character boundary), with `…` when cut.
fn shown(s: &str) -> String {
    if s.len() <= SHOWN_BYTES {
        return s.to_string();
    }
    let mut end = SHOWN_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn n(s: &str) -> String {
        match normalize_bare(s) {
            Ok(v) => v,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    #[test]
    fn unicode_case_is_folded() {
        let want = "ärger@example.com";
        assert_eq!(n("Ärger@example.com"), want);
        assert_eq!(n("ärger@example.com"), want);
        assert_eq!(n("ÄRGER@example.com"), want);
        assert_eq!(n("ÄRGER@EXAMPLE.com/Phone"), want);
        // Decomposed A + COMBINING DIAERESIS is the same user (NFC).
        assert_eq!(n("A\u{308}rger@example.com"), want);
        assert_eq!(n("ΣΑΣ@example.com"), "σασ@example.com");
        // Case mapping is not case folding: ß stays ß (RFC 8265 §3.3.3).
        assert_eq!(n("Fußball@example.com"), "fußball@example.com");
    }

    #[test]
    fn pure_ascii_is_its_lower_case() {
        // What existing users' keys were: ASCII lower case of the bare JID.
        for jid in [
            "alice@example.com",
            "Alice@Example.COM",
            "J.Smith+Tag@IM.Example.org",
            "a!#$%*=?^_`{|}~-@example.com",
            "x@xn--bcher-kva.example",
            "USER@XN--BCHER-KVA.EXAMPLE",
            "user@under_score.example",
            "user@192.0.2.1",
            "user@[2001:DB8::1]",
            "a@b",
        ] {
            assert_eq!(n(jid), jid.to_ascii_lowercase(), "{jid}");
        }
        // Random JIDs over the ASCII the proxy saw before: every accepted
        // one is unchanged from its ASCII lower case.
        let local_chars: Vec<u8> = (b'!'..=b'~').collect();
        let domain_chars = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.";
        let mut rng = rand::rngs::StdRng::seed_from_u64(7622);
        let mut accepted = 0;
        for _ in 0..3000 {
            let l: String = (0..rng.gen_range(1..12))
                .map(|_| char::from(local_chars[rng.gen_range(0..local_chars.len())]))
                .collect();
            let d: String = (0..rng.gen_range(1..16))
                .map(|_| char::from(domain_chars[rng.gen_range(0..domain_chars.len())]))
                .collect();
            let jid = format!("{l}@{d}");
            if let Ok(v) = normalize_bare(&jid) {
                accepted += 1;
                // Today's key: ASCII lower case of what precedes the first `/`.
                let before_resource = jid.split('/').next().unwrap_or(&jid);
                let want = before_resource.to_ascii_lowercase();
                let want = want.strip_suffix('.').unwrap_or(&want);
                assert_eq!(v, want, "{jid:?}");
            }
        }
        assert!(accepted > 500, "only {accepted} accepted");
    }

    #[test]
    fn ascii_fast_path_equals_the_profile() {
        let check = |s: &str| match (ascii_localpart(s), precis_localpart(s)) {
            (Some(fast), Ok(full)) => assert_eq!(fast, full, "{s:?}"),
            (None, Err(_)) => {}
            (fast, full) => panic!("{s:?}: fast {fast:?}, full {full:?}"),
        };
        // Every ASCII character alone and next to letters.
        for b in 0u8..0x80 {
            let c = char::from(b);
            check(&c.to_string());
            check(&format!("Ab{c}Yz"));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(8265);
        for _ in 0..2000 {
            let s: String = (0..rng.gen_range(1..10))
                .map(|_| char::from(rng.gen_range(0u8..0x80)))
                .collect();
            check(&s);
        }
    }

    #[test]
    fn width_and_compatibility_forms() {
        // Full-width letters map to their narrow forms, then lower case.
        assert_eq!(n("ＡＬＩＣＥ@example.com"), "alice@example.com");
        assert_eq!(n("ａｌｉｃｅ@example.com"), n("alice@example.com"));
        // A full-width `@` maps to `@`, which the localpart may not hold.
        assert!(matches!(
            normalize_bare("a\u{ff20}b@example.com"),
            Err(JidError::InvalidLocalpart { .. })
        ));
        // Other compatibility forms are disallowed (HasCompat), not mapped.
        for local in ["\u{fb00}", "x\u{2163}", "\u{2460}", "\u{210c}"] {
            let jid = format!("{local}@example.com");
            assert!(
                matches!(normalize_bare(&jid), Err(JidError::InvalidLocalpart { .. })),
                "{jid:?}"
            );
        }
    }

    #[test]
    fn domains_are_idna_canonical() {
        let want = "alice@xn--bcher-kva.example";
        assert_eq!(n("alice@Bücher.example"), want);
        assert_eq!(n("alice@BÜCHER.EXAMPLE"), want);
        assert_eq!(n("alice@xn--bcher-kva.example"), want);
        assert_eq!(n("alice@XN--BCHER-KVA.example"), want);
        // Ideographic full stop is a dot; a trailing dot goes.
        assert_eq!(n("alice@bücher\u{3002}example"), want);
        assert_eq!(n("alice@Bücher.example."), want);
        assert_eq!(n("alice@example.com."), "alice@example.com");
        assert_eq!(n("alice@[::1]"), "alice@[::1]");
    }

    #[test]
    fn full_jids() {
        assert_eq!(
            normalize_full_to_bare("ÄRGER@Example.com/Tablet/x@y").unwrap(),
            "ärger@example.com"
        );
        assert_eq!(
            normalize_full_to_bare("alice@example.com").unwrap(),
            "alice@example.com"
        );
        // The first `/` starts the resource, even before an `@`.
        assert!(normalize_full_to_bare("alice/x@example.com").is_err());
    }

    /// The variant's name, for tables of expected errors.
    fn kind(e: &JidError) -> &'static str {
        match e {
            JidError::MissingLocalpart { .. } => "no-local",
            JidError::EmptyLocalpart { .. } => "empty-local",
            JidError::InvalidLocalpart { .. } => "local",
            JidError::EmptyDomain { .. } => "empty-domain",
            JidError::InvalidDomain { .. } => "domain",
            JidError::LocalpartTooLong { .. } => "long-local",
            JidError::DomainpartTooLong { .. } => "long-domain",
        }
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let cases = [
            ("example.com", "no-local"),
            ("", "no-local"),
            ("alice/x@example.com", "no-local"),
            ("@example.com", "empty-local"),
            ("@b", "empty-local"),
            ("a@", "empty-domain"),
            ("a@/res", "empty-domain"),
            ("a@.", "empty-domain"),
            ("a b@example.com", "local"),
            ("a\u{0}b@example.com", "local"),
            ("a\tb@example.com", "local"),
            ("a\u{7f}@example.com", "local"),
            ("a\u{85}@example.com", "local"),
            ("a\u{200b}@example.com", "local"),
            ("\u{a0}@example.com", "local"),
            ("o'hara@example.com", "local"),
            ("a<b@example.com", "local"),
            ("a>b@example.com", "local"),
            ("a\"b@example.com", "local"),
            ("a:b@example.com", "local"),
            ("a&b@example.com", "local"),
            ("a@exa mple.com", "domain"),
            ("a@exa\u{1}mple.com", "domain"),
            ("a@b@c", "domain"),
            ("a@example..com", "domain"),
            ("a@.example.com", "domain"),
            ("a@xn--a.example", "domain"),
            ("a@[::1", "domain"),
            ("a@[example.com]", "domain"),
            ("a@host:5222", "domain"),
            ("a@100%.example", "domain"),
        ];
        for (jid, want) in cases {
            match normalize_bare(jid) {
                Ok(v) => panic!("{jid:?} accepted as {v:?}"),
                Err(e) => {
                    assert_eq!(kind(&e), want, "{jid:?}: {e}");
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }

    #[test]
    fn messages_and_lengths() {
        let e = normalize_bare("a b@example.com").unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with(
                r#"the localpart of "a b@example.com" is not a valid username (RFC 7622): "#
            ),
            "{m}"
        );
        assert!(m.contains("U+0020"), "{m}");
        // Control characters are escaped in messages; long JIDs are cut.
        let e = normalize_bare("a\u{1}@x").unwrap_err().to_string();
        assert!(e.contains(r#""a\u{1}@x""#), "{e}");
        let long = format!("{}@example.com", "ä".repeat(2000));
        let e = normalize_bare(&long).unwrap_err();
        assert!(
            matches!(e, JidError::LocalpartTooLong { len: 4000, .. }),
            "{e:?}"
        );
        assert!(e.to_string().len() < 400);
        // The limits are on the normalised form: 1023 bytes pass, 1024 fail.
        let ok = format!("{}@example.com", "A".repeat(MAX_PART_BYTES));
        assert_eq!(n(&ok), ok.to_ascii_lowercase());
        let too = format!("{}@example.com", "a".repeat(MAX_PART_BYTES + 1));
        assert!(matches!(
            normalize_bare(&too),
            Err(JidError::LocalpartTooLong { len: 1024, .. })
        ));
        // Full-width input of 1023 characters shrinks to 1023 bytes.
        let wide = format!("{}@example.com", "ａ".repeat(MAX_PART_BYTES));
        assert_eq!(n(&wide).len(), MAX_PART_BYTES + "@example.com".len());
        let label = "a".repeat(63);
        let domain = vec![label.as_str(); 17].join(".");
        let e = normalize_bare(&format!("u@{domain}")).unwrap_err();
        assert!(
            matches!(e, JidError::DomainpartTooLong { len: 1087, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7622);
        let pieces: &[&str] = &[
            "@",
            "/",
            ".",
            "[",
            "]",
            ":",
            "a",
            "Z",
            "ä",
            "Ä",
            "ß",
            "\u{308}",
            "ｆ",
            "\u{fb00}",
            "xn--",
            "\u{5d0}",
            "\u{627}",
            "1",
            "\u{200d}",
            "\u{3002}",
            " ",
            "\0",
            "\u{10ffff}",
        ];
        for i in 0..4000 {
            let s = if i % 2 == 0 {
                let len = rng.gen_range(0..40);
                let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                (0..rng.gen_range(0..12))
                    .map(|_| pieces[rng.gen_range(0..pieces.len())])
                    .collect()
            };
            let a = normalize_bare(&s);
            let b = normalize_full_to_bare(&s);
            assert_eq!(a, b);
            if let Ok(v) = a {
                // Normalising is idempotent.
                assert_eq!(normalize_bare(&v).as_ref(), Ok(&v), "{s:?}");
            }
        }
    }
}
