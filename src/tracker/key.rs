//! Compact bare-JID keys and their hash.
//!
//! Keys arrive already normalised per RFC 7622 by [`crate::jid`] (PRECIS
//! UsernameCaseMapped localpart, IDNA domainpart): that normalisation is
//! what makes two spellings of one user the same key, Unicode case
//! included. On top of it the hash folds ASCII case eight bytes at a time
//! and the slot keeps the key's first 32 bytes ASCII-lower-cased
//! ([`folded_words`]), compared word by word. For a normalised
//! key that folding changes nothing; it is only a cheap extra that keeps a
//! probe with a stray ASCII capital (a caller that skipped normalisation)
//! on the right entry without allocating. It does not fold non-ASCII case.

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

/// The first 32 bytes of `bytes`, ASCII-lower-cased, zero-padded, as four
/// little-endian words (how a user slot stores its key).
#[inline]
pub(crate) fn folded_words(bytes: &[u8]) -> [u64; 4] {
    let mut out = [0u64; 4];
    for (o, c) in out.iter_mut().zip(bytes.chunks(8)) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        *o = lower8(u64::from_le_bytes(w));
    }
    out
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
    fn folded_words_ignore_ascii_case_and_pad() {
        assert_eq!(
            folded_words(b"Bob@Example.com"),
            folded_words(b"bob@example.COM")
        );
        assert_ne!(
            folded_words(b"bob@example.com"),
            folded_words(b"bob@example.co")
        );
        let long = b"a-very-long-localpart@conference.example.com";
        assert_eq!(folded_words(long), folded_words(&long[..32]));
        assert_eq!(folded_words(b"")[0], 0);
    }
}
