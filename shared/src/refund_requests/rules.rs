//! Which refund requests are verified from Tally's own records, and how much may go back.
//! Pure: the facts are read by the caller.

use crate::billing::history::{HistoryEntry, MovementKind};
use crate::ids::SubscriptionId;
use crate::money::Cents;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Why the customer asks for their money back (the help pages' refundable cases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefundReason {
    DuplicateCharge,
    ChargedAfterCancellation,
    TechnicalIssue,
    Other,
}

/// When a subscription's cancellation takes (or took) effect, as Stripe last reported it;
/// kept per workspace by the billing events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancellation {
    pub subscription: SubscriptionId,
    pub requested_at: DateTime<Utc>,
    pub effective_at: DateTime<Utc>,
    /// Set when the subscription was resumed afterwards: the cancellation no longer holds.
    pub resumed_at: Option<DateTime<Utc>>,
    /// Stripe's time of the latest fact.
    pub as_of: i64,
    /// Kept for a fact that the subscription is not cancelling when nothing was cancelled
    /// (so an older cancellation delivered later is known for older); a cancellation in
    /// the same second as such a fact is not undone by it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub never_cancelled: bool,
}

pub const CANCELLATION_SK: &str = "CANCELLATION";

impl Cancellation {
    /// What a subscription fact says of the cancellation: canceled now, cancelling at
    /// `period_end`, or neither (resumed). Older facts than the stored one change nothing.
    pub fn merge(
        current: Option<Self>,
        subscription: &SubscriptionId,
        canceled: bool,
        cancel_at_period_end: bool,
        period_end: DateTime<Utc>,
        at: i64,
    ) -> Option<Self> {
        let now = DateTime::from_timestamp(at, 0).unwrap_or_default();
        // A resumption delivered late: the subscription was resumed when it says, earlier
        // than the later fact that first showed it resumed (a renewal's own event).
        if let Some(c) = current.as_ref()
            && &c.subscription == subscription
            && !canceled
            && !cancel_at_period_end
            && c.requested_at <= now
            && c.resumed_at.is_some_and(|r| now < r)
        {
            return Some(Self {
                resumed_at: Some(now),
                ..c.clone()
            });
        }
        // Older facts change nothing; of two in the same second, a resumption stands (a
        // refund must never rest on a cancellation that may have been undone).
        if current.as_ref().is_some_and(|c| {
            c.as_of > at
                || (c.as_of == at
                    && c.resumed_at.is_some()
                    && !c.never_cancelled
                    && (canceled || cancel_at_period_end))
        }) {
            return None;
        }
        let same = current
            .as_ref()
            .filter(|c| &c.subscription == subscription && c.resumed_at.is_none());
        let next = if canceled {
            Some(Self {
                subscription: subscription.clone(),
                requested_at: same.map_or(now, |c| c.requested_at),
                effective_at: same.map_or(now, |c| c.effective_at.min(now)),
                resumed_at: None,
                as_of: at,
                never_cancelled: false,
            })
        } else if cancel_at_period_end {
            Some(Self {
                subscription: subscription.clone(),
                requested_at: same.map_or(now, |c| c.requested_at),
                effective_at: period_end,
                resumed_at: None,
                as_of: at,
                never_cancelled: false,
            })
        } else if let Some(c) = same {
            Some(Self {
                resumed_at: Some(now),
                as_of: at,
                ..c.clone()
            })
        } else {
            // Not cancelling, and nothing stored to resume (or resumed already): the fact is
            // kept all the same, so an older cancellation delivered after it (Stripe retrying
            // an earlier event) is known for older and cannot make a wanted renewal look
            // charged after cancellation.
            Some(
                match current.as_ref().filter(|c| &c.subscription == subscription) {
                    Some(c) => Self {
                        as_of: at,
                        ..c.clone()
                    },
                    None => Self {
                        subscription: subscription.clone(),
                        requested_at: now,
                        effective_at: now,
                        resumed_at: Some(now),
                        as_of: at,
                        never_cancelled: true,
                    },
                },
            )
        };
        next.filter(|n| Some(n) != current.as_ref())
    }
}

/// What the records say of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Verified: refund at once, for this reason.
    Approve(String),
    /// Support staff decide; why.
    Review(String),
}

/// How far apart two identical purchases count as a duplicate charge.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::minutes(30);

fn is_purchase(e: &HistoryEntry) -> bool {
    matches!(
        e.kind,
        Some(
            MovementKind::Subscription
                | MovementKind::Pack
                | MovementKind::TopUp
                | MovementKind::CustomPayment
                | MovementKind::Invoice
        )
    )
}

/// A second successful charge for the same purchase: the same kind of movement, amount and
/// description (for subscriptions, the same subscription and billing reason), paid no more
/// than `window` after the first. Only the later of the two is the duplicate, so two
/// requests can never both be approved as each other's duplicate.
pub fn duplicate_of<'a>(
    entry: &HistoryEntry,
    others: &'a [HistoryEntry],
    window: Duration,
) -> Option<&'a HistoryEntry> {
    others.iter().find(|o| {
        o.id != entry.id
            && is_purchase(o)
            && o.kind == entry.kind
            && o.charge.is_some()
            && o.amount == entry.amount
            && o.amount_refunded == Cents::ZERO
            && o.amount_credited == Cents::ZERO
            && o.description == entry.description
            && (entry.kind != Some(MovementKind::Subscription)
                || (o.subscription == entry.subscription
                    && o.billing_reason == entry.billing_reason))
            && (o.created, o.id.as_str()) < (entry.created, entry.id.as_str())
            && entry.created - o.created <= window
    })
}

/// A subscription renewal charged once its cancellation had taken effect (and was not
/// resumed before the charge).
pub fn after_cancellation(entry: &HistoryEntry, cancellation: Option<&Cancellation>) -> bool {
    let Some(c) = cancellation else {
        return false;
    };
    entry.kind == Some(MovementKind::Subscription)
        && entry.billing_reason.as_deref() == Some("subscription_cycle")
        && entry.subscription.as_ref() == Some(&c.subscription)
        && entry.created >= c.effective_at
        && c.resumed_at.is_none_or(|r| r > entry.created)
}

/// The verdict on a request for `entry`, paid, for `reason`.
pub fn decide(
    reason: RefundReason,
    entry: &HistoryEntry,
    others: &[HistoryEntry],
    cancellation: Option<&Cancellation>,
    window: Duration,
) -> Verdict {
    match reason {
        RefundReason::DuplicateCharge => match duplicate_of(entry, others, window) {
            Some(first) => Verdict::Approve(format!(
                "duplicate charge: the same purchase was paid {} minutes earlier ({})",
                (entry.created - first.created).num_minutes(),
                first.id
            )),
            None => Verdict::Review(
                "no identical earlier payment found in the duplicate-charge window".into(),
            ),
        },
        RefundReason::ChargedAfterCancellation => {
            if after_cancellation(entry, cancellation) {
                Verdict::Approve("charged after the subscription's cancellation took effect".into())
            } else {
                Verdict::Review(
                    "the records show no cancellation in effect when this was charged".into(),
                )
            }
        }
        RefundReason::TechnicalIssue | RefundReason::Other => {
            Verdict::Review("waiting for support staff".into())
        }
    }
}

/// How much of a payment may still be refunded: what was paid, less the non-refundable
/// part (add-ons) unless `mistaken`, less what was refunded outside requests and what
/// requests claim (`failed`: refunds that failed or were canceled). Add-ons are non-refundable as a purchase, not as a mistake: a charge
/// confirmed as a duplicate, or as made after the cancellation took effect, is refundable
/// whole (the help pages).
pub fn refundable(
    entry: &HistoryEntry,
    mistaken: bool,
    refunded_elsewhere: Cents,
    claimed: Cents,
    failed: Cents,
) -> Cents {
    let non_refundable = if mistaken {
        0
    } else {
        entry.non_refundable.get()
    };
    let left = entry
        .amount
        .get()
        .saturating_sub(non_refundable)
        .saturating_sub(refunded_elsewhere.get())
        .saturating_sub(claimed.get())
        // Money a credit note gave back to the customer's balance, or outside Stripe, is
        // given back already.
        .saturating_sub(entry.amount_credited.get());
    // Never more than what Stripe still holds of the charge: its refunded total, less
    // refunds that failed or were canceled after it counted them (their money came back).
    Cents::new(
        left.min(
            entry
                .amount
                .get()
                .saturating_sub(entry.amount_refunded.get().saturating_sub(failed.get()))
                .saturating_sub(entry.amount_credited.get()),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(min: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_764_000_000 + min * 60, 0).unwrap()
    }

    fn purchase(id: &str, kind: MovementKind, cents: u64, min: i64) -> HistoryEntry {
        let mut e: HistoryEntry = serde_json::from_value(serde_json::json!({
            "id": id, "kind": null, "status": "succeeded", "description": "1 x pack_500",
            "currency": "usd", "tax": null, "invoice": null, "hosted_invoice_url": null,
            "invoice_pdf": null, "receipt_url": null, "payment_intent": null, "charge": "ch_1",
            "billing_reason": null, "created": at(min), "updated": at(min),
        }))
        .unwrap();
        e.kind = Some(kind);
        e.amount = Cents::new(cents);
        e
    }

    #[test]
    fn only_the_later_of_two_identical_payments_in_the_window_is_a_duplicate() {
        let w = DEFAULT_DUPLICATE_WINDOW;
        let first = purchase("pi_a", MovementKind::Pack, 1000, 0);
        let second = purchase("pi_b", MovementKind::Pack, 1000, 5);
        let all = [first.clone(), second.clone()];
        assert_eq!(
            duplicate_of(&second, &all, w).map(|e| &e.id),
            Some(&first.id)
        );
        assert_eq!(duplicate_of(&first, &all, w), None);
        assert!(matches!(
            decide(RefundReason::DuplicateCharge, &second, &all, None, w),
            Verdict::Approve(_)
        ));
        assert!(matches!(
            decide(RefundReason::DuplicateCharge, &first, &all, None, w),
            Verdict::Review(_)
        ));
        // Too far apart, another amount, another pack, or the first already refunded.
        let late = purchase("pi_c", MovementKind::Pack, 1000, 31);
        assert_eq!(duplicate_of(&late, std::slice::from_ref(&first), w), None);
        let other_amount = purchase("pi_d", MovementKind::Pack, 900, 1);
        assert_eq!(
            duplicate_of(&other_amount, std::slice::from_ref(&first), w),
            None
        );
        let mut other_pack = purchase("pi_e", MovementKind::Pack, 1000, 1);
        other_pack.description = Some("1 x pack_2000".into());
        assert_eq!(
            duplicate_of(&other_pack, std::slice::from_ref(&first), w),
            None
        );
        let mut refunded = first.clone();
        refunded.amount_refunded = Cents::new(1000);
        assert_eq!(duplicate_of(&second, &[refunded], w), None);
        let mut unpaid = first.clone();
        unpaid.charge = None;
        assert_eq!(duplicate_of(&second, &[unpaid], w), None);
        let topup = purchase("pi_f", MovementKind::TopUp, 1000, 1);
        assert_eq!(duplicate_of(&topup, &[first], w), None);
    }

    #[test]
    fn a_renewal_is_charged_after_cancellation_only_once_it_took_effect_and_was_not_resumed() {
        let sub = SubscriptionId::parse("sub_1").unwrap();
        let mut renewal = purchase("in_r", MovementKind::Subscription, 2000, 60);
        renewal.billing_reason = Some("subscription_cycle".into());
        renewal.subscription = Some(sub.clone());
        // Set to cancel at the period end (minute 30), then renewed at minute 60 anyway.
        let c = Cancellation::merge(None, &sub, false, true, at(30), at(10).timestamp()).unwrap();
        assert!(after_cancellation(&renewal, Some(&c)));
        assert!(matches!(
            decide(
                RefundReason::ChargedAfterCancellation,
                &renewal,
                &[],
                Some(&c),
                DEFAULT_DUPLICATE_WINDOW
            ),
            Verdict::Approve(_)
        ));
        // Charged before it took effect: the customer had that period.
        let mut early = renewal.clone();
        early.created = at(20);
        assert!(!after_cancellation(&early, Some(&c)));
        // Resumed before the renewal: the renewal was wanted.
        let resumed = Cancellation::merge(
            Some(c.clone()),
            &sub,
            false,
            false,
            at(30),
            at(20).timestamp(),
        )
        .unwrap();
        assert_eq!(resumed.resumed_at, Some(at(20)));
        assert!(!after_cancellation(&renewal, Some(&resumed)));
        // An older fact delivered late changes nothing.
        assert_eq!(
            Cancellation::merge(
                Some(resumed.clone()),
                &sub,
                false,
                true,
                at(30),
                at(15).timestamp()
            ),
            None
        );
        // Another subscription's cancellation, a sign-up invoice, no cancellation at all.
        let other = SubscriptionId::parse("sub_2").unwrap();
        let c2 = Cancellation::merge(None, &other, true, false, at(0), at(0).timestamp()).unwrap();
        assert!(!after_cancellation(&renewal, Some(&c2)));
        let mut signup = renewal.clone();
        signup.billing_reason = Some("subscription_create".into());
        assert!(!after_cancellation(&signup, Some(&c)));
        assert!(!after_cancellation(&renewal, None));
        // A cancellation and a resumption stamped the same second: the resumption stands,
        // whatever the delivery order.
        let tie = at(50).timestamp();
        let resumed_first =
            Cancellation::merge(Some(c.clone()), &sub, false, false, at(30), tie).unwrap();
        assert_eq!(
            Cancellation::merge(Some(resumed_first.clone()), &sub, false, true, at(30), tie),
            None
        );
        assert!(!after_cancellation(&renewal, Some(&resumed_first)));
        // The resumption's own event delivered after the renewal's: the renewal's event
        // first stood for it (minute 61), then the resumption's time (minute 25) is kept.
        let by_renewal = Cancellation::merge(
            Some(c.clone()),
            &sub,
            false,
            false,
            at(90),
            at(61).timestamp(),
        )
        .unwrap();
        assert!(after_cancellation(&renewal, Some(&by_renewal)));
        let late = Cancellation::merge(
            Some(by_renewal),
            &sub,
            false,
            false,
            at(30),
            at(25).timestamp(),
        )
        .unwrap();
        assert_eq!(late.resumed_at, Some(at(25)));
        assert!(!after_cancellation(&renewal, Some(&late)));
        // The resumption processed before the cancellation it undid (Stripe delivering the
        // older event late): the older cancellation changes nothing.
        let first = Cancellation::merge(None, &sub, false, false, at(90), at(20).timestamp())
            .expect("a resumption is kept even with nothing to resume");
        assert!(!after_cancellation(&renewal, Some(&first)));
        assert_eq!(
            Cancellation::merge(
                Some(first.clone()),
                &sub,
                false,
                true,
                at(30),
                at(10).timestamp()
            ),
            None
        );
        // Nor after a later resumption of one already resumed, or over another
        // subscription's cancellation.
        let again = Cancellation::merge(
            Some(resumed.clone()),
            &sub,
            false,
            false,
            at(90),
            at(70).timestamp(),
        )
        .unwrap();
        assert_eq!(
            (again.resumed_at, again.as_of),
            (Some(at(20)), at(70).timestamp())
        );
        assert_eq!(
            Cancellation::merge(Some(again), &sub, false, true, at(30), at(65).timestamp()),
            None
        );
        let over = Cancellation::merge(
            Some(c2.clone()),
            &sub,
            false,
            false,
            at(90),
            at(20).timestamp(),
        )
        .unwrap();
        assert_eq!(
            Cancellation::merge(Some(over), &sub, false, true, at(30), at(10).timestamp()),
            None
        );
        // A cancellation in the same second as the first fact kept (nothing was cancelled
        // before it) stands: only a real resumption wins a tie.
        let tied = Cancellation::merge(
            Some(first.clone()),
            &sub,
            false,
            true,
            at(30),
            at(20).timestamp(),
        )
        .expect("a same-second cancellation after a mere resumption fact");
        assert!(after_cancellation(&renewal, Some(&tied)));
        // A later cancellation still counts.
        let later = Cancellation::merge(Some(first), &sub, false, true, at(30), at(21).timestamp())
            .unwrap();
        assert!(after_cancellation(&renewal, Some(&later)));
        // Canceled outright at minute 40: effective then.
        let now =
            Cancellation::merge(Some(c), &sub, true, false, at(30), at(40).timestamp()).unwrap();
        assert_eq!(
            now.effective_at,
            at(30),
            "the earlier effective time stands"
        );
    }

    #[test]
    fn never_more_than_was_paid_less_add_ons_refunds_and_claims() {
        let mut e = purchase("in_1", MovementKind::Subscription, 5000, 0);
        assert_eq!(
            refundable(&e, false, Cents::ZERO, Cents::ZERO, Cents::ZERO),
            Cents::new(5000)
        );
        e.non_refundable = Cents::new(1500);
        assert_eq!(
            refundable(&e, false, Cents::ZERO, Cents::ZERO, Cents::ZERO),
            Cents::new(3500)
        );
        assert_eq!(
            refundable(&e, false, Cents::new(1000), Cents::new(2000), Cents::ZERO),
            Cents::new(500)
        );
        assert_eq!(
            refundable(&e, false, Cents::new(4000), Cents::new(2000), Cents::ZERO),
            Cents::ZERO
        );
        // A charge confirmed as a mistake is refundable add-ons and all.
        assert_eq!(
            refundable(&e, true, Cents::ZERO, Cents::ZERO, Cents::ZERO),
            Cents::new(5000)
        );
        assert_eq!(
            refundable(&e, true, Cents::new(1000), Cents::new(2000), Cents::ZERO),
            Cents::new(2000)
        );
        // Stripe's own refunded total bounds it too.
        e.non_refundable = Cents::ZERO;
        e.amount_refunded = Cents::new(4900);
        assert_eq!(
            refundable(&e, true, Cents::ZERO, Cents::ZERO, Cents::ZERO),
            Cents::new(100)
        );
        // So does what credit notes gave back to the customer's balance or outside Stripe.
        e.amount_refunded = Cents::ZERO;
        e.amount_credited = Cents::new(3000);
        assert_eq!(
            refundable(&e, true, Cents::ZERO, Cents::ZERO, Cents::ZERO),
            Cents::new(2000)
        );
        assert_eq!(
            refundable(&e, true, Cents::new(1500), Cents::ZERO, Cents::ZERO),
            Cents::new(500)
        );
        e.amount_refunded = Cents::new(2500);
        assert_eq!(
            refundable(&e, true, Cents::ZERO, Cents::ZERO, Cents::ZERO),
            Cents::ZERO
        );
        // A refund that failed after it was counted gave nothing back: refundable again.
        e.amount_credited = Cents::ZERO;
        e.amount_refunded = Cents::new(5000);
        assert_eq!(
            refundable(&e, true, Cents::ZERO, Cents::ZERO, Cents::ZERO),
            Cents::ZERO
        );
        assert_eq!(
            refundable(&e, true, Cents::ZERO, Cents::ZERO, Cents::new(5000)),
            Cents::new(5000)
        );
    }
}
