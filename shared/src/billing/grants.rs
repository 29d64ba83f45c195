//! Credits a Stripe object paid for: pure functions from Stripe's objects to grants, each
//! under a key derived from the object that paid (`stripe:checkout:<session>`,
//! `stripe:invoice:<invoice>:plan`, ...), so it is granted exactly once however often the
//! event arrives.

use super::objects::{CheckoutSession, Invoice, PaymentIntent};
use super::{poison, read_terms, ts};
use crate::catalog::Catalog;
use crate::ids::InvoiceId;
use crate::ledger::{LotSource, Refs};
use crate::money::Credits;
use crate::queue::ConsumeError;
use crate::subscriptions::Terms;
use crate::subscriptions::paid::{
    Item, Level, PaidLine, billing_month, change_value_through, credit_value_unknown_period,
    first_month_credits, first_month_of_lines, interval_of_period, level_after_changes, net,
    new_period,
};
use chrono::{DateTime, Duration, Utc};

/// Most packs one checkout may buy.
pub const MAX_PACK_QUANTITY: u64 = 100;

/// Credits one Stripe object paid for, under a key derived from that object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditGrant {
    /// The subscription billing month (its start) the credits are for.
    pub month: Option<DateTime<Utc>>,
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
    let (pack_id, per_pack) = sold_pack(&s.metadata, catalog)?;
    let quantity: u64 = s
        .metadata
        .get("quantity")
        .map_or(Ok(1), |q| q.parse())
        .map_err(|_| poison("pack quantity is not a number"))?;
    if quantity == 0 || quantity > MAX_PACK_QUANTITY {
        return Err(poison(format!("pack quantity {quantity} out of range")));
    }
    let credits = per_pack
        .checked_mul(quantity)
        .ok_or_else(|| poison(format!("{quantity} x {pack_id} overflows the credits")))?;
    Ok(Some(CreditGrant {
        month: None,
        key: format!("stripe:checkout:{}", s.id),
        source: LotSource::Pack,
        credits,
        expires_at: None,
        refs: Refs {
            invoice: s.invoice.id().cloned(),
            charge: s.payment_intent.id().map(ToString::to_string),
            ..Refs::default()
        },
        note: format!("{quantity} x {pack_id} ({per_pack} credits)"),
    }))
}

/// The pack a payment bought and the credits each was sold with: those recorded on the
/// payment at sale (`credits`), so a catalog change between the sale and a late payment
/// changes nothing; the catalog's for payments made before they were recorded.
fn sold_pack<'m>(
    metadata: &'m std::collections::HashMap<String, String>,
    catalog: &Catalog,
) -> Result<(&'m str, Credits), ConsumeError> {
    let pack_id = metadata
        .get("pack")
        .ok_or_else(|| poison("pack payment without pack"))?;
    let per_pack = match metadata.get("credits") {
        Some(c) => c
            .parse::<i128>()
            .ok()
            .and_then(|c| Credits::parse_request_amount(c).ok())
            .ok_or_else(|| poison(format!("pack payment with invalid credits {c:?}")))?,
        None => {
            catalog
                .pack(pack_id)
                .ok_or_else(|| poison(format!("unknown pack {pack_id:?}")))?
                .credits
        }
    };
    Ok((pack_id, per_pack))
}

/// The lines of a paid invoice that bill Tally's catalog items; other lines are ignored.
pub fn paid_lines(i: &Invoice, catalog: &Catalog) -> Vec<PaidLine> {
    i.lines
        .data
        .iter()
        .filter_map(|l| {
            let item = match l.product().and_then(|p| Item::of_product(p, catalog)) {
                Some(item) => item,
                // A subscription item on a product that is not Tally's (older subscriptions).
                None if l.subscription_item() => Item::Other,
                None => return None,
            };
            let period = l.period.as_ref()?;
            Some(PaidLine {
                item,
                quantity: l.quantity.unwrap_or(1),
                amount: l.amount,
                start: ts(period.start),
                end: ts(period.end),
                proration: l.proration(),
            })
        })
        .collect()
}

/// The period an invoice opens (sign-up, renewal, interval switch), from its lines.
pub fn opened_period(i: &Invoice, catalog: &Catalog) -> Option<Level> {
    new_period(&paid_lines(i, catalog))
}

/// What a paid invoice means for credits: its grants, the period it opens (sign-up,
/// renewal, interval switch) and the level a change inside a period leads to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvoiceCredits {
    pub grants: Vec<CreditGrant>,
    pub opens: Option<Level>,
    pub changes: Option<(Level, DateTime<Utc>)>,
    /// Credits the invoice gave back as money: a change whose lines are worth less than
    /// nothing (unused time at a richer level credited by Stripe), to be taken back.
    pub credited: Credits,
}

/// Credits of a paid invoice. `known` are the subscription's paid periods (newest first);
/// a change's proration lines are valued against the one they bill. Lines of a period not
/// known yet (its own invoice not applied yet) make the event wait and retry.
pub fn invoice_grants(
    i: &Invoice,
    catalog: &Catalog,
    known: &[Level],
) -> Result<InvoiceCredits, ConsumeError> {
    let refs = Refs {
        invoice: Some(i.id.clone()),
        ..Refs::default()
    };
    let reason = i.billing_reason.as_deref();
    if reason == Some("manual")
        && i.metadata.get("kind").map(String::as_str) == Some("custom_payment")
    {
        let credits = i
            .metadata
            .get("credits")
            .and_then(|c| c.parse::<i128>().ok())
            .and_then(|c| Credits::parse_request_amount(c).ok())
            .ok_or_else(|| poison("custom payment invoice without valid credits"))?;
        // An invoice finalized without its line (the item call failed after the draft
        // was created), or cancelled by a credit note, is paid at $0: nothing was paid
        // for, so nothing is granted. One the customer's Stripe balance paid (money Stripe
        // held for them, from credited time) was paid with that: `amount_paid` is 0, and
        // the balance moved by the amount.
        let from_balance = i
            .ending_balance
            .map_or(0, |end| end.saturating_sub(i.starting_balance));
        // The balance moves both ways: a credit the customer had paid part of it
        // (`from_balance` above 0); a debt they owed was collected with it (below 0: that
        // money paid the debt, not the credits).
        if i.amount_paid <= 0 && from_balance <= 0 {
            return Err(poison(format!(
                "custom payment invoice {} was paid nothing; no credits granted",
                i.id
            )));
        }
        let credits = custom_payment_credits(
            i,
            credits,
            i.amount_paid.saturating_add(from_balance).max(0),
        );
        if credits.is_zero() {
            return Err(poison(format!(
                "custom payment invoice {} was paid too little for a credit; no credits granted",
                i.id
            )));
        }
        return Ok(InvoiceCredits {
            grants: vec![CreditGrant {
                month: None,
                key: format!("stripe:invoice:{}:custom", i.id),
                source: LotSource::Pack,
                credits,
                expires_at: None,
                refs,
                note: "custom payment".into(),
            }],
            ..InvoiceCredits::default()
        });
    }
    if !matches!(
        reason,
        Some("subscription_create" | "subscription_cycle" | "subscription_update")
    ) {
        return Ok(InvoiceCredits::default());
    }
    // A period Stripe billed nothing for (a trial added in the dashboard: its lines are
    // $0) is not a paid period: its credits come with the first invoice that bills it. (A
    // coupon bills the lines at their price and discounts them: that is paid for.)
    if matches!(reason, Some("subscription_create" | "subscription_cycle"))
        && !i.lines.data.is_empty()
        && i.lines.data.iter().all(|l| l.amount == 0)
    {
        tracing::info!(invoice = %i.id, "a period billed nothing (a trial): no credits");
        return Ok(InvoiceCredits::default());
    }
    let lines = paid_lines(i, catalog);
    if new_period(&lines).is_none() && reason != Some("subscription_update") {
        // A subscription created before Tally named its products: its terms are in the
        // subscription's metadata.
        let level = metadata_level(i, catalog)?;
        let credits = first_month_credits(&level, catalog);
        return Ok(InvoiceCredits {
            grants: first_month_grants(&i.id, &level, credits, catalog, &refs),
            opens: Some(level),
            ..InvoiceCredits::default()
        });
    }
    line_grants(&i.id, reason.unwrap_or_default(), &lines, known, catalog)
}

/// The credits a custom payment's invoice grants for what was `paid` (cents, from the card
/// and the customer's Stripe balance): the agreed credits for the agreed amount, and the
/// same share, rounded down, of them for less (a discount or a credit note before payment
/// lowered what was collected). The agreed amount is the one recorded on the invoice
/// (`amount_cents`), or for invoices made before it was recorded, the sum of its lines.
fn custom_payment_credits(i: &Invoice, credits: Credits, paid: i64) -> Credits {
    let agreed = i
        .metadata
        .get("amount_cents")
        .and_then(|a| a.parse::<i64>().ok())
        .filter(|a| *a > 0)
        .unwrap_or_else(|| i.lines.data.iter().map(|l| l.amount.max(0)).sum());
    if agreed <= 0 || paid >= agreed {
        return credits;
    }
    let share = i128::from(credits.get()) * i128::from(paid) / i128::from(agreed);
    Credits::new(u64::try_from(share).unwrap_or(0))
}

/// Credits of a paid subscription invoice's lines (see [`crate::subscriptions::paid`]):
/// a new period's first month, and a change's proration lines valued against the known
/// period they bill.
pub fn line_grants(
    id: &InvoiceId,
    reason: &str,
    lines: &[PaidLine],
    known: &[Level],
    catalog: &Catalog,
) -> Result<InvoiceCredits, ConsumeError> {
    let refs = Refs {
        invoice: Some(id.clone()),
        ..Refs::default()
    };
    let mut out = InvoiceCredits::default();
    let prorations: Vec<PaidLine> = lines.iter().filter(|l| l.proration).cloned().collect();
    if let Some(level) = new_period(lines) {
        // An interval switch: the new period's first month, less what the unused rest of
        // the old month was worth (already granted with the old period).
        let old: Vec<PaidLine> = prorations
            .iter()
            .filter(|l| l.end != level.period_end)
            .cloned()
            .collect();
        // (unused, valued exactly): estimates lean toward granting less, never toward
        // taking back more.
        let (unused, exact) = match old.first() {
            None => (0, true),
            Some(first) => match known
                .iter()
                .find(|p| p.period_end == first.end && p.period_start <= first.start)
            {
                Some(period) => {
                    // Prorations left for this invoice by changes that were not billed at
                    // once cover every month since each change, granted at the period's
                    // level (a change billed at once takes such prorations into its own
                    // invoice, so none is left behind one).
                    let (plan, addon) =
                        change_value_through(&old, period, Some(level.period_start), catalog);
                    // Plan and add-on lines net out: what the customer paid more for one
                    // part pays for the other's months.
                    ((plan + addon).min(0), true)
                }
                None => (
                    credit_value_unknown_period(&old, &level.plan, catalog),
                    false,
                ),
            },
        };
        // A new period Stripe billed nothing for (a trial added to a running subscription:
        // its plan line is $0, beside the credit for the unused old time) is not a paid
        // period: its credits come with the first invoice that bills the plan, and the
        // unused old time's go with the money credited for it. It still takes the old
        // period's place, so a yearly plan's later months stop there, as a month of its
        // own: a trial is paid for by no year, however long it runs.
        if lines.iter().filter(|l| !l.proration).all(|l| l.amount == 0) {
            // Nothing to shrink an estimate from: the credit is valued exactly, against the
            // old period once its own invoice is applied (as a change's is).
            if !exact {
                return Err(ConsumeError::retry(format!(
                    "invoice {id} starts a trial after a period not recorded yet"
                )));
            }
            if !has_other_items(lines) {
                out.credited = credited(unused);
            }
            tracing::info!(invoice = %id, "a new period billed nothing (a trial): no credits");
            out.opens = Some(Level {
                interval: crate::subscriptions::plan::Interval::Monthly,
                ..level
            });
            return Ok(out);
        }
        let (plan, addon) = first_month_of_lines(lines, &level, catalog);
        let (plan, addon) = (i128::from(plan.get()) + unused, i128::from(addon.get()));
        if exact && !has_other_items(lines) {
            out.credited = credited(plan + addon);
        }
        let (plan, addon) = net(plan, addon);
        out.grants.extend(first_month_grants(
            id,
            &level,
            (plan, addon),
            catalog,
            &refs,
        ));
        out.opens = Some(level);
        return Ok(out);
    }
    if reason != "subscription_update" {
        return Ok(out);
    }
    // The change this invoice was made for is its latest; prorations an earlier change
    // left for the next invoice (made in the dashboard without invoicing it) come with it.
    let Some(last) = prorations.iter().max_by_key(|l| l.start) else {
        return Ok(out);
    };
    let period = known
        .iter()
        .find(|p| p.period_end == last.end && p.period_start <= last.start)
        .cloned()
        .ok_or_else(|| {
            ConsumeError::retry(format!(
                "invoice {id} bills a change in a period not recorded yet (ending {})",
                last.end
            ))
        })?;
    let lines_of_period: Vec<PaidLine> = prorations
        .iter()
        .filter(|l| l.end == period.period_end)
        .cloned()
        .collect();
    // Each change is worth its months from the one it was made in through this one: the
    // months between were granted at the level before it (a change billed at once has
    // only the rest of its own month).
    let (plan_value, addon_value) = change_value_through(
        &lines_of_period,
        &period,
        Some(last.start + Duration::seconds(1)),
        catalog,
    );
    if !has_other_items(&lines_of_period) {
        out.credited = credited(plan_value + addon_value);
    }
    let (plan_credits, addon_credits) = net(plan_value, addon_value);
    let (month_start, month_end) = billing_month(&period, last.start);
    let after = level_after_changes(&lines_of_period, &period);
    let rollover = catalog.plan(&after.plan).map_or(0, |p| p.rollover_days);
    if plan_credits > Credits::ZERO {
        out.grants.push(CreditGrant {
            month: Some(month_start),
            key: format!("stripe:invoice:{id}:change:plan"),
            source: LotSource::PlanPeriod,
            credits: plan_credits,
            expires_at: Some(month_end + Duration::days(rollover as i64)),
            refs: refs.clone(),
            note: "plan change, rest of the billing month".into(),
        });
    }
    if addon_credits > Credits::ZERO {
        out.grants.push(CreditGrant {
            month: Some(month_start),
            key: format!("stripe:invoice:{id}:change:addon"),
            source: LotSource::Addon,
            credits: addon_credits,
            expires_at: Some(month_end),
            refs,
            note: "add-on units, rest of the billing month".into(),
        });
    }
    out.changes = Some((after, last.start));
    Ok(out)
}

/// Whether lines bill products that name no catalog item: their credit is valued as the
/// plan in force (an estimate that keeps grants low), so it never decides a take-back.
fn has_other_items(lines: &[PaidLine]) -> bool {
    lines.iter().any(|l| matches!(l.item, Item::Other))
}

/// What a change worth `value` credits in total gave back: nothing unless it is negative.
fn credited(value: i128) -> Credits {
    Credits::new(u64::try_from(-value.min(0)).unwrap_or(u64::MAX))
}

/// The grants of a new period's first billing month.
fn first_month_grants(
    id: &InvoiceId,
    level: &Level,
    (plan_credits, addon_credits): (Credits, Credits),
    catalog: &Catalog,
    refs: &Refs,
) -> Vec<CreditGrant> {
    let (month_start, month_end) = billing_month(level, level.period_start);
    let rollover = catalog.plan(&level.plan).map_or(0, |p| p.rollover_days);
    let name = catalog
        .plan(&level.plan)
        .map_or(level.plan.as_str(), |p| p.name.as_str());
    let mut grants = Vec::new();
    if plan_credits > Credits::ZERO {
        grants.push(CreditGrant {
            month: Some(month_start),
            key: format!("stripe:invoice:{id}:plan"),
            source: LotSource::PlanPeriod,
            credits: plan_credits,
            expires_at: Some(month_end + Duration::days(rollover as i64)),
            refs: refs.clone(),
            note: format!("{name} plan credits"),
        });
    }
    if addon_credits > Credits::ZERO {
        grants.push(CreditGrant {
            month: Some(month_start),
            key: format!("stripe:invoice:{id}:addon"),
            source: LotSource::Addon,
            credits: addon_credits,
            expires_at: Some(month_end),
            refs: refs.clone(),
            note: format!("{} add-on unit(s)", level.addon_units),
        });
    }
    grants
}

/// The level of a sign-up or renewal invoice whose lines name no Tally product.
fn metadata_level(i: &Invoice, catalog: &Catalog) -> Result<Level, ConsumeError> {
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
        plan, addon_units, ..
    } = read_terms(&details.metadata, start)?;
    if catalog.plan(&plan).is_none() {
        return Err(poison(format!("unknown plan {plan:?}")));
    }
    Ok(Level {
        plan,
        interval: interval_of_period(ts(start), ts(end)),
        addon_units,
        period_start: ts(start),
        period_end: ts(end),
    })
}

/// Whether a payment intent is an auto top-up (Checkout's own payment intents carry no
/// `topup` flag; their credits come with the checkout session).
pub fn is_top_up(pi: &PaymentIntent) -> bool {
    pi.metadata.get("topup").map(String::as_str) == Some("true")
        && pi.metadata.get("kind").map(String::as_str) == Some("pack")
}

/// The pack an auto top-up paid for, once per payment intent.
pub fn top_up_grant(pi: &PaymentIntent, catalog: &Catalog) -> Result<CreditGrant, ConsumeError> {
    let (pack_id, credits) = sold_pack(&pi.metadata, catalog)?;
    Ok(CreditGrant {
        month: None,
        key: format!("stripe:payment_intent:{}", pi.id),
        source: LotSource::Pack,
        credits,
        expires_at: None,
        refs: Refs {
            charge: Some(pi.id.to_string()),
            ..Refs::default()
        },
        note: format!("auto top-up: {pack_id} ({credits} credits)"),
    })
}
