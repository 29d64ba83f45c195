//! Billing documents kept from Stripe's facts: invoices, the subscription (and the plan
//! the ledger derives from it), payments with their refunds and disputes. Each merges by a
//! total order on its facts, so any delivery order ends in the same document.

use super::objects;
use super::records::*;
use super::{BillingEvents, poison, read_terms, ts};
use crate::ids::{CustomerId, IdempotencyKey, PaymentMethodId, WorkspaceId};
use crate::ledger::{Actor, ActorKind, Operation, PlanStatus, Refs};
use crate::money::{Cents, SignedCents};
use crate::payments::PaymentsError;
use crate::queue::ConsumeError;
use crate::service::LedgerRequest;
use crate::store::docs;
use crate::subscriptions::paid::{Item, Level};
use crate::subscriptions::{Terms, meta};

/// A Stripe amount that is never negative. A negative one means the object is not what
/// the records assume, so the event is poisoned rather than stored.
fn cents(amount: i64, field: &str, object: &dyn std::fmt::Display) -> Result<Cents, ConsumeError> {
    Cents::try_from(amount)
        .map_err(|_| poison(format!("{field} of {object} is negative ({amount})")))
}

/// Plan, interval and add-on units from a subscription's items, when they name Tally's
/// products.
fn items_terms(
    s: &objects::Subscription,
    catalog: &crate::catalog::Catalog,
) -> Option<(String, crate::ledger::Interval, u32)> {
    let mut plan = None;
    let mut units = 0u64;
    for item in &s.items.data {
        let price = item.price.as_ref()?;
        match Item::of_product(price.product_id()?, catalog) {
            Some(Item::Plan(p)) => {
                let interval = crate::subscriptions::terms::interval_of(
                    price.recurring.as_ref().and_then(|r| r.interval.as_deref()),
                );
                plan = Some((p, interval));
            }
            Some(Item::Addon(_)) => units += item.quantity.unwrap_or(1),
            Some(Item::Other) | None => {}
        }
    }
    let (plan, interval) = plan?;
    Some((plan, interval, u32::try_from(units).unwrap_or(u32::MAX)))
}

impl BillingEvents {
    pub(super) async fn record_invoice(
        &self,
        event: &objects::Event,
        workspace: &WorkspaceId,
        i: &objects::Invoice,
    ) -> Result<(), ConsumeError> {
        let record = InvoiceRecord {
            id: i.id.clone(),
            number: i.number.clone(),
            status: i.status.clone().unwrap_or_else(|| "draft".into()),
            billing_reason: i.billing_reason.clone(),
            amount_due: cents(i.amount_due, "amount_due", &i.id)?,
            amount_paid: cents(i.amount_paid, "amount_paid", &i.id)?,
            amount_remaining: cents(i.amount_remaining, "amount_remaining", &i.id)?,
            total: SignedCents::new(i.total),
            currency: i.currency.clone().unwrap_or_else(|| "usd".into()),
            // A correction's replacement and a top-up's receipt are paid by a payment
            // already made, out of band: open only between their finalizing and their
            // marking as paid (or after a request stopped between the two), they are never
            // offered as a page to pay.
            hosted_invoice_url: i.hosted_invoice_url.clone().filter(|_| {
                !(matches!(
                    i.metadata.get("kind").map(String::as_str),
                    Some("reissue" | "top_up")
                ) && i.status.as_deref() == Some("open"))
            }),
            invoice_pdf: i.invoice_pdf.clone(),
            created: ts(i.created),
            paid_at: i
                .status_transitions
                .as_ref()
                .and_then(|t| t.paid_at)
                .map(ts),
            subscription: i
                .subscription_details()
                .and_then(|d| d.subscription.id().cloned()),
            as_of: event.created,
            as_of_event: event.id.clone(),
        };
        docs::update(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            &invoice_sk(i.created, &i.id),
            |cur| InvoiceRecord::merge(cur, record.clone()),
        )
        .await?;
        // Where the invoice lives, for staff routes that name an invoice alone.
        docs::update(
            self.docs.as_ref(),
            &invoice_link_pk(&i.id),
            LINK_SK,
            |cur: Option<InvoiceLink>| {
                cur.is_none().then(|| InvoiceLink {
                    workspace: workspace.clone(),
                    created: i.created,
                })
            },
        )
        .await?;
        if record.status != "draft" {
            self.invoice_history(workspace, i, &record).await?;
        }
        Ok(())
    }

    /// The invoice's line in the billing history.
    async fn invoice_history(
        &self,
        workspace: &WorkspaceId,
        i: &objects::Invoice,
        record: &InvoiceRecord,
    ) -> Result<(), ConsumeError> {
        use super::history::{HistoryEntry, MovementKind};
        let kind = match i.metadata.get("kind").map(String::as_str) {
            Some("custom_payment") => Some(MovementKind::CustomPayment),
            Some("pack") => Some(MovementKind::Pack),
            Some("top_up") => Some(MovementKind::TopUp),
            Some("reissue") => Some(MovementKind::Invoice),
            _ if i.subscription_details().is_some() => Some(MovementKind::Subscription),
            _ => None,
        };
        let description = i
            .description
            .clone()
            .or_else(|| i.lines.data.iter().find_map(|l| l.description.clone()));
        let tax = i.tax_amount().map(|t| cents(t, "tax", &i.id)).transpose()?;
        // Add-on units are non-refundable (the help pages): their share of the money paid.
        // Their lines net of the time they credited back, as a share of all lines net, of
        // what was paid, each line net of its discounts and with the tax charged on top of
        // it: a coupon for one product only, or another tax rate, weighs on its own part,
        // the customer's Stripe balance on both alike; and a change that credits more
        // add-on time than it charges has none.
        let is_addon = |l: &&super::objects::InvoiceLine| {
            l.product()
                .and_then(|p| Item::of_product(p, self.catalog()))
                .is_some_and(|it| matches!(it, Item::Addon(_)))
        };
        let lines: i128 = i.lines.data.iter().map(|l| i128::from(l.net())).sum();
        let addons: i128 = i
            .lines
            .data
            .iter()
            .filter(is_addon)
            .map(|l| i128::from(l.net()))
            .sum();
        let paid = i128::from(i.amount_paid.max(0));
        let non_refundable = if lines > 0 && addons > 0 {
            paid * addons.min(lines) / lines
        } else {
            0
        };
        let non_refundable =
            Cents::try_from(i64::try_from(non_refundable).unwrap_or(0)).unwrap_or_default();
        let subscription = i
            .subscription_details()
            .and_then(|d| d.subscription.id().cloned());
        let order = (InvoiceRecord::rank(&record.status), record.as_of);
        let amount = if record.status == "paid" {
            record.amount_paid
        } else {
            record.amount_due
        };
        let replaces = i
            .metadata
            .get("reissue_of")
            .filter(|_| i.metadata.get("kind").map(String::as_str) == Some("reissue"))
            .and_then(|o| crate::ids::InvoiceId::parse(o).ok());
        if let Some(original) = &replaces {
            // Credit notes on the replacement give back what the original's payment paid.
            docs::update(
                self.docs.as_ref(),
                &super::refunds::reissue_pk(&i.id),
                super::refunds::LINK_SK,
                |cur: Option<super::refunds::ReissueLink>| {
                    cur.is_none_or(|l| l.original.is_none())
                        .then(|| super::refunds::ReissueLink {
                            original: Some(original.clone()),
                        })
                },
            )
            .await?;
            // Notes that came before this link belong to the original's payment.
            self.move_credit_notes(&i.id, original).await?;
            // The original's line names its replacement.
            let now = self.ledger.clock.now();
            super::history::record(
                self.docs.as_ref(),
                workspace,
                original.as_str(),
                now,
                now,
                |e| {
                    (e.replaced_by.as_ref() != Some(&i.id)) && {
                        e.replaced_by = Some(i.id.clone());
                        true
                    }
                },
            )
            .await?;
        }
        // An invoice documenting a payment already on the history (an auto top-up, paid
        // out of band) adds its links to that payment's line.
        if kind == Some(MovementKind::TopUp)
            && let Some(pi) = i
                .metadata
                .get("payment_intent")
                .and_then(|p| crate::ids::PaymentIntentId::parse(p).ok())
        {
            // Its links go on the payment's line once it is paid (an open one could be
            // paid again from its page, so it is never shown).
            if record.status != "paid" {
                return Ok(());
            }
            super::history::record(
                self.docs.as_ref(),
                workspace,
                pi.as_str(),
                record.created,
                self.ledger.clock.now(),
                |e: &mut HistoryEntry| {
                    let before = e.clone();
                    HistoryEntry::fill(&mut e.kind, Some(&MovementKind::TopUp));
                    HistoryEntry::fill(&mut e.payment_intent, Some(&pi));
                    HistoryEntry::fill(&mut e.invoice, Some(&i.id));
                    HistoryEntry::fill(
                        &mut e.hosted_invoice_url,
                        record.hosted_invoice_url.as_ref(),
                    );
                    HistoryEntry::fill(&mut e.invoice_pdf, record.invoice_pdf.as_ref());
                    HistoryEntry::fill(&mut e.tax, tax.as_ref());
                    *e != before
                },
            )
            .await?;
            // Money a credit note of the receipt gives back is the payment's.
            return self.link_receipt(&i.id, &pi, workspace).await;
        }
        super::history::record(
            self.docs.as_ref(),
            workspace,
            i.id.as_str(),
            record.created,
            self.ledger.clock.now(),
            |e: &mut HistoryEntry| {
                let before = e.clone();
                match kind {
                    Some(k) => e.kind = Some(k),
                    None => HistoryEntry::fill(&mut e.kind, Some(&MovementKind::Invoice)),
                }
                if order >= e.status_order {
                    e.set_status(&record.status, order);
                    e.amount = amount;
                    e.tax = tax.or(e.tax);
                    e.hosted_invoice_url = record
                        .hosted_invoice_url
                        .clone()
                        .or(e.hosted_invoice_url.take());
                    e.invoice_pdf = record.invoice_pdf.clone().or(e.invoice_pdf.take());
                    // From the latest record: a draft's or an open one's is nothing yet.
                    e.non_refundable = non_refundable;
                }
                e.invoice = Some(i.id.clone());
                HistoryEntry::fill(&mut e.replaces, replaces.as_ref());
                HistoryEntry::fill(&mut e.subscription, subscription.as_ref());
                HistoryEntry::fill(&mut e.currency, Some(&record.currency));
                HistoryEntry::fill(&mut e.description, description.as_ref());
                HistoryEntry::fill(&mut e.billing_reason, record.billing_reason.as_ref());
                *e != before
            },
        )
        .await?;
        Ok(())
    }

    /// A refund a refund request asked for (its metadata names the request and approval):
    /// its status on the request.
    async fn request_refund_status(&self, r: &objects::Refund) -> Result<(), ConsumeError> {
        if let (Some(request), Some(workspace), Some(status)) = (
            r.metadata.get("refund_request"),
            Self::metadata_workspace(&r.metadata)?,
            r.status.as_deref(),
        ) {
            let attempt = r
                .metadata
                .get("refund_attempt")
                .and_then(|a| a.parse().ok())
                .unwrap_or(1);
            crate::refund_requests::stripe_refund_status(
                self.docs.as_ref(),
                &workspace,
                request,
                attempt,
                &r.id,
                status,
                self.ledger.clock.now(),
            )
            .await?;
        }
        Ok(())
    }

    /// `refund.created`, `refund.updated`, `refund.failed`: the refund's status on its
    /// payment, then the payment followed (its history, its credits).
    pub(super) async fn refund(&self, r: objects::Refund) -> Result<(), ConsumeError> {
        let Some(charge) = r.charge.id() else {
            tracing::warn!(refund = %r.id, "refund names no charge; not recorded");
            return Ok(());
        };
        let record = PaymentRecord {
            currency: r.currency.clone(),
            payment_intent: r.payment_intent.id().cloned(),
            refunds: vec![RefundFact {
                id: r.id.clone(),
                amount: cents(r.amount, "amount", &r.id)?,
                status: r.status.clone(),
                reason: r.reason.clone(),
                created: ts(r.created),
                request: r.metadata.get("refund_request").cloned(),
                attempt: r
                    .metadata
                    .get("refund_attempt")
                    .and_then(|a| a.parse().ok()),
            }],
            ..PaymentRecord::new(charge.clone())
        };
        let merged = docs::update(self.docs.as_ref(), &charge_pk(charge), PAYMENT_SK, |cur| {
            PaymentRecord::merge(cur, record.clone())
        })
        .await?;
        self.request_refund_status(&r).await?;
        let pi = merged
            .and_then(|p| p.payment_intent)
            .or_else(|| r.payment_intent.id().cloned());
        if let Some(pi) = pi {
            self.follow_payment(&pi).await?;
        }
        self.tell_refund_failed(&r).await?;
        Ok(())
    }

    /// A refund of a refund request that failed after it was made (the bank returned it):
    /// the customer was told it is on its way, and is told now that it is not (once,
    /// whichever step failed it; a notice lost before goes now). Last, after everything
    /// else the event brings: a notifications outage retries the event, which finds the
    /// rest done.
    async fn tell_refund_failed(&self, r: &objects::Refund) -> Result<(), ConsumeError> {
        let (Some(queue), Some(request), Some(workspace)) = (
            &self.notifications,
            r.metadata.get("refund_request"),
            Self::metadata_workspace(&r.metadata)?,
        ) else {
            return Ok(());
        };
        crate::refund_requests::tell_failure(
            self.docs.as_ref(),
            queue.as_ref(),
            &workspace,
            request,
        )
        .await
        .map(|_| ())
    }

    /// The subscription facts a paid (or failed) sign-up or renewal invoice carries: the
    /// period and, from its lines, the level it pays for (else the subscription metadata).
    pub(super) async fn subscription_from_invoice(
        &self,
        event: &objects::Event,
        workspace: &WorkspaceId,
        i: &objects::Invoice,
        opens: Option<&Level>,
        status: PlanStatus,
    ) -> Result<(), ConsumeError> {
        let Some(d) = i.subscription_details() else {
            return Ok(());
        };
        let Some(sub) = d.subscription.id() else {
            return Ok(());
        };
        let (plan, interval, addon_units, scheduled, start, end) = match opens {
            Some(l) => (
                l.plan.clone(),
                l.interval,
                l.addon_units,
                None,
                l.period_start.timestamp(),
                l.period_end.timestamp(),
            ),
            None => {
                let Some((start, end)) = i.service_period() else {
                    return Ok(());
                };
                if i.billing_reason.as_deref() == Some("subscription_update")
                    || !d.metadata.contains_key(meta::PLAN)
                {
                    return Ok(());
                }
                let Terms {
                    plan,
                    interval,
                    addon_units,
                    scheduled,
                } = read_terms(&d.metadata, start)?;
                (plan, interval, addon_units, scheduled, start, end)
            }
        };
        let record = SubscriptionRecord {
            id: sub.clone(),
            customer: i.customer.id().cloned(),
            plan,
            interval,
            status,
            // A sign-up invoice that failed leaves the subscription incomplete (Stripe's
            // status while its first invoice is unpaid), not past due.
            stripe_status: match (status, i.billing_reason.as_deref()) {
                (PlanStatus::Active, _) => "active",
                (_, Some("subscription_create")) => "incomplete",
                _ => "past_due",
            }
            .into(),
            cancel_at_period_end: false,
            period_start: ts(start),
            period_end: ts(end),
            addon_units,
            scheduled,
            as_of: event.created,
            as_of_event: event.id.clone(),
            ended_at: None,
            created: None,
            voided_period: None,
            level_as_of: None,
        };
        // Lines are made with the invoice; the subscription's metadata (the terms of a
        // subscription older than Tally's products) is copied when it is finalized.
        let from_lines = opens.is_some()
            && crate::subscriptions::paid::new_period(&super::grants::paid_lines(
                i,
                self.catalog(),
            ))
            .is_some();
        let switch = i.billing_reason.as_deref() == Some("subscription_update");
        let lines_as_of = if from_lines {
            i.created
        } else {
            i.status_transitions
                .as_ref()
                .and_then(|t| t.finalized_at)
                .unwrap_or(i.created)
        };
        self.merge_subscription(event, workspace, record, move |cur, incoming| {
            SubscriptionRecord::merge_invoice_facts(cur, incoming, lines_as_of, switch)
        })
        .await
    }

    pub(super) async fn subscription(
        &self,
        event: &objects::Event,
        s: objects::Subscription,
    ) -> Result<(), ConsumeError> {
        let workspace = match Self::metadata_workspace(&s.metadata)? {
            Some(a) => a,
            None => self
                .customer_workspace(s.customer.id())
                .await?
                .ok_or_else(|| {
                    ConsumeError::retry(format!("no workspace known for subscription {}", s.id))
                })?,
        };
        let (start, end) = s
            .period()
            .ok_or_else(|| poison(format!("subscription {} has no period", s.id)))?;
        // The items are what Stripe bills (whichever door changed them: our API, the
        // customer portal, the dashboard); the metadata is the fallback for subscriptions
        // whose items name no Tally product.
        let (plan, interval, addon_units, scheduled) = match items_terms(&s, self.catalog()) {
            Some((plan, interval, units)) => {
                let scheduled = read_terms(&s.metadata, start)
                    .ok()
                    .and_then(|t| t.scheduled)
                    .filter(|_| s.schedule.as_ref().is_some_and(|v| !v.is_null()));
                (plan, interval, units, scheduled)
            }
            None => {
                let t = read_terms(&s.metadata, start)?;
                (t.plan, t.interval, t.addon_units, t.scheduled)
            }
        };
        if self.catalog().plan(&plan).is_none() {
            return Err(poison(format!("unknown plan {plan:?}")));
        }
        let deleted = event.kind == "customer.subscription.deleted";
        let status = match s.status.as_str() {
            _ if deleted => PlanStatus::Canceled,
            "canceled" | "incomplete_expired" => PlanStatus::Canceled,
            "paused" => PlanStatus::Paused,
            _ if s.pause_collection.as_ref().is_some_and(|p| !p.is_null()) => PlanStatus::Paused,
            "past_due" | "unpaid" | "incomplete" => PlanStatus::PastDue,
            _ => PlanStatus::Active,
        };
        let record = SubscriptionRecord {
            id: s.id.clone(),
            customer: s.customer.id().cloned(),
            plan,
            interval,
            status,
            stripe_status: s.status.clone(),
            cancel_at_period_end: s.cancel_at_period_end,
            period_start: ts(start),
            period_end: ts(end),
            addon_units,
            scheduled,
            as_of: event.created,
            as_of_event: event.id.clone(),
            ended_at: s
                .ended_at
                .filter(|_| status == PlanStatus::Canceled)
                .map(ts),
            created: s.created.map(ts),
            voided_period: None,
            level_as_of: None,
        };
        if let Some(c) = s.customer.id() {
            self.link_customer(c, &workspace).await?;
        }
        // When a cancellation takes effect, for refunds of renewals charged after it.
        let canceled = status == PlanStatus::Canceled;
        docs::update(
            self.docs.as_ref(),
            &workspace_pk(&workspace),
            crate::refund_requests::rules::CANCELLATION_SK,
            |cur| {
                crate::refund_requests::Cancellation::merge(
                    cur,
                    &s.id,
                    canceled,
                    s.cancel_at_period_end,
                    ts(end),
                    event.created,
                )
            },
        )
        .await?;
        self.merge_subscription(event, &workspace, record, SubscriptionRecord::merge)
            .await
    }

    /// A renewal invoice Stripe voided (collection paused, or voided by staff): its period
    /// was never paid, so the subscription document marks it and an active plan in it
    /// gives no benefits until a paid period covers it (see `merge_subscription`).
    pub(super) async fn voided_renewal(
        &self,
        event: &objects::Event,
        workspace: &WorkspaceId,
        i: &objects::Invoice,
    ) -> Result<(), ConsumeError> {
        // Voided before any attempt to collect it, nothing paid: as pausing collection
        // voids a renewal. (One staff void after failed attempts says nothing of the kind:
        // the period may be settled another way.)
        if i.billing_reason.as_deref() != Some("subscription_cycle")
            || i.attempt_count > 0
            || i.amount_paid > 0
        {
            return Ok(());
        }
        let Some(sub) = i
            .subscription_details()
            .and_then(|d| d.subscription.id().cloned())
        else {
            return Ok(());
        };
        let Some((start, _)) = i.service_period() else {
            return Ok(());
        };
        let start = ts(start);
        let Some(current) = docs::get::<SubscriptionRecord>(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            SUBSCRIPTION_SK,
        )
        .await?
        else {
            return Ok(());
        };
        if current.id != sub || current.period_start > start {
            return Ok(());
        }
        // Merged (and the plan set) even when the mark is already there: a delivery again
        // after a failure half way still sets the plan.
        let marked = SubscriptionRecord {
            voided_period: Some(start),
            ..current
        };
        self.merge_subscription(event, workspace, marked, |cur, marked| {
            let p = marked.voided_period?;
            cur?.with_voided_period(&marked.id, p)
        })
        .await
    }

    /// Merges facts into the subscription document, then makes the ledger's plan match it.
    async fn merge_subscription(
        &self,
        event: &objects::Event,
        workspace: &WorkspaceId,
        record: SubscriptionRecord,
        merge: impl Fn(Option<SubscriptionRecord>, SubscriptionRecord) -> Option<SubscriptionRecord>,
    ) -> Result<(), ConsumeError> {
        let merged = docs::update(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            SUBSCRIPTION_SK,
            |cur| merge(cur, record.clone()),
        )
        .await?
        .expect("a merge always leaves a document");
        let mut plan = merged.plan_state();
        // Its first invoice not paid (declined, a card needing authentication, a bank
        // debit still processing): incomplete, or past due still in the period it was
        // created in (nothing has renewed it, so its only invoice is the sign-up's),
        // with no paid period of it on record. Nothing is paid for, so no benefits (the
        // pack discount, custom-model slots) until an invoice is. The paid invoice
        // records its period before it merges here, so neither the order of the events
        // nor which of two in the same second wins the status decides it. A renewal past
        // due keeps them (paid before paid periods were recorded, it has none on record).
        let first_period = merged
            .created
            .is_some_and(|c| merged.period_start <= c + chrono::Duration::days(1));
        if plan.status == PlanStatus::PastDue
            && (merged.stripe_status == "incomplete" || first_period)
            && super::periods::get(self.docs.as_ref(), workspace, &merged.id)
                .await?
                .is_none()
        {
            plan.paid_through = Some(merged.period_start);
        }
        let in_voided_period = matches!(plan.status, PlanStatus::Active | PlanStatus::PastDue)
            && merged.voided_period == Some(merged.period_start);
        if plan.status == PlanStatus::Paused || in_voided_period {
            // Paused, or active in a period whose renewal invoice Stripe voided (resumed
            // after a pause): how far the paid invoices reach decides whether it gives its
            // benefits.
            // A period a change opened (its own invoice not paid) is not paid by the
            // change; without a paid period on record, nothing is covered.
            let paid = crate::refresh::refresh_doc(self.docs.as_ref(), workspace)
                .await?
                .filter(|d| d.subscription == merged.id && d.opened_by.is_none())
                .map(|d| d.period_end);
            plan.paid_through = paid.or(in_voided_period.then_some(merged.period_start));
        }
        let key = format!("stripe:{}:plan", event.id);
        self.ledger
            .execute(LedgerRequest {
                workspace: workspace.clone(),
                key: IdempotencyKey::derived(key.clone()),
                fingerprint: key,
                actor: Actor::new(ActorKind::Stripe, event.id.clone()),
                refs: Refs {
                    stripe_event: Some(event.id.clone()),
                    ..Refs::default()
                },
                op: Operation::SetPlan {
                    plan: Some(plan.clone()),
                },
            })
            .await?;
        self.withdraw_discount(workspace, &plan).await
    }

    /// After the plan is set: a pack checkout priced with more discount than the plan gives
    /// now is expired (see [`super::checkouts`]). Stripe is asked only when such a session
    /// may be open, for at most [`WITHDRAW_BUDGET`](super::checkouts::WITHDRAW_BUDGET). A store error retries the event (every
    /// step before is idempotent); Stripe failing or taking longer is logged and holds
    /// nothing up (an invoice's other steps follow): the record keeps its discount, so a
    /// later subscription event asks again, and a session not expired lapses within its 24
    /// hours.
    async fn withdraw_discount(
        &self,
        workspace: &WorkspaceId,
        plan: &crate::subscriptions::PlanState,
    ) -> Result<(), ConsumeError> {
        use super::checkouts::{WITHDRAW_BUDGET, WithdrawError, Withdrawn, withdraw};
        let Some(stripe) = &self.stripe else {
            return Ok(());
        };
        let now =
            crate::subscriptions::Entitlements::of(Some(plan), self.catalog()).pack_discount_pct;
        match withdraw(
            self.docs.as_ref(),
            stripe.as_ref(),
            workspace,
            now,
            WITHDRAW_BUDGET,
        )
        .await
        {
            Ok(Withdrawn::Expired(n)) => tracing::info!(
                %workspace, expired = n, discount_pct = now,
                "pack checkouts priced with a discount the plan no longer gives were expired"
            ),
            Ok(Withdrawn::Nothing) => {}
            Err(WithdrawError::Store(e)) => return Err(e.into()),
            Err(e @ (WithdrawError::Stripe(_) | WithdrawError::TooSlow(_))) => tracing::error!(
                %workspace, error = %e, discount_pct = now,
                "could not expire pack checkouts priced with a discount the plan no longer gives; \
                 a later subscription event asks again"
            ),
        }
        Ok(())
    }

    pub(super) async fn charge(
        &self,
        event: &objects::Event,
        c: objects::Charge,
    ) -> Result<(), ConsumeError> {
        let workspace = match Self::metadata_workspace(&c.metadata)? {
            Some(a) => Some(
                self.named_workspace(a, c.customer.id(), &format!("charge {}", c.id))
                    .await?,
            ),
            None => match self.customer_workspace(c.customer.id()).await? {
                Some(a) => Some(a),
                // The checkout that links this customer may not have been applied yet.
                None if c.customer.id().is_some() => {
                    return Err(ConsumeError::retry(format!(
                        "no workspace known yet for the customer of charge {}",
                        c.id
                    )));
                }
                None => None,
            },
        };
        let refunds = c
            .refunds
            .as_ref()
            .map(|l| {
                l.data
                    .iter()
                    .map(|r| {
                        Ok(RefundFact {
                            id: r.id.clone(),
                            amount: cents(r.amount, "amount", &r.id)?,
                            status: r.status.clone(),
                            reason: r.reason.clone(),
                            created: ts(r.created),
                            request: r.metadata.get("refund_request").cloned(),
                            attempt: r
                                .metadata
                                .get("refund_attempt")
                                .and_then(|a| a.parse().ok()),
                        })
                    })
                    .collect::<Result<Vec<_>, ConsumeError>>()
            })
            .transpose()?
            .unwrap_or_default();
        let record = PaymentRecord {
            charge: c.id.clone(),
            workspace,
            amount: cents(c.amount, "amount", &c.id)?,
            amount_refunded: cents(c.amount_refunded, "amount_refunded", &c.id)?,
            currency: c.currency.clone(),
            payment_intent: c.payment_intent.id().cloned(),
            created: Some(ts(c.created)),
            refunds,
            disputes: Vec::new(),
            receipt_url: c.receipt_url.clone(),
        };
        // A dispute recorded before the charge named its workspace (delivered out of
        // order) stops auto top-up now.
        let mut disputed_before: Option<String> = None;
        docs::update(
            self.docs.as_ref(),
            &charge_pk(&c.id),
            PAYMENT_SK,
            |cur: Option<PaymentRecord>| {
                disputed_before = cur
                    .as_ref()
                    .filter(|p| p.workspace.is_none())
                    .and_then(|p| p.disputes.first())
                    .map(|d| d.id.to_string());
                PaymentRecord::merge(cur, record.clone())
            },
        )
        .await?;
        if let (Some(ws), Some(dispute)) = (&record.workspace, &disputed_before) {
            crate::alerts::stop_for_dispute(self.docs.as_ref(), ws, dispute).await?;
        }
        // Refunds refund requests asked for: their status on the request (as with
        // `refund.*` events, whichever arrives first).
        for r in c.refunds.as_ref().map_or(&[][..], |l| &l.data[..]) {
            self.request_refund_status(r).await?;
        }
        if event.kind == "charge.refunded" {
            tracing::info!(charge = %c.id, refunded = c.amount_refunded, "refund recorded");
        }
        // A failed attempt is not the payment; the successful charge of the intent is.
        if let (true, Some(pi)) = (
            c.status.as_deref().is_none_or(|s| s == "succeeded"),
            c.payment_intent.id(),
        ) {
            self.link_charge(pi, &c.id).await?;
        }
        // The card of the latest successful payment is the one auto top-up uses. Only a
        // card: auto top-up charges a card off-session, at once (a bank debit would stay
        // `processing` for days, a wallet or a redirect method cannot be charged so).
        // Last, since it may ask Stripe: a retry after an outage finds the rest done.
        let card = c
            .payment_method_details
            .as_ref()
            .and_then(|d| d.kind.as_deref())
            == Some("card");
        if let (Some(a), Some(pm), "charge.succeeded", true) = (
            &record.workspace,
            c.payment_method.id(),
            event.kind.as_str(),
            card,
        ) && self
            .saved_for_top_ups(a, pm, c.customer.id(), c.created)
            .await?
        {
            docs::update(
                self.docs.as_ref(),
                &workspace_pk(a),
                PROFILE_SK,
                |cur: Option<BillingProfile>| {
                    let mut p = cur.unwrap_or_default();
                    // Not older than the saved card's payment, and something new: the
                    // card, or a later payment with it.
                    (p.payment_method_at.is_none_or(|at| at <= c.created)
                        && (p.payment_method.as_ref() != Some(pm)
                            || p.payment_method_at != Some(c.created)))
                    .then(|| {
                        p.payment_method = Some(pm.clone());
                        p.payment_method_at = Some(c.created);
                        p
                    })
                },
            )
            .await?;
        }
        for r in c.refunds.as_ref().map_or(&[][..], |l| &l.data[..]) {
            self.tell_refund_failed(r).await?;
        }
        Ok(())
    }

    /// Whether `card`, paid with by `workspace` at `paid_at`, is to be the card auto top-up
    /// charges: another than the saved one, paid with no earlier than it, and kept by
    /// Stripe for the customer (attached). A card entered once on a hosted invoice page (a
    /// custom payment) is usually not kept (unless the account's invoice settings save
    /// it), and charging it off-session would be refused. Without Stripe configured
    /// nothing is charged off-session anyway, and the card is taken as it comes.
    async fn saved_for_top_ups(
        &self,
        workspace: &WorkspaceId,
        card: &PaymentMethodId,
        paid_by: Option<&CustomerId>,
        paid_at: i64,
    ) -> Result<bool, ConsumeError> {
        let profile: BillingProfile =
            docs::get(self.docs.as_ref(), &workspace_pk(workspace), PROFILE_SK)
                .await?
                .unwrap_or_default();
        if profile.payment_method_at.is_some_and(|at| at > paid_at) {
            return Ok(false);
        }
        // The saved card paid again: only its date moves on.
        if profile.payment_method.as_ref() == Some(card) {
            return Ok(true);
        }
        let Some(stripe) = &self.stripe else {
            return Ok(true);
        };
        // The customer top-ups charge: the workspace's, else the payment's.
        let Some(customer) = profile.customer.as_ref().or(paid_by) else {
            return Ok(false);
        };
        match stripe.card_saved_for(card, customer).await {
            Ok(true) => Ok(true),
            Ok(false) => {
                tracing::info!(workspace = %workspace, card = %card, customer = %customer,
                    "a card not saved for the customer paid; auto top-up keeps the saved one");
                Ok(false)
            }
            // A key that may not read payment methods: retrying would hold the customer's
            // later events back, and only mending the key helps.
            Err(e) if e.is_key_denied() => {
                tracing::error!(workspace = %workspace, card = %card, error = %e,
                    "the Stripe key may not read payment methods; auto top-up keeps the saved card");
                Ok(false)
            }
            Err(e @ PaymentsError::Unavailable { .. }) => Err(ConsumeError::retry(e)),
            Err(e) => {
                tracing::warn!(workspace = %workspace, card = %card, error = %e,
                    "could not read whether the card is saved; auto top-up keeps the saved one");
                Ok(false)
            }
        }
    }

    pub(super) async fn dispute(
        &self,
        event: &objects::Event,
        d: objects::Dispute,
    ) -> Result<(), ConsumeError> {
        let charge = d
            .charge
            .id()
            .ok_or_else(|| poison(format!("dispute {} names no charge", d.id)))?
            .clone();
        let record = PaymentRecord {
            currency: d.currency.clone(),
            disputes: vec![DisputeFact {
                id: d.id.clone(),
                amount: cents(d.amount, "amount", &d.id)?,
                reason: d.reason.clone(),
                status: d.status.clone(),
                created: ts(d.created),
                as_of: event.created,
            }],
            ..PaymentRecord::new(charge.clone())
        };
        // A card whose holder disputes a charge is not charged again off-session: a dispute
        // seen for the first time stops auto top-up (before it is recorded, so a retry
        // after a failure stops it still; a redelivery later, once the owner has saved the
        // settings again, does not). When the charge's workspace is not known yet, its
        // charge event does this.
        let before: Option<PaymentRecord> =
            docs::get(self.docs.as_ref(), &charge_pk(&charge), PAYMENT_SK).await?;
        if let Some(ws) = before
            .as_ref()
            .filter(|p| !p.disputes.iter().any(|x| x.id == d.id))
            .and_then(|p| p.workspace.as_ref())
        {
            crate::alerts::stop_for_dispute(self.docs.as_ref(), ws, d.id.as_str()).await?;
        }
        docs::update(self.docs.as_ref(), &charge_pk(&charge), PAYMENT_SK, |cur| {
            PaymentRecord::merge(cur, record.clone())
        })
        .await?;
        tracing::warn!(charge = %charge, dispute = %d.id, amount = d.amount, "dispute recorded");
        let pi = match d.payment_intent.id() {
            Some(pi) => Some(pi.clone()),
            None => docs::get::<PaymentRecord>(self.docs.as_ref(), &charge_pk(&charge), PAYMENT_SK)
                .await?
                .and_then(|p| p.payment_intent),
        };
        if let Some(pi) = pi {
            // Only a succeeded charge can be disputed, so it is the payment of its intent.
            self.link_charge(&pi, &charge).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_stripe_amounts_poison_the_event() {
        assert_eq!(cents(4900, "amount", &"ch_1").ok(), Some(Cents::new(4900)));
        match cents(-1, "amount_refunded", &"ch_1") {
            Err(ConsumeError::Poison(m)) => {
                assert_eq!(m.to_string(), "amount_refunded of ch_1 is negative (-1)")
            }
            other => panic!("expected poison, got {other:?}"),
        }
    }
}
