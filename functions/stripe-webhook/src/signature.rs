//! The `Stripe-Signature` header, read before any signature is computed: `t=<unix seconds>`
//! once, and any number of `v1=<hex>` signatures (other schemes are ignored, as Stripe
//! says). A header whose timestamp is missing, repeated, not a number or outside the
//! tolerance is refused here, so the verifier only ever sees timestamps near now.

/// How far a signature's timestamp may be from now, either way.
pub const TOLERANCE_SECONDS: i64 = 300;

/// Why a header was refused before verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    Malformed,
    NoTimestamp,
    RepeatedTimestamp,
    BadTimestamp,
    NoSignature,
    Stale,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeaderError::Malformed => {
                "the Stripe-Signature header is not a list of key=value pairs"
            }
            HeaderError::NoTimestamp => "the Stripe-Signature header has no timestamp (t=)",
            HeaderError::RepeatedTimestamp => {
                "the Stripe-Signature header has more than one timestamp"
            }
            HeaderError::BadTimestamp => {
                "the Stripe-Signature timestamp is not a whole number of seconds"
            }
            HeaderError::NoSignature => "the Stripe-Signature header has no v1 signature",
            HeaderError::Stale => "the signature timestamp is outside the 300 s tolerance",
        })
    }
}

impl std::error::Error for HeaderError {}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    pub t: i64,
    pub v1: Vec<&'a str>,
}

impl<'a> SignatureHeader<'a> {
    pub fn parse(raw: &'a str) -> Result<Self, HeaderError> {
        let mut t = None;
        let mut v1 = Vec::new();
        for pair in raw.split(',') {
            let (key, value) = pair.split_once('=').ok_or(HeaderError::Malformed)?;
            match key.trim() {
                "t" => {
                    if t.is_some() {
                        return Err(HeaderError::RepeatedTimestamp);
                    }
                    let value = value.trim();
                    // Digits only (an optional leading minus): no `+`, no spaces.
                    let digits = value.strip_prefix('-').unwrap_or(value);
                    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(HeaderError::BadTimestamp);
                    }
                    t = Some(value.parse().map_err(|_| HeaderError::BadTimestamp)?);
                }
                "v1" => v1.push(value.trim()),
                _ => {}
            }
        }
        let t = t.ok_or(HeaderError::NoTimestamp)?;
        if v1.is_empty() {
            return Err(HeaderError::NoSignature);
        }
        Ok(Self { t, v1 })
    }

    /// Whether the timestamp is within the tolerance of `now` (no overflow whatever `t`).
    pub fn is_fresh(&self, now: i64) -> bool {
        now.checked_sub(self.t)
            .and_then(i64::checked_abs)
            .is_some_and(|age| age <= TOLERANCE_SECONDS)
    }
}

/// Whether one of `v1` is the HMAC-SHA256 of `"<t>.<payload>"` under `secret`, compared
/// in constant time (Stripe's scheme: the whole `whsec_...` string is the key).
pub fn signed_by(secret: &str, t: i64, payload: &str, v1: &[&str]) -> bool {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    // `verify_slice` compares in constant time (the `subtle` crate).
    v1.iter()
        .filter_map(|sig| hex32(sig))
        .any(|given| mac.clone().verify_slice(&given).is_ok())
}

/// 64 hex digits as 32 bytes; anything else is not a SHA-256 signature.
fn hex32(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_timestamp_and_every_v1_signature() {
        let h = SignatureHeader::parse("t=1700000000,v1=ab,v0=zz,v1=cd").unwrap();
        assert_eq!(h.t, 1_700_000_000);
        assert_eq!(h.v1, vec!["ab", "cd"]);
        assert!(h.is_fresh(1_700_000_300));
        assert!(!h.is_fresh(1_700_000_301));
    }

    #[test]
    fn a_signature_is_checked_against_the_exact_body_time_and_secret() {
        // Stripe's documented scheme: HMAC-SHA256("<t>.<body>") under the secret, in hex.
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"whsec_x").unwrap();
        mac.update(b"1700000000.{\"id\":1}");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(signed_by(
            "whsec_x",
            1_700_000_000,
            "{\"id\":1}",
            &["zz", &hex]
        ));
        assert!(signed_by(
            "whsec_x",
            1_700_000_000,
            "{\"id\":1}",
            &[&hex.to_uppercase()]
        ));
        assert!(!signed_by("whsec_y", 1_700_000_000, "{\"id\":1}", &[&hex]));
        assert!(!signed_by("whsec_x", 1_700_000_001, "{\"id\":1}", &[&hex]));
        assert!(!signed_by("whsec_x", 1_700_000_000, "{\"id\":2}", &[&hex]));
        assert!(!signed_by(
            "whsec_x",
            1_700_000_000,
            "{\"id\":1}",
            &[&hex[..62]]
        ));
    }

    #[test]
    fn absurd_missing_repeated_and_unreadable_timestamps_are_refused() {
        let min = SignatureHeader::parse("t=-9223372036854775808,v1=ab").unwrap();
        assert!(!min.is_fresh(1_700_000_000));
        assert!(!min.is_fresh(i64::MAX));
        let max = SignatureHeader::parse("t=9223372036854775807,v1=ab").unwrap();
        assert!(!max.is_fresh(i64::MIN));
        for (raw, why) in [
            ("v1=ab", HeaderError::NoTimestamp),
            ("t=1,t=2,v1=ab", HeaderError::RepeatedTimestamp),
            ("t=+5,v1=ab", HeaderError::BadTimestamp),
            ("t=99999999999999999999,v1=ab", HeaderError::BadTimestamp),
            ("t=,v1=ab", HeaderError::BadTimestamp),
            ("t=5", HeaderError::NoSignature),
            ("garbage", HeaderError::Malformed),
        ] {
            assert_eq!(SignatureHeader::parse(raw), Err(why), "{raw}");
        }
    }
}
