//! Pack checkouts priced with a plan's pack discount. A Stripe session can be paid for 24
//! hours, so one made while the plan gave a discount could be paid at it after the plan
//! stopped giving it (canceled, paused past its paid period, a downgrade). The workspace
//! keeps one small document saying the highest discount an open session may carry; the
//! billing worker reads it after it sets the plan, and asks Stripe to expire the sessions
//! priced above the plan's discount only when one may be open.

use super::records::workspace_pk;
use crate::ids::{CustomerId, WorkspaceId};
use crate::payments::Payments;
use crate::store::StoreError;
use crate::store::docs::{self, DocStore};
use serde::{Deserialize, Serialize};

/// Sort key of the document, under the workspace's partition.
pub const OFFERED_SK: &str = "CHECKOUT#pack_discount";

/// The longest the billing worker spends expiring a customer's sessions for one event
/// (its batch shares the function's 60 s with other customers' events); what is left is
/// expired by a later event.
pub const WITHDRAW_BUDGET: std::time::Duration = std::time::Duration::from_secs(15);

/// The highest pack discount an open pack session of the workspace may be priced with, and
/// the Stripe customer the sessions were made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscountOffered {
    pub customer: CustomerId,
    pub pct: u8,
    /// Counts the offers recorded: the worker lowers `pct` only if none came in between
    /// its read and its write.
    pub offers: u64,
}

/// Written before a pack session priced with `pct` is made (and again when a checkout
/// could not expire its own session): one may be open from now on.
pub async fn offering(
    docs: &dyn DocStore,
    workspace: &WorkspaceId,
    customer: &CustomerId,
    pct: u8,
) -> Result<(), StoreError> {
    docs::update(
        docs,
        &workspace_pk(workspace),
        OFFERED_SK,
        |cur: Option<DiscountOffered>| {
            Some(match cur {
                Some(c) => DiscountOffered {
                    pct: if c.customer == *customer {
                        c.pct.max(pct)
                    } else {
                        pct
                    },
                    customer: customer.clone(),
                    offers: c.offers + 1,
                },
                None => DiscountOffered {
                    customer: customer.clone(),
                    pct,
                    offers: 1,
                },
            })
        },
    )
    .await?;
    Ok(())
}

/// What withdrawing a discount did.
#[derive(Debug, PartialEq, Eq)]
pub enum Withdrawn {
    /// No session priced above `now_pct` can be open: Stripe was not asked.
    Nothing,
    /// Stripe expired this many sessions (of those listed).
    Expired(u32),
}

/// After the plan is set: if a pack session priced above `now_pct` (the discount the plan
/// gives now) may be open, asks Stripe (for at most `budget`) to expire every such session,
/// then records that none is. A failure leaves the record as it was, so the next call asks again. A session
/// made after the listing is the checkout's own to expire: it reads the plan again once its
/// session exists.
pub async fn withdraw(
    docs: &dyn DocStore,
    stripe: &dyn Payments,
    workspace: &WorkspaceId,
    now_pct: u8,
    budget: std::time::Duration,
) -> Result<Withdrawn, WithdrawError> {
    let pk = workspace_pk(workspace);
    let Some(offered) = docs::get::<DiscountOffered>(docs, &pk, OFFERED_SK).await? else {
        return Ok(Withdrawn::Nothing);
    };
    if offered.pct <= now_pct {
        return Ok(Withdrawn::Nothing);
    }
    let expiring = stripe.expire_pack_checkouts(&offered.customer, now_pct);
    let expired = match tokio::time::timeout(budget, expiring).await {
        Ok(answer) => answer.map_err(WithdrawError::Stripe)?,
        Err(_) => return Err(WithdrawError::TooSlow(budget)),
    };
    // Lowered only if no checkout raised it meanwhile (its session may not be listed yet;
    // the checkout withdraws it itself if the plan no longer gives its discount).
    docs::update(docs, &pk, OFFERED_SK, |cur: Option<DiscountOffered>| {
        (cur.as_ref().map(|c| c.offers) == Some(offered.offers)).then(|| DiscountOffered {
            pct: now_pct,
            ..offered.clone()
        })
    })
    .await?;
    Ok(Withdrawn::Expired(expired))
}

#[derive(Debug, thiserror::Error)]
pub enum WithdrawError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Stripe(crate::payments::PaymentsError),
    /// Stripe took longer than the budget (some sessions may be expired already).
    #[error("the payment provider took longer than {0:?}")]
    TooSlow(std::time::Duration),
}
