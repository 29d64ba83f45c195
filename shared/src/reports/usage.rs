//! Credits spent in a time range, grouped by member, model or day, summed from the journal
//! itself: the totals of a report are exactly the journal's sums over the range.
//!
//! A charge counts where its journal entry falls (`at`), a reversal where it was given
//! back. Member and model come from the generation the entry names; an entry that names
//! none (there are none today) is grouped under `unknown`.

use crate::ids::{GenerationId, WorkspaceId};
use crate::ledger::{Entry, Reason};
use crate::money::Credits;
use crate::store::{CREATION_ORDER_SLACK, EntryQuery, LedgerStore, StoreError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use utoipa::ToSchema;

/// How usage is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// The member who started the generation (token subject).
    Member,
    Model,
    /// The UTC day of the journal entry (`YYYY-MM-DD`).
    Day,
}

/// One group's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageGroup {
    pub key: String,
    /// Credits charged for generations.
    pub spent: Credits,
    /// Credits given back by reversing charges.
    pub reversed: Credits,
    /// Generations charged.
    pub charges: u64,
}

/// Credits spent in `[from, to)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub group_by: GroupBy,
    /// Highest spend first.
    pub groups: Vec<UsageGroup>,
    /// The sum of the journal's `spent` totals over the range.
    pub spent: Credits,
    pub reversed: Credits,
    pub charges: u64,
}

/// Journal entries with `at` in `[from, to)`, newest first, page by page: `each` gets every
/// page in turn and answers whether to go on. Reads back from the newest entry and stops once entries are older than
/// `from` (allowing for clocks of concurrent writers).
pub async fn entries_between<F>(
    store: &dyn LedgerStore,
    workspace: &WorkspaceId,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    mut each: F,
) -> Result<(), StoreError>
where
    F: FnMut(Vec<Entry>) -> bool,
{
    let mut before = match to {
        Some(t) => Some(first_seq_at_or_after(store, workspace, slack_after(t)).await?),
        None => None,
    };
    loop {
        let page = store
            .entries(workspace, &EntryQuery { before, limit: 100 })
            .await?;
        let Some((last_seq, last_at)) = page.last().map(|e| (e.seq, e.at)) else {
            return Ok(());
        };
        before = Some(last_seq);
        let past = from.is_some_and(|f| last_at < slack_before(f));
        let full = page.len() == 100;
        let kept: Vec<Entry> = page
            .into_iter()
            .filter(|e| from.is_none_or(|f| e.at >= f) && to.is_none_or(|t| e.at < t))
            .collect();
        if !kept.is_empty() && !each(kept) {
            return Ok(());
        }
        if past || !full || last_seq <= 1 {
            return Ok(());
        }
    }
}

/// `t` less the clock slack of concurrent writers (saturating at the earliest instant).
pub fn slack_before(t: DateTime<Utc>) -> DateTime<Utc> {
    t.checked_sub_signed(CREATION_ORDER_SLACK)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `t` plus the clock slack (saturating at the latest instant).
pub fn slack_after(t: DateTime<Utc>) -> DateTime<Utc> {
    t.checked_add_signed(CREATION_ORDER_SLACK)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The first sequence number whose entry is at or after `t` (one past the last entry when
/// none is): a binary search over the journal, which is in time order, so a report of a
/// range long ago reads a few dozen entries to find its start instead of everything since.
pub async fn first_seq_at_or_after(
    store: &dyn LedgerStore,
    workspace: &WorkspaceId,
    t: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let Some(state) = store.load(workspace).await? else {
        return Ok(1);
    };
    let (mut lo, mut hi) = (1u64, state.next_seq);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at = store
            .entries_by_seq(workspace, &[mid])
            .await?
            .first()
            .map(|e| e.at)
            .ok_or_else(|| StoreError::decode(format!("journal entry {mid} is missing")))?;
        if at >= t {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

fn add(total: &mut Credits, more: Credits) -> Result<(), StoreError> {
    *total = total
        .checked_add(more)
        .ok_or_else(|| StoreError::decode("usage total overflows"))?;
    Ok(())
}

/// Most charges one report sums (each may need its generation read).
pub const MAX_REPORT_ENTRIES: usize = 20_000;

/// Generations read at once for a report's groups.
const CONCURRENT_READS: usize = 16;

/// Totals credits spent in `[from, to)` grouped by `group_by`; `None` when the range holds
/// more than `max_entries` charges, or as many reversals (a narrower range answers).
pub async fn usage(
    store: &dyn LedgerStore,
    workspace: &WorkspaceId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    group_by: GroupBy,
    max_entries: usize,
) -> Result<Option<Usage>, StoreError> {
    let mut entries = Vec::new();
    if from >= to {
        return Ok(Some(Usage {
            from,
            to,
            group_by,
            groups: Vec::new(),
            spent: Credits::ZERO,
            reversed: Credits::ZERO,
            charges: 0,
        }));
    }
    let (mut charged, mut reversals) = (0usize, 0usize);
    entries_between(store, workspace, Some(from), Some(to), |page| {
        for e in page {
            match e.reason {
                Reason::GenerationCharged => charged += 1,
                Reason::Reversal => reversals += 1,
                _ => continue,
            }
            entries.push((e.at, e.reason, e.refs.generation, e.totals));
        }
        // Past the cap, reading on is for nothing.
        charged <= max_entries && reversals <= max_entries
    })
    .await?;
    if charged > max_entries || reversals > max_entries {
        return Ok(None);
    }
    // Member and model of each generation named, read once each, several at a time.
    let mut who: HashMap<GenerationId, (String, String)> = HashMap::new();
    if group_by != GroupBy::Day {
        use futures_util::{StreamExt, TryStreamExt};
        let named: std::collections::BTreeSet<GenerationId> =
            entries.iter().filter_map(|(_, _, g, _)| *g).collect();
        let found: Vec<_> = futures_util::stream::iter(named)
            .map(|g| async move { store.generation(workspace, g).await })
            .buffer_unordered(CONCURRENT_READS)
            .try_collect()
            .await?;
        for g in found.into_iter().flatten() {
            who.insert(g.id, (g.started_by, g.estimate.model));
        }
    }
    let mut groups: BTreeMap<String, UsageGroup> = BTreeMap::new();
    let (mut spent, mut reversed, mut charges) = (Credits::ZERO, Credits::ZERO, 0u64);
    for (at, reason, generation, totals) in entries {
        let key = match group_by {
            GroupBy::Day => at.format("%Y-%m-%d").to_string(),
            GroupBy::Member | GroupBy::Model => generation
                .and_then(|g| who.get(&g))
                .map(|(member, model)| {
                    if group_by == GroupBy::Member {
                        member.clone()
                    } else {
                        model.clone()
                    }
                })
                .unwrap_or_else(|| "unknown".into()),
        };
        let group = groups.entry(key.clone()).or_insert_with(|| UsageGroup {
            key,
            ..UsageGroup::default()
        });
        match reason {
            Reason::GenerationCharged => {
                add(&mut group.spent, totals.spent)?;
                add(&mut spent, totals.spent)?;
                group.charges += 1;
                charges += 1;
            }
            _ => {
                add(&mut group.reversed, totals.issued)?;
                add(&mut reversed, totals.issued)?;
            }
        }
    }
    let mut groups: Vec<UsageGroup> = groups.into_values().collect();
    groups.sort_by(|a, b| b.spent.cmp(&a.spent).then_with(|| a.key.cmp(&b.key)));
    Ok(Some(Usage {
        from,
        to,
        group_by,
        groups,
        spent,
        reversed,
        charges,
    }))
}
