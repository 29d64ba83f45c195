//! Credits are whole numbers and money is integer cents; there are no floats anywhere.

use serde::{Deserialize, Serialize};
use std::fmt;
use utoipa::ToSchema;

/// The largest credit amount accepted in any single request. Far above any real generation
/// or grant, low enough that sums of many of them cannot overflow `u64`.
pub const MAX_CREDITS_PER_REQUEST: u64 = 10_000_000;

/// An amount of credits.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(transparent)]
pub struct Credits(u64);

impl Credits {
    pub const ZERO: Credits = Credits(0);

    pub const fn new(value: u64) -> Self {
        Self(value)
    }
    pub const fn get(self) -> u64 {
        self.0
    }
    /// Parses a request amount: positive and at most [`MAX_CREDITS_PER_REQUEST`].
    pub fn parse_request_amount(value: i128) -> Result<Self, String> {
        if value <= 0 {
            return Err("must be a positive whole number of credits".into());
        }
        if value > MAX_CREDITS_PER_REQUEST as i128 {
            return Err(format!("must be at most {MAX_CREDITS_PER_REQUEST}"));
        }
        Ok(Self(value as u64))
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An amount of money in the smallest currency unit (USD cents).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(transparent)]
pub struct Cents(u64);

impl Cents {
    pub const fn new(value: u64) -> Self {
        Self(value)
    }
    pub const fn get(self) -> u64 {
        self.0
    }
    /// Applies a percentage discount, rounding the discounted price down (in the customer's
    /// favour) so a displayed price is never above what the percentage promises.
    pub fn discounted(self, percent_off: u8) -> Cents {
        let keep = 100u64.saturating_sub(percent_off as u64);
        Cents(self.0 * keep / 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_amounts_must_be_positive_and_bounded() {
        assert_eq!(Credits::parse_request_amount(5), Ok(Credits::new(5)));
        assert!(Credits::parse_request_amount(0).is_err());
        assert!(Credits::parse_request_amount(-3).is_err());
        assert!(Credits::parse_request_amount(MAX_CREDITS_PER_REQUEST as i128 + 1).is_err());
    }

    #[test]
    fn discounts_round_down_in_the_customers_favour() {
        assert_eq!(Cents::new(999).discounted(20), Cents::new(799));
        assert_eq!(Cents::new(1000).discounted(0), Cents::new(1000));
        assert_eq!(Cents::new(2900 * 12).discounted(40), Cents::new(20880));
    }
}
