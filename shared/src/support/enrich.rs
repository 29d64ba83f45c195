//! What Tally's own records say about a ticket, and what it fixes by itself.
//!
//! Findings come from the ledger (balance, holds, the generation named and its journal
//! entries, spending by member over the last days), the billing history (recent payments,
//! duplicate charges) and the refresh schedule (the next allotment or renewal).
//!
//! Fixed automatically, each at most once whatever the number of tickets, because every
//! fix runs under a key derived from what it fixes:
//! - a hold past its deadline that no operation released yet is released now (its credits
//!   were never charged);
//! - a charge the journal took for a generation that failed or expired is given back, once,
//!   in an entry linked to the ticket and the generation, under the generation reversal's
//!   own key (so a staff reversal is the same request). The ledger releases a failed
//!   generation's hold without charge, so this is a safety net; a record that claims a
//!   charge its journal entries do not show is reported to staff as urgent, never paid out;
//! - a duplicate charge the refund rules verify (the later of two identical payments, all
//!   its credits unused) opens a refund request, when the ticket's author may ask for
//!   refunds (owner or billing admin).
//!
//! A completed generation the customer says failed is not certain from the records: the
//! ticket carries its charge and journal entries and staff reverse it if the output was
//! faulty.

use super::{Category, Priority, Remediation};
use crate::billing::history::{self, HistoryEntry, HistoryQuery, Movement, MovementKind};
use crate::http::Problem;
use crate::ids::{GenerationId, IdempotencyKey, WorkspaceId};
use crate::ledger::{Actor, Balance, Entry, Generation, GenerationStatus, Operation, Refs};
use crate::money::{Cents, Credits};
use crate::refund_requests::{NewRequest, RefundReason, RefundRequests, RequestStatus, rules};
use crate::reports::usage::{GroupBy, UsageGroup, usage};
use crate::service::{Ledger, LedgerRequest};
use crate::store::DocStore;
use crate::subscriptions::Entitlements;
use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

/// How far back spending by member looks.
pub const SPENDING_DAYS: i64 = 7;
/// Recent payments shown.
pub const RECENT_PAYMENTS: usize = 10;
/// Most holds a ticket lists (it counts them all).
pub const MAX_HOLDS_SHOWN: usize = 50;
/// Most members the spending summary of a ticket lists (the biggest spenders; the rest
/// are counted in a finding), so the ticket stays a small item however large the team.
pub const MAX_MEMBERS_SHOWN: usize = 50;
/// Most charges the spending summary of a ticket reads.
pub const MAX_SPENDING_ENTRIES: usize = 2_000;
/// How far back duplicate charges are looked for.
pub const DUPLICATE_LOOKBACK_DAYS: i64 = 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GenerationFacts {
    #[serde(flatten)]
    pub generation: Generation,
    /// The journal entries that moved its credits.
    pub journal: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HoldFact {
    #[schema(value_type = String)]
    pub generation: GenerationId,
    pub credits: Credits,
    pub started_by: String,
    pub model: String,
    pub created_at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
    /// Past its deadline: released without charge.
    pub overdue: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DuplicateSuspicion {
    /// The later payment (the duplicate).
    pub payment: String,
    /// The earlier, identical one.
    pub duplicate_of: String,
    pub amount: Cents,
    pub currency: String,
}

/// Findings stored on a ticket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Enrichment {
    pub balance: Balance,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The plan's status (`active`, `past_due`, `paused`, `canceled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_status: Option<String>,
    /// When credits next refresh: the next monthly allotment of a yearly plan, or the
    /// renewal of a monthly one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationFacts>,
    /// The generations holding credits that end first (at most 50).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_holds: Vec<HoldFact>,
    /// How many generations hold credits, and how many credits they hold in all.
    #[serde(default)]
    pub pending_hold_count: usize,
    #[serde(default)]
    pub pending_hold_credits: Credits,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_payments: Vec<Movement>,
    /// Credits spent by each member over the last seven days (the biggest
    /// [`MAX_MEMBERS_SHOWN`] spenders).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spending_by_member: Vec<UsageGroup>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duplicate_charges: Vec<DuplicateSuspicion>,
    /// The customer reports a negative balance.
    #[serde(default)]
    pub negative_balance_reported: bool,
    /// What the records say, in words, for the customer and for staff.
    pub findings: Vec<String>,
}

/// What enrichment needs.
#[derive(Clone)]
pub struct Context {
    pub ledger: Ledger,
    pub docs: Arc<dyn DocStore>,
    /// Refund requests, to open one for a verified duplicate charge.
    pub refunds: Option<RefundRequests>,
}

/// A ticket being filed.
pub struct Subject<'a> {
    pub ticket: &'a str,
    pub workspace: &'a WorkspaceId,
    pub user: &'a str,
    pub can_manage_billing: bool,
    pub category: Category,
    pub generation: Option<GenerationId>,
    pub payment: Option<&'a str>,
    pub text: &'a str,
    pub now: DateTime<Utc>,
}

/// What [`assess`] found and did.
pub struct Assessment {
    pub enrichment: Enrichment,
    pub remediations: Vec<Remediation>,
    /// Raised priority, if the findings call for it.
    pub escalate_to: Option<Priority>,
    /// The support level of the plan in effect (none without one).
    pub support_level: Option<String>,
}

fn mentions_negative_balance(text: &str) -> bool {
    let t = text.to_lowercase();
    // A figure written with a minus sign ("-40", "- 40", "−40"), not a hyphen inside a word
    // or a range ("4-5").
    let chars: Vec<char> = t.chars().collect();
    let signed_figure = chars.iter().enumerate().any(|(i, &c)| {
        let before = chars[..i].iter().rev().find(|c| **c != ' ');
        let spaced = chars.get(i + 1) == Some(&' ');
        matches!(c, '-' | '\u{2212}')
            // Not a hyphen ("pay-as-you-go") nor a range ("4-5", "4 - 5").
            && (i == 0 || !chars[i - 1].is_alphanumeric())
            && !before.is_some_and(char::is_ascii_digit)
            // Not a list's bullet ("- 2 renders failed" opening a line).
            && !(spaced && before.is_none_or(|b| *b == '\n'))
            && chars[i + 1..]
                .iter()
                .find(|c| **c != ' ')
                .is_some_and(char::is_ascii_digit)
    });
    (t.contains("negative") || t.contains("below zero") || t.contains("minus") || signed_figure)
        && (t.contains("balance") || t.contains("credit"))
}

/// Whether the ticket says a payment was taken more than once ("charged twice", "double
/// charge", "a duplicate", "two charges", "more than once"), as whole words and not denied
/// ("not a duplicate", "don't charge me twice"; "double-check" is no such saying).
fn mentions_double_charge(text: &str) -> bool {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .collect();
    let denied = |i: usize| {
        words[i.saturating_sub(5)..i].iter().any(|w| {
            matches!(
                *w,
                "not"
                    | "no"
                    | "never"
                    | "don't"
                    | "dont"
                    | "didn't"
                    | "isn't"
                    | "wasn't"
                    | "won't"
                    | "without"
            )
        })
    };
    let next = |i: usize| words.get(i + 1).copied().unwrap_or_default();
    (0..words.len()).any(|i| {
        let said = match words[i] {
            "twice" | "duplicate" | "duplicated" | "duplicates" | "2x" => true,
            "double" | "doubled" => !next(i).starts_with("check"),
            "two" | "2" => matches!(next(i), "charges" | "payments" | "times"),
            "more" => next(i) == "than" && words.get(i + 2) == Some(&"once"),
            "multiple" => matches!(next(i), "charges" | "payments"),
            _ => false,
        };
        said && !denied(i)
    })
}

/// Reads what the records say about the ticket and fixes what is certain.
pub async fn assess(ctx: &Context, s: &Subject<'_>) -> Result<Assessment, Problem> {
    let mut e = Enrichment::default();
    let mut fixes = Vec::new();
    let mut escalate_to = None;
    let mut asked_refund = false;
    let ledger = &ctx.ledger;
    let view = ledger.workspace_now(s.workspace).await?;
    if let Some(p) = &view.plan {
        e.plan = Some(p.plan.clone());
        e.plan_status = serde_json::to_value(p.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
    }
    // What the plan gives is what is in effect (a canceled plan, or a paused one past
    // its paid time, gives nothing): its support level, and credits that will come.
    let in_effect = view.plan.as_ref().filter(|p| p.in_effect());
    let support_level = Entitlements::of(view.plan.as_ref(), &ledger.catalog)
        .plan
        .map(|p| p.support.clone());
    if let Some(p) = in_effect {
        // Renewed at the period's end unless set to cancel then.
        let renewal = (!p.cancel_at_period_end).then_some(p.period_end);
        e.next_refresh = match crate::refresh::refresh_doc(ctx.docs.as_ref(), s.workspace).await? {
            Some(doc) => crate::refresh::schedule::of(&doc)
                .into_iter()
                // The first allotment not granted yet, even when it fell due minutes ago
                // and the refresh (every 15 minutes) has not run: that is the one asked
                // about.
                .find(|a| a.k >= doc.next_allotment)
                .map(|a| a.at)
                .or_else(|| (!p.cancel_at_period_end).then_some(doc.period_end)),
            None => renewal,
        };
    }
    if let Some(g) = s.generation {
        generation_facts(ctx, s, g, &mut e, &mut fixes, &mut escalate_to).await?;
    }

    if matches!(s.category, Category::Billing | Category::Credits) {
        let spending = usage(
            ledger.store.as_ref(),
            s.workspace,
            s.now - Duration::days(SPENDING_DAYS),
            s.now + Duration::seconds(1),
            GroupBy::Member,
            MAX_SPENDING_ENTRIES,
        )
        .await?;
        match spending {
            Some(spending) => {
                if spending.groups.len() > 1 {
                    e.findings.push(format!(
                        "{} members spent credits in the last {SPENDING_DAYS} days ({} credits in all)",
                        spending.groups.len(),
                        spending.spent.get()
                    ));
                }
                let mut groups = spending.groups;
                if groups.len() > MAX_MEMBERS_SHOWN {
                    groups.sort_by(|a, b| b.spent.cmp(&a.spent).then_with(|| a.key.cmp(&b.key)));
                    let rest = groups.split_off(MAX_MEMBERS_SHOWN);
                    let credits: u64 = rest.iter().map(|g| g.spent.get()).sum();
                    e.findings.push(format!(
                        "{} more members spent {credits} credits; see the usage report",
                        rest.len()
                    ));
                }
                e.spending_by_member = groups;
            }
            None => e.findings.push(format!(
                "more than {MAX_SPENDING_ENTRIES} charges in the last {SPENDING_DAYS} days; see the usage report"
            )),
        }
    }
    // Payments are for those who may see the billing history: owners and billing admins.
    if s.can_manage_billing
        && (matches!(s.category, Category::Billing | Category::Credits) || s.payment.is_some())
    {
        let (payments, _) = history::page(
            ctx.docs.as_ref(),
            s.workspace,
            &HistoryQuery {
                limit: RECENT_PAYMENTS,
                ..HistoryQuery::default()
            },
        )
        .await?;
        e.recent_payments = payments;
        duplicates(ctx, s, &mut e, &mut fixes, &mut asked_refund).await?;
    } else if matches!(s.category, Category::Billing) {
        e.findings.push(
            "payments are shown to the workspace owner and billing admins; ask them to check Billing > History".into(),
        );
    }

    // The balance and the holds as the ticket's own fixes left them (a hold it released, a
    // charge it gave back), settled as of now: a hold past its deadline holds nothing.
    let view = if fixes.is_empty() && !asked_refund {
        view
    } else {
        ledger.workspace_now(s.workspace).await?
    };
    e.balance = view.balance();
    // The holds that end first, from their own items, and those an older state item still
    // keeps inside.
    let mut open = ledger
        .store
        .open_holds(s.workspace, None, MAX_HOLDS_SHOWN)
        .await?;
    open.extend(view.holds.iter().cloned());
    let mut holds: Vec<HoldFact> = open
        .iter()
        .map(|h| HoldFact {
            generation: h.generation,
            credits: h.amount,
            started_by: h.started_by.clone(),
            model: h.estimate.model.clone(),
            created_at: h.created_at,
            deadline: h.deadline,
            overdue: h.deadline <= s.now,
        })
        .collect();
    // A ticket stays small: the holds that end first, and how many there are.
    holds.sort_by_key(|h| h.deadline);
    holds.truncate(MAX_HOLDS_SHOWN);
    e.pending_hold_count = usize::try_from(view.open_holds).unwrap_or(usize::MAX);
    e.pending_hold_credits = e.balance.held;
    let overdue = holds.iter().filter(|h| h.overdue).count();
    e.pending_holds = holds;
    let mut said = Vec::new();
    if e.pending_hold_count > 0 {
        said.push(format!(
            "{} generation(s) hold {} credits until they finish; held credits are not spent",
            e.pending_hold_count,
            e.pending_hold_credits.get()
        ));
    }
    if overdue > 0 {
        said.push(format!(
            "{overdue} generation(s) passed their deadline unfinished: their credits are no longer held and show as available"
        ));
    }
    e.findings.splice(0..0, said);

    if mentions_negative_balance(s.text) {
        e.negative_balance_reported = true;
        escalate_to = Some(Priority::Urgent);
        e.findings.push(format!(
            "a negative balance was reported; the ledger shows {} available and {} held",
            e.balance.available.get(),
            e.balance.held.get()
        ));
    }
    Ok(Assessment {
        enrichment: e,
        remediations: fixes,
        escalate_to,
        support_level,
    })
}

/// Settlements a ticket runs at most to release its generation's overdue hold (each
/// releases a batch of the earliest overdue holds).
const SUPPORT_SETTLE_ROUNDS: usize = 40;

/// How long a ticket spends releasing at most (support-intake's timeout is 20 s).
const SUPPORT_SETTLE_TIME: std::time::Duration = std::time::Duration::from_secs(5);

async fn generation_facts(
    ctx: &Context,
    s: &Subject<'_>,
    id: GenerationId,
    e: &mut Enrichment,
    fixes: &mut Vec<Remediation>,
    escalate_to: &mut Option<Priority>,
) -> Result<(), Problem> {
    let ledger = &ctx.ledger;
    let Some(mut g) = ledger.store.generation(s.workspace, id).await? else {
        return Err(Problem::not_found(format!(
            "no generation {id} in this workspace"
        )));
    };
    let actor = Actor::new(crate::ledger::ActorKind::System, "support-intake");
    let refs = Refs {
        generation: Some(id),
        ticket: Some(s.ticket.to_owned()),
        ..Refs::default()
    };
    match g.status {
        GenerationStatus::Held if g.deadline <= s.now => {
            // A settlement releases the earliest overdue holds, a batch at a time: behind a
            // backlog this one comes later, so settle again (each round under a key of its
            // own, so a retried ticket repeats none) until it is released.
            // The ticket is filed whatever happens here: a busy workspace or a long backlog
            // ends the rounds, and the ticket says the hold is still to be released.
            let began = std::time::Instant::now();
            for round in 0..SUPPORT_SETTLE_ROUNDS {
                if began.elapsed() >= SUPPORT_SETTLE_TIME {
                    break;
                }
                let key = match round {
                    0 => format!("gen:{id}:support-settle"),
                    n => format!("gen:{id}:support-settle:{n}"),
                };
                let out = match ledger
                    .execute(LedgerRequest {
                        workspace: s.workspace.clone(),
                        key: IdempotencyKey::derived(key),
                        fingerprint: "support-settle".into(),
                        actor: actor.clone(),
                        refs: refs.clone(),
                        op: Operation::Settle,
                    })
                    .await
                {
                    Ok(out) => out,
                    Err(crate::service::ServiceError::Contention) => break,
                    Err(other) => return Err(other.into()),
                };
                if let Some(now) = ledger.store.generation(s.workspace, id).await? {
                    g = now;
                }
                // Released, completed meanwhile, or nothing left to release.
                if g.status != GenerationStatus::Held || out.entries.is_empty() {
                    break;
                }
            }
            if g.status == GenerationStatus::Held {
                e.findings.push(format!(
                    "generation {id} passed its deadline; its hold of {} credits is released without charge with the other overdue holds shortly",
                    g.held.get()
                ));
            }
            if g.status == GenerationStatus::Expired {
                fixes.push(Remediation {
                        action: "hold_released".into(),
                        detail: format!(
                            "generation {id} never finished; its hold of {} credits passed its deadline and was released without charge",
                            g.held.get()
                        ),
                        credits: Some(g.held),
                        // The entry that released this hold (the record's last).
                        entries: g.entries.last().copied().into_iter().collect(),
                        refund_request: None,
                    });
            }
        }
        GenerationStatus::Held => e.findings.push(format!(
            "generation {id} is still running: {} credits are held (not spent) until {}",
            g.held.get(),
            g.deadline.to_rfc3339()
        )),
        GenerationStatus::Failed | GenerationStatus::Expired if g.charged > Credits::ZERO => {
            // What the journal itself took for it, less what came back: the record alone is
            // not proof of a charge.
            // Only entries that name this generation count, whatever the record lists.
            let journal: Vec<Entry> = ledger
                .store
                .entries_by_seq(s.workspace, &g.entries)
                .await?
                .into_iter()
                .filter(|e| e.refs.generation == Some(id))
                .collect();
            let taken: u64 = journal
                .iter()
                .filter(|e| e.reason == crate::ledger::Reason::GenerationCharged)
                .map(|e| e.totals.spent.get())
                .sum();
            let given: u64 = journal
                .iter()
                .filter(|e| e.reason == crate::ledger::Reason::Reversal)
                .map(|e| e.totals.issued.get())
                .sum();
            let credits = Credits::new(taken.saturating_sub(given));
            let key = IdempotencyKey::derived(format!("gen:{id}:reverse"));
            let done = ledger.store.idempotency(s.workspace, &key).await?.is_some();
            if done {
                e.findings
                    .push(format!("generation {id}'s charge was already given back"));
            } else if credits.is_zero() {
                *escalate_to = Some(Priority::Urgent);
                e.findings.push(format!(
                        "generation {id} {} and its record shows a charge of {} credits that its journal entries do not: staff must check it",
                        g.status.as_str(),
                        g.charged.get()
                    ));
            } else {
                // Under the reversal's own key: a staff reversal (or another ticket) after
                // this one is the same request, never a second credit.
                let out = ledger
                    .execute(LedgerRequest {
                        workspace: s.workspace.clone(),
                        key,
                        // The reversal's own fingerprint: staff reversing it later get the
                        // same answer, not a refusal of a key they never sent.
                        fingerprint: crate::service::REVERSE_FINGERPRINT.into(),
                        actor: actor.clone(),
                        refs: refs.clone(),
                        op: Operation::Adjust {
                            credits: crate::money::CreditDelta::increase(credits),
                            note: format!(
                                "charge of {} generation {id} given back (ticket {})",
                                g.status.as_str(),
                                s.ticket
                            ),
                        },
                    })
                    .await;
                match out {
                    Ok(out) => fixes.push(Remediation {
                        action: "credits_returned".into(),
                        detail: format!(
                            "generation {id} {} but {} credits were charged; they were given back",
                            g.status.as_str(),
                            credits.get()
                        ),
                        credits: Some(credits),
                        entries: out.entries,
                        refund_request: None,
                    }),
                    Err(crate::service::ServiceError::KeyReused) => e
                        .findings
                        .push(format!("generation {id}'s charge was already given back")),
                    Err(other) => return Err(other.into()),
                }
            }
        }
        GenerationStatus::Failed | GenerationStatus::Expired => e.findings.push(format!(
            "generation {id} {} and was not charged: its hold of {} credits was released",
            g.status.as_str(),
            g.held.get()
        )),
        GenerationStatus::Completed if g.reversed > Credits::ZERO => e.findings.push(format!(
            "generation {id} was charged {} credits and {} were already given back",
            g.charged.get(),
            g.reversed.get()
        )),
        GenerationStatus::Completed => {
            e.findings.push(format!(
                    "generation {id} completed and was charged {} credits (estimate {}); if its output was faulty, staff can reverse the charge",
                    g.charged.get(),
                    g.estimate.credits.get()
                ));
            if s.category == Category::Generation && g.charged > Credits::ZERO {
                *escalate_to = (*escalate_to).max(Some(Priority::High));
            }
        }
    }
    let entries = ledger.store.entries_by_seq(s.workspace, &g.entries).await?;
    e.generation = Some(GenerationFacts {
        generation: g,
        journal: entries,
    });
    Ok(())
}

/// The finding for a refund request an earlier ticket (or step) made for `payment`.
fn made_before(r: &crate::refund_requests::RefundRequest, payment: &str) -> String {
    format!(
        "refund request {} for payment {payment} was made before and is {}",
        r.id,
        serde_json::to_value(r.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    )
}

/// Suspected duplicate charges, and a refund request for the one the ticket names and says
/// was taken twice (`asked_refund` set when one was asked for: its credits may be taken
/// back even when the ticket does not count it as fixed).
async fn duplicates(
    ctx: &Context,
    s: &Subject<'_>,
    e: &mut Enrichment,
    fixes: &mut Vec<Remediation>,
    asked_refund: &mut bool,
) -> Result<(), Problem> {
    let window = ctx
        .refunds
        .as_ref()
        .map_or(rules::DEFAULT_DUPLICATE_WINDOW, |r| r.duplicate_window);
    let around: Vec<HistoryEntry> = history::around(
        ctx.docs.as_ref(),
        s.workspace,
        s.now - Duration::days(DUPLICATE_LOOKBACK_DAYS),
        s.now + Duration::seconds(1),
    )
    .await?;
    let named = match (s.payment, &ctx.refunds) {
        (Some(p), Some(r)) => r.movement(s.workspace, p).await?.map(|m| m.id),
        _ => None,
    };
    for entry in &around {
        if entry.charge.is_none()
            || entry.amount == Cents::ZERO
            || matches!(
                entry.kind,
                Some(MovementKind::Refund | MovementKind::Dispute) | None
            )
        {
            continue;
        }
        let Some(twin) = rules::duplicate_of(entry, &around, window) else {
            continue;
        };
        e.duplicate_charges.push(DuplicateSuspicion {
            payment: entry.id.clone(),
            duplicate_of: twin.id.clone(),
            amount: entry.amount,
            currency: entry.currency.clone().unwrap_or_default(),
        });
        e.findings.push(format!(
            "payment {} looks like a duplicate of {} ({} cents)",
            entry.id,
            twin.id,
            entry.amount.get()
        ));
        let Some(refunds) = &ctx.refunds else {
            continue;
        };
        if named.as_ref().is_some_and(|n| n != &entry.id) {
            continue;
        }
        let id = crate::refund_requests::id_for_key(
            s.workspace,
            &format!("ticket-duplicate:{}", entry.id),
        );
        // Two identical purchases may both be meant: money goes back only for the payment
        // the ticket names and says was taken twice. A request an earlier ticket made is
        // told whatever this one says.
        let asked = named.as_ref() == Some(&entry.id) && mentions_double_charge(s.text);
        if !asked {
            match refunds.get(s.workspace, &id).await? {
                Some(r) => e.findings.push(made_before(&r, &entry.id)),
                // Given back already (in the dashboard): nothing to ask for.
                None if entry.amount_refunded.get() + entry.amount_credited.get()
                    >= entry.amount.get() => {}
                None => e.findings.push(format!(
                    "no refund was asked for payment {}: a refund is asked for by naming the payment on a ticket that says it was charged twice, or from Billing > History",
                    entry.id
                )),
            }
            continue;
        }
        *asked_refund = true;
        let new = || NewRequest {
            payment: entry.id.clone(),
            reason: RefundReason::DuplicateCharge,
            details: format!("duplicate of {} (support ticket {})", twin.id, s.ticket),
            requested_by: s.user.to_owned(),
            id: Some(id.clone()),
        };
        let mut request = refunds.create(s.workspace, new(), s.now).await;
        // Unavailable (the refunds queue refused the approval's job, or the store was busy):
        // asked once more under the same id, which sends an approval made meanwhile again.
        if request
            .as_ref()
            .is_err_and(|p| p.status == StatusCode::SERVICE_UNAVAILABLE)
        {
            request = refunds.create(s.workspace, new(), s.now).await;
        }
        // This ticket's own request, with the money on its way or back, fixed the ticket.
        // One an earlier ticket made, or one denied or failed, is a finding for staff: it
        // must not make this ticket look settled.
        let this_ticket = |r: &crate::refund_requests::RefundRequest| {
            r.details
                .ends_with(&format!("(support ticket {})", s.ticket))
        };
        match request {
            Ok(r)
                if matches!(
                    r.status,
                    RequestStatus::Approved | RequestStatus::Pending | RequestStatus::Succeeded
                ) && this_ticket(&r) =>
            {
                fixes.push(Remediation {
                    action: "refund_requested".into(),
                    detail: format!(
                        "payment {} is a verified duplicate of {}; refund request {} is {} for {} cents",
                        entry.id,
                        twin.id,
                        r.id,
                        serde_json::to_value(r.status)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        r.amount.get()
                    ),
                    credits: None,
                    entries: Vec::new(),
                    refund_request: Some(r.id),
                });
            }
            Ok(r) if r.status == RequestStatus::InReview => e.findings.push(format!(
                "refund request {} for payment {} awaits staff review",
                r.id, entry.id
            )),
            Ok(r) => e.findings.push(made_before(&r, &entry.id)),
            // An approval whose job could not be queued keeps its credits taken back and
            // waits: approving it again sends it.
            Err(p) if p.status == StatusCode::SERVICE_UNAVAILABLE => e.findings.push(format!(
                "payment {} is a verified duplicate of {}; refund request {id}, if it exists, \
                 may be approved without its refund sent ({}): approve it again to send it",
                entry.id, twin.id, p.detail
            )),
            Err(p) => e.findings.push(format!(
                "payment {} could not be refunded automatically: {}",
                entry.id, p.detail
            )),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mentions_double_charge;

    #[test]
    fn a_double_charge_is_said_in_whole_words_and_not_denied() {
        for said in [
            "Double charged\nI was charged twice",
            "Pack bought two times",
            "two charges for one pack",
            "a duplicate payment",
            "It was duplicated!",
            "charged more than once",
            "multiple charges on my card",
            "2x the price",
            "my card was double-charged",
        ] {
            assert!(mentions_double_charge(said), "{said}");
        }
        for not_said in [
            "How does rollover work?\n?",
            "Please double-check my invoice",
            "I bought two packs on purpose, not a duplicate, but the credits did not arrive",
            "I don't want to be charged twice when I upgrade",
            "Will I be charged again next month?",
            "Can I use the same payment method?",
            "twofold redoubled duplicity",
            "two packs, three times the fun",
        ] {
            assert!(!mentions_double_charge(not_said), "{not_said}");
        }
    }
}
