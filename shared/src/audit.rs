//! The staff audit log: every read of a workspace by support staff or finance, one small
//! document per read (`WORKSPACE#<id>` / `AUDIT#<millis>#<id>`), written before the data is
//! answered. A read whose audit record cannot be written is not answered.

use crate::billing::records::{BillingProfile, PROFILE_SK, workspace_pk};
use crate::http::Identity;
use crate::ids::WorkspaceId;
use crate::store::{DocStore, LedgerStore, StoreError, docs};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub const AUDIT_PREFIX: &str = "AUDIT#";

/// One staff read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditRecord {
    pub id: String,
    pub at: DateTime<Utc>,
    /// The staff member (token subject) or operator of the command-line tool.
    pub staff: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[schema(value_type = String)]
    pub workspace: WorkspaceId,
    /// What was read, e.g. `GET /v1/admin/workspaces/{workspace_id}/ledger`.
    pub action: String,
    /// The filters it was read with (query string), if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// `api` or `cli`.
    pub via: String,
}

/// A new record id: ULIDs in increasing order within this process, so records of the same
/// millisecond still list in the order they were made.
fn new_id() -> String {
    static GENERATOR: std::sync::Mutex<Option<ulid::Generator>> = std::sync::Mutex::new(None);
    let mut g = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let id = g
        .get_or_insert_with(ulid::Generator::new)
        .generate()
        .unwrap_or_else(|_| ulid::Ulid::new());
    format!("aud_{id}")
}

fn audit_sk(at: DateTime<Utc>, id: &str) -> String {
    format!("{AUDIT_PREFIX}{:013}#{id}", at.timestamp_millis().max(0))
}

/// Who reads, as the audit log names them.
#[derive(Debug, Clone)]
pub struct Reader {
    pub staff: String,
    pub email: Option<String>,
    pub via: &'static str,
}

impl From<&Identity> for Reader {
    fn from(who: &Identity) -> Self {
        Self {
            staff: who.sub.clone(),
            email: who.email.clone(),
            via: "api",
        }
    }
}

/// Records one read; the caller answers only once this returned `Ok`.
pub async fn record(
    store: &dyn DocStore,
    at: DateTime<Utc>,
    reader: &Reader,
    workspace: &WorkspaceId,
    action: &str,
    detail: &str,
) -> Result<AuditRecord, StoreError> {
    let id = new_id();
    let rec = AuditRecord {
        id: id.clone(),
        at,
        staff: reader.staff.clone(),
        email: reader.email.clone(),
        workspace: workspace.clone(),
        action: action.to_owned(),
        detail: detail.chars().take(1000).collect(),
        via: reader.via.to_owned(),
    };
    let body = crate::store::encode(&rec)?;
    if !store
        .put_doc(&workspace_pk(workspace), &audit_sk(at, &id), &body, 0)
        .await?
    {
        return Err(StoreError::backend("audit record id collided"));
    }
    Ok(rec)
}

/// Where reads across workspaces (the staff ticket queue) are recorded.
pub const GLOBAL_PK: &str = "AUDIT";

/// Records one read that spans workspaces (the staff ticket queue), in the global log.
pub async fn record_global(
    store: &dyn DocStore,
    at: DateTime<Utc>,
    reader: &Reader,
    action: &str,
    detail: &str,
) -> Result<(), StoreError> {
    let id = new_id();
    let rec = serde_json::json!({
        "id": id, "at": at, "staff": reader.staff, "email": reader.email,
        "action": action, "detail": detail.chars().take(1000).collect::<String>(),
        "via": reader.via,
    });
    let body = crate::store::encode(&rec)?;
    if !store
        .put_doc(GLOBAL_PK, &audit_sk(at, &id), &body, 0)
        .await?
    {
        return Err(StoreError::backend("audit record id collided"));
    }
    Ok(())
}

/// A workspace's audit log, newest first, from below the cursor `before` (a sort key this
/// module handed out).
pub async fn page(
    store: &dyn DocStore,
    workspace: &WorkspaceId,
    before: Option<&str>,
    limit: usize,
) -> Result<(Vec<AuditRecord>, Option<String>), StoreError> {
    let mut rows = docs::page::<AuditRecord>(
        store,
        &workspace_pk(workspace),
        AUDIT_PREFIX,
        before,
        limit + 1,
    )
    .await?;
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last()
            .map(|(sk, _)| sk.trim_start_matches(AUDIT_PREFIX).to_owned())
    } else {
        None
    };
    Ok((rows.into_iter().map(|(_, r)| r).collect(), next))
}

/// The sort key behind an audit cursor, if it is one [`page`] hands out.
pub fn cursor_sk(cursor: &str) -> Option<String> {
    let (millis, id) = cursor.split_once('#')?;
    let ok = millis.len() == 13
        && millis.bytes().all(|b| b.is_ascii_digit())
        && id.len() == 30
        && id.starts_with("aud_")
        && id[4..].bytes().all(|b| b.is_ascii_alphanumeric());
    ok.then(|| format!("{AUDIT_PREFIX}{cursor}"))
}

/// Whether a workspace exists: it has a journal or a billing profile. Staff reads and
/// adjustments refuse a workspace that does not, so a mistyped id is an error rather than
/// an empty answer or a phantom workspace with credits.
pub async fn workspace_exists(
    ledger: &dyn LedgerStore,
    docs_store: &dyn DocStore,
    workspace: &WorkspaceId,
) -> Result<bool, StoreError> {
    Ok(ledger.load(workspace).await?.is_some()
        || docs::get::<BillingProfile>(docs_store, &workspace_pk(workspace), PROFILE_SK)
            .await?
            .is_some())
}

/// A staff read of a workspace that exists, not recorded yet: the caller reads (a refused
/// query changes nothing, not even the audit log), then [`StaffRead::record`]s it and only
/// then answers.
#[must_use = "a staff read answers only once recorded"]
pub struct StaffRead {
    pub workspace: WorkspaceId,
    reader: Reader,
    at: DateTime<Utc>,
    action: String,
    detail: String,
}

impl StaffRead {
    /// Records the read once its answer is known, and hands the answer on: a query refused
    /// as invalid (`validation_failed`, checked before anything is read) is not recorded;
    /// every other answer is, refusals made after reading included (a generation that is
    /// not the workspace's, a range too large to answer, a failure midway).
    pub async fn answered<T>(
        self,
        docs_store: &dyn DocStore,
        answer: Result<T, crate::http::Problem>,
    ) -> Result<T, crate::http::Problem> {
        if let Err(p) = &answer
            && p.code == "validation_failed"
        {
            return answer;
        }
        self.record(docs_store).await?;
        answer
    }

    /// Records the read in the workspace's audit log.
    pub async fn record(self, docs_store: &dyn DocStore) -> Result<WorkspaceId, StoreError> {
        record(
            docs_store,
            self.at,
            &self.reader,
            &self.workspace,
            &self.action,
            &self.detail,
        )
        .await?;
        Ok(self.workspace)
    }
}

/// The start of every staff read of a workspace: parses the id and refuses a workspace that
/// does not exist (404). The read is recorded once the answer is ready.
pub async fn staff_read(
    docs_store: &dyn DocStore,
    ledger: &dyn LedgerStore,
    at: DateTime<Utc>,
    who: &Identity,
    workspace_id: &str,
    action: &str,
    detail: &str,
) -> Result<StaffRead, crate::http::Problem> {
    let workspace = WorkspaceId::parse(workspace_id)
        .map_err(|e| crate::http::Problem::validation("workspace_id", &e.to_string()))?;
    if !workspace_exists(ledger, docs_store, &workspace).await? {
        return Err(crate::http::Problem::not_found(format!(
            "workspace {workspace} has no journal and no billing profile; check the id"
        )));
    }
    Ok(StaffRead {
        workspace,
        reader: Reader::from(who),
        at,
        action: action.to_owned(),
        detail: detail.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let at = DateTime::from_timestamp(1_764_000_000, 0).unwrap();
        let id = new_id();
        let sk = audit_sk(at, &id);
        let cursor = sk.trim_start_matches(AUDIT_PREFIX);
        assert_eq!(cursor_sk(cursor).as_deref(), Some(sk.as_str()));
        for bad in ["", "1#aud_x", "1764000000000#x", "1764000000000", "abc#def"] {
            assert_eq!(cursor_sk(bad), None, "{bad}");
        }
    }
}
