//! Credit refresh: the monthly allotments of yearly plans (clamped anniversaries, each
//! exactly once under repeated, late and missed ticks, nothing for subscriptions not in
//! effect, raised levels for later months only), renewal reconciliation, settlement of
//! lapsed lots and many overdue holds in bounded transactions, the sharded due index, and
//! the SQS worker and job sender. Over the embedded store and the DynamoDB emulator.

use aws_lambda_events::event::sqs::SqsEvent;
use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use tally::billing::records::{SUBSCRIPTION_SK, SubscriptionRecord, workspace_pk};
use tally::clock::{Clock, ManualClock};
use tally::ids::{
    GenerationId, IdempotencyKey, InvoiceId, StripeEventId, SubscriptionId, WorkspaceId,
};
use tally::ledger::{
    Actor, ActorKind, Entry, Interval, LotSource, Operation, PlanStatus, Reason, Refs,
    WorkspaceState,
};
use tally::money::Credits;
use tally::queue::lambda::process_batch;
use tally::refresh::{
    self, Job, JobSink, PaidPeriod, RECONCILE_PREFIX, Refresher, SqsJobs, run_due,
};
use tally::service::{Ledger, LedgerRequest};
use tally::store::docs::{self, DocStore, DueMark, shard_of};
use tally::store::dynamo::DynamoStore;
use tally::store::embedded::EmbeddedStore;
use tally::store::{EntryQuery, LedgerStore};
use tally::subscriptions::calendar::add_months;
use tally_tests::workspace;

/// Both ports over one store, as the functions use them.
struct Parts {
    ledger: Ledger,
    docs: Arc<dyn DocStore>,
    clock: Arc<ManualClock>,
}

fn parts_over(store: Arc<dyn LedgerStore>, docs: Arc<dyn DocStore>) -> Parts {
    parts_with_catalog(store, docs, tally::catalog::Catalog::builtin())
}

fn parts_with_catalog(
    store: Arc<dyn LedgerStore>,
    docs: Arc<dyn DocStore>,
    catalog: tally::catalog::Catalog,
) -> Parts {
    let clock = Arc::new(ManualClock::new(start()));
    let ledger = Ledger::new(store, clock.clone(), Arc::new(catalog));
    Parts {
        ledger,
        docs,
        clock,
    }
}

fn embedded() -> Parts {
    let s = Arc::new(EmbeddedStore::in_memory());
    parts_over(s.clone(), s)
}

async fn dynamo() -> Parts {
    let endpoint = std::env::var("DYNAMODB_ENDPOINT").expect("run the suite with `make test`");
    let client = DynamoStore::local_client(&endpoint);
    let table = format!(
        "tally-refresh-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    DynamoStore::create_table(&client, &table).await.unwrap();
    let s = Arc::new(DynamoStore::new(client, table));
    parts_over(s.clone(), s)
}

/// Jan 31 of a leap year: the anniversaries clamp to Feb 29, Apr 30, ...
/// A change billing the plan and the add-on.
const BOTH: refresh::Billed = refresh::Billed {
    plan: true,
    addon: true,
};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2028, 1, 31, 10, 0, 0).unwrap()
}

fn sub(ws: &str) -> SubscriptionId {
    SubscriptionId::parse(&format!("sub_{ws}")).unwrap()
}

fn period(ws: &str, interval: Interval, plan: &str, units: u32) -> PaidPeriod {
    PaidPeriod {
        workspace: workspace(ws),
        subscription: sub(ws),
        invoice: InvoiceId::parse(&format!("in_{ws}")).unwrap(),
        interval,
        plan: plan.into(),
        addon_units: units,
        addon_credits: None,
        plan_terms: None,
        period_start: start(),
        period_end: add_months(start(), interval.months()),
    }
}

/// Stripe's subscription record as billing-events keeps it.
async fn set_subscription(
    p: &Parts,
    ws: &str,
    status: PlanStatus,
    interval: Interval,
    period_start: DateTime<Utc>,
) {
    set_subscription_voided(p, ws, status, interval, period_start, None).await;
}

/// `ws` subscribed to Max monthly, its first period paid (from the test's start).
async fn monthly_max_paid(p: &Parts, ws: &str) {
    set_subscription(p, ws, PlanStatus::Active, Interval::Monthly, start()).await;
    refresh::record_paid_period(
        p.docs.as_ref(),
        &period(ws, Interval::Monthly, "max", 0),
        start(),
    )
    .await
    .unwrap();
}

/// Stripe's record of the subscription, with the period whose renewal it voided, if any.
async fn set_subscription_voided(
    p: &Parts,
    ws: &str,
    status: PlanStatus,
    interval: Interval,
    period_start: DateTime<Utc>,
    voided_period: Option<DateTime<Utc>>,
) {
    let record = SubscriptionRecord {
        id: sub(ws),
        customer: None,
        plan: "max".into(),
        interval,
        status,
        stripe_status: "active".into(),
        cancel_at_period_end: false,
        period_start,
        period_end: add_months(period_start, interval.months()),
        addon_units: 0,
        scheduled: None,
        as_of: period_start.timestamp(),
        as_of_event: StripeEventId::parse("evt_test").unwrap(),
        ended_at: None,
        created: None,
        voided_period,
        level_as_of: None,
    };
    let pk = workspace_pk(&workspace(ws));
    docs::update(
        p.docs.as_ref(),
        &pk,
        SUBSCRIPTION_SK,
        |_: Option<SubscriptionRecord>| Some(record.clone()),
    )
    .await
    .unwrap();
}

/// The subscription document of `ws` canceled, ended at `ended` (naming `id` instead, when
/// given).
async fn end_subscription(p: &Parts, ws: &str, id: Option<&str>, ended: DateTime<Utc>) {
    docs::update(
        p.docs.as_ref(),
        &workspace_pk(&workspace(ws)),
        SUBSCRIPTION_SK,
        |r: Option<SubscriptionRecord>| {
            let mut r = r.unwrap();
            if let Some(id) = id {
                r.id = SubscriptionId::parse(id).unwrap();
            }
            r.status = PlanStatus::Canceled;
            r.stripe_status = "canceled".into();
            r.ended_at = Some(ended);
            Some(r)
        },
    )
    .await
    .unwrap();
}

/// An active yearly subscription of `ws` whose period (from [`start`]) is paid at `plan`
/// with `units` add-on units.
async fn paid_yearly(p: &Parts, ws: &str, plan: &str, units: u32) {
    set_subscription(p, ws, PlanStatus::Active, Interval::Yearly, start()).await;
    refresh::record_paid_period(
        p.docs.as_ref(),
        &period(ws, Interval::Yearly, plan, units),
        start(),
    )
    .await
    .unwrap();
}

/// The invoice's own grant (allotment 0), as billing-events makes it.
async fn invoice_grant(p: &Parts, ws: &str, credits: u64) {
    p.ledger
        .execute(LedgerRequest {
            workspace: workspace(ws),
            key: IdempotencyKey::derived(format!("stripe:invoice:in_{ws}:plan")),
            fingerprint: "invoice".into(),
            actor: Actor::new(ActorKind::Stripe, "evt_paid"),
            refs: Refs::default(),
            op: Operation::Grant {
                month: None,
                source: LotSource::PlanPeriod,
                credits: Credits::new(credits),
                expires_at: Some(add_months(start(), 1) + Duration::days(30)),
                note: None,
            },
        })
        .await
        .unwrap();
}

async fn journal(p: &Parts, ws: &str) -> Vec<Entry> {
    let mut all = p
        .ledger
        .store
        .entries(
            &workspace(ws),
            &EntryQuery {
                before: None,
                limit: 100_000,
            },
        )
        .await
        .unwrap();
    all.reverse();
    all
}

/// Plan credit grants by (month, day) of the grant, with their amounts.
async fn plan_grants(p: &Parts, ws: &str) -> Vec<((u32, u32), u64)> {
    journal(p, ws)
        .await
        .iter()
        .filter(|e| e.reason == Reason::PlanCredits)
        .map(|e| ((e.at.month(), e.at.day()), e.credits.unsigned_abs().get()))
        .collect()
}

/// The workspace's refresh document, which the test expects to exist.
async fn doc_of(p: &Parts, ws: &str) -> refresh::RefreshDoc {
    refresh::refresh_doc(p.docs.as_ref(), &workspace(ws))
        .await
        .unwrap()
        .expect("a refresh document")
}

/// Moves the clock through `until`, stopping at every due time the index names, and
/// runs the schedule there (twice: a repeated tick must change nothing). Returns the
/// reports of every pass.
async fn play_until(p: &Parts, until: DateTime<Utc>) -> Vec<refresh::RunReport> {
    let refresher = Refresher::new(p.ledger.clone(), p.docs.clone());
    let mut reports = Vec::new();
    for _ in 0..500 {
        let Some(next) = refresher.earliest_due().await.unwrap() else {
            break;
        };
        if next > until {
            break;
        }
        if next > p.clock.now() {
            p.clock.set(next);
        }
        let first = run_due(&p.ledger, &p.docs, p.clock.now()).await.unwrap();
        let again = run_due(&p.ledger, &p.docs, p.clock.now()).await.unwrap();
        assert!(
            again.jobs.is_empty() || again.jobs.iter().all(|j| j.settle_operations == 0),
            "a repeated tick settles nothing more: {again:?}"
        );
        reports.push(first);
        reports.push(again);
    }
    p.clock.set(until.max(p.clock.now()));
    reports
}

const EXPECTED_ANNIVERSARIES: [(u32, u32); 12] = [
    (1, 31),
    (2, 29),
    (3, 31),
    (4, 30),
    (5, 31),
    (6, 30),
    (7, 31),
    (8, 31),
    (9, 30),
    (10, 31),
    (11, 30),
    (12, 31),
];

async fn a_max_yearly_workspace_gets_twelve_allotments_at_the_clamped_anniversaries(p: Parts) {
    let ws = "yearly";
    set_subscription(&p, ws, PlanStatus::Active, Interval::Yearly, start()).await;
    invoice_grant(&p, ws, 400).await;
    let paid = period(ws, Interval::Yearly, "max", 1);
    refresh::record_paid_period(p.docs.as_ref(), &paid, p.clock.now())
        .await
        .unwrap();
    // The same paid period reported again (a redelivered event) changes nothing.
    refresh::record_paid_period(p.docs.as_ref(), &paid, p.clock.now())
        .await
        .unwrap();
    play_until(&p, start() + Duration::days(400)).await;
    let grants = plan_grants(&p, ws).await;
    let days: Vec<(u32, u32)> = grants.iter().map(|(d, _)| *d).collect();
    assert_eq!(days, EXPECTED_ANNIVERSARIES);
    assert!(grants.iter().all(|(_, c)| *c == 400));
    let addons = journal(&p, ws)
        .await
        .iter()
        .filter(|e| e.reason == Reason::AddonCredits)
        .count();
    assert_eq!(addons, 11, "one add-on grant per worker allotment");
    // Every lot lapsed in its turn; the journal alone rebuilds the state.
    let state = p.ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    let rebuilt = WorkspaceState::from_journal(workspace(ws), &journal(&p, ws).await).unwrap();
    assert_eq!(rebuilt.balance(), state.balance());
    assert_eq!(rebuilt.totals, state.totals);
    state.check_invariants().unwrap();
    assert_eq!(
        state.balance().available,
        Credits::ZERO,
        "all lapsed by day 400"
    );
    assert_eq!(state.totals.issued, Credits::new(12 * 400 + 11 * 60));
    assert_eq!(state.totals.expired, state.totals.issued);
}

/// A yearly plan's later months are granted at the terms its year was paid for: the
/// catalog edited after the payment (Max raised to 500 credits a month rolling over 10
/// days) gives them to years paid from then on, not to this one. A period recorded before
/// terms were kept follows the catalog of the day.
#[tokio::test]
async fn a_yearly_plans_months_keep_the_terms_its_year_was_paid_at() {
    let sold = tally::catalog::Catalog::builtin();
    let mut edited = sold.clone();
    let max = edited.plans.iter_mut().find(|p| p.id == "max").unwrap();
    assert_eq!(max.monthly_credits, Credits::new(400));
    max.monthly_credits = Credits::new(500);
    let (days_sold, days_edited) = (i64::from(max.rollover_days), 10);
    max.rollover_days = 10;
    let team = edited.plans.iter_mut().find(|p| p.id == "team").unwrap();
    assert_eq!(team.monthly_credits, Credits::new(6000));
    team.monthly_credits = Credits::new(7000);
    let store = Arc::new(EmbeddedStore::in_memory());
    let p = parts_with_catalog(store.clone(), store, edited);
    for (ws, terms) in [
        ("paid_at_400", refresh::PlanTerms::of("max", &sold)),
        ("recorded_before_terms", None),
    ] {
        set_subscription(&p, ws, PlanStatus::Active, Interval::Yearly, start()).await;
        let paid = PaidPeriod {
            plan_terms: terms,
            ..period(ws, Interval::Yearly, "max", 0)
        };
        refresh::record_paid_period(p.docs.as_ref(), &paid, start())
            .await
            .unwrap();
        // Delivered again: nothing changes.
        refresh::record_paid_period(p.docs.as_ref(), &paid, start())
            .await
            .unwrap();
    }
    // A third year paid at Max, upgraded to Team ten days in (the change paid then, at
    // Team's terms of the day): its later months are Team's as sold.
    let ws = "upgraded";
    set_subscription(&p, ws, PlanStatus::Active, Interval::Yearly, start()).await;
    let own = PaidPeriod {
        plan_terms: refresh::PlanTerms::of("max", &sold),
        ..period(ws, Interval::Yearly, "max", 0)
    };
    refresh::record_paid_period(p.docs.as_ref(), &own, start())
        .await
        .unwrap();
    let up = PaidPeriod {
        invoice: InvoiceId::parse("in_upgraded_team").unwrap(),
        plan: "team".into(),
        plan_terms: refresh::PlanTerms::of("team", &sold),
        ..own.clone()
    };
    refresh::set_level(p.docs.as_ref(), &up, start() + Duration::days(10), 1, BOTH)
        .await
        .unwrap();
    play_until(&p, add_months(start(), 2) + Duration::hours(1)).await;
    for (ws, credits, rollover) in [
        ("paid_at_400", 400, days_sold),
        ("recorded_before_terms", 500, days_edited),
        ("upgraded", 6000, days_sold),
    ] {
        assert_eq!(
            plan_grants(&p, ws).await,
            vec![((2, 29), credits), ((3, 31), credits)],
            "{ws}"
        );
        let state = p.ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
        let expiries: Vec<_> = state.lots.iter().map(|l| l.expires_at).collect();
        assert_eq!(
            expiries,
            vec![
                Some(add_months(start(), 2) + Duration::days(rollover)),
                Some(add_months(start(), 3) + Duration::days(rollover)),
            ],
            "{ws}"
        );
    }
}

#[tokio::test]
async fn yearly_allotments_embedded() {
    a_max_yearly_workspace_gets_twelve_allotments_at_the_clamped_anniversaries(embedded()).await;
}

#[tokio::test]
async fn yearly_allotments_dynamo() {
    a_max_yearly_workspace_gets_twelve_allotments_at_the_clamped_anniversaries(dynamo().await)
        .await;
}

#[tokio::test]
async fn daily_and_hourly_ticks_grant_each_allotment_exactly_once() {
    let p = embedded();
    let ws = "ticks";
    set_subscription(&p, ws, PlanStatus::Active, Interval::Yearly, start()).await;
    invoice_grant(&p, ws, 400).await;
    refresh::record_paid_period(
        p.docs.as_ref(),
        &period(ws, Interval::Yearly, "max", 0),
        start(),
    )
    .await
    .unwrap();
    // Every 7 hours for a year and a bit: ticks fall at odd times after each anniversary.
    while p.clock.now() < start() + Duration::days(370) {
        p.clock.advance(Duration::hours(7));
        run_due(&p.ledger, &p.docs, p.clock.now()).await.unwrap();
    }
    let days: Vec<(u32, u32)> = plan_grants(&p, ws).await.iter().map(|g| g.0).collect();
    assert_eq!(days, EXPECTED_ANNIVERSARIES);
}

#[tokio::test]
async fn a_late_tick_grants_every_missed_allotment_still_unexpired_and_nothing_twice() {
    let p = embedded();
    let ws = "late";
    paid_yearly(&p, ws, "max", 1).await;
    // No tick at all from Jan 31 to May 5.
    p.clock
        .set(Utc.with_ymd_and_hms(2028, 5, 5, 0, 0, 0).unwrap());
    let report = run_due(&p.ledger, &p.docs, p.clock.now()).await.unwrap();
    let job = &report.jobs[0];
    let ts = start().timestamp();
    let key = |k: u32, what: &str| format!("refresh:sub_{ws}:{ts}:{k}:{what}");
    // Month 1 (Feb 29) lapsed on Apr 30 with its rollover; month 2's add-on ended Apr 30.
    assert_eq!(
        job.granted,
        [key(2, "plan"), key(3, "plan"), key(3, "addon")]
    );
    assert_eq!(
        job.skipped_expired,
        [key(1, "plan"), key(1, "addon"), key(2, "addon")]
    );
    let again = run_due(&p.ledger, &p.docs, p.clock.now()).await.unwrap();
    assert!(
        again.jobs.is_empty(),
        "nothing is due until the next anniversary"
    );
    // The job delivered twice (an SQS duplicate) grants nothing new.
    let before = journal(&p, ws).await.len();
    let refresher = Refresher::new(p.ledger.clone(), p.docs.clone());
    refresher.run(&job_for(ws, p.clock.now())).await.unwrap();
    assert_eq!(journal(&p, ws).await.len(), before);
    assert_eq!(
        p.ledger
            .workspace_now(&workspace(ws))
            .await
            .unwrap()
            .balance()
            .available,
        Credits::new(400 + 400 + 60)
    );
}

fn job_for(ws: &str, due: DateTime<Utc>) -> Job {
    Job {
        workspace: workspace(ws),
        due,
    }
}

#[tokio::test]
async fn canceled_and_replaced_subscriptions_get_nothing_paused_and_past_due_ones_their_paid_months()
 {
    let p = embedded();
    for (ws, status) in [
        ("canceled", PlanStatus::Canceled),
        ("paused", PlanStatus::Paused),
        ("pastdue", PlanStatus::PastDue),
    ] {
        set_subscription(&p, ws, status, Interval::Yearly, start()).await;
        refresh::record_paid_period(
            p.docs.as_ref(),
            &period(ws, Interval::Yearly, "max", 2),
            start(),
        )
        .await
        .unwrap();
    }
    // A subscription replaced by another gets nothing for the old one either.
    set_subscription(
        &p,
        "replaced",
        PlanStatus::Active,
        Interval::Yearly,
        start(),
    )
    .await;
    let mut old = period("replaced", Interval::Yearly, "max", 0);
    old.subscription = SubscriptionId::parse("sub_old").unwrap();
    refresh::record_paid_period(p.docs.as_ref(), &old, start())
        .await
        .unwrap();
    let reports = play_until(&p, start() + Duration::days(400)).await;
    let forfeited = |ws: &str| -> Vec<u32> {
        reports
            .iter()
            .flat_map(|r| &r.jobs)
            .filter(|j| j.workspace.as_ref() == Some(&workspace(ws)))
            .flat_map(|j| j.forfeited.clone())
            .collect()
    };
    for ws in ["canceled", "replaced"] {
        assert!(
            journal(&p, ws).await.is_empty(),
            "{ws}: no ledger entry at all"
        );
        assert_eq!(forfeited(ws), (1..12).collect::<Vec<_>>(), "{ws}");
    }
    // The year's invoice paid months 2-12: a pause (collection of the next invoices
    // stopped) or a retried payment keeps them, each once, at the paid level.
    for ws in ["paused", "pastdue"] {
        let granted = plan_grants(&p, ws).await;
        assert_eq!(granted.len(), 11, "{ws}: {granted:?}");
        assert!(granted.iter().all(|(_, c)| *c == 400), "{ws}: {granted:?}");
        assert!(forfeited(ws).is_empty(), "{ws}");
    }
    // Paused, then resumed: every month of the paid period comes, each once.
    let ws = "resumed";
    set_subscription(&p, ws, PlanStatus::Paused, Interval::Yearly, start()).await;
    let mut resumed = period(ws, Interval::Yearly, "max", 0);
    resumed.period_start = p.clock.now();
    resumed.period_end = add_months(resumed.period_start, 12);
    refresh::record_paid_period(p.docs.as_ref(), &resumed, p.clock.now())
        .await
        .unwrap();
    let base = p.clock.now();
    play_until(&p, add_months(base, 2)).await;
    assert_eq!(
        plan_grants(&p, ws).await.len(),
        2,
        "months 2 and 3 while paused"
    );
    set_subscription(&p, ws, PlanStatus::Active, Interval::Yearly, start()).await;
    play_until(&p, add_months(base, 4)).await;
    let granted = plan_grants(&p, ws).await;
    assert_eq!(granted.len(), 4, "months 2 to 5: {granted:?}");
}

#[tokio::test]
async fn months_that_began_before_a_subscription_ended_are_granted_however_late_the_worker_comes() {
    let p = embedded();
    let ws = "ended";
    paid_yearly(&p, ws, "max", 0).await;
    // Canceled at once a day after its third month began (29 Mar 2028 after 31 Jan),
    // before the worker came to months 2 and 3.
    let ended = add_months(start(), 2) + Duration::days(1);
    end_subscription(&p, ws, None, ended).await;
    p.clock.set(ended + Duration::days(1));
    let report = Refresher::new(p.ledger.clone(), p.docs.clone())
        .run(&job_for(ws, p.clock.now()))
        .await
        .unwrap();
    let granted = plan_grants(&p, ws).await;
    assert_eq!(granted.len(), 2, "months 2 and 3 were owed: {granted:?}");
    assert!(report.forfeited.is_empty(), "{report:?}");
    // The months after the end never come.
    let reports = play_until(&p, start() + Duration::days(400)).await;
    assert_eq!(plan_grants(&p, ws).await.len(), 2);
    let forfeited: Vec<u32> = reports
        .iter()
        .flat_map(|r| &r.jobs)
        .flat_map(|j| j.forfeited.clone())
        .collect();
    assert_eq!(forfeited, (3..12).collect::<Vec<_>>());
}

/// The subscription document still names the one this yearly plan replaced: its deletion
/// came after the new subscription's events, which could not replace it while it looked
/// alive. Ended before the paid year began, it takes none of the year's months; one that
/// ended inside the year says the year's own subscription may not be in effect.
#[tokio::test]
async fn a_predecessor_ended_before_the_paid_year_does_not_take_its_months() {
    for (ws, ended, months, own_end) in [
        ("stale", start() - Duration::days(1), 11, None),
        ("overlapping", start() + Duration::days(10), 0, None),
        // Its own cancellation (dropped from the record for the same reason) bounds it.
        (
            "stale_canceled",
            start() - Duration::days(1),
            3,
            Some(start() + Duration::days(100)),
        ),
    ] {
        // Each on its own clock from the start.
        let p = embedded();
        paid_yearly(&p, ws, "max", 0).await;
        if let Some(end) = own_end {
            let c = tally::refund_requests::Cancellation {
                subscription: sub(ws),
                requested_at: end,
                effective_at: end,
                resumed_at: None,
                as_of: end.timestamp(),
                never_cancelled: false,
            };
            docs::update(
                p.docs.as_ref(),
                &workspace_pk(&workspace(ws)),
                tally::refund_requests::rules::CANCELLATION_SK,
                |_: Option<tally::refund_requests::Cancellation>| Some(c.clone()),
            )
            .await
            .unwrap();
        }
        end_subscription(&p, ws, Some("sub_before"), ended).await;
        play_until(&p, start() + Duration::days(400)).await;
        let granted = plan_grants(&p, ws).await;
        assert_eq!(granted.len(), months, "{ws}: {granted:?}");
    }
}

/// At `at`, a paid monthly Plus period of `ws` from `at`, billed by `invoice`, recorded.
async fn monthly_from(p: &Parts, ws: &str, invoice: &str, at: DateTime<Utc>) -> PaidPeriod {
    p.clock.set(at);
    let mut monthly = period(ws, Interval::Monthly, "plus", 0);
    monthly.invoice = InvoiceId::parse(invoice).unwrap();
    monthly.period_start = at;
    monthly.period_end = add_months(at, 1);
    refresh::record_paid_period(p.docs.as_ref(), &monthly, at)
        .await
        .unwrap();
    monthly
}

/// A new period of the same subscription recorded minutes after a yearly month fell due,
/// before the worker came to it (a switch to monthly, a billing-cycle reset): the month
/// is still granted, once, at its own level.
#[tokio::test]
async fn a_month_due_before_a_new_period_was_recorded_is_still_granted() {
    let p = embedded();
    let ws = "switched";
    paid_yearly(&p, ws, "max", 0).await;
    let due = add_months(start(), 1); // 29 Feb 2028
    let switched = due + Duration::minutes(5);
    monthly_from(&p, ws, "in_switch", switched).await;
    assert!(doc_of(&p, ws).await.previous.is_some());
    // And another new period (a billing-cycle reset) before the worker came: the month is
    // still owed.
    let reset = switched + Duration::minutes(2);
    let monthly = monthly_from(&p, ws, "in_reset", reset).await;
    set_subscription(&p, ws, PlanStatus::Active, Interval::Monthly, reset).await;
    assert!(doc_of(&p, ws).await.previous.is_some());
    play_until(&p, reset + Duration::days(3)).await;
    assert_eq!(plan_grants(&p, ws).await, vec![((2, 29), 400)]);
    assert!(doc_of(&p, ws).await.previous.is_none());
    // Run again: nothing more.
    Refresher::new(p.ledger.clone(), p.docs.clone())
        .run(&job_for(ws, p.clock.now()))
        .await
        .unwrap();
    assert_eq!(plan_grants(&p, ws).await.len(), 1);
    // A period recorded with no month owed keeps no previous one.
    monthly_from(&p, ws, "in_next", monthly.period_end).await;
    assert!(doc_of(&p, ws).await.previous.is_none());
}

/// A new period recorded in the very second a yearly month fell due, before the worker
/// came to it: that month is still the replaced period's (Stripe credits it as unused
/// from that second), granted once at its level; the next month is the new period's.
#[tokio::test]
async fn a_month_due_in_the_second_its_period_is_replaced_is_still_granted() {
    let p = embedded();
    let ws = "switchedatonce";
    paid_yearly(&p, ws, "max", 0).await;
    let due = add_months(start(), 1); // 29 Feb 2028
    let monthly = monthly_from(&p, ws, "in_switch", due).await;
    set_subscription(&p, ws, PlanStatus::Active, Interval::Monthly, due).await;
    let kept = doc_of(&p, ws).await.previous.expect("the month is owed");
    assert!(refresh::kept_until(&kept, due));
    play_until(&p, monthly.period_end + Duration::days(3)).await;
    assert_eq!(plan_grants(&p, ws).await, vec![((2, 29), 400)]);
    assert!(doc_of(&p, ws).await.previous.is_none());
}

/// The same, with the worker's clock a little behind Stripe's: the replaced period's month
/// is owed whatever the worker's clock says, and granted once, not dropped.
#[tokio::test]
async fn a_month_owed_by_a_replaced_period_is_granted_by_a_worker_whose_clock_is_behind() {
    let p = embedded();
    let ws = "behindclock";
    paid_yearly(&p, ws, "max", 0).await;
    let due = add_months(start(), 1); // 29 Feb 2028
    let monthly = monthly_from(&p, ws, "in_switch", due).await;
    set_subscription(&p, ws, PlanStatus::Active, Interval::Monthly, due).await;
    assert!(doc_of(&p, ws).await.previous.is_some(), "the month is owed");
    p.clock.set(due - Duration::seconds(30));
    run_due(&p.ledger, &p.docs, p.clock.now()).await.unwrap();
    assert_eq!(plan_grants(&p, ws).await, vec![((2, 29), 400)]);
    assert!(doc_of(&p, ws).await.previous.is_none());
    play_until(&p, monthly.period_end + Duration::days(3)).await;
    assert_eq!(plan_grants(&p, ws).await, vec![((2, 29), 400)], "once");
}

/// The kept period ends where its replacement began: with the worker a month behind, a
/// switch a day after a month's date and the new monthly period's renewal leave only that
/// month owed, not the next one, which the monthly period paid.
#[tokio::test]
async fn a_kept_period_owes_only_the_months_before_its_replacement() {
    let p = embedded();
    let ws = "behind";
    paid_yearly(&p, ws, "max", 0).await;
    let due = add_months(start(), 1); // 29 Feb 2028
    let switched = due + Duration::days(1);
    let monthly = monthly_from(&p, ws, "in_switch", switched).await;
    // Its renewal, a month on: the yearly period's 31 March falls before it.
    let renewed = monthly.period_end;
    assert!(add_months(start(), 2) < renewed);
    monthly_from(&p, ws, "in_renewal", renewed).await;
    set_subscription(&p, ws, PlanStatus::Active, Interval::Monthly, renewed).await;
    play_until(&p, renewed + Duration::days(3)).await;
    // Granted late (1 April), once: the month of 29 February alone.
    assert_eq!(plan_grants(&p, ws).await, vec![((4, 1), 400)]);
    let notes: Vec<String> = journal(&p, ws)
        .await
        .iter()
        .filter(|e| e.reason == Reason::PlanCredits)
        .filter_map(|e| e.note.clone())
        .collect();
    assert!(notes[0].contains("month 2 of 12"), "{notes:?}");
}

#[tokio::test]
async fn a_changed_level_applies_to_later_allotments_only_and_the_latest_change_wins() {
    let p = embedded();
    let ws = "raised";
    set_subscription(&p, ws, PlanStatus::Active, Interval::Yearly, start()).await;
    let paid = period(ws, Interval::Yearly, "max", 0);
    refresh::record_paid_period(p.docs.as_ref(), &paid, start())
        .await
        .unwrap();
    play_until(&p, add_months(start(), 2) + Duration::days(1)).await;
    // A paid upgrade to Generative with 2 add-on units mid-month 3.
    let at = p.clock.now();
    let upgraded = PaidPeriod {
        plan: "generative".into(),
        addon_units: 2,
        ..paid.clone()
    };
    refresh::set_level(p.docs.as_ref(), &upgraded, at, 2, BOTH)
        .await
        .unwrap();
    // A change older than the one applied, or of another period, changes nothing.
    let older = PaidPeriod {
        plan: "plus".into(),
        addon_units: 1,
        ..paid.clone()
    };
    refresh::set_level(p.docs.as_ref(), &older, at - Duration::hours(1), 9, BOTH)
        .await
        .unwrap();
    // At the same instant, the lower of two levels does not replace the higher.
    refresh::set_level(p.docs.as_ref(), &older, at, 1, BOTH)
        .await
        .unwrap();
    let earlier_period = PaidPeriod {
        plan: "team".into(),
        addon_units: 50,
        period_start: start() - Duration::days(366),
        period_end: start(),
        ..paid.clone()
    };
    refresh::set_level(p.docs.as_ref(), &earlier_period, at, 9, BOTH)
        .await
        .unwrap();
    // A redelivered paid period of the same period keeps the changed level.
    refresh::record_paid_period(p.docs.as_ref(), &paid, p.clock.now())
        .await
        .unwrap();
    play_until(&p, add_months(start(), 4) + Duration::days(1)).await;
    let amounts: Vec<u64> = plan_grants(&p, ws).await.iter().map(|g| g.1).collect();
    assert_eq!(
        amounts,
        [400, 400, 900, 900],
        "months 2 and 3 at Max, then Generative"
    );
    let addons: Vec<u64> = journal(&p, ws)
        .await
        .iter()
        .filter(|e| e.reason == Reason::AddonCredits)
        .map(|e| e.credits.unsigned_abs().get())
        .collect();
    assert_eq!(addons, [120, 120]);
}

/// Stripe charges a renewal up to an hour after the period starts: an upgrade paid in that
/// hour is applied before the period's own invoice. The period's invoice then becomes the
/// period's (its refunds follow the allotments), the upgrade one of its changes (its
/// refunds follow what it added), and the months come at the upgraded level.
#[tokio::test]
async fn an_upgrade_paid_before_its_renewal_was_charged_becomes_a_change_of_that_period() {
    let p = embedded();
    let ws = "early";
    set_subscription(&p, ws, PlanStatus::Active, Interval::Yearly, start()).await;
    let own = period(ws, Interval::Yearly, "max", 0);
    let upgrade = PaidPeriod {
        invoice: InvoiceId::parse("in_early_change").unwrap(),
        plan: "generative".into(),
        ..own.clone()
    };
    let at = start() + Duration::minutes(20);
    refresh::set_level(p.docs.as_ref(), &upgrade, at, 1, BOTH)
        .await
        .unwrap();
    // More add-on units in the same second (ranked after it), before the invoice too.
    let units = PaidPeriod {
        invoice: InvoiceId::parse("in_early_units").unwrap(),
        plan: "generative".into(),
        addon_units: 2,
        ..own.clone()
    };
    refresh::set_level(p.docs.as_ref(), &units, at, 2, BOTH)
        .await
        .unwrap();
    let opened = doc_of(&p, ws).await;
    assert_eq!(opened.invoice, upgrade.invoice, "opened by the change");
    // Not due for its months meanwhile (the period's invoice files it again), only for
    // its renewal check.
    let due = refresh::schedule::next_due(&opened, Duration::hours(6)).unwrap();
    assert!(due >= opened.period_end, "{due}");
    // The changes paid only their difference: the months wait for the period's invoice.
    play_until(&p, add_months(start(), 1) + Duration::days(1)).await;
    assert!(plan_grants(&p, ws).await.is_empty());
    for _ in 0..2 {
        refresh::record_paid_period(p.docs.as_ref(), &own, start())
            .await
            .unwrap();
    }
    let doc = doc_of(&p, ws).await;
    assert_eq!(doc.invoice, own.invoice, "the period's own invoice");
    assert_eq!((doc.plan.as_str(), doc.addon_units), ("generative", 2));
    assert_eq!(doc.changes.len(), 2, "{:?}", doc.changes);
    assert_eq!(doc.changes[0].invoice, upgrade.invoice);
    assert_eq!(
        (
            doc.changes[0].before.plan.as_str(),
            doc.changes[0].after.plan.as_str()
        ),
        ("max", "generative")
    );
    assert_eq!(doc.changes[1].invoice, units.invoice);
    assert_eq!(
        (
            doc.changes[1].before.addon_units,
            doc.changes[1].after.addon_units
        ),
        (0, 2)
    );
    assert!(doc.opened_by.is_none());
    // Refunds are known by their invoices: the period's, and the change's.
    refresh::record_given_back(p.docs.as_ref(), &workspace(ws), &own.invoice, one_of_100())
        .await
        .unwrap();
    refresh::record_given_back(
        p.docs.as_ref(),
        &workspace(ws),
        &upgrade.invoice,
        one_of_100(),
    )
    .await
    .unwrap();
    let doc = doc_of(&p, ws).await;
    assert_eq!(doc.given_back, Some((1, 100)));
    assert_eq!(doc.changes[0].given_back, Some((1, 100)));
    play_until(&p, add_months(start(), 2) + Duration::days(1)).await;
    let amounts: Vec<u64> = plan_grants(&p, ws).await.iter().map(|g| g.1).collect();
    assert_eq!(amounts.len(), 2, "{amounts:?}");
    assert!(
        amounts.iter().all(|a| (850..900).contains(a)),
        "{amounts:?}"
    );
}

#[tokio::test]
async fn a_later_period_replaces_an_earlier_one_and_an_earlier_one_arriving_late_is_ignored() {
    let p = embedded();
    let ws = "order";
    let first = period(ws, Interval::Yearly, "max", 0);
    let mut second = first.clone();
    second.period_start = first.period_end;
    second.period_end = add_months(second.period_start, 12);
    second.plan = "plus".into();
    refresh::record_paid_period(p.docs.as_ref(), &second, start())
        .await
        .unwrap();
    refresh::record_paid_period(p.docs.as_ref(), &first, start())
        .await
        .unwrap();
    let doc = doc_of(&p, ws).await;
    assert_eq!(
        (doc.period_start, doc.plan.as_str()),
        (second.period_start, "plus")
    );
}

async fn monthly_renewals_without_a_paid_period_are_recorded_for_reconciliation(p: Parts) {
    let ws = "monthly";
    monthly_max_paid(&p, ws).await;
    invoice_grant(&p, ws, 400).await;
    let refresher = Refresher::new(p.ledger.clone(), p.docs.clone());
    // Stripe renews (its record moves on) but the renewal's paid period never arrives.
    let renewed = add_months(start(), 1);
    set_subscription(&p, ws, PlanStatus::Active, Interval::Monthly, renewed).await;
    play_until(&p, renewed + Duration::days(3)).await;
    let items = p
        .docs
        .list_docs(&workspace_pk(&workspace(ws)), RECONCILE_PREFIX, 10)
        .await
        .unwrap();
    assert_eq!(items.len(), 1, "one reconciliation item for the period");
    assert!(items[0].sk.contains(&renewed.timestamp().to_string()));
    assert_eq!(
        plan_grants(&p, ws).await.len(),
        1,
        "the worker never grants a monthly plan's renewal"
    );
    // Checked once: the same job again records nothing more.
    refresher.run(&job_for(ws, p.clock.now())).await.unwrap();
    assert_eq!(
        p.docs
            .list_docs(&workspace_pk(&workspace(ws)), RECONCILE_PREFIX, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A period whose renewal Stripe voided (collection paused) is unpaid by design: no
/// reconciliation item, and the renewal after it is looked at once it is due; canceled in
/// it, the subscription renews no more and nothing is looked at again.
#[tokio::test]
async fn a_voided_renewal_is_not_reconciled_and_a_cancellation_in_it_ends_the_checks() {
    let p = embedded();
    let ws = "voided";
    monthly_max_paid(&p, ws).await;
    let renewed = add_months(start(), 1);
    set_subscription_voided(
        &p,
        ws,
        PlanStatus::Active,
        Interval::Monthly,
        renewed,
        Some(renewed),
    )
    .await;
    play_until(&p, renewed + Duration::days(3)).await;
    let items = || async {
        p.docs
            .list_docs(&workspace_pk(&workspace(ws)), RECONCILE_PREFIX, 10)
            .await
            .unwrap()
            .len()
    };
    assert_eq!(items().await, 0);
    let doc = doc_of(&p, ws).await;
    assert!(!doc.renewal_checked);
    assert!(
        doc.renewal_retry_at
            .is_some_and(|t| t >= add_months(renewed, 1)),
        "{doc:?}"
    );
    // Paused, its period's void not seen yet: no item, looked at again.
    set_subscription_voided(&p, ws, PlanStatus::Paused, Interval::Monthly, renewed, None).await;
    play_until(&p, add_months(renewed, 1) + Duration::days(1)).await;
    assert_eq!(items().await, 0);
    assert!(!doc_of(&p, ws).await.renewal_checked);
    // Canceled in the voided period: checked, never due again for it.
    set_subscription_voided(
        &p,
        ws,
        PlanStatus::Canceled,
        Interval::Monthly,
        renewed,
        Some(renewed),
    )
    .await;
    play_until(&p, add_months(renewed, 1) + Duration::days(4)).await;
    assert_eq!(items().await, 0);
    assert!(doc_of(&p, ws).await.renewal_checked);
}

#[tokio::test]
async fn monthly_reconciliation_embedded() {
    monthly_renewals_without_a_paid_period_are_recorded_for_reconciliation(embedded()).await;
}

#[tokio::test]
async fn monthly_reconciliation_dynamo() {
    monthly_renewals_without_a_paid_period_are_recorded_for_reconciliation(dynamo().await).await;
}

#[tokio::test]
async fn a_renewal_that_arrives_in_time_is_not_reconciled() {
    let p = embedded();
    let ws = "renewed";
    set_subscription(&p, ws, PlanStatus::Active, Interval::Monthly, start()).await;
    let first = period(ws, Interval::Monthly, "max", 0);
    refresh::record_paid_period(p.docs.as_ref(), &first, start())
        .await
        .unwrap();
    let mut next = first.clone();
    next.period_start = first.period_end;
    next.period_end = add_months(next.period_start, 1);
    p.clock.set(next.period_start + Duration::hours(1));
    set_subscription(
        &p,
        ws,
        PlanStatus::Active,
        Interval::Monthly,
        next.period_start,
    )
    .await;
    refresh::record_paid_period(p.docs.as_ref(), &next, p.clock.now())
        .await
        .unwrap();
    play_until(&p, next.period_start + Duration::days(5)).await;
    let items = p
        .docs
        .list_docs(&workspace_pk(&workspace(ws)), RECONCILE_PREFIX, 10)
        .await
        .unwrap();
    assert!(items.is_empty());
}

async fn lapsed_lots_and_200_overdue_holds_are_settled_in_bounded_operations(p: Parts) {
    let ws = "holds";
    monthly_max_paid(&p, ws).await;
    tally_tests::grant(&p.ledger, ws, 2_000).await;
    invoice_grant(&p, ws, 400).await;
    let estimate = tally_tests::image_estimate(&p.ledger);
    for _ in 0..200 {
        let hold = tally_tests::hold_request(
            ws,
            GenerationId::new(),
            &estimate,
            start() + Duration::hours(1),
        );
        p.ledger.execute(hold).await.unwrap();
    }
    let held = p.ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    assert_eq!(held.open_holds, 200);
    let entries_before = journal(&p, ws).await.len();
    // Past every hold's deadline and past the plan lot's rollover.
    p.clock.set(add_months(start(), 2) + Duration::days(1));
    let refresher = Refresher::new(p.ledger.clone(), p.docs.clone());
    let job = job_for(ws, p.clock.now());
    let report = refresher.run(&job).await.unwrap();
    assert_eq!(report.settle_operations, 8, "200 holds, 25 per operation");
    let entries = journal(&p, ws).await;
    let new = &entries[entries_before..];
    assert_eq!(
        new.iter()
            .filter(|e| e.reason == Reason::HoldExpired)
            .count(),
        200
    );
    assert!(new.iter().any(|e| e.reason == Reason::LotsExpired));
    let mut per_operation: BTreeMap<String, usize> = BTreeMap::new();
    for e in new {
        let key = e.refs.idempotency_key.clone().unwrap();
        *per_operation.entry(key).or_default() += 1;
    }
    assert!(
        per_operation.values().all(|n| *n <= 26),
        "{per_operation:?}"
    );
    let state = p.ledger.store.load(&workspace(ws)).await.unwrap().unwrap();
    assert_eq!(state.open_holds, 0);
    assert!(
        p.ledger
            .store
            .open_holds(&workspace(ws), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!state.needs_settling(p.clock.now()));
    assert_eq!(state.balance().available, Credits::new(2_000));
    assert_eq!(
        state.totals.expired,
        Credits::new(400),
        "the lapsed plan lot, all of it"
    );
    let rebuilt = WorkspaceState::from_journal(workspace(ws), &entries).unwrap();
    assert_eq!(
        (rebuilt.balance(), rebuilt.totals, rebuilt.lots.clone()),
        (state.balance(), state.totals, state.lots.clone())
    );
    state.check_invariants().unwrap();
    // The same job again (a duplicate delivery) writes nothing.
    let again = refresher.run(&job).await.unwrap();
    assert_eq!(again.settle_operations, 0);
    assert_eq!(journal(&p, ws).await.len(), entries.len());
}

#[tokio::test]
async fn settlement_embedded() {
    lapsed_lots_and_200_overdue_holds_are_settled_in_bounded_operations(embedded()).await;
}

#[tokio::test]
async fn settlement_dynamo() {
    lapsed_lots_and_200_overdue_holds_are_settled_in_bounded_operations(dynamo().await).await;
}

async fn the_due_index_returns_only_due_documents_per_shard(docs: Arc<dyn DocStore>) {
    let t = start();
    let mark = |shard, hours| {
        Some(DueMark {
            shard,
            at: t + Duration::hours(hours),
        })
    };
    let put = |pk: &'static str, expected: u64, due: Option<DueMark>| {
        let docs = docs.clone();
        async move {
            assert!(
                docs.put_doc_due(pk, "REFRESH", "{}", expected, due)
                    .await
                    .unwrap()
            );
        }
    };
    put("WORKSPACE#a", 0, mark(0, 1)).await;
    put("WORKSPACE#b", 0, mark(0, -2)).await;
    put("WORKSPACE#c", 0, mark(1, 0)).await;
    put("WORKSPACE#d", 0, mark(0, 5)).await;
    put("WORKSPACE#e", 0, None).await;
    let found = |shard, hours, limit| {
        let docs = docs.clone();
        async move {
            docs.due_docs(shard, t + Duration::hours(hours), limit)
                .await
                .unwrap()
                .into_iter()
                .map(|d| (d.pk, d.due))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        found(0, 1, 10).await,
        [
            ("WORKSPACE#b".to_owned(), t - Duration::hours(2)),
            ("WORKSPACE#a".to_owned(), t + Duration::hours(1)),
        ],
        "due ones of shard 0, earliest first"
    );
    assert_eq!(found(0, 1, 1).await.len(), 1, "the limit holds");
    assert_eq!(found(1, 1, 10).await, [("WORKSPACE#c".to_owned(), t)]);
    assert!(found(2, 100, 10).await.is_empty());
    // Re-filed later: no longer due now.
    put("WORKSPACE#b", 1, mark(0, 3)).await;
    assert_eq!(found(0, 1, 10).await.len(), 1);
    // Taken out of the index, and a stale version changes nothing.
    put("WORKSPACE#a", 1, None).await;
    assert!(
        !docs
            .put_doc_due("WORKSPACE#a", "REFRESH", "{}", 1, mark(0, 0))
            .await
            .unwrap()
    );
    assert!(found(0, 1, 10).await.is_empty());
    // A plain write replaces the whole document, mark included.
    assert!(
        docs.put_doc("WORKSPACE#d", "REFRESH", "{}", 1)
            .await
            .unwrap()
    );
    assert_eq!(
        found(0, 100, 10)
            .await
            .into_iter()
            .map(|d| d.0)
            .collect::<Vec<_>>(),
        ["WORKSPACE#b"]
    );
    assert_eq!(
        docs.get_doc("WORKSPACE#b", "REFRESH")
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

#[tokio::test]
async fn due_index_embedded() {
    the_due_index_returns_only_due_documents_per_shard(tally_tests::embedded_docs()).await;
}

#[tokio::test]
async fn due_index_dynamo() {
    the_due_index_returns_only_due_documents_per_shard(tally_tests::dynamo_docs().await).await;
}

#[test]
fn shards_are_stable_and_spread() {
    assert_eq!(shard_of("acme", 16), shard_of("acme", 16));
    let mut counts = [0u32; 16];
    for i in 0..16_000 {
        counts[shard_of(&format!("ws_{i}"), 16) as usize] += 1;
    }
    assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    assert_eq!(shard_of("anything", 1), 0);
}

#[tokio::test]
async fn the_scheduler_finds_due_workspaces_across_shards_and_sends_them_in_batches() {
    let p = dynamo().await;
    let names: Vec<String> = (0..23).map(|i| format!("ws{i}")).collect();
    for ws in &names {
        set_subscription(&p, ws, PlanStatus::Active, Interval::Yearly, start()).await;
        refresh::record_paid_period(
            p.docs.as_ref(),
            &period(ws, Interval::Yearly, "max", 0),
            start(),
        )
        .await
        .unwrap();
    }
    let shards: std::collections::BTreeSet<u32> = names.iter().map(|w| shard_of(w, 16)).collect();
    assert!(shards.len() > 5, "spread over shards");
    let refresher = Refresher::new(p.ledger.clone(), p.docs.clone());
    assert!(refresher.due_jobs(p.clock.now()).await.unwrap().is_empty());
    p.clock.set(add_months(start(), 1));
    let jobs = refresher.due_jobs(p.clock.now()).await.unwrap();
    assert_eq!(jobs.len(), 23);

    let endpoint = std::env::var("DYNAMODB_ENDPOINT").unwrap();
    let sqs = tally::queue::sqs::SqsQueue::local_client(&endpoint);
    let url = sqs
        .create_queue()
        .queue_name(format!("refresh-jobs-{}", ulid::Ulid::new()))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let sink = SqsJobs::new(sqs.clone(), &url);
    assert_eq!(refresher.schedule(&sink).await.unwrap(), 23);
    let mut received: Vec<Job> = Vec::new();
    for _ in 0..20 {
        let out = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap();
        let msgs = out.messages();
        if msgs.is_empty() {
            break;
        }
        for m in msgs {
            received.push(serde_json::from_str(m.body().unwrap()).unwrap());
            sqs.delete_message()
                .queue_url(&url)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    let mut got: Vec<String> = received.iter().map(|j| j.workspace.to_string()).collect();
    got.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(got, want);
    // The jobs run through the SQS worker grant month 2 once each.
    for job in &received {
        refresher.run(job).await.unwrap();
    }
    for ws in &names {
        assert_eq!(plan_grants(&p, ws).await.len(), 1, "{ws}");
    }
}

/// An interval switch in the very second a period began: two paid periods with the same
/// start. The switch's period is in force, in whichever order the two invoices arrive, and
/// whatever their numbers say (Stripe numbers a renewal's invoice as it finalizes it, up to
/// an hour after a switch made in its second was numbered): a year switched to is granted
/// its months, a year switched away from is not.
#[tokio::test]
async fn a_switch_in_the_second_a_period_began_is_the_period_in_force() {
    // (name, the period's own invoice: reason and number, the switch's number, the
    // switch goes to a year)
    let cases = [
        (
            "signup",
            "subscription_create",
            "ABC-0001",
            "ABC-0002",
            true,
        ),
        (
            "renewal",
            "subscription_cycle",
            "ABC-0003",
            "ABC-0002",
            true,
        ),
        (
            "to_monthly",
            "subscription_cycle",
            "ABC-0003",
            "ABC-0002",
            false,
        ),
    ];
    for (name, reason, number, switch_number, to_yearly) in cases {
        for switch_first in [false, true] {
            let p = embedded();
            let ws = format!("sw_{name}_{switch_first}");
            let (from, to) = if to_yearly {
                (Interval::Monthly, Interval::Yearly)
            } else {
                (Interval::Yearly, Interval::Monthly)
            };
            set_subscription(&p, &ws, PlanStatus::Active, to, start()).await;
            let own = PaidPeriod {
                invoice: InvoiceId::parse(&format!("in_{ws}_own")).unwrap(),
                ..period(&ws, from, "plus", 0)
            };
            let switch = PaidPeriod {
                invoice: InvoiceId::parse(&format!("in_{ws}_switch")).unwrap(),
                ..period(&ws, to, "max", 0)
            };
            let ranked = [
                (own, refresh::period_rank(Some(reason), Some(number))),
                (
                    switch,
                    refresh::period_rank(Some("subscription_update"), Some(switch_number)),
                ),
            ];
            let order: Vec<_> = if switch_first {
                ranked.iter().rev().collect()
            } else {
                ranked.iter().collect()
            };
            // Once each, then both again (duplicates change nothing).
            for pass in 0..2 {
                for (period, rank) in &order {
                    refresh::record_ranked_period(p.docs.as_ref(), period, *rank, start())
                        .await
                        .unwrap();
                }
                let doc = doc_of(&p, &ws).await;
                assert_eq!(
                    (doc.interval, doc.plan.as_str(), doc.invoice.as_str()),
                    (to, "max", format!("in_{ws}_switch").as_str()),
                    "{name}, switch first: {switch_first}, pass {pass}"
                );
            }
            p.clock.set(add_months(start(), 2));
            run_due(&p.ledger, &p.docs, p.clock.now()).await.unwrap();
            let months = if to_yearly { 2 } else { 0 };
            assert_eq!(
                plan_grants(&p, &ws).await.len(),
                months,
                "{name}, switch first: {switch_first}"
            );
        }
    }
}

/// Two switches in the renewal's second (yearly, to monthly, back to yearly): the third
/// period has the first one's start and end, and is still not taken for it. In every
/// arrival order the last switch's year is in force and granted its months.
#[tokio::test]
async fn two_switches_in_one_second_leave_the_last_in_force() {
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for (i, order) in orders.iter().enumerate() {
        let p = embedded();
        let ws = format!("two_sw{i}");
        set_subscription(&p, &ws, PlanStatus::Active, Interval::Yearly, start()).await;
        let invoice = |n: &str| InvoiceId::parse(&format!("in_{ws}_{n}")).unwrap();
        let periods = [
            (
                PaidPeriod {
                    invoice: invoice("renewal"),
                    ..period(&ws, Interval::Yearly, "plus", 0)
                },
                refresh::period_rank(Some("subscription_cycle"), Some("ABC-0006")),
            ),
            (
                PaidPeriod {
                    invoice: invoice("to_monthly"),
                    ..period(&ws, Interval::Monthly, "max", 0)
                },
                refresh::period_rank(Some("subscription_update"), Some("ABC-0002")),
            ),
            (
                PaidPeriod {
                    invoice: invoice("to_yearly"),
                    ..period(&ws, Interval::Yearly, "team", 0)
                },
                refresh::period_rank(Some("subscription_update"), Some("ABC-0003")),
            ),
        ];
        // Once each, then all again (duplicates change nothing).
        for pass in 0..2 {
            for k in order {
                let (period, rank) = &periods[*k];
                refresh::record_ranked_period(p.docs.as_ref(), period, *rank, start())
                    .await
                    .unwrap();
            }
            let doc = doc_of(&p, &ws).await;
            assert_eq!(
                (doc.plan.as_str(), doc.invoice.clone()),
                ("team", invoice("to_yearly")),
                "order {order:?}, pass {pass}"
            );
        }
    }
}

/// `DueShards` lowered after documents were filed in a higher shard: the scheduler still
/// finds them, and the worker files each one it runs under the new count.
#[tokio::test]
async fn lowering_the_shard_count_strands_no_document() {
    let p = embedded();
    let ws = (0..)
        .map(|i| format!("wide{i}"))
        .find(|w| shard_of(w, 64) >= 16)
        .unwrap();
    set_subscription(&p, &ws, PlanStatus::Active, Interval::Yearly, start()).await;
    refresh::record_paid_period(
        p.docs.as_ref(),
        &period(&ws, Interval::Yearly, "max", 0),
        start(),
    )
    .await
    .unwrap();
    let mut wide = Refresher::new(p.ledger.clone(), p.docs.clone());
    wide.settings.shards = 64;
    p.clock.set(add_months(start(), 1));
    wide.run(&job_for(&ws, p.clock.now())).await.unwrap();
    let high = shard_of(&ws, 64);
    let filed = p
        .docs
        .due_docs(high, DateTime::<Utc>::MAX_UTC, 10)
        .await
        .unwrap();
    assert_eq!(filed.len(), 1, "filed under 64 shards");

    // A new process with the default 16 shards.
    let narrow = Refresher::new(p.ledger.clone(), p.docs.clone());
    assert_eq!(narrow.shards_in_use().await.unwrap(), 64);
    p.clock.set(add_months(start(), 2));
    let jobs = narrow.due_jobs(p.clock.now()).await.unwrap();
    assert_eq!(jobs.len(), 1, "the document in shard {high} is found");
    narrow.run(&jobs[0]).await.unwrap();
    assert_eq!(plan_grants(&p, &ws).await.len(), 2);
    assert!(
        p.docs
            .due_docs(high, DateTime::<Utc>::MAX_UTC, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let low = p
        .docs
        .due_docs(shard_of(&ws, 16), DateTime::<Utc>::MAX_UTC, 10)
        .await
        .unwrap();
    assert_eq!(low.len(), 1, "filed again under 16 shards");
}

/// A sink that keeps what it was sent.
#[derive(Default)]
struct Sent(std::sync::Mutex<Vec<Job>>);

#[async_trait::async_trait]
impl JobSink for Sent {
    async fn send(&self, jobs: &[Job]) -> Result<(), tally::queue::QueueError> {
        self.0.lock().unwrap().extend_from_slice(jobs);
        Ok(())
    }
}

#[tokio::test]
async fn the_sqs_worker_handles_duplicates_and_reports_only_the_bad_message() {
    let p = embedded();
    let ws = "acme";
    paid_yearly(&p, ws, "max", 0).await;
    let sample = |name: &str| -> serde_json::Value {
        let path = format!(
            "{}/../events/credit-refresh/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let batch: SqsEvent = serde_json::from_value(sample("jobs-with-duplicate.json")).unwrap();
    let due: Job = serde_json::from_str(batch.records[0].body.as_deref().unwrap()).unwrap();
    assert_eq!(due.workspace, WorkspaceId::parse(ws).unwrap());
    assert_eq!(
        due.due,
        add_months(start(), 1),
        "the sample names the Feb 29 allotment"
    );
    p.clock.set(due.due + Duration::minutes(5));
    let sent = Sent::default();
    let refresher = Refresher::new(p.ledger.clone(), p.docs.clone());
    // The schedule's tick, as the Lambda receives it: one job for the due workspace.
    let answer = refresher
        .handle_event(&sent, sample("scheduled-tick.json"))
        .await
        .unwrap();
    assert_eq!(answer["jobs"], 1);
    assert_eq!(sent.0.lock().unwrap()[0].workspace, due.workspace);

    // The jobs batch: the unreadable message alone is reported for redelivery.
    let answer = refresher
        .handle_event(&sent, sample("jobs-with-duplicate.json"))
        .await
        .unwrap();
    let failed: Vec<String> = answer["batchItemFailures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(failed, [batch.records[1].message_id.clone().unwrap()]);
    // And the whole batch redelivered: still one grant.
    process_batch(
        &refresher,
        batch,
        tally::refresh::jobs::REFRESH_JOBS_MAX_RECEIVES,
    )
    .await;
    assert_eq!(plan_grants(&p, ws).await, [((2, 29), 400)]);
}

#[test]
fn the_sample_tick_is_an_eventbridge_scheduled_event() {
    let path = format!(
        "{}/../events/credit-refresh/scheduled-tick.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let event: aws_lambda_events::event::eventbridge::EventBridgeEvent =
        serde_json::from_value(v.clone()).unwrap();
    assert_eq!(event.detail_type, "Scheduled Event");
    assert!(
        v.get("Records").is_none(),
        "the handler tells the two triggers apart by Records"
    );
}

/// In the local system the schedule runs every due job in one pass: a workspace whose job
/// fails every time (its plan gone from the catalog) does not hold up the others.
#[tokio::test]
async fn one_failing_refresh_job_does_not_hold_up_the_others() {
    let p = embedded();
    // "broken" is in due shard 0, "fine" in 13: the failing job is read first.
    paid_yearly(&p, "broken", "gold", 0).await;
    paid_yearly(&p, "fine", "max", 0).await;
    p.clock.set(add_months(start(), 1) + Duration::minutes(1));
    let failed = run_due(&p.ledger, &p.docs, p.clock.now()).await;
    assert!(failed.is_err(), "the failure is still answered");
    // The other workspace got its month all the same.
    assert_eq!(plan_grants(&p, "fine").await.len(), 1);
    assert!(plan_grants(&p, "broken").await.is_empty());
}

/// One cent of a hundred given back, of an invoice of one part.
fn one_of_100() -> refresh::GivenBack {
    refresh::GivenBack {
        back: 1,
        paid: 100,
        parts: None,
    }
}
