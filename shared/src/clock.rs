//! Time as a port: the system clock in production; behind the `local` feature (which the
//! Lambda binaries leave off), clocks the local system and the tests can move forward.

use chrono::{DateTime, Utc};

/// Where "now" comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// UTC wall-clock time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock the local Stripe simulator moves forward, like Stripe's test clocks: one
/// instance is shared by the ledger, the webhook's signature check and the simulator, so
/// advancing it moves the whole local system at once.
#[cfg(feature = "local")]
pub trait AdvanceableClock: Clock {
    /// Moves the clock forward to `to`. An instant not after `now()` leaves it as it is:
    /// time never goes backwards.
    fn advance_to(&self, to: DateTime<Utc>);
    /// How far the clock has been moved forward in total.
    fn offset(&self) -> chrono::Duration;
}

/// A clock that only moves when told to.
#[cfg(feature = "local")]
#[derive(Debug)]
pub struct ManualClock {
    start: DateTime<Utc>,
    now: std::sync::Mutex<DateTime<Utc>>,
}

#[cfg(feature = "local")]
impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            start,
            now: std::sync::Mutex::new(start),
        }
    }
    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self.now.lock().expect("clock lock");
        *now += by;
    }
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().expect("clock lock") = to;
    }
}

#[cfg(feature = "local")]
impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("clock lock")
    }
}

#[cfg(feature = "local")]
impl AdvanceableClock for ManualClock {
    fn advance_to(&self, to: DateTime<Utc>) {
        let mut now = self.now.lock().expect("clock lock");
        *now = (*now).max(to);
    }
    fn offset(&self) -> chrono::Duration {
        self.now() - self.start
    }
}

/// Wall-clock time plus a forward offset: `make run`'s clock. It keeps ticking in real
/// time, and advancing it adds to the offset.
#[cfg(feature = "local")]
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset: std::sync::Mutex<chrono::Duration>,
}

#[cfg(feature = "local")]
impl OffsetClock {
    pub fn new() -> Self {
        Self::default()
    }
}

#[cfg(feature = "local")]
impl Clock for OffsetClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + *self.offset.lock().expect("clock lock")
    }
}

#[cfg(feature = "local")]
impl AdvanceableClock for OffsetClock {
    fn advance_to(&self, to: DateTime<Utc>) {
        let mut offset = self.offset.lock().expect("clock lock");
        let ahead = to - (Utc::now() + *offset);
        if ahead > chrono::Duration::zero() {
            *offset += ahead;
        }
    }
    fn offset(&self) -> chrono::Duration {
        *self.offset.lock().expect("clock lock")
    }
}

#[cfg(all(test, feature = "local"))]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    #[test]
    fn advanceable_clocks_move_forward_only() {
        let t = Utc.with_ymd_and_hms(2028, 1, 31, 12, 0, 0).unwrap();
        let manual = ManualClock::new(t);
        manual.advance_to(t + Duration::days(2));
        manual.advance_to(t + Duration::days(1));
        assert_eq!(manual.now(), t + Duration::days(2));
        assert_eq!(manual.offset(), Duration::days(2));
        let offset = OffsetClock::new();
        let target = Utc::now() + Duration::days(30);
        offset.advance_to(target);
        offset.advance_to(target - Duration::days(10));
        assert!(offset.now() >= target);
        assert!(offset.offset() >= Duration::days(30) - Duration::seconds(1));
        assert!(offset.offset() < Duration::days(30) + Duration::seconds(5));
    }
}
