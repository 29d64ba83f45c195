//! Stripe facts applied to workspaces: the billing-events worker's logic.
//!
//! Every effect is exactly-once and order-free: credit grants are ledger operations keyed by
//! the Stripe object that paid for them (`stripe:checkout:<session>`,
//! `stripe:invoice:<invoice>:plan`, ...), documents merge by a total order on their facts,
//! and the ledger's plan is re-derived from the merged subscription document each time.

pub mod changes;
pub mod checkouts;
pub mod documents;
pub mod grants;
pub mod history;
pub mod linking;
pub mod objects;
pub mod periods;
pub mod reconcile;
pub mod records;
pub mod refunds;

pub use grants::{CreditGrant, MAX_PACK_QUANTITY};
pub use linking::{Linked, link_customer};

use crate::catalog::Catalog;
use crate::ids::{IdempotencyKey, WorkspaceId};
use crate::ledger::{Actor, ActorKind, Operation, PlanStatus};
use crate::money::Credits;
use crate::queue::{ConsumeError, Consumer, Delivery};
use crate::service::{Ledger, LedgerRequest, ServiceError};
use crate::store::StoreError;
use crate::store::docs::{self, DocStore};
use crate::subscriptions::terms::{Terms, terms};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use records::*;
use std::sync::Arc;
use tracing::Instrument;

/// A grant and what paid for it, for the billing history.
#[derive(Clone, Copy)]
struct Paid<'a> {
    key: &'a str,
    credits: Credits,
    source: crate::ledger::LotSource,
    note: &'a str,
    invoice: Option<&'a crate::ids::InvoiceId>,
    pi: Option<&'a crate::ids::PaymentIntentId>,
}

/// Applies Stripe events from the billing queue.
#[derive(Clone)]
pub struct BillingEvents {
    pub ledger: Ledger,
    pub docs: Arc<dyn DocStore>,
    /// The ledger money going back runs on (refunds, disputes, credit notes, unused time
    /// credited by a change): the same, observed by the observer given to
    /// [`new`](Self::new), one that only alerts. A crossing there must not charge the card
    /// the money went back to, least of all one in a dispute.
    money_back: Ledger,
    /// The Stripe mode this deployment is in (`Some(true)`: live), from its secret key
    /// ([`key_livemode`](crate::payments::stripe_api::key_livemode)): an event from the
    /// other mode (a test endpoint's signing secret among the live ones) is never applied.
    /// `None` checks nothing.
    pub livemode: Option<bool>,
    /// Stripe: to read the lines an invoice event does not carry (its invoice object has
    /// the first ten), and to expire the pack checkouts priced with a discount the plan
    /// stopped giving (canceled, paused, downgraded): otherwise such a session could be
    /// paid at the discount for the rest of its 24 hours. `None` expires nothing, and an
    /// invoice with more lines waits (is retried) until Stripe is configured.
    pub stripe: Option<Arc<dyn crate::payments::Payments>>,
    /// Where customers are told what Stripe's events decided for them (a refund of a
    /// refund request that failed after it was made). `None` tells no one.
    pub notifications: Option<Arc<dyn crate::queue::Queue>>,
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

/// Whether every line of a paid invoice starts before the oldest period kept: it bills
/// time (a change's, or a period cut short by an interval switch) in periods Tally no
/// longer keeps and will not learn of again.
fn outdated(
    invoice: &objects::Invoice,
    known: &[crate::subscriptions::paid::Level],
    catalog: &Catalog,
) -> bool {
    let Some(oldest) = known.iter().map(|l| l.period_start).min() else {
        return false;
    };
    let lines = grants::paid_lines(invoice, catalog);
    !lines.is_empty() && lines.iter().all(|l| l.start < oldest)
}

fn ts(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

fn read_terms(
    m: &std::collections::HashMap<String, String>,
    period_start: i64,
) -> Result<Terms, ConsumeError> {
    terms(m, period_start).map_err(|e| poison(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(event: &objects::Event) -> Result<T, ConsumeError> {
    serde_json::from_value(event.data.object.clone())
        .map_err(|e| poison(format!("{} object of {}: {e}", event.kind, event.id)))
}

/// A paid period as the credit refresh records it.
fn paid_period(
    workspace: &WorkspaceId,
    sub: &crate::ids::SubscriptionId,
    invoice: &crate::ids::InvoiceId,
    level: &crate::subscriptions::paid::Level,
    addon_credits: Option<Credits>,
    catalog: &crate::catalog::Catalog,
) -> crate::refresh::PaidPeriod {
    crate::refresh::PaidPeriod {
        plan_terms: crate::refresh::PlanTerms::of(&level.plan, catalog),
        workspace: workspace.clone(),
        subscription: sub.clone(),
        invoice: invoice.clone(),
        interval: level.interval,
        plan: level.plan.clone(),
        addon_units: level.addon_units,
        addon_credits,
        period_start: level.period_start,
        period_end: level.period_end,
    }
}

/// The billing-events function's two queues: Stripe's events, and the auto top-ups the
/// ledger's observer asks for (told apart by their body).
pub struct BillingWork {
    pub events: BillingEvents,
    pub topups: crate::alerts::TopUps,
}

#[async_trait]
impl Consumer for BillingWork {
    async fn consume(&self, delivery: &Delivery) -> Result<(), ConsumeError> {
        if crate::alerts::TopUpRequest::is_request(&delivery.body) {
            self.topups.consume(delivery).await
        } else {
            self.events.consume(delivery).await
        }
    }
}

#[async_trait]
impl Consumer for BillingEvents {
    async fn consume(&self, delivery: &Delivery) -> Result<(), ConsumeError> {
        let event: objects::Event = serde_json::from_str(&delivery.body)
            .map_err(|e| poison(format!("not a Stripe event: {e}")))?;
        let span = tracing::info_span!("stripe_event", event = %event.id, kind = %event.kind);
        let result = self.apply(&event).instrument(span).await;
        if result.is_ok() {
            // From Stripe creating the event to the ledger having applied it.
            let lag = self.ledger.clock.now().timestamp_millis() - event.created * 1000;
            crate::metrics::Record::new("stripe_event")
                .millis("WebhookToLedgerLag", lag)
                .property("event", event.id.as_str())
                .property("type", event.kind.as_str())
                .emit();
        }
        result
    }
}

impl BillingEvents {
    /// `money_back` observes the operations for money going back (see
    /// [`alerts::alerts_only`](crate::alerts::alerts_only); `None`: nobody does).
    pub fn new(
        ledger: Ledger,
        docs: Arc<dyn DocStore>,
        money_back: Option<Arc<dyn crate::service::CommitObserver>>,
    ) -> Self {
        let mut back = ledger.clone();
        back.observer = money_back;
        Self {
            money_back: back,
            ledger,
            docs,
            livemode: None,
            stripe: None,
            notifications: None,
        }
    }

    fn catalog(&self) -> &Catalog {
        &self.ledger.catalog
    }

    /// Applies one event. Unknown event types are acknowledged and ignored.
    pub async fn apply(&self, event: &objects::Event) -> Result<(), ConsumeError> {
        if let (Some(ours), Some(theirs)) = (self.livemode, event.livemode)
            && ours != theirs
        {
            let mode = |live: bool| if live { "live" } else { "test" };
            return Err(ConsumeError::poison(format!(
                "event {} comes from Stripe's {} mode and this deployment is in {} mode; \
                 not applied (is a signing secret of the other mode configured?)",
                event.id,
                mode(theirs),
                mode(ours)
            )));
        }
        match event.kind.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                self.checkout(event, parse(event)?).await
            }
            "invoice.paid" => {
                let invoice = self.whole_invoice(event).await?;
                let workspace = self.invoice_workspace(&invoice).await?;
                self.record_invoice(event, &workspace, &invoice).await?;
                self.invoice_paid(event, &workspace, &invoice).await
            }
            "invoice.payment_failed" => {
                let invoice = self.whole_invoice(event).await?;
                let workspace = self.invoice_workspace(&invoice).await?;
                self.record_invoice(event, &workspace, &invoice).await?;
                let opens = grants::opened_period(&invoice, self.catalog());
                self.subscription_from_invoice(
                    event,
                    &workspace,
                    &invoice,
                    opens.as_ref(),
                    PlanStatus::PastDue,
                )
                .await
            }
            "invoice.voided" => {
                let invoice = self.whole_invoice(event).await?;
                let workspace = self.invoice_workspace(&invoice).await?;
                self.record_invoice(event, &workspace, &invoice).await?;
                self.voided_renewal(event, &workspace, &invoice).await
            }
            "invoice.created"
            | "invoice.finalized"
            | "invoice.updated"
            | "invoice.marked_uncollectible"
            | "invoice.payment_succeeded" => {
                // Recorded with every line too: the history's non-refundable add-on money
                // comes from them.
                let invoice = self.whole_invoice(event).await?;
                let workspace = self.invoice_workspace(&invoice).await?;
                self.record_invoice(event, &workspace, &invoice).await
            }
            "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted"
            | "customer.subscription.paused"
            | "customer.subscription.resumed" => self.subscription(event, parse(event)?).await,
            "payment_intent.succeeded" => self.top_up(event, parse(event)?).await,
            "invoice_payment.paid" => self.invoice_payment(parse(event)?).await,
            "charge.succeeded" | "charge.refunded" | "charge.updated" => {
                self.charge(event, parse(event)?).await
            }
            "refund.created" | "refund.updated" | "refund.failed" => {
                self.refund(parse(event)?).await
            }
            "credit_note.created" | "credit_note.updated" | "credit_note.voided" => {
                self.credit_note(parse(event)?).await
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

    async fn grant(
        &self,
        event: &objects::Event,
        workspace: &WorkspaceId,
        g: CreditGrant,
    ) -> Result<(), ConsumeError> {
        let paid_by = g.refs.charge.clone();
        let invoice = g.refs.invoice.clone();
        let key = g.key.clone();
        let credits = g.credits;
        let source = g.source;
        let note = g.note.clone();
        let Some(outcome) = self.grant_once(event, workspace, g).await? else {
            return Ok(());
        };
        let pi = paid_by.and_then(|p| crate::ids::PaymentIntentId::parse(&p).ok());
        let paid = Paid {
            key: &key,
            credits,
            source,
            note: &note,
            invoice: invoice.as_ref(),
            pi: pi.as_ref(),
        };
        self.grant_history(event, workspace, &paid).await?;
        // Packs and top-ups name the payment intent that bought them: refunds and disputes
        // of that payment follow the lot.
        if let (Some(pi), Some(lot)) = (&pi, outcome.lot.as_deref()) {
            self.link_lot(
                pi,
                workspace,
                refunds::lot_seq(lot)?,
                credits,
                invoice.as_ref(),
            )
            .await?;
        }
        // Subscription invoices are tied to their payment by `invoice_payment.paid`.
        if let (Some(invoice), Some(lot)) = (invoice, outcome.lot.as_deref()) {
            self.link_invoice_lot(&invoice, workspace, &key, refunds::lot_seq(lot)?, credits)
                .await?;
        }
        Ok(())
    }

    /// The credits a grant gave, on the billing history's line of what paid for them: the
    /// invoice, else the payment intent.
    async fn grant_history(
        &self,
        event: &objects::Event,
        workspace: &WorkspaceId,
        paid: &Paid<'_>,
    ) -> Result<(), ConsumeError> {
        use history::{HistoryEntry, MovementKind};
        let Paid {
            key,
            credits,
            source,
            note,
            invoice,
            pi,
        } = *paid;
        let id = match (invoice, pi) {
            (Some(i), _) => i.to_string(),
            (None, Some(p)) => p.to_string(),
            (None, None) => return Ok(()),
        };
        let kind = match source {
            crate::ledger::LotSource::Pack if key.starts_with("stripe:checkout:") => {
                Some(MovementKind::Pack)
            }
            crate::ledger::LotSource::Pack => Some(MovementKind::TopUp),
            _ => None,
        };
        // Dated when it was paid: a checkout session's own `created` is when its page was
        // opened (up to a day before), its completion is the event's.
        let object = &event.data.object;
        let created = if object.get("object").and_then(serde_json::Value::as_str)
            == Some("checkout.session")
        {
            Some(event.created)
        } else {
            object.get("created").and_then(serde_json::Value::as_i64)
        }
        .map_or(self.ledger.clock.now(), ts);
        history::record(
            self.docs.as_ref(),
            workspace,
            &id,
            created,
            self.ledger.clock.now(),
            |e: &mut HistoryEntry| {
                let before = e.clone();
                if let Some(k) = kind
                    && matches!(e.kind, None | Some(MovementKind::Invoice))
                {
                    e.kind = Some(k);
                }
                if invoice.is_none() {
                    // A payment without an invoice: paid, as its grant shows.
                    e.set_status("succeeded", (2, event.created));
                }
                HistoryEntry::fill(&mut e.invoice, invoice);
                HistoryEntry::fill(&mut e.payment_intent, pi);
                if invoice.is_none() {
                    HistoryEntry::fill(&mut e.description, Some(&note.to_owned()));
                }
                e.granted.insert(key.to_owned(), credits);
                *e != before
            },
        )
        .await?;
        Ok(())
    }

    async fn grant_once(
        &self,
        event: &objects::Event,
        workspace: &WorkspaceId,
        g: CreditGrant,
    ) -> Result<Option<crate::ledger::Outcome>, ConsumeError> {
        let mut refs = g.refs;
        refs.stripe_event = Some(event.id.clone());
        if g.expires_at.is_some_and(|t| t <= self.ledger.clock.now()) {
            // Credits for a period that is already over would lapse at once; the payment
            // stays recorded on its invoice, the ledger gets nothing unusable.
            tracing::warn!(workspace = %workspace, key = %g.key, "credits for an ended period not granted");
            return Ok(None);
        }
        let req = LedgerRequest {
            workspace: workspace.clone(),
            key: IdempotencyKey::derived(g.key.clone()),
            fingerprint: g.key,
            actor: Actor::new(ActorKind::Stripe, event.id.clone()),
            refs,
            op: Operation::Grant {
                month: g.month,
                source: g.source,
                credits: g.credits,
                expires_at: g.expires_at,
                note: Some(g.note),
            },
        };
        Ok(Some(self.ledger.execute(req).await?))
    }

    /// An invoice event's invoice with every line. Stripe's invoice objects carry the first
    /// ten lines and say when there are more; those are read from Stripe (as they are now:
    /// a paid invoice's lines never change, a draft's may). Valuing part of an invoice's
    /// lines as all of them would grant for a change without its credit for unused time,
    /// miss the period a renewal opens, or leave add-on money out of what is
    /// non-refundable.
    async fn whole_invoice(
        &self,
        event: &objects::Event,
    ) -> Result<objects::Invoice, ConsumeError> {
        let mut invoice: objects::Invoice = parse(event)?;
        if !invoice.lines.has_more {
            return Ok(invoice);
        }
        let id = &invoice.id;
        let Some(stripe) = &self.stripe else {
            return Err(ConsumeError::retry(format!(
                "invoice {id} has more lines than event {} carries, and no Stripe key is \
                 configured to read them",
                event.id
            )));
        };
        let lines = match stripe.invoice_lines(id).await {
            Ok(Some(lines)) => lines,
            Ok(None) => return Err(poison(format!("Stripe has no invoice {id}"))),
            Err(e) if e.is_retryable() => return Err(ConsumeError::retry(e)),
            Err(e) => return Err(poison(format!("lines of invoice {id}: {e}"))),
        };
        invoice.lines.data = lines
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()
            .map_err(|e| poison(format!("a line of invoice {id}: {e}")))?;
        invoice.lines.has_more = false;
        Ok(invoice)
    }

    /// A paid invoice: its credits (valued against the paid periods it bills), then the
    /// period it opens or the level a change leads to, then the subscription document.
    /// Grants come first so a retry after a crash still sees the period a change billed.
    async fn invoice_paid(
        &self,
        event: &objects::Event,
        workspace: &WorkspaceId,
        invoice: &objects::Invoice,
    ) -> Result<(), ConsumeError> {
        let sub = invoice
            .subscription_details()
            .and_then(|d| d.subscription.id().cloned());
        let mut known = Vec::new();
        if let Some(sub) = &sub {
            if let Some(doc) = periods::get(self.docs.as_ref(), workspace, sub).await? {
                known = doc.levels();
            }
            // Periods paid before paid periods were recorded: the subscription document.
            if let Some(rec) = docs::get::<SubscriptionRecord>(
                self.docs.as_ref(),
                &workspace_pk(workspace),
                SUBSCRIPTION_SK,
            )
            .await?
            .filter(|r| &r.id == sub)
            {
                known.push(crate::subscriptions::paid::Level {
                    plan: rec.plan.clone(),
                    interval: rec.interval,
                    addon_units: rec.addon_units,
                    period_start: rec.period_start,
                    period_end: rec.period_end,
                });
            }
        }
        let credits = match grants::invoice_grants(invoice, self.catalog(), &known) {
            Err(ConsumeError::Retry(why)) if outdated(invoice, &known, self.catalog()) => {
                return self.outdated_invoice(invoice, workspace, why).await;
            }
            other => other?,
        };
        for grant in credits.grants {
            self.grant(event, workspace, grant).await?;
        }

        // The start of a yearly billing month the change fell in whose credits the credit
        // refresh had not granted yet (its allotment was waiting when the change came).
        let mut month_from = None;
        if let Some(sub) = &sub {
            if let Some(level) = &credits.opens {
                // The credit refresh grants a yearly period's later months from it.
                let (_, addon_credits) = crate::subscriptions::paid::first_month_of_lines(
                    &grants::paid_lines(invoice, self.catalog()),
                    level,
                    self.catalog(),
                );
                let addon_credits = if level.addon_units > 0 && addon_credits == Credits::ZERO {
                    // Units billed on products that are not Tally's (older subscriptions):
                    // as the plan's add-on.
                    crate::subscriptions::paid::first_month_credits(level, self.catalog()).1
                } else {
                    addon_credits
                };
                // A yearly month of the period this one replaces, due and not granted yet
                // (the credit refresh grants it from the replaced period, kept as the new
                // document's `previous`): unused time credited back comes from it. Read
                // before the period is recorded; a retry finds it as `previous`.
                // Only the period this one directly replaced: a `previous` carried from an
                // earlier replacement is not this invoice's to credit. A month dated at the
                // switch itself is the replaced period's, as the kept period's (Stripe
                // credits it as unused).
                let start = level.period_start;
                month_from = crate::refresh::refresh_doc(self.docs.as_ref(), workspace)
                    .await?
                    .and_then(|d| {
                        if &d.subscription == sub && d.period_start == start {
                            d.previous
                                .map(|p| *p)
                                .filter(|p| crate::refresh::kept_until(p, start))
                        } else {
                            Some(d)
                        }
                    })
                    .filter(|d| &d.subscription == sub && d.period_start < start)
                    .and_then(|d| d.waiting_at(start));
                crate::refresh::record_ranked_period(
                    self.docs.as_ref(),
                    &paid_period(
                        workspace,
                        sub,
                        &invoice.id,
                        level,
                        Some(addon_credits),
                        self.catalog(),
                    ),
                    crate::refresh::period_rank(
                        invoice.billing_reason.as_deref(),
                        invoice.number.as_deref(),
                    ),
                    self.ledger.clock.now(),
                )
                .await?;
                periods::open(
                    self.docs.as_ref(),
                    workspace,
                    sub,
                    periods::PaidPeriod {
                        level: level.clone(),
                        invoice: invoice.id.clone(),
                        level_as_of: level.period_start,
                        level_rank: None,
                        rank: crate::refresh::period_rank(
                            invoice.billing_reason.as_deref(),
                            invoice.number.as_deref(),
                        ),
                        parts: Some(crate::refresh::PartsSet::default()),
                    },
                )
                .await?;
                // A refund of this invoice that arrived first shrinks the period's later
                // months now that the period is recorded.
                self.link_invoice(&invoice.id, workspace).await?;
            }
            if let Some((level, at)) = &credits.changes {
                let lines = grants::paid_lines(invoice, self.catalog());
                let billed_addons = lines.iter().any(|l| {
                    l.proration && matches!(l.item, crate::subscriptions::paid::Item::Addon(_))
                });
                let billed = crate::refresh::Billed {
                    plan: lines.iter().any(|l| {
                        l.proration
                            && l.amount > 0
                            && matches!(l.item, crate::subscriptions::paid::Item::Plan(_))
                    }),
                    addon: billed_addons,
                };
                let addon_credits =
                    crate::subscriptions::paid::addon_credits_after_changes(&lines, self.catalog());
                let plan_credits = self
                    .catalog()
                    .plan(&level.plan)
                    .map_or(0, |p| p.monthly_credits.get());
                let rank = change_rank(
                    invoice.number.as_deref(),
                    plan_credits.saturating_mul(1_000_000).saturating_add(
                        addon_credits.map_or(u64::from(level.addon_units), |c| c.get()),
                    ),
                );
                crate::refresh::set_level(
                    self.docs.as_ref(),
                    &paid_period(
                        workspace,
                        sub,
                        &invoice.id,
                        level,
                        addon_credits,
                        self.catalog(),
                    ),
                    *at,
                    rank,
                    billed,
                )
                .await?;
                // A yearly month that fell due before this change and was not granted yet:
                // the credits credited back come from that month's (granted later, at the
                // level of its date). Decided when the change is seen; a retry replays the
                // ledger's first answer.
                month_from = crate::refresh::refresh_doc(self.docs.as_ref(), workspace)
                    .await?
                    .filter(|d| &d.subscription == sub && d.period_start <= *at)
                    .and_then(|d| d.waiting_at(*at));
                periods::change(
                    self.docs.as_ref(),
                    workspace,
                    sub,
                    &invoice.id,
                    level,
                    (*at, rank),
                    billed,
                )
                .await?;
                // A refund of this change's invoice that arrived first lowers the later
                // months now that the change is recorded (even when its own grant was
                // nothing and made no lot).
                self.link_invoice(&invoice.id, workspace).await?;
            }
        }
        if credits.credited > Credits::ZERO {
            // Money back for unused time: its credits follow it out, as far as unspent (of
            // a month not granted yet, from its credits as they are granted).
            let take = credits
                .credited
                .min(Credits::new(crate::money::MAX_CREDITS_PER_REQUEST));
            let key = format!("stripe:invoice:{}:credited", invoice.id);
            let req = LedgerRequest {
                workspace: workspace.clone(),
                key: IdempotencyKey::derived(key.clone()),
                fingerprint: key,
                actor: Actor::new(ActorKind::Stripe, event.id.clone()),
                refs: crate::ledger::Refs {
                    invoice: Some(invoice.id.clone()),
                    stripe_event: Some(event.id.clone()),
                    ..Default::default()
                },
                op: Operation::ChangeCredited {
                    credits: take,
                    month_from,
                    note: format!(
                        "invoice {} credited unused time worth {} credits more than the new time",
                        invoice.id, credits.credited
                    ),
                },
            };
            // Money that went back (to the customer's Stripe balance): no top-up for it.
            self.money_back.execute(req).await?;
        }
        self.subscription_from_invoice(
            event,
            workspace,
            invoice,
            credits.opens.as_ref(),
            PlanStatus::Active,
        )
        .await?;
        if sub.is_some() {
            // What tells a late duplicate from an invoice that stopped half way.
            self.mark_applied(&invoice.id, workspace).await?;
        } else {
            // Any other invoice (one staff made in the dashboard grants nothing, so no lot
            // ties it to the workspace): its refunds and disputes still show on the
            // billing history, which follows the payment through the invoice's workspace.
            self.link_invoice(&invoice.id, workspace).await?;
        }
        Ok(())
    }

    /// A paid invoice billing only periods older than every one kept (a change of a period
    /// two renewals back: Stripe resent by hand, or a dead letter redriven a month on).
    /// Waiting cannot bring its period back. Applied before, every step of it: a duplicate,
    /// acknowledged. Never applied, or stopped half way (its grants made, its take-back of
    /// money credited back not): a person decides, from the dead-letter queue.
    async fn outdated_invoice(
        &self,
        invoice: &objects::Invoice,
        workspace: &WorkspaceId,
        why: crate::error::BoxError,
    ) -> Result<(), ConsumeError> {
        let applied = docs::get::<refunds::InvoiceLots>(
            self.docs.as_ref(),
            &refunds::invoice_lots_pk(&invoice.id),
            refunds::LINK_SK,
        )
        .await?
        .is_some_and(|l| l.applied && l.workspace.as_ref() == Some(workspace));
        if applied {
            tracing::info!(invoice = %invoice.id, "an invoice applied before, delivered again after its period left the ones kept");
            return Ok(());
        }
        Err(poison(format!(
            "invoice {} bills only periods older than the ones kept for its subscription and was \
             not applied in full ({why}); its credits are for a person to decide",
            invoice.id
        )))
    }

    async fn checkout(
        &self,
        event: &objects::Event,
        s: objects::CheckoutSession,
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
                    if p.subscription.as_ref() == Some(sub) {
                        return None;
                    }
                    p.subscription = Some(sub.clone());
                    Some(p)
                },
            )
            .await?;
        }
        if let Some(grant) = grants::checkout_grant(&s, self.catalog())? {
            self.grant(event, &workspace, grant).await?;
        }
        Ok(())
    }

    /// An auto top-up paid off-session: its pack, once per payment intent.
    async fn top_up(
        &self,
        event: &objects::Event,
        pi: objects::PaymentIntent,
    ) -> Result<(), ConsumeError> {
        if !grants::is_top_up(&pi) {
            return Ok(());
        }
        let named = Self::metadata_workspace(&pi.metadata)?
            .ok_or_else(|| poison(format!("top-up {} names no workspace", pi.id)))?;
        let workspace = self
            .named_workspace(named, pi.customer.id(), &format!("top-up {}", pi.id))
            .await?;
        let grant = grants::top_up_grant(&pi, self.catalog())?;
        self.grant(event, &workspace, grant).await
    }
}

/// Orders paid changes made in the same second (their invoices' `created` is the same):
/// Stripe numbers a customer's invoices in sequence (`PREFIX-0001`) as it finalizes them,
/// so the higher number is the later change. Without a number, the richer level (`level`,
/// plan credits then add-ons) counts as later, and any numbered invoice after it.
pub(crate) fn change_rank(number: Option<&str>, level: u64) -> u64 {
    const NUMBERED: u64 = 1 << 62;
    crate::refresh::invoice_rank(number).unwrap_or(level.min(NUMBERED - 1))
}

#[cfg(test)]
mod tests {
    use super::change_rank;

    #[test]
    fn same_second_changes_are_ordered_by_stripes_invoice_numbers_then_by_level() {
        // Stripe's numbering: the later invoice is the later change, whatever its level.
        assert!(
            change_rank(Some("A1B2C3D4-0012"), 6_000_000_000)
                < change_rank(Some("A1B2C3D4-0013"), 150_000_000)
        );
        // Without numbers, the richer level; a numbered invoice counts as after them.
        assert!(change_rank(None, 150_000_000) < change_rank(None, 900_000_000));
        assert!(change_rank(None, u64::MAX) < change_rank(Some("X-0001"), 0));
        assert!(change_rank(Some("no number"), 5) < change_rank(Some("X-0001"), 0));
        assert_eq!(change_rank(Some("no number"), 5), change_rank(None, 5));
    }
}
