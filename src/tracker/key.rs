//! Compact bare-JID keys and their hash.
//!
//! Keys arrive already normalised per RFC 7622 by [`crate::jid`] (PRECIS
//! UsernameCaseMapped localpart, IDNA domainpart): that normalisation is
//! what makes two spellings of one user the same key, Unicode case
//! included. On top of it the hash folds ASCII case eight bytes at a time
//! and equality uses `eq_ignore_ascii_case`, and stored keys are
//! ASCII-lower-cased once, at insert, inline when short. For a normalised
//! key that folding changes nothing; it is only a cheap extra that keeps a
//! probe with a stray ASCII capital (a caller that skipped normalisation)
//! on the right entry without allocating. It does not fold non-ASCII case.

/// Longest key kept inline: `SmallStr` is then 32 bytes, half a cache line,
/// and most bare JIDs (`jsmith@example.com`) fit.
const INLINE: usize = 30;

/// A short string stored inline, a long one on the heap.
#[derive(Clone)]
pub(crate) enum SmallStr {
    /// Up to [`INLINE`] bytes, no allocation.
    Inline {
        /// Used bytes of `bytes`.
        len: u8,
        /// The text, zero-padded.
        bytes: [u8; INLINE],
    },
    /// Anything longer.
    Heap(Box<str>),
}

impl SmallStr {
    /// `s`, ASCII-lower-cased: `s` is a bare JID normalised by
    /// [`crate::jid`], which this leaves unchanged.
    pub(crate) fn lowercase(s: &str) -> SmallStr {
        if s.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            for (d, b) in bytes.iter_mut().zip(s.bytes()) {
                *d = b.to_ascii_lowercase();
            }
            SmallStr::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            SmallStr::Heap(s.to_ascii_lowercase().into_boxed_str())
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            SmallStr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            SmallStr::Heap(b) => b.as_bytes(),
        }
    }

    /// Whether `other` names the same key, ignoring ASCII case.
    pub(crate) fn matches(&self, other: &[u8]) -> bool {
        let me = self.as_bytes();
        me.len() == other.len() && me.eq_ignore_ascii_case(other)
    }
}

impl std::fmt::Debug for SmallStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xa076_1d64_78bd_642f;
const K3: u64 = 0xe703_7ed1_a0b4_28db;

/// 64×64→128-bit multiply folded to 64 bits: one instruction pair that mixes
/// every input bit into the result (the core of wyhash and foldhash).
#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// ASCII-lower-cases the eight bytes of `x` at once (SWAR): bytes `A`..=`Z`
/// get bit 0x20, every other byte (including non-ASCII) is left alone.
#[inline]
fn lower8(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    let low7 = x & (ONES * 0x7f);
    // High bit set where the low seven bits are >= 'A' / > 'Z'.
    let ge_a = low7 + ONES * (0x80 - u64::from(b'A'));
    let gt_z = low7 + ONES * (0x7f - u64::from(b'Z'));
    let upper = ge_a & !gt_z & !x & HIGH;
    x | (upper >> 2)
}

/// Hash of `bytes` as if ASCII-lower-cased, keyed by `seed` (random per
/// tracker, so that nobody can precompute JIDs that collide).
#[inline]
pub(crate) fn hash_folded(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K1);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = fold_mul(h ^ lower8(u64::from_le_bytes(w)), K2);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = fold_mul(h ^ lower8(u64::from_le_bytes(w)), K3);
    }
    fold_mul(h, K1)
}

/// Hash of a connection id (sequential numbers spread over all bits).
#[inline]
pub(crate) fn hash_conn(seed: u64, conn: u64) -> u64 {
    fold_mul(conn ^ seed, K2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower8_matches_the_scalar_rule() {
        let all: Vec<u8> = (0..=255u8).collect();
        for c in all.chunks(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            let got = lower8(u64::from_le_bytes(w)).to_le_bytes();
            let want: Vec<u8> = c.iter().map(u8::to_ascii_lowercase).collect();
            assert_eq!(&got[..], &want[..]);
        }
    }

    #[test]
    fn hash_ignores_ascii_case_only() {
        let s = 7;
        assert_eq!(
            hash_folded(s, b"Alice.Smith@Example.COM"),
            hash_folded(s, b"alice.smith@example.com")
        );
        assert_ne!(
            hash_folded(s, b"alice@example.com"),
            hash_folded(s, b"alicf@example.com")
        );
        assert_ne!(hash_folded(s, b"a"), hash_folded(s, b"a\0"));
        assert_eq!(
            hash_folded(s, "Ä@x".as_bytes()),
            hash_folded(s, "Ä@X".as_bytes())
        );
    }

    #[test]
    fn small_strings() {
        let short = SmallStr::lowercase("Bob@Example.com");
        assert!(matches!(short, SmallStr::Inline { .. }));
        assert_eq!(short.as_bytes(), b"bob@example.com");
        assert!(short.matches(b"BOB@example.COM"));
        assert!(!short.matches(b"bob@example.co"));
        let long = SmallStr::lowercase("A-Very-Long-Localpart@conference.example.com");
        assert!(matches!(long, SmallStr::Heap(_)));
        assert!(long.matches(b"a-very-long-localpart@conference.example.com"));
        assert_eq!(std::mem::size_of::<SmallStr>(), 32);
    }
}
