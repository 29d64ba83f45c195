//! Stripe facts applied to workspaces: the billing-events worker's logic.
//!
//! Every effect is exactly-once and order-free: credit grants are ledger operations keyed by
//! the Stripe object that paid for them (`stripe:checkout:<session>`,
//! `stripe:invoice:<invoice>:plan`, ...), documents merge by a total order on their facts,
//! and the ledger's plan is re-derived from the merged subscription document each time.

pub mod records;
pub mod stripe;

use crate::catalog::Catalog;
use crate::ids::{IdempotencyKey, WorkspaceId};
use crate::ledger::{Actor, ActorKind, Interval, LotSource, Operation, PlanStatus, Refs};
use crate::money::Credits;
use crate::queue::{ConsumeError, Consumer, Delivery};
use crate::service::{Ledger, LedgerRequest, ServiceError};
use crate::store::StoreError;
use crate::store::docs::{self, DocStore};
use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use records::*;
use std::sync::Arc;

/// Most packs one checkout may buy.
pub const MAX_PACK_QUANTITY: u64 = 100;

/// Credits one Stripe object paid for, under a key derived from that object.
struct CreditGrant {
    key: String,
    source: LotSource,
    credits: u64,
    expires_at: Option<DateTime<Utc>>,
    refs: Refs,
    note: String,
}

/// Applies Stripe events from the billing queue.
#[derive(Clone)]
pub struct BillingEvents {
    pub ledger: Ledger,
    pub docs: Arc<dyn DocStore>,
}

impl From<StoreError> for ConsumeError {
    fn from(e: StoreError) -> Self {
        ConsumeError::retry(e)
    }
}

impl From<ServiceError> for ConsumeError {
    fn from(e: ServiceError) -> Self {
        if e.is_retryable() {
            ConsumeError::retry(e)
        } else {
            ConsumeError::poison(e)
        }
    }
}

fn poison(what: impl Into<String>) -> ConsumeError {
    ConsumeError::poison(Into::<String>::into(what))
}

fn ts(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

fn parse<T: serde::de::DeserializeOwned>(event: &stripe::Event) -> Result<T, ConsumeError> {
    serde_json::from_value(event.data.object.clone())
        .map_err(|e| poison(format!("{} object of {}: {e}", event.kind, event.id)))
}

#[async_trait]
impl Consumer for BillingEvents {
    async fn consume(&self, delivery: &Delivery) -> Result<(), ConsumeError> {
        let event: stripe::Event = serde_json::from_str(&delivery.body)
            .map_err(|e| poison(format!("not a Stripe event: {e}")))?;
        let span = tracing::info_span!("stripe_event", event = %event.id, kind = %event.kind);
        let _enter = span.enter();
        self.apply(&event).await
    }
}

impl BillingEvents {
    pub fn new(ledger: Ledger, docs: Arc<dyn DocStore>) -> Self {
        Self { ledger, docs }
    }

    fn catalog(&self) -> &Catalog {
        &self.ledger.catalog
    }

    /// Applies one event. Unknown event types are acknowledged and ignored.
    pub async fn apply(&self, event: &stripe::Event) -> Result<(), ConsumeError> {
        match event.kind.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                self.checkout(event, parse(event)?).await
            }
            "invoice.paid" => {
                let invoice: stripe::Invoice = parse(event)?;
                let workspace = self.invoice_workspace(&invoice).await?;
                self.record_invoice(event, &workspace, &invoice).await?;
                self.subscription_from_invoice(event, &workspace, &invoice, PlanStatus::Active)
                    .await?;
                self.grant_invoice_credits(event, &workspace, &invoice)
                    .await
            }
            "invoice.payment_failed" => {
                let invoice: stripe::Invoice = parse(event)?;
                let workspace = self.invoice_workspace(&invoice).await?;
                self.record_invoice(event, &workspace, &invoice).await?;
                self.subscription_from_invoice(event, &workspace, &invoice, PlanStatus::PastDue)
                    .await
            }
            "invoice.created"
            | "invoice.finalized"
            | "invoice.updated"
            | "invoice.voided"
            | "invoice.marked_uncollectible"
            | "invoice.payment_succeeded" => {
                let invoice: stripe::Invoice = parse(event)?;
                let workspace = self.invoice_workspace(&invoice).await?;
                self.record_invoice(event, &workspace, &invoice).await
            }
            "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted"
            | "customer.subscription.paused"
            | "customer.subscription.resumed" => self.subscription(event, parse(event)?).await,
            "payment_intent.succeeded" => self.top_up(event, parse(event)?).await,
            "charge.succeeded" | "charge.refunded" | "charge.updated" => {
                self.charge(event, parse(event)?).await
            }
            "charge.dispute.created" | "charge.dispute.updated" | "charge.dispute.closed" => {
                self.dispute(event, parse(event)?).await
            }
            other => {
                tracing::debug!(kind = other, "event type not used");
                Ok(())
            }
        }
    }

    /// Links a Stripe customer to a workspace (first link wins; a conflicting one is
    /// refused loudly and left alone).
    async fn link_customer(
        &self,
        customer: &str,
        workspace: &WorkspaceId,
    ) -> Result<(), ConsumeError> {
        link_customer(self.docs.as_ref(), customer, workspace).await?;
        Ok(())
    }

    async fn customer_workspace(
        &self,
        customer: Option<&str>,
    ) -> Result<Option<WorkspaceId>, ConsumeError> {
        let Some(c) = customer else { return Ok(None) };
        Ok(
            docs::get::<Link>(self.docs.as_ref(), &customer_pk(c), LINK_SK)
                .await?
                .map(|l| l.workspace),
        )
    }

    fn metadata_workspace(
        meta: &std::collections::HashMap<String, String>,
    ) -> Result<Option<WorkspaceId>, ConsumeError> {
        meta.get("org_id")
            .map(|o| WorkspaceId::parse(o).map_err(|e| poison(format!("metadata org_id: {e}"))))
            .transpose()
    }

    async fn invoice_workspace(
        &self,
        invoice: &stripe::Invoice,
    ) -> Result<WorkspaceId, ConsumeError> {
        if let Some(a) = Self::metadata_workspace(&invoice.metadata)? {
            return Ok(a);
        }
        if let Some(d) = invoice.subscription_details()
            && let Some(a) = Self::metadata_workspace(&d.metadata)?
        {
            return Ok(a);
        }
        self.customer_workspace(invoice.customer.id())
            .await?
            .ok_or_else(|| {
                ConsumeError::retry(format!("no workspace known for invoice {}", invoice.id))
            })
    }

    async fn grant(
        &self,
        event: &stripe::Event,
        workspace: &WorkspaceId,
        g: CreditGrant,
    ) -> Result<(), ConsumeError> {
        let mut refs = g.refs;
        refs.stripe_event = Some(event.id.clone());
        if g.expires_at.is_some_and(|t| t <= self.ledger.clock.now()) {
            // Credits for a period that is already over would lapse at once; the payment
            // stays recorded on its invoice, the ledger gets nothing unusable.
            tracing::warn!(workspace = %workspace, key = %g.key, "credits for an ended period not granted");
            return Ok(());
        }
        let req = LedgerRequest {
            workspace: workspace.clone(),
            key: IdempotencyKey::derived(g.key.clone()),
            fingerprint: g.key,
            actor: Actor::new(ActorKind::Stripe, event.id.clone()),
            refs,
            op: Operation::Grant {
                source: g.source,
                credits: Credits::new(g.credits),
                expires_at: g.expires_at,
                note: Some(g.note),
            },
        };
        self.ledger.execute(req).await?;
        Ok(())
    }

    async fn checkout(
        &self,
        event: &stripe::Event,
        s: stripe::CheckoutSession,
    ) -> Result<(), ConsumeError> {
        let workspace = match Self::metadata_workspace(&s.metadata)? {
            Some(a) => a,
            None => match s.client_reference_id.as_deref().map(WorkspaceId::parse) {
                Some(Ok(a)) => a,
                _ => {
                    tracing::warn!(session = %s.id, "checkout session without a workspace; not ours");
                    return Ok(());
                }
            },
        };
        if let Some(c) = s.customer.id() {
            self.link_customer(c, &workspace).await?;
        }
        if let Some(sub) = s.subscription.id() {
            docs::update(
                self.docs.as_ref(),
                &workspace_pk(&workspace),
                PROFILE_SK,
                |cur: Option<BillingProfile>| {
                    let mut p = cur.unwrap_or_default();
                    if p.subscription.as_deref() == Some(sub) {
                        return None;
                    }
                    p.subscription = Some(sub.to_owned());
                    Some(p)
                },
            )
            .await?;
        }
        let paid = matches!(
            s.payment_status.as_deref(),
            Some("paid" | "no_payment_required")
        );
        if s.mode.as_deref() == Some("payment")
            && s.metadata.get("kind").map(String::as_str) == Some("pack")
        {
            if !paid {
                tracing::info!(session = %s.id, "pack checkout not paid yet; waiting for async payment");
                return Ok(());
            }
            let pack_id = s
                .metadata
                .get("pack")
                .ok_or_else(|| poison("pack checkout without pack"))?;
            let pack = self
                .catalog()
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
            let refs = Refs {
                invoice: s.invoice.id().map(str::to_owned),
                charge: s.payment_intent.id().map(str::to_owned),
                ..Refs::default()
            };
            self.grant(
                event,
                &workspace,
                CreditGrant {
                    key: format!("stripe:checkout:{}", s.id),
                    source: LotSource::Pack,
                    credits: pack.credits * quantity,
                    expires_at: None,
                    refs,
                    note: format!("{quantity} x {} ({} credits)", pack.id, pack.credits),
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn record_invoice(
        &self,
        event: &stripe::Event,
        workspace: &WorkspaceId,
        i: &stripe::Invoice,
    ) -> Result<(), ConsumeError> {
        let record = InvoiceRecord {
            id: i.id.clone(),
            number: i.number.clone(),
            status: i.status.clone().unwrap_or_else(|| "draft".into()),
            billing_reason: i.billing_reason.clone(),
            amount_due: i.amount_due,
            amount_paid: i.amount_paid,
            amount_remaining: i.amount_remaining,
            total: i.total,
            currency: i.currency.clone().unwrap_or_else(|| "usd".into()),
            hosted_invoice_url: i.hosted_invoice_url.clone(),
            invoice_pdf: i.invoice_pdf.clone(),
            created: ts(i.created),
            paid_at: i
                .status_transitions
                .as_ref()
                .and_then(|t| t.paid_at)
                .map(ts),
            subscription: i
                .subscription_details()
                .and_then(|d| d.subscription.id().map(str::to_owned)),
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
        Ok(())
    }

    /// Plan and add-on credits for the period an invoice pays, once per invoice.
    async fn grant_invoice_credits(
        &self,
        event: &stripe::Event,
        workspace: &WorkspaceId,
        i: &stripe::Invoice,
    ) -> Result<(), ConsumeError> {
        let refs = Refs {
            invoice: Some(i.id.clone()),
            ..Refs::default()
        };
        match i.billing_reason.as_deref() {
            Some("subscription_create" | "subscription_cycle") => {}
            Some("manual")
                if i.metadata.get("kind").map(String::as_str) == Some("custom_payment") =>
            {
                let credits: u64 = i
                    .metadata
                    .get("credits")
                    .and_then(|c| c.parse().ok())
                    .filter(|c| *c > 0 && *c <= crate::money::MAX_CREDITS_PER_REQUEST)
                    .ok_or_else(|| poison("custom payment invoice without valid credits"))?;
                return self
                    .grant(
                        event,
                        workspace,
                        CreditGrant {
                            key: format!("stripe:invoice:{}:custom", i.id),
                            source: LotSource::Pack,
                            credits,
                            expires_at: None,
                            refs,
                            note: "custom payment".into(),
                        },
                    )
                    .await;
            }
            _ => return Ok(()),
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
        let (plan_id, _, units, _) = terms(&details.metadata, start)?;
        let plan = self
            .catalog()
            .plan(&plan_id)
            .ok_or_else(|| poison(format!("unknown plan {plan_id:?}")))?
            .clone();
        let (start, end) = (ts(start), ts(end));
        // Yearly plans get a month's allowance per month; this invoice carries the first.
        let month_end = end.min(start + Duration::days(31));
        self.grant(
            event,
            workspace,
            CreditGrant {
                key: format!("stripe:invoice:{}:plan", i.id),
                source: LotSource::PlanPeriod,
                credits: plan.monthly_credits,
                expires_at: Some(month_end + Duration::days(plan.rollover_days as i64)),
                refs: refs.clone(),
                note: format!("{} plan credits", plan.name),
            },
        )
        .await?;
        let units = units as u64;
        if units > 0 {
            let addon = self
                .catalog()
                .addon(&plan.addon)
                .ok_or_else(|| poison("plan add-on missing from catalog"))?;
            self.grant(
                event,
                workspace,
                CreditGrant {
                    key: format!("stripe:invoice:{}:addon", i.id),
                    source: LotSource::Addon,
                    credits: units * addon.credits_per_unit,
                    expires_at: Some(month_end),
                    refs,
                    note: format!("{units} add-on unit(s)"),
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn subscription_from_invoice(
        &self,
        event: &stripe::Event,
        workspace: &WorkspaceId,
        i: &stripe::Invoice,
        status: PlanStatus,
    ) -> Result<(), ConsumeError> {
        let Some(d) = i.subscription_details() else {
            return Ok(());
        };
        let (Some(sub), Some((start, end))) = (d.subscription.id(), i.service_period()) else {
            return Ok(());
        };
        if i.billing_reason.as_deref() == Some("subscription_update")
            || !d.metadata.contains_key(meta::PLAN)
        {
            return Ok(());
        }
        let (plan, interval, addon_units, scheduled) = terms(&d.metadata, start)?;
        let record = SubscriptionRecord {
            id: sub.to_owned(),
            customer: i.customer.id().map(str::to_owned),
            plan,
            interval,
            status,
            stripe_status: if status == PlanStatus::Active {
                "active"
            } else {
                "past_due"
            }
            .into(),
            cancel_at_period_end: false,
            period_start: ts(start),
            period_end: ts(end),
            addon_units,
            scheduled,
            as_of: event.created,
            as_of_event: event.id.clone(),
        };
        self.merge_subscription(
            event,
            workspace,
            record,
            SubscriptionRecord::merge_invoice_facts,
        )
        .await
    }

    async fn subscription(
        &self,
        event: &stripe::Event,
        s: stripe::Subscription,
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
        let (plan, interval, addon_units, scheduled) = terms(&s.metadata, start)?;
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
            customer: s.customer.id().map(str::to_owned),
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
        };
        if let Some(c) = s.customer.id() {
            self.link_customer(c, &workspace).await?;
        }
        self.merge_subscription(event, &workspace, record, SubscriptionRecord::merge)
            .await
    }

    /// Merges facts into the subscription document, then makes the ledger's plan match it.
    async fn merge_subscription(
        &self,
        event: &stripe::Event,
        workspace: &WorkspaceId,
        record: SubscriptionRecord,
        merge: fn(Option<SubscriptionRecord>, SubscriptionRecord) -> Option<SubscriptionRecord>,
    ) -> Result<(), ConsumeError> {
        let merged = docs::update(
            self.docs.as_ref(),
            &workspace_pk(workspace),
            SUBSCRIPTION_SK,
            |cur| merge(cur, record.clone()),
        )
        .await?
        .expect("a merge always leaves a document");
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
                    plan: Some(merged.plan_state()),
                },
            })
            .await?;
        Ok(())
    }

    async fn charge(&self, event: &stripe::Event, c: stripe::Charge) -> Result<(), ConsumeError> {
        let workspace = match Self::metadata_workspace(&c.metadata)? {
            Some(a) => Some(a),
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
                    .map(|r| RefundFact {
                        id: r.id.clone(),
                        amount: r.amount,
                        status: r.status.clone(),
                        reason: r.reason.clone(),
                        created: ts(r.created),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let record = PaymentRecord {
            charge: c.id.clone(),
            workspace,
            amount: c.amount,
            amount_refunded: c.amount_refunded,
            currency: c.currency.clone(),
            payment_intent: c.payment_intent.id().map(str::to_owned),
            created: Some(ts(c.created)),
            refunds,
            disputes: Vec::new(),
        };
        docs::update(self.docs.as_ref(), &charge_pk(&c.id), PAYMENT_SK, |cur| {
            PaymentRecord::merge(cur, record.clone())
        })
        .await?;
        // The card of the latest successful payment is the one auto top-up uses.
        if let (Some(a), Some(pm), "charge.succeeded") = (
            &record.workspace,
            c.payment_method.id(),
            event.kind.as_str(),
        ) {
            docs::update(
                self.docs.as_ref(),
                &workspace_pk(a),
                PROFILE_SK,
                |cur: Option<BillingProfile>| {
                    let mut p = cur.unwrap_or_default();
                    (p.payment_method.as_deref() != Some(pm)).then(|| {
                        p.payment_method = Some(pm.to_owned());
                        p
                    })
                },
            )
            .await?;
        }
        if event.kind == "charge.refunded" {
            tracing::info!(charge = %c.id, refunded = c.amount_refunded, "refund recorded");
        }
        Ok(())
    }

    /// An auto top-up paid off-session: its pack, once per payment intent. (Checkout's own
    /// payment intents carry no `topup` flag; their credits come with the checkout session.)
    async fn top_up(
        &self,
        event: &stripe::Event,
        pi: stripe::PaymentIntent,
    ) -> Result<(), ConsumeError> {
        if pi.metadata.get("topup").map(String::as_str) != Some("true")
            || pi.metadata.get("kind").map(String::as_str) != Some("pack")
        {
            return Ok(());
        }
        let workspace = Self::metadata_workspace(&pi.metadata)?
            .ok_or_else(|| poison(format!("top-up {} names no workspace", pi.id)))?;
        let pack_id = pi
            .metadata
            .get("pack")
            .ok_or_else(|| poison("top-up without pack"))?;
        let pack = self
            .catalog()
            .pack(pack_id)
            .ok_or_else(|| poison(format!("unknown pack {pack_id:?}")))?;
        self.grant(
            event,
            &workspace,
            CreditGrant {
                key: format!("stripe:payment_intent:{}", pi.id),
                source: LotSource::Pack,
                credits: pack.credits,
                expires_at: None,
                refs: Refs {
                    charge: Some(pi.id.clone()),
                    ..Refs::default()
                },
                note: format!("auto top-up: {} ({} credits)", pack.id, pack.credits),
            },
        )
        .await
    }

    async fn dispute(&self, event: &stripe::Event, d: stripe::Dispute) -> Result<(), ConsumeError> {
        let charge = d
            .charge
            .id()
            .ok_or_else(|| poison(format!("dispute {} names no charge", d.id)))?
            .to_owned();
        let record = PaymentRecord {
            charge: charge.clone(),
            currency: d.currency.clone(),
            disputes: vec![DisputeFact {
                id: d.id.clone(),
                amount: d.amount,
                reason: d.reason.clone(),
                status: d.status.clone(),
                created: ts(d.created),
                as_of: event.created,
            }],
            ..PaymentRecord::default()
        };
        docs::update(self.docs.as_ref(), &charge_pk(&charge), PAYMENT_SK, |cur| {
            PaymentRecord::merge(cur, record.clone())
        })
        .await?;
        tracing::warn!(charge = %charge, dispute = %d.id, amount = d.amount, "dispute recorded");
        Ok(())
    }
}

/// Links a Stripe customer to a workspace and records it on the workspace's billing
/// profile. The first link wins; a conflicting later claim is refused loudly and left
/// alone. Returns the customer the profile names afterwards.
pub async fn link_customer(
    docs_store: &dyn DocStore,
    customer: &str,
    workspace: &WorkspaceId,
) -> Result<String, StoreError> {
    let linked = docs::update(
        docs_store,
        &customer_pk(customer),
        LINK_SK,
        |cur: Option<Link>| {
            cur.is_none().then(|| Link {
                workspace: workspace.clone(),
            })
        },
    )
    .await?;
    if let Some(l) = linked
        && &l.workspace != workspace
    {
        tracing::error!(customer, linked = %l.workspace, claimed = %workspace,
            "Stripe customer already belongs to another workspace; ignoring the new claim");
    }
    let profile = docs::update(
        docs_store,
        &workspace_pk(workspace),
        PROFILE_SK,
        |cur: Option<BillingProfile>| {
            let mut p = cur.unwrap_or_default();
            if p.customer.is_some() {
                return None;
            }
            p.customer = Some(customer.to_owned());
            Some(p)
        },
    )
    .await?;
    Ok(profile
        .and_then(|p| p.customer)
        .unwrap_or_else(|| customer.to_owned()))
}

/// Metadata keys Tally keeps on a Stripe subscription.
pub mod meta {
    pub const WORKSPACE: &str = "org_id";
    pub const PLAN: &str = "plan";
    pub const INTERVAL: &str = "interval";
    pub const ADDON_UNITS: &str = "addon_units";
    pub const SCHEDULED_PLAN: &str = "scheduled_plan";
    pub const SCHEDULED_INTERVAL: &str = "scheduled_interval";
    pub const SCHEDULED_ADDON_UNITS: &str = "scheduled_addon_units";
    /// Unix time (the renewal) from which the scheduled terms apply.
    pub const SCHEDULED_FROM: &str = "scheduled_from";
}

/// What a subscription's metadata says applies to the period starting at `period_start`:
/// scheduled terms once their time has come, the current ones before (and what is
/// scheduled, for display).
pub fn terms(
    m: &std::collections::HashMap<String, String>,
    period_start: i64,
) -> Result<(String, Interval, u32, Option<ScheduledChange>), ConsumeError> {
    let plan = m
        .get(meta::PLAN)
        .cloned()
        .ok_or_else(|| poison("subscription metadata names no plan"))?;
    let interval = interval_of(m.get(meta::INTERVAL).map(String::as_str));
    let units: u32 = m
        .get(meta::ADDON_UNITS)
        .map_or(Ok(0), |u| u.parse())
        .map_err(|_| poison("addon_units is not a number"))?;
    let Some(from) = m
        .get(meta::SCHEDULED_FROM)
        .and_then(|f| f.parse::<i64>().ok())
    else {
        return Ok((plan, interval, units, None));
    };
    let next_plan = m
        .get(meta::SCHEDULED_PLAN)
        .cloned()
        .unwrap_or_else(|| plan.clone());
    let next_interval = m
        .get(meta::SCHEDULED_INTERVAL)
        .map_or(interval, |i| interval_of(Some(i)));
    let next_units = m
        .get(meta::SCHEDULED_ADDON_UNITS)
        .and_then(|u| u.parse().ok())
        .unwrap_or(units);
    if period_start >= from {
        Ok((next_plan, next_interval, next_units, None))
    } else {
        Ok((
            plan,
            interval,
            units,
            Some(ScheduledChange {
                plan: next_plan,
                interval: next_interval,
                addon_units: next_units,
                from: ts(from),
            }),
        ))
    }
}

fn interval_of(s: Option<&str>) -> Interval {
    match s {
        Some("year" | "yearly") => Interval::Yearly,
        _ => Interval::Monthly,
    }
}
