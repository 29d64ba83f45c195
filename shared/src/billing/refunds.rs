//! Credits follow money back out: a refunded payment takes back the unspent part of the lot
//! it bought, a disputed one freezes it until the dispute closes.
//!
//! Three facts arrive in any order: the grant of the lot (keyed by the payment intent that
//! paid for it), the charge (which names its payment intent and carries the cumulative
//! `amount_refunded`), and the dispute. Each is written to the payment's link document and
//! then [`BillingEvents::follow_payment`] runs; it acts only once all it needs is known, and
//! every ledger effect is keyed by what caused it, so redeliveries change nothing.
//!
//! A refund of `r` cents when `u` cents of the payment were not yet refunded takes `r / u`
//! of the lot's free credits (rounded down): the unspent credits are attributed evenly to the
//! money not yet given back, so refunds add up to at most everything unspent, and the part
//! of the refunded money whose credits were already spent is written on the journal entry.
//! Credits reserved by running generations are not touched (they may be spent).

use super::history::{self, HistoryEntry, MovementKind};
use super::records::{PAYMENT_SK, PaymentRecord, charge_pk, refund_rank};
use super::{BillingEvents, poison};
use crate::ids::{ChargeId, IdempotencyKey, InvoiceId, PaymentIntentId, WorkspaceId};
use crate::ledger::{Actor, ActorKind, Operation, Refs, Share};
use crate::money::{Cents, Credits};
use crate::queue::ConsumeError;
use crate::service::LedgerRequest;
use crate::store::docs;
use serde::{Deserialize, Serialize};

/// What a payment intent paid for and how far its refunds have been followed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentLink {
    pub workspace: Option<WorkspaceId>,
    /// The lot its grant created (`lot_<seq>`), with the credits it started with.
    pub lot: Option<u64>,
    #[serde(default)]
    pub credits: Credits,
    /// The successful charge of the payment intent.
    pub charge: Option<ChargeId>,
    /// The invoice the payment intent paid (subscription sign-ups, renewals, changes).
    #[serde(default)]
    pub invoice: Option<InvoiceId>,
    /// A paid invoice documenting the payment without being paid by it (an auto top-up's
    /// receipt, paid out of band): its credit notes give back this payment's money.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<InvoiceId>,
}

/// The lots an invoice's grants created (a plan's month, add-on units, a change), at most
/// a handful, and the payment intent that paid it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLots {
    pub workspace: Option<WorkspaceId>,
    /// (grant key, lot sequence number, credits granted)
    pub lots: Vec<(String, u64, Credits)>,
    pub payment_intent: Option<PaymentIntentId>,
    /// Every step of the paid subscription invoice done: its grants, the period or change
    /// it records, and the take-back of money credited back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub applied: bool,
}

/// The credit notes of a paid invoice that gave money back without a refund (to the
/// customer's Stripe balance, or outside Stripe), by credit note id: (cents, voided).
/// Staff make them in Stripe's dashboard, one at a time; a reissue's own note is not kept.
/// Notes on a reissue's replacement are kept on the original, whose payment they follow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditNotes {
    pub notes: std::collections::BTreeMap<String, (u64, bool)>,
}

impl CreditNotes {
    /// Cents the notes gave back, voided ones included: credits a note took back stay
    /// taken when it is voided (the ledger never gives back what it took for money given
    /// back), so the money stays counted as given back with them.
    pub fn credited(&self) -> u64 {
        self.notes
            .values()
            .fold(0u64, |a, (c, _)| a.saturating_add(*c))
    }
}

/// Why money paid for `invoice` (or for the original a replacement stands for) partly went
/// back, if it did: refunded, credited by a note, or contested in a dispute still open or
/// lost. The payment is the one recorded as paying the invoice (a top-up receipt's, the
/// payment it documents).
pub async fn money_gone_back(
    docs: &dyn docs::DocStore,
    invoice: &InvoiceId,
) -> Result<Option<&'static str>, crate::store::StoreError> {
    // A replacement's payment facts are on its original (reissued at most a few times).
    let mut invoice = invoice.clone();
    for _ in 0..20 {
        match docs::get::<ReissueLink>(docs, &reissue_pk(&invoice), LINK_SK)
            .await?
            .and_then(|l| l.original)
        {
            Some(original) => invoice = original,
            None => break,
        }
    }
    if credited(docs, &invoice).await? > 0 {
        return Ok(Some("credited by a credit note"));
    }
    let Some(pi) = docs::get::<InvoiceLots>(docs, &invoice_lots_pk(&invoice), LINK_SK)
        .await?
        .and_then(|l| l.payment_intent)
    else {
        return Ok(None);
    };
    let Some(charge) = docs::get::<PaymentLink>(docs, &payment_pk(&pi), LINK_SK)
        .await?
        .and_then(|l| l.charge)
    else {
        return Ok(None);
    };
    let Some(payment) = docs::get::<PaymentRecord>(docs, &charge_pk(&charge), PAYMENT_SK).await?
    else {
        return Ok(None);
    };
    if payment.amount_refunded.get() > 0 {
        return Ok(Some("refunded"));
    }
    let contested = payment.disputes.iter().any(|d| {
        let status = payment.dispute_status(d);
        dispute_open(status) || status == "lost"
    });
    Ok(contested.then_some("disputed"))
}

/// A reissue's replacement invoice names its original (`REISSUE#<replacement>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReissueLink {
    pub original: Option<InvoiceId>,
}

pub fn reissue_pk(replacement: &InvoiceId) -> String {
    format!("REISSUE#{replacement}")
}

/// The cents the credit notes of `invoice` gave back without a refund.
pub async fn credited(
    docs: &dyn docs::DocStore,
    invoice: &InvoiceId,
) -> Result<u64, crate::store::StoreError> {
    Ok(
        docs::get::<CreditNotes>(docs, &credit_notes_pk(invoice), LINK_SK)
            .await?
            .map_or(0, |d| d.credited()),
    )
}

/// More credit notes than this on one invoice go to a person (the document stays small).
pub const MAX_CREDIT_NOTES: usize = 100;

pub fn credit_notes_pk(invoice: &InvoiceId) -> String {
    format!("CREDIT_NOTES#{invoice}")
}

pub fn invoice_lots_pk(invoice: &InvoiceId) -> String {
    format!("INVOICE_LOTS#{invoice}")
}

pub fn payment_pk(pi: &PaymentIntentId) -> String {
    format!("PI#{pi}")
}
pub const LINK_SK: &str = "LINK";

/// Sets something on a link document once (`set` answers whether it changed anything).
async fn link<T>(
    docs: &dyn docs::DocStore,
    pk: &str,
    mut set: impl FnMut(&mut T) -> bool,
) -> Result<(), ConsumeError>
where
    T: Default + Clone + Serialize + serde::de::DeserializeOwned,
{
    docs::update(docs, pk, LINK_SK, |cur: Option<T>| {
        let mut l = cur.unwrap_or_default();
        set(&mut l).then_some(l)
    })
    .await?;
    Ok(())
}

/// Records that `pi` paid `invoice` (or, for a receipt, is the payment it documents).
async fn paid_by(
    docs: &dyn docs::DocStore,
    invoice: &InvoiceId,
    pi: &PaymentIntentId,
) -> Result<(), ConsumeError> {
    link(docs, &invoice_lots_pk(invoice), |l: &mut InvoiceLots| {
        l.payment_intent.is_none() && {
            l.payment_intent = Some(pi.clone());
            true
        }
    })
    .await
}

/// Dispute states in which the money is still contested.
pub(crate) fn dispute_open(status: &str) -> bool {
    matches!(
        status,
        "needs_response" | "under_review" | "warning_needs_response" | "warning_under_review"
    )
}

impl BillingEvents {
    /// Records that the lot `lot` (of `credits`) was bought by `pi`, then follows the payment.
    pub(super) async fn link_lot(
        &self,
        pi: &PaymentIntentId,
        workspace: &WorkspaceId,
        lot: u64,
        credits: Credits,
        invoice: Option<&InvoiceId>,
    ) -> Result<(), ConsumeError> {
        link(
            self.docs.as_ref(),
            &payment_pk(pi),
            |l: &mut PaymentLink| {
                let named = l.invoice.is_none() && invoice.is_some();
                if named {
                    // A checkout that created an invoice: its history line is the invoice's.
                    l.invoice = invoice.cloned();
                }
                let lot_set = l.lot.is_none();
                if lot_set {
                    l.workspace = Some(workspace.clone());
                    l.lot = Some(lot);
                    l.credits = credits;
                }
                named || lot_set
            },
        )
        .await?;
        self.follow_payment(pi).await
    }

    /// Records a lot an invoice's grant created, then follows the invoice's payment.
    pub(crate) async fn link_invoice_lot(
        &self,
        invoice: &InvoiceId,
        workspace: &WorkspaceId,
        key: &str,
        lot: u64,
        credits: Credits,
    ) -> Result<(), ConsumeError> {
        link(
            self.docs.as_ref(),
            &invoice_lots_pk(invoice),
            |l: &mut InvoiceLots| {
                !l.lots.iter().any(|(k, _, _)| k == key) && {
                    l.workspace = Some(workspace.clone());
                    l.lots.push((key.to_owned(), lot, credits));
                    true
                }
            },
        )
        .await?;
        self.follow_invoice(invoice).await
    }

    /// Records whose invoice `invoice` is, lots or not, then follows its payment: a change
    /// whose own grant was nothing still raised the later months its refund must lower.
    pub(super) async fn link_invoice(
        &self,
        invoice: &InvoiceId,
        workspace: &WorkspaceId,
    ) -> Result<(), ConsumeError> {
        link(
            self.docs.as_ref(),
            &invoice_lots_pk(invoice),
            |l: &mut InvoiceLots| {
                l.workspace.is_none() && {
                    l.workspace = Some(workspace.clone());
                    true
                }
            },
        )
        .await?;
        self.follow_invoice(invoice).await
    }

    /// Records that every step of the paid subscription invoice `invoice` is done.
    pub(super) async fn mark_applied(
        &self,
        invoice: &InvoiceId,
        workspace: &WorkspaceId,
    ) -> Result<(), ConsumeError> {
        link(
            self.docs.as_ref(),
            &invoice_lots_pk(invoice),
            |l: &mut InvoiceLots| {
                !l.applied && {
                    l.workspace.get_or_insert_with(|| workspace.clone());
                    l.applied = true;
                    true
                }
            },
        )
        .await
    }

    /// Follows the payment of `invoice`, if it is known yet.
    pub(super) async fn follow_invoice(&self, invoice: &InvoiceId) -> Result<(), ConsumeError> {
        let pi = docs::get::<InvoiceLots>(self.docs.as_ref(), &invoice_lots_pk(invoice), LINK_SK)
            .await?
            .and_then(|d| d.payment_intent);
        match pi {
            Some(pi) => self.follow_payment(&pi).await,
            None => Ok(()),
        }
    }

    /// A paid receipt invoice of the payment `pi` (an auto top-up's, paid out of band):
    /// credit notes on it are followed as the payment's, whichever arrives first.
    /// A receipt of another workspace than the payment's (metadata copied by hand) is
    /// not linked.
    pub(super) async fn link_receipt(
        &self,
        invoice: &InvoiceId,
        pi: &PaymentIntentId,
        workspace: &WorkspaceId,
    ) -> Result<(), ConsumeError> {
        let mut other = false;
        link(
            self.docs.as_ref(),
            &payment_pk(pi),
            |l: &mut PaymentLink| {
                other = l.workspace.as_ref().is_some_and(|w| w != workspace);
                !other && l.receipt.is_none() && {
                    l.receipt = Some(invoice.clone());
                    true
                }
            },
        )
        .await?;
        if other {
            tracing::error!(invoice = %invoice, payment = %pi, workspace = %workspace,
                "a top-up receipt names another workspace's payment; not linked");
            return Ok(());
        }
        paid_by(self.docs.as_ref(), invoice, pi).await?;
        self.follow_payment(pi).await
    }

    /// `invoice_payment.paid`: which payment intent paid which invoice.
    pub(super) async fn invoice_payment(
        &self,
        p: super::objects::InvoicePayment,
    ) -> Result<(), ConsumeError> {
        let (Some(invoice), Some(pi)) = (p.invoice.id(), p.payment.payment_intent.id()) else {
            return Ok(());
        };
        if p.status.as_deref() != Some("paid") {
            return Ok(());
        }
        paid_by(self.docs.as_ref(), invoice, pi).await?;
        link(
            self.docs.as_ref(),
            &payment_pk(pi),
            |l: &mut PaymentLink| {
                l.invoice.is_none() && {
                    l.invoice = Some(invoice.clone());
                    true
                }
            },
        )
        .await?;
        self.follow_payment(pi).await
    }

    /// `credit_note.created`, `.updated`, `.voided`: a note of a paid invoice that gave
    /// money back without a refund takes back what that money bought, as a refund does.
    /// A voided note still counts: the credits it took stay taken (staff give them back
    /// with an adjustment), as after a refund that failed.
    pub(super) async fn credit_note(
        &self,
        note: super::objects::CreditNote,
    ) -> Result<(), ConsumeError> {
        let Some(mut invoice) = note.invoice.id().cloned() else {
            return Ok(());
        };
        if note.memo.as_deref() == Some(crate::payments::REISSUE_MEMO) {
            // A reissue: the replacement is paid by the same money; nothing was given back.
            return Ok(());
        }
        let Some(given) = note.given_back_without_refund() else {
            return Err(poison(format!(
                "credit note {} does not list its refunds (an API version before 2025-03-31): how much it gave back without a refund is left to a person",
                note.id
            )));
        };
        let cents = u64::try_from(given).unwrap_or(0);
        // A note on a corrected reissue's replacement gives back money the original's
        // payment paid (a replacement of a replacement too).
        for _ in 0..8 {
            match docs::get::<ReissueLink>(self.docs.as_ref(), &reissue_pk(&invoice), LINK_SK)
                .await?
                .and_then(|l| l.original)
            {
                Some(original) => invoice = original,
                None => break,
            }
        }
        let void = note.void();
        let mut over = false;
        docs::update(
            self.docs.as_ref(),
            &credit_notes_pk(&invoice),
            LINK_SK,
            |cur: Option<CreditNotes>| {
                let mut d = cur.unwrap_or_default();
                let before = d.notes.get(&note.id).copied();
                if before.is_none() && cents == 0 {
                    // Nothing given back (a note on what was still due): nothing to keep.
                    return None;
                }
                // A note's amounts never change; a void is final.
                let was_void = before.is_some_and(|(_, v)| v);
                let next = (cents, void || was_void);
                if before == Some(next) {
                    return None;
                }
                if before.is_none() && d.notes.len() >= MAX_CREDIT_NOTES {
                    over = true;
                    return None;
                }
                d.notes.insert(note.id.clone(), next);
                Some(d)
            },
        )
        .await?;
        if over {
            return Err(poison(format!(
                "invoice {invoice} has more than {MAX_CREDIT_NOTES} credit notes; credit note {} is left to a person",
                note.id
            )));
        }
        // Filed under an invoice not known as a replacement: if its link was written
        // meanwhile, the move that came with it may have missed this note.
        if let Some(original) =
            docs::get::<ReissueLink>(self.docs.as_ref(), &reissue_pk(&invoice), LINK_SK)
                .await?
                .and_then(|l| l.original)
        {
            return self.move_credit_notes(&invoice, &original).await;
        }
        self.follow_invoice(&invoice).await
    }

    /// Credit notes filed under a reissue's replacement before its link to the original was
    /// known: moved to the original, whose payment they follow.
    pub(super) async fn move_credit_notes(
        &self,
        replacement: &InvoiceId,
        original: &InvoiceId,
    ) -> Result<(), ConsumeError> {
        if replacement == original {
            return Ok(());
        }
        let moved =
            docs::get::<CreditNotes>(self.docs.as_ref(), &credit_notes_pk(replacement), LINK_SK)
                .await?
                .unwrap_or_default();
        // The first invoice of a chain of reissues is the one that was paid.
        let mut original = original.clone();
        for _ in 0..8 {
            match docs::get::<ReissueLink>(self.docs.as_ref(), &reissue_pk(&original), LINK_SK)
                .await?
                .and_then(|l| l.original)
            {
                Some(o) => original = o,
                None => break,
            }
        }
        let original = &original;
        if original == replacement {
            // A chain of reissues that leads back to itself: nothing to move to.
            return Ok(());
        }
        docs::update(
            self.docs.as_ref(),
            &credit_notes_pk(original),
            LINK_SK,
            |cur: Option<CreditNotes>| {
                let mut d = cur.unwrap_or_default();
                let before = d.clone();
                for (id, &(cents, void)) in &moved.notes {
                    let e = d.notes.entry(id.clone()).or_insert((cents, void));
                    e.1 |= void;
                }
                (d != before).then_some(d)
            },
        )
        .await?;
        // Only the notes moved leave: one filed meanwhile stays until the next move.
        docs::update(
            self.docs.as_ref(),
            &credit_notes_pk(replacement),
            LINK_SK,
            |cur: Option<CreditNotes>| {
                let mut d = cur?;
                let before = d.notes.len();
                d.notes.retain(|id, _| !moved.notes.contains_key(id));
                (d.notes.len() != before).then_some(d)
            },
        )
        .await?;
        self.follow_invoice(original).await
    }

    /// Cents the credit notes of `invoice` gave back without a refund.
    pub(crate) async fn credited(&self, invoice: Option<&InvoiceId>) -> Result<u64, ConsumeError> {
        match invoice {
            Some(i) => Ok(credited(self.docs.as_ref(), i).await?),
            None => Ok(0),
        }
    }

    /// Records which charge paid `pi`, then follows the payment.
    pub(super) async fn link_charge(
        &self,
        pi: &PaymentIntentId,
        charge: &ChargeId,
    ) -> Result<(), ConsumeError> {
        link(
            self.docs.as_ref(),
            &payment_pk(pi),
            |l: &mut PaymentLink| {
                l.charge.is_none() && {
                    l.charge = Some(charge.clone());
                    true
                }
            },
        )
        .await?;
        self.follow_payment(pi).await
    }

    /// Brings the lot bought by `pi` in line with what happened to the payment: refunds
    /// taken back, a dispute frozen, won (unfrozen) or lost (taken back).
    pub(super) async fn follow_payment(&self, pi: &PaymentIntentId) -> Result<(), ConsumeError> {
        let Some(link) =
            docs::get::<PaymentLink>(self.docs.as_ref(), &payment_pk(pi), LINK_SK).await?
        else {
            return Ok(());
        };
        let Some(charge) = &link.charge else {
            return Ok(());
        };
        // The lots the payment bought: a pack's one, or those of the invoice it paid.
        let (workspace, lots) = match (&link.workspace, link.lot, &link.invoice) {
            (Some(w), Some(lot), _) => (w.clone(), vec![(lot, link.credits, false)]),
            (_, _, Some(invoice)) => {
                let Some(doc) = docs::get::<InvoiceLots>(
                    self.docs.as_ref(),
                    &invoice_lots_pk(invoice),
                    LINK_SK,
                )
                .await?
                else {
                    return Ok(());
                };
                let Some(w) = doc.workspace else {
                    return Ok(());
                };
                (
                    w,
                    doc.lots
                        .iter()
                        .map(|(key, l, c)| (*l, *c, is_addon_grant(key)))
                        .collect::<Vec<_>>(),
                )
            }
            _ => return Ok(()),
        };
        let Some(payment) =
            docs::get::<PaymentRecord>(self.docs.as_ref(), &charge_pk(charge), PAYMENT_SK).await?
        else {
            return Ok(());
        };
        let paid = payment.amount.get();
        if paid == 0 {
            return Ok(());
        }
        // The purchase's line in the billing history: the invoice, else the payment intent.
        let row = link
            .invoice
            .as_ref()
            .map_or_else(|| pi.to_string(), ToString::to_string);
        // Money given back: refunds, and what credit notes gave back without one (to the
        // customer's Stripe balance, or outside Stripe).
        // While a dispute (or an inquiry) is open its freeze holds the credits: what credit
        // notes gave back meanwhile is taken once it closes, from credits a won one has
        // unfrozen, or from what a lost one left.
        let disputed = payment
            .disputes
            .iter()
            .any(|d| dispute_open(payment.dispute_status(d)));
        let credited = self
            .credited(link.invoice.as_ref().or(link.receipt.as_ref()))
            .await?;
        // Stripe's refunds as known here count too: a refund's own event may come long
        // before the charge's (`amount_refunded`), which waits in the customer's queue
        // group behind an event being retried. Failed and canceled ones gave nothing back.
        let known: u64 = payment
            .refunds
            .iter()
            .filter(|r| r.rank() <= refund_rank(Some("succeeded")))
            .fold(0, |sum, r| sum.saturating_add(r.amount.get()));
        let refunds = payment.amount_refunded.get().max(known).min(paid);
        let refunded = refunds.saturating_add(credited).min(paid);
        // Money a lost dispute gave back (for the yearly months).
        let lost: u64 = payment
            .disputes
            .iter()
            .filter(|d| d.status.as_deref() == Some("lost"))
            .map(|d| d.amount.get())
            .sum();
        self.payment_history(
            &workspace,
            &row,
            pi,
            charge,
            &payment,
            link.invoice.as_ref(),
            credited,
        )
        .await?;
        // The add-on units an invoice charged are not refundable: money given back comes off
        // the rest first, and a dispute off the add-ons first (see [`Pools`]).
        let non_refundable = match &link.invoice {
            Some(_) => history::get(self.docs.as_ref(), &workspace, &row)
                .await?
                .map_or(0, |e| e.non_refundable.get()),
            None => 0,
        };
        let pools = Pools::new(paid, non_refundable);
        // Takes back, from each lot, what `total` cents given back bought (the ledger keeps
        // how much of the payment each lot has followed, so this is exact under retries,
        // reordering and a concurrent follower).
        let take_back = async |total: u64, credited: u64| -> Result<(), ConsumeError> {
            for &(lot, credits, addon) in &lots {
                let req = take_back_request(
                    &workspace, charge, pi, lot, credits, addon, pools, total, credited,
                );
                let key = format!("stripe:refund:{charge}:{total}:lot_{lot}");
                if let Some(o) = self.run(req).await? {
                    // The refund that reached the total; a credit note's share is on the
                    // purchase's line only.
                    let by = (credited == 0)
                        .then(|| refund_reaching(&payment, total))
                        .flatten()
                        .map(|r| r.id.to_string());
                    self.taken_back_history(&workspace, &row, by.as_deref(), &key, o.clawed_back)
                        .await?;
                }
            }
            Ok(())
        };
        // Refunds first: a dispute's freeze is a share of what they left.
        // Refunds and notes are shares of the lot's part of what was paid (see `Pools`), a
        // dispute's a share of what they left: a lot meeting them all at once (a yearly
        // plan's later month) loses what the money given back bought. Refunds first (Stripe refuses them on a
        // disputed charge, so they come before any dispute but an inquiry).
        if refunds > 0 {
            take_back(refunds, 0).await?;
        }
        // A yearly period's later months are paid by the same invoice.
        if let Some(invoice) = &link.invoice {
            let back = refunded.saturating_add(lost).min(paid);
            if back > 0 {
                // Of an invoice with add-on units and more, what each part gave back (on
                // the payment's scale): a change's later months lose that share of what
                // the change added to each.
                let lost_each: Vec<u64> = payment
                    .disputes
                    .iter()
                    .filter(|d| d.status.as_deref() == Some("lost"))
                    .map(|d| d.amount.get())
                    .collect();
                let parts = pools.parts_back(refunded, &lost_each);
                crate::refresh::record_given_back(
                    self.docs.as_ref(),
                    &workspace,
                    invoice,
                    crate::refresh::GivenBack { back, paid, parts },
                )
                .await?;
            }
        }
        // A dispute's share is of the money the lot has not followed back yet (refunds and
        // credit notes taken back, other lost disputes): a credit note's take-back may be
        // waiting for the dispute, and a refund made before the dispute may be followed
        // after it (it then takes its share of the frozen credits).
        //
        // A payment's disputes share its lots' frozen credits: an inquiry the bank turned
        // into a chargeback is a second dispute of the same money, and the one opened last
        // may have found every credit already frozen by the first. So a lost dispute takes
        // back all that is frozen before any closing lifts it, and a dispute closed without
        // loss (won, an inquiry closed) lifts the freeze only once no other dispute of the
        // payment is open: until then the freeze stays for the dispute still open. An
        // inquiry followed by a chargeback counts as closed (see `dispute_status`), so
        // the chargeback's outcome lifts or takes the freeze even if Stripe leaves the
        // inquiry open.
        let mut disputes: Vec<_> = payment.disputes.iter().collect();
        disputes.sort_by_key(|d| match payment.dispute_status(d) {
            "lost" => 0,
            s if dispute_open(s) => 2,
            _ => 1,
        });
        for d in disputes {
            let status = payment.dispute_status(d);
            let other_open = payment
                .disputes
                .iter()
                .any(|o| o.id != d.id && dispute_open(payment.dispute_status(o)));
            let lifted = !dispute_open(status) && status != "lost";
            if lifted && other_open {
                continue;
            }
            for &(lot, _, addon) in &lots {
                // The lot's part of the disputed money, on the payment's scale.
                let disputed = pools.disputed(addon, d.amount.get());
                let freeze = || dispute_freeze(&d.id, charge, lot, disputed, paid);
                let mut steps = Vec::new();
                match status {
                    s if dispute_open(s) => steps.push(freeze()),
                    "lost" => {
                        steps.push(freeze());
                        steps.push((
                            format!("stripe:dispute:{}:lost:lot_{lot}", d.id),
                            Operation::Unfreeze {
                                lot,
                                take_back: true,
                                lost_cents: disputed,
                                note: format!("dispute {} of payment {charge} lost", d.id),
                            },
                        ));
                    }
                    // won, warning_closed, prevented: the money stays; a freeze (if one
                    // was made) is lifted.
                    _ => {
                        // The dispute's own freeze first (a replay when it was followed
                        // open): its key used, a follower that read the dispute still open
                        // cannot freeze the lot again after the lifting.
                        steps.push(freeze());
                        steps.push((
                            format!("stripe:dispute:{}:closed:lot_{lot}", d.id),
                            Operation::Unfreeze {
                                lot,
                                take_back: false,
                                lost_cents: 0,
                                note: format!(
                                    "dispute {} of payment {charge} closed ({status})",
                                    d.id
                                ),
                            },
                        ));
                    }
                }
                for (key, op) in steps {
                    if let Some(o) = self.follow(&workspace, &key, pi, charge, op).await? {
                        let dispute = d.id.to_string();
                        self.taken_back_history(
                            &workspace,
                            &row,
                            Some(&dispute),
                            &key,
                            o.clawed_back,
                        )
                        .await?;
                    }
                }
            }
        }
        // Credit notes last, once no dispute is open: a won dispute's credits are unfrozen
        // above, so the notes' share is taken from credits that are free again.
        if !disputed && refunded > refunds {
            take_back(refunded, credited).await?;
        }
        Ok(())
    }

    async fn follow(
        &self,
        workspace: &WorkspaceId,
        key: &str,
        pi: &PaymentIntentId,
        charge: &ChargeId,
        op: Operation,
    ) -> Result<Option<crate::ledger::Outcome>, ConsumeError> {
        self.run(follow_request(workspace, key, pi, charge, op))
            .await
    }

    async fn run(
        &self,
        req: LedgerRequest,
    ) -> Result<Option<crate::ledger::Outcome>, ConsumeError> {
        match self.money_back.execute(req).await {
            Ok(o) => Ok(Some(o)),
            // The same key with a different share: the facts moved between two attempts.
            // What was first applied stands.
            Err(crate::service::ServiceError::KeyReused) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A payment's facts on the billing history: the purchase's line (`row`) gets the
    /// payment, its receipt and how much was refunded; each refund and dispute has a line.
    #[allow(clippy::too_many_arguments)]
    async fn payment_history(
        &self,
        workspace: &WorkspaceId,
        row: &str,
        pi: &PaymentIntentId,
        charge: &ChargeId,
        payment: &PaymentRecord,
        invoice: Option<&InvoiceId>,
        credited: u64,
    ) -> Result<(), ConsumeError> {
        let now = self.ledger.clock.now();
        let created = payment.created.unwrap_or(now);
        history::record(self.docs.as_ref(), workspace, row, created, now, |e| {
            let before = e.clone();
            HistoryEntry::fill(&mut e.payment_intent, Some(pi));
            HistoryEntry::fill(&mut e.charge, Some(charge));
            HistoryEntry::fill(&mut e.receipt_url, payment.receipt_url.as_ref());
            HistoryEntry::fill(&mut e.currency, payment.currency.as_ref());
            if invoice.is_none() {
                e.amount = e.amount.max(payment.amount);
            }
            e.amount_refunded = e.amount_refunded.max(payment.amount_refunded);
            // Never lowered: what may still be refunded is read from it, and a stale
            // follower must not make more refundable than there is.
            e.amount_credited = e.amount_credited.max(Cents::new(credited));
            *e != before
        })
        .await?;
        for r in &payment.refunds {
            let status = r.status.as_deref().unwrap_or("pending");
            history::record(
                self.docs.as_ref(),
                workspace,
                r.id.as_str(),
                r.created,
                now,
                |e| {
                    let before = e.clone();
                    e.kind = Some(MovementKind::Refund);
                    e.set_status(status, (refund_rank(r.status.as_deref()), 0));
                    e.amount = r.amount;
                    HistoryEntry::fill(&mut e.description, r.reason.as_ref());
                    HistoryEntry::fill(&mut e.currency, payment.currency.as_ref());
                    HistoryEntry::fill(&mut e.payment_intent, Some(pi));
                    HistoryEntry::fill(&mut e.charge, Some(charge));
                    HistoryEntry::fill(&mut e.invoice, invoice);
                    *e != before
                },
            )
            .await?;
        }
        for d in &payment.disputes {
            let status = d.status_or_open();
            let (closed, as_of, _) = d.order();
            history::record(
                self.docs.as_ref(),
                workspace,
                d.id.as_str(),
                d.created,
                now,
                |e| {
                    let before = e.clone();
                    e.kind = Some(MovementKind::Dispute);
                    e.set_status(status, (u8::from(closed), as_of));
                    e.amount = d.amount;
                    HistoryEntry::fill(&mut e.description, d.reason.as_ref());
                    HistoryEntry::fill(&mut e.currency, payment.currency.as_ref());
                    HistoryEntry::fill(&mut e.payment_intent, Some(pi));
                    HistoryEntry::fill(&mut e.charge, Some(charge));
                    HistoryEntry::fill(&mut e.invoice, invoice);
                    *e != before
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Credits a take-back (ledger key `key`) took, on the purchase's line and on the
    /// refund or dispute that caused it.
    async fn taken_back_history(
        &self,
        workspace: &WorkspaceId,
        row: &str,
        cause: Option<&str>,
        key: &str,
        credits: Credits,
    ) -> Result<(), ConsumeError> {
        let now = self.ledger.clock.now();
        for id in std::iter::once(row).chain(cause) {
            history::record(self.docs.as_ref(), workspace, id, now, now, |e| {
                (e.taken_back.get(key) != Some(&credits)) && {
                    e.taken_back.insert(key.to_owned(), credits);
                    true
                }
            })
            .await?;
        }
        Ok(())
    }
}

/// Which money of a payment each of its lots follows. An invoice's add-on units are not
/// refundable (the help pages), so its money is two parts: the rest first, `paid -
/// non_refundable` cents, then the add-on units' `non_refundable` cents. Money given back
/// (refunds, credit notes) is counted from the bottom, so it is the rest's until that is
/// all given back; a dispute is of the money on top, the add-on units' first. Each fact's
/// part is fixed by its own amount, so the order the facts are followed in does not matter
/// (money given back and disputed do not pass what was paid, but for a refund made during
/// an inquiry, whose part the ledger then takes from the frozen credits, as for a payment
/// of one part). A lot of the add-on units
/// (its grant key ends `:addon`) follows their part, every other lot the rest, each
/// scaled onto the whole payment (`part × paid / part's size`), so the ledger's arithmetic
/// per lot (shares of `paid`) is the same as for a payment of one part: a pack, a top-up,
/// an invoice without add-ons, or one of add-ons only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pools {
    pub paid: u64,
    pub non_refundable: u64,
}

impl Pools {
    pub fn new(paid: u64, non_refundable: u64) -> Self {
        Self {
            paid,
            non_refundable: non_refundable.min(paid),
        }
    }

    /// Whether the payment has two parts (add-on units and more).
    pub fn two_parts(self) -> bool {
        self.split().is_some()
    }

    /// Where the add-on units' part starts, when the payment has two parts.
    fn split(self) -> Option<u64> {
        (self.non_refundable > 0 && self.non_refundable < self.paid)
            .then(|| self.paid - self.non_refundable)
    }

    /// The cents `[lo, hi)` of the payment a lot follows.
    fn range(self, addon: bool) -> (u64, u64) {
        match self.split() {
            Some(s) if addon => (s, self.paid),
            Some(s) => (0, s),
            None => (0, self.paid),
        }
    }

    /// How much of the cents `[from, to)` fall in the lot's part.
    fn overlap(self, addon: bool, from: u64, to: u64) -> u64 {
        let (lo, hi) = self.range(addon);
        to.min(hi).saturating_sub(from.max(lo))
    }

    /// `cents` of the lot's part on the whole payment's scale (rounded down; all of the
    /// part is all of the payment).
    fn scaled(self, addon: bool, cents: u64) -> u64 {
        let (lo, hi) = self.range(addon);
        let size = hi - lo;
        if size == 0 {
            return 0;
        }
        let v = u128::from(cents.min(size)) * u128::from(self.paid) / u128::from(size);
        u64::try_from(v).unwrap_or(u64::MAX)
    }

    /// Of `given` cents given back in all (refunds and credit notes), the lot's part:
    /// (cents, size of the part), when the payment has two parts.
    pub fn part(self, addon: bool, given: u64) -> Option<(u64, u64)> {
        self.split()?;
        let (lo, hi) = self.range(addon);
        Some((self.overlap(addon, 0, given), hi - lo))
    }

    /// Of `given` cents given back in all, what the lot follows, on the payment's scale.
    pub fn given_back(self, addon: bool, given: u64) -> u64 {
        self.scaled(addon, self.overlap(addon, 0, given))
    }

    /// Of a payment of two parts, what each part (the rest's, the add-on units') gave back,
    /// on the payment's scale: `given` cents given back (refunds, credit notes) and the
    /// disputes lost, of those amounts.
    pub fn parts_back(self, given: u64, lost: &[u64]) -> Option<(u64, u64)> {
        self.split()?;
        let part = |addon: bool| {
            lost.iter()
                .fold(self.given_back(addon, given), |sum, &l| {
                    sum.saturating_add(self.disputed(addon, l))
                })
                .min(self.paid)
        };
        Some((part(false), part(true)))
    }

    /// Of a dispute of `amount` cents, what the lot follows, on the payment's scale: the
    /// points of its range mapped, not its length, so that money given back and a dispute
    /// that together make the whole payment make all of it on every lot (each rounded down
    /// alone would leave a credit). A part of a lot's part is so rounded up, by less than
    /// one cent of the payment.
    pub fn disputed(self, addon: bool, amount: u64) -> u64 {
        let from = self.paid.saturating_sub(amount);
        self.paid - self.given_back(addon, from)
    }
}

/// Whether a lot, by the key of its grant, is of add-on units (an invoice's, a change's, or
/// a yearly month's).
pub fn is_addon_grant(key: &str) -> bool {
    key.ends_with(":addon")
}

/// The key and operation of the freeze a dispute makes on a lot the payment bought: `amount`
/// is the lot's part of the disputed money on the payment's scale (see [`Pools`]), of the
/// `paid` cents.
fn dispute_freeze(
    dispute: &impl std::fmt::Display,
    charge: &ChargeId,
    lot: u64,
    amount: u64,
    paid: u64,
) -> (String, Operation) {
    let share = Share {
        numerator: amount.min(paid),
        denominator: paid,
    };
    (
        format!("stripe:dispute:{dispute}:open:lot_{lot}"),
        Operation::Freeze {
            lot,
            share,
            of_rest: true,
            note: format!("payment {charge} disputed ({dispute})"),
        },
    )
}

/// The ledger request that follows a payment's fact (`op`, under `key`) on a lot.
fn follow_request(
    workspace: &WorkspaceId,
    key: &str,
    pi: &PaymentIntentId,
    charge: &ChargeId,
    op: Operation,
) -> LedgerRequest {
    let fingerprint = format!("{key}:{}", crate::service::fingerprint(&format!("{op:?}")));
    LedgerRequest {
        workspace: workspace.clone(),
        key: IdempotencyKey::derived(key.to_owned()),
        fingerprint,
        actor: Actor::new(ActorKind::Stripe, charge.to_string()),
        refs: Refs {
            charge: Some(pi.to_string()),
            ..Refs::default()
        },
        op,
    }
}

/// The take-back of what `refunded` of the `paid` cents of a payment bought of a lot of
/// `credits`: the same request whether a refund request's approval runs it or Stripe's
/// refund event does later (then it is a replay and takes nothing twice).
#[allow(clippy::too_many_arguments)]
pub fn take_back_request(
    workspace: &WorkspaceId,
    charge: &ChargeId,
    pi: &PaymentIntentId,
    lot: u64,
    credits: Credits,
    addon: bool,
    pools: Pools,
    refunded: u64,
    credited: u64,
) -> LedgerRequest {
    let paid = pools.paid;
    // The lot's part of the money given back, on the payment's scale.
    let followed = pools.given_back(addon, refunded);
    let bought = Share {
        numerator: followed,
        denominator: paid,
    }
    .of(credits);
    let given = if credited == 0 {
        format!("{refunded} of {paid} cents paid by {charge} refunded")
    } else {
        format!(
            "{refunded} of {paid} cents paid by {charge} given back ({credited} of them by credit notes, without a refund)"
        )
    };
    let part = match pools.part(addon, refunded) {
        Some((back, of)) if addon => format!(" ({back} of the {of} cents of add-on units)"),
        Some((back, of)) => format!(" ({back} of the {of} cents besides add-on units)"),
        None => String::new(),
    };
    let note = format!("{given}{part}; that money bought {bought} credits of lot_{lot}");
    let key = format!("stripe:refund:{charge}:{refunded}:lot_{lot}");
    follow_request(
        workspace,
        &key,
        pi,
        charge,
        Operation::TakeBack {
            lot,
            refunded: followed,
            paid,
            note,
        },
    )
}

/// The refund that brought the payment's refunded total to `refunded` (refunds in the
/// order Stripe made them; failed and canceled ones gave nothing back). None while the
/// refunds known do not reach it (the charge's event counted one whose own event has not
/// come yet): the take-back goes on that refund's line when its event comes and replays it.
fn refund_reaching(payment: &PaymentRecord, refunded: u64) -> Option<&super::records::RefundFact> {
    let mut total = 0u64;
    payment
        .refunds
        .iter()
        .filter(|r| r.rank() <= refund_rank(Some("succeeded")))
        .find(|r| {
            total = total.saturating_add(r.amount.get());
            total >= refunded
        })
}

/// The lot id `lot_<seq>` a grant answers with, as its sequence number.
pub(super) fn lot_seq(lot: &str) -> Result<u64, ConsumeError> {
    lot.strip_prefix("lot_")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| poison(format!("grant answered with an unknown lot id {lot:?}")))
}

#[cfg(test)]
mod tests {
    use super::Pools;

    /// Team at 29,900 cents with one add-on unit at 3,000.
    const TEAM: Pools = Pools {
        paid: 32_900,
        non_refundable: 3_000,
    };

    #[test]
    fn money_given_back_is_the_rests_first_and_a_dispute_the_add_ons_first() {
        // The plan's money refunded: all of the plan lots, none of the add-on lot.
        assert_eq!(TEAM.given_back(false, 29_900), 32_900);
        assert_eq!(TEAM.given_back(true, 29_900), 0);
        // Part of it: that share of the plan lots, on the payment's scale.
        assert_eq!(TEAM.given_back(false, 10_000), 10_000 * 32_900 / 29_900);
        // More than the plan's money: the add-on units' share of the rest.
        assert_eq!(TEAM.given_back(false, 31_000), 32_900);
        assert_eq!(TEAM.given_back(true, 31_000), 1_100 * 32_900 / 3_000);
        assert_eq!(TEAM.given_back(true, 32_900), 32_900);
        // A chargeback of what was left after the plan's refund: the add-on units'.
        assert_eq!(TEAM.disputed(true, 3_000), 32_900);
        assert_eq!(TEAM.disputed(false, 3_000), 0);
        // A part of the payment disputed: the add-on units' money first, then the rest's.
        assert_eq!(TEAM.disputed(true, 5_000), 32_900);
        assert_eq!(
            TEAM.disputed(false, 5_000),
            (2_000u64 * 32_900).div_ceil(29_900)
        );
        // A refund and a dispute that make the whole payment take every credit, rounding
        // included.
        for refund in [10_000, 27_900, 29_899, 29_900, 30_001] {
            for addon in [false, true] {
                let dispute = 32_900 - refund;
                assert_eq!(
                    TEAM.given_back(addon, refund) + TEAM.disputed(addon, dispute),
                    32_900,
                    "{refund} {addon}"
                );
            }
        }
        // All of it: everything, whichever lot.
        assert_eq!(TEAM.disputed(false, 32_900), 32_900);
        assert_eq!(TEAM.disputed(true, 32_900), 32_900);
        assert_eq!(TEAM.part(true, 31_000), Some((1_100, 3_000)));
        assert_eq!(TEAM.part(false, 31_000), Some((29_900, 29_900)));
    }

    #[test]
    fn each_part_gives_back_its_share_of_the_money_back_and_the_disputes_lost() {
        // The plan's money refunded: the rest's all, the add-on units' none.
        assert_eq!(TEAM.parts_back(29_900, &[]), Some((32_900, 0)));
        // Half the plan's money refunded, the add-on units' lost in a dispute.
        assert_eq!(TEAM.parts_back(14_950, &[3_000]), Some((16_450, 32_900)));
        // Two disputes lost beside a refund: never more than all of a part.
        assert_eq!(
            TEAM.parts_back(29_900, &[3_000, 3_000]),
            Some((32_900, 32_900))
        );
        // A payment of one part: none (the whole share stands for both).
        assert_eq!(Pools::new(5_000, 0).parts_back(100, &[]), None);
        assert_eq!(Pools::new(3_000, 3_000).parts_back(100, &[]), None);
    }

    #[test]
    fn a_payment_of_one_part_is_followed_as_a_whole() {
        // A pack, an invoice without add-ons, and one of add-ons only.
        for pools in [
            Pools::new(5_000, 0),
            Pools::new(5_000, 5_000),
            Pools::new(5_000, 9_000),
        ] {
            for addon in [false, true] {
                for cents in [0, 1, 2_500, 5_000, 7_000] {
                    assert_eq!(pools.given_back(addon, cents), cents.min(5_000));
                    assert_eq!(pools.disputed(addon, cents), cents.min(5_000));
                }
                assert_eq!(pools.part(addon, 100), None);
            }
        }
    }

    #[test]
    fn each_lots_part_only_grows_with_the_money_given_back() {
        let mut last = (0, 0);
        for given in (0..=32_900).step_by(7) {
            let now = (TEAM.given_back(false, given), TEAM.given_back(true, given));
            assert!(now.0 >= last.0 && now.1 >= last.1, "{given}");
            last = now;
        }
        assert_eq!(last, (32_900, 32_900));
    }
}
