//! Credits a Stripe object paid for: pure functions from Stripe's objects to grants, each
//! under a key derived from the object that paid (`stripe:checkout:<session>`,
//! `stripe:invoice:<invoice>:plan`, ...), so it is granted exactly once however often the
//! event arrives.

use super::objects::{CheckoutSession, Invoice, PaymentIntent};
use super::{poison, read_terms, ts};
use crate::catalog::Catalog;
use crate::ledger::{LotSource, Refs};
use crate::money::Credits;
use crate::queue::ConsumeError;
use crate::subscriptions::Terms;
use crate::subscriptions::change::allowance_window;
use chrono::{DateTime, Duration, Utc};

/// Most packs one checkout may buy.
pub const MAX_PACK_QUANTITY: u64 = 100;

/// Credits one Stripe object paid for, under a key derived from that object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditGrant {
    pub key: String,
    pub source: LotSource,
    pub credits: Credits,
    pub expires_at: Option<DateTime<Utc>>,
    pub refs: Refs,
    pub note: String,
}

/// The packs a checkout session bought, once it is paid; `None` for sessions that sell
/// something else or are not paid yet (their async payment event brings the credits).
pub fn checkout_grant(
    s: &CheckoutSession,
    catalog: &Catalog,
) -> Result<Option<CreditGrant>, ConsumeError> {
    let paid = matches!(
        s.payment_status.as_deref(),
        Some("paid" | "no_payment_required")
    );
    if s.mode.as_deref() != Some("payment")
        || s.metadata.get("kind").map(String::as_str) != Some("pack")
    {
        return Ok(None);
    }
    if !paid {
        tracing::info!(session = %s.id, "pack checkout not paid yet; waiting for async payment");
        return Ok(None);
    }
    let pack_id = s
        .metadata
        .get("pack")
        .ok_or_else(|| poison("pack checkout without pack"))?;
    let pack = catalog
        .pack(pack_id)
        .ok_or_else(|| poison(format!("unknown pack {pack_id:?}")))?;
    let quantity: u64 = s
        .metadata
        .get("quantity")
        .map_or(Ok(1), |q| q.parse())
        .map_err(|_| poison("pack quantity is not a number"))?;
    if quantity == 0 || quantity > MAX_PACK_QUANTITY {
        return Err(poison(format!("pack quantity {quantity} out of range")));
    }
    let credits = pack
        .credits
        .checked_mul(quantity)
        .ok_or_else(|| poison(format!("{quantity} x {} overflows the credits", pack.id)))?;
    Ok(Some(CreditGrant {
        key: format!("stripe:checkout:{}", s.id),
        source: LotSource::Pack,
        credits,
        expires_at: None,
        refs: Refs {
            invoice: s.invoice.id().cloned(),
            charge: s.payment_intent.id().map(ToString::to_string),
            ..Refs::default()
        },
        note: format!("{quantity} x {} ({} credits)", pack.id, pack.credits),
    }))
}

/// Plan and add-on credits for the period a paid subscription invoice starts (the first
/// billing month of it), or the agreed credits of a paid custom payment.
pub fn invoice_grants(i: &Invoice, catalog: &Catalog) -> Result<Vec<CreditGrant>, ConsumeError> {
    let refs = Refs {
        invoice: Some(i.id.clone()),
        ..Refs::default()
    };
    match i.billing_reason.as_deref() {
        Some("subscription_create" | "subscription_cycle") => {}
        Some("manual") if i.metadata.get("kind").map(String::as_str) == Some("custom_payment") => {
            let credits = i
                .metadata
                .get("credits")
                .and_then(|c| c.parse::<i128>().ok())
                .and_then(|c| Credits::parse_request_amount(c).ok())
                .ok_or_else(|| poison("custom payment invoice without valid credits"))?;
            // An invoice finalized without its line (the item call failed after the draft
            // was created) is paid at $0: nothing was paid for, so nothing is granted.
            if i.amount_paid <= 0 {
                return Err(poison(format!(
                    "custom payment invoice {} was paid nothing; no credits granted",
                    i.id
                )));
            }
            return Ok(vec![CreditGrant {
                key: format!("stripe:invoice:{}:custom", i.id),
                source: LotSource::Pack,
                credits,
                expires_at: None,
                refs,
                note: "custom payment".into(),
            }]);
        }
        _ => return Ok(Vec::new()),
    }
    let Some(details) = i.subscription_details() else {
        return Err(poison(format!(
            "subscription invoice {} has no subscription details",
            i.id
        )));
    };
    let (start, end) = i
        .service_period()
        .ok_or_else(|| poison(format!("invoice {} has no service period", i.id)))?;
    let Terms {
        plan: plan_id,
        addon_units: units,
        ..
    } = read_terms(&details.metadata, start)?;
    let plan = catalog
        .plan(&plan_id)
        .ok_or_else(|| poison(format!("unknown plan {plan_id:?}")))?;
    let (start, end) = (ts(start), ts(end));
    // Yearly plans get a month's allowance per billing month; this invoice carries the
    // first.
    let (_, month_end) = allowance_window(start, end, start);
    let mut grants = vec![CreditGrant {
        key: format!("stripe:invoice:{}:plan", i.id),
        source: LotSource::PlanPeriod,
        credits: plan.monthly_credits,
        expires_at: Some(month_end + Duration::days(plan.rollover_days as i64)),
        refs: refs.clone(),
        note: format!("{} plan credits", plan.name),
    }];
    let units = units as u64;
    if units > 0 {
        let addon = catalog
            .addon(&plan.addon)
            .ok_or_else(|| poison("plan add-on missing from catalog"))?;
        let credits = addon
            .credits_per_unit
            .checked_mul(units)
            .ok_or_else(|| poison(format!("{units} add-on units overflow the credits")))?;
        grants.push(CreditGrant {
            key: format!("stripe:invoice:{}:addon", i.id),
            source: LotSource::Addon,
            credits,
            expires_at: Some(month_end),
            refs,
            note: format!("{units} add-on unit(s)"),
        });
    }
    Ok(grants)
}

/// Whether a payment intent is an auto top-up (Checkout's own payment intents carry no
/// `topup` flag; their credits come with the checkout session).
pub fn is_top_up(pi: &PaymentIntent) -> bool {
    pi.metadata.get("topup").map(String::as_str) == Some("true")
        && pi.metadata.get("kind").map(String::as_str) == Some("pack")
}

/// The pack an auto top-up paid for, once per payment intent.
pub fn top_up_grant(pi: &PaymentIntent, catalog: &Catalog) -> Result<CreditGrant, ConsumeError> {
    let pack_id = pi
        .metadata
        .get("pack")
        .ok_or_else(|| poison("top-up without pack"))?;
    let pack = catalog
        .pack(pack_id)
        .ok_or_else(|| poison(format!("unknown pack {pack_id:?}")))?;
    Ok(CreditGrant {
        key: format!("stripe:payment_intent:{}", pi.id),
        source: LotSource::Pack,
        credits: pack.credits,
        expires_at: None,
        refs: Refs {
            charge: Some(pi.id.to_string()),
            ..Refs::default()
        },
        note: format!("auto top-up: {} ({} credits)", pack.id, pack.credits),
    })
}
