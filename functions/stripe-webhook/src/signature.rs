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
