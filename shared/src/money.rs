//! Credits are whole numbers and money is integer cents; there are no floats anywhere.
//!
//! Each amount has its own type so credits cannot be added to cents, and so every place
//! that could overflow says what happens: `checked_*` methods return `None`, and the few
//! operators (`+`, `-`, `Sum`) panic instead of wrapping. The operators are used only where
//! the ledger's invariants already rule the overflow out (a lot never holds more than it
//! has; each grant is at most [`MAX_CREDITS_PER_REQUEST`]).
//!
//! All four types serialize as the bare integer (`#[serde(transparent)]`) and appear in the
//! OpenAPI document as integer schemas, so stored items and API bodies look exactly as they
//! did when the fields were plain integers.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Sub, SubAssign};
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
    pub const fn is_zero(&self) -> bool {
        self.0 == 0
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
    pub fn checked_add(self, rhs: Credits) -> Option<Credits> {
        self.0.checked_add(rhs.0).map(Credits)
    }
    pub fn checked_sub(self, rhs: Credits) -> Option<Credits> {
        self.0.checked_sub(rhs.0).map(Credits)
    }
    /// The difference, or zero when `rhs` is larger.
    pub fn saturating_sub(self, rhs: Credits) -> Credits {
        Credits(self.0.saturating_sub(rhs.0))
    }
    /// `factor` times this amount (a count of packs, add-on units or items).
    pub fn checked_mul(self, factor: u64) -> Option<Credits> {
        self.0.checked_mul(factor).map(Credits)
    }
    /// This amount moved by a journal delta; `None` if it would leave `0..=u64::MAX`.
    pub fn checked_add_delta(self, delta: CreditDelta) -> Option<Credits> {
        self.0.checked_add_signed(delta.0).map(Credits)
    }
}

/// Panics on overflow; for sums the ledger bounds (see the module docs).
impl Add for Credits {
    type Output = Credits;
    fn add(self, rhs: Credits) -> Credits {
        self.checked_add(rhs).expect("credit amount overflowed u64")
    }
}
impl AddAssign for Credits {
    fn add_assign(&mut self, rhs: Credits) {
        *self = *self + rhs;
    }
}
/// Panics below zero; for differences the ledger's invariants keep non-negative.
impl Sub for Credits {
    type Output = Credits;
    fn sub(self, rhs: Credits) -> Credits {
        self.checked_sub(rhs)
            .expect("credit amount went below zero")
    }
}
impl SubAssign for Credits {
    fn sub_assign(&mut self, rhs: Credits) {
        *self = *self - rhs;
    }
}
/// Panics on overflow. Sums are over one workspace's lots, holds or allocations, each at
/// most the credits granted to it and every grant at most [`MAX_CREDITS_PER_REQUEST`]: more
/// than a million million grants would be needed to overflow.
impl Sum for Credits {
    fn sum<I: Iterator<Item = Credits>>(iter: I) -> Credits {
        iter.fold(Credits::ZERO, Add::add)
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A signed change to an amount of credits, as the journal records it (a lot's remaining
/// and held credits, an entry's effect on the available balance, a support adjustment).
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
pub struct CreditDelta(i64);

impl CreditDelta {
    pub const ZERO: CreditDelta = CreditDelta(0);

    pub const fn new(value: i64) -> Self {
        Self(value)
    }
    pub const fn get(self) -> i64 {
        self.0
    }
    /// `gained - lost` as a signed change.
    ///
    /// Panics if the change does not fit in `i64`. The ledger only builds deltas from
    /// amounts on one workspace's lots (each grant at most [`MAX_CREDITS_PER_REQUEST`]),
    /// which stay many orders of magnitude below `i64::MAX`.
    pub fn net(gained: Credits, lost: Credits) -> Self {
        let net = i128::from(gained.0) - i128::from(lost.0);
        Self(i64::try_from(net).expect("credit change does not fit in i64"))
    }
    /// A rise by `amount`; panics like [`CreditDelta::net`].
    pub fn increase(amount: Credits) -> Self {
        Self::net(amount, Credits::ZERO)
    }
    /// A fall by `amount`; panics like [`CreditDelta::net`].
    pub fn decrease(amount: Credits) -> Self {
        Self::net(Credits::ZERO, amount)
    }
    /// The size of the change, whichever way it goes.
    pub const fn unsigned_abs(self) -> Credits {
        Credits(self.0.unsigned_abs())
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
    pub const ZERO: Cents = Cents(0);

    pub const fn new(value: u64) -> Self {
        Self(value)
    }
    pub const fn get(self) -> u64 {
        self.0
    }
    /// `factor` times this price (e.g. twelve months).
    pub fn saturating_sub(self, rhs: Cents) -> Cents {
        Cents(self.0.saturating_sub(rhs.0))
    }
    pub fn checked_add(self, rhs: Cents) -> Option<Cents> {
        self.0.checked_add(rhs.0).map(Cents)
    }

    pub fn checked_mul(self, factor: u64) -> Option<Cents> {
        self.0.checked_mul(factor).map(Cents)
    }
    /// Applies a percentage discount, rounding the discounted price down (in the customer's
    /// favour) so a displayed price is never above what the percentage promises.
    pub fn discounted(self, percent_off: u8) -> Cents {
        let keep = 100u64.saturating_sub(percent_off as u64);
        // In u128 the product cannot overflow, and the result is at most `self`.
        Cents((u128::from(self.0) * u128::from(keep) / 100) as u64)
    }
}

/// Stripe sends amounts as signed integers; those that can never be negative (amounts due,
/// paid, charged, refunded, disputed) are refused here when they are.
impl TryFrom<i64> for Cents {
    type Error = std::num::TryFromIntError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        u64::try_from(value).map(Cents)
    }
}

/// An amount of money that may be negative: an invoice's total is below zero when its
/// credit notes and prorations exceed its charges.
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
pub struct SignedCents(i64);

impl SignedCents {
    pub const fn new(value: i64) -> Self {
        Self(value)
    }
    pub const fn get(self) -> i64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        assert_eq!(Cents::new(u64::MAX).discounted(0), Cents::new(u64::MAX));
    }

    #[test]
    fn amounts_serialize_as_bare_integers() {
        assert_eq!(serde_json::to_value(Credits::new(5)).unwrap(), json!(5));
        assert_eq!(
            serde_json::to_value(CreditDelta::new(-5)).unwrap(),
            json!(-5)
        );
        assert_eq!(serde_json::to_value(Cents::new(1200)).unwrap(), json!(1200));
        assert_eq!(
            serde_json::to_value(SignedCents::new(-30)).unwrap(),
            json!(-30)
        );
        assert_eq!(
            serde_json::from_value::<Credits>(json!(7)).unwrap(),
            Credits::new(7)
        );
        assert_eq!(
            serde_json::from_value::<SignedCents>(json!(-7)).unwrap(),
            SignedCents::new(-7)
        );
        assert!(serde_json::from_value::<Credits>(json!(-1)).is_err());
        assert!(serde_json::from_value::<Cents>(json!(-1)).is_err());
    }

    #[test]
    fn amounts_are_integers_in_the_openapi_document() {
        use utoipa::PartialSchema;
        for (schema, format, minimum) in [
            (Credits::schema(), "int64", Some(0)),
            (CreditDelta::schema(), "int64", None),
            (Cents::schema(), "int64", Some(0)),
            (SignedCents::schema(), "int64", None),
        ] {
            let s = serde_json::to_value(schema).unwrap();
            assert_eq!(s["type"], "integer", "{s}");
            assert_eq!(s["format"], format, "{s}");
            assert_eq!(s["minimum"].as_i64(), minimum, "{s}");
        }
    }

    #[test]
    fn overflow_is_explicit() {
        let max = Credits::new(u64::MAX);
        assert_eq!(max.checked_add(Credits::new(1)), None);
        assert_eq!(Credits::ZERO.checked_sub(Credits::new(1)), None);
        assert_eq!(
            Credits::new(3).saturating_sub(Credits::new(5)),
            Credits::ZERO
        );
        assert_eq!(max.checked_mul(2), None);
        assert_eq!(Credits::new(3).checked_mul(4), Some(Credits::new(12)));
        assert_eq!(Cents::new(u64::MAX).checked_mul(12), None);
        assert_eq!(
            Credits::new(5).checked_add_delta(CreditDelta::new(-5)),
            Some(Credits::ZERO)
        );
        assert_eq!(
            Credits::new(5).checked_add_delta(CreditDelta::new(-6)),
            None
        );
        assert_eq!(Cents::try_from(-1i64).ok(), None);
        assert_eq!(Cents::try_from(250i64).ok(), Some(Cents::new(250)));
    }

    #[test]
    fn deltas_are_signed_differences() {
        let (a, b) = (Credits::new(20), Credits::new(45));
        assert_eq!(CreditDelta::net(a, b), CreditDelta::new(-25));
        assert_eq!(CreditDelta::net(b, a), CreditDelta::new(25));
        assert_eq!(CreditDelta::increase(a), CreditDelta::new(20));
        assert_eq!(CreditDelta::decrease(a), CreditDelta::new(-20));
        assert_eq!(CreditDelta::new(-25).unsigned_abs(), Credits::new(25));
        assert_eq!(
            [a, b].into_iter().sum::<Credits>(),
            Credits::new(65),
            "sums add up"
        );
    }

    #[test]
    #[should_panic(expected = "below zero")]
    fn subtraction_below_zero_panics_rather_than_wraps() {
        let _ = Credits::new(1) - Credits::new(2);
    }
}
