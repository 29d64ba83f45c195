//! Embedded store on redb: a file under `TALLY_DATA_DIR` for the local runner, or memory for
//! tests. One redb write transaction per commit gives the same all-or-nothing guarantee as a
//! DynamoDB `TransactWriteItems`.

use super::*;
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;

/// `workspace` -> state JSON.
const ACCOUNTS: TableDefinition<&str, &str> = TableDefinition::new("workspaces");
/// `workspace`, seq -> entry JSON.
const ENTRIES: TableDefinition<(&str, u64), &str> = TableDefinition::new("entries");
/// `workspace`, key -> idempotency record JSON.
const IDEMPOTENCY: TableDefinition<(&str, &str), &str> = TableDefinition::new("idempotency");
/// `workspace`, generation id -> generation JSON (ULID text sorts by time).
const GENERATIONS: TableDefinition<(&str, &str), &str> = TableDefinition::new("generations");
/// `workspace`, deadline (ms), generation id -> open hold JSON.
const HOLDS: TableDefinition<(&str, i64, &str), &str> = TableDefinition::new("holds");
/// `workspace`, status, generation id -> nothing: generations by status.
const BY_STATUS: TableDefinition<(&str, &str, &str), ()> =
    TableDefinition::new("generations_by_status");
/// generation id -> workspace.
const GENERATION_OWNERS: TableDefinition<&str, &str> = TableDefinition::new("generation_owners");
/// pk, sk -> (version, body).
const DOCS: TableDefinition<(&str, &str), (u64, &str)> = TableDefinition::new("docs");
/// The due index: shard, due time (ms), pk, sk -> nothing.
const DUE: TableDefinition<(u32, i64, &str, &str), ()> = TableDefinition::new("due");
/// Where each document is filed in the due index: pk, sk -> (shard, due time in ms).
const DUE_OF: TableDefinition<(&str, &str), (u32, i64)> = TableDefinition::new("due_of");
/// The local runner's queues: (queue, sequence) → (dead-lettered, message JSON). A message
/// is written before its send is acknowledged and removed once consumed.
const QUEUE: TableDefinition<(&str, u64), (bool, &str)> = TableDefinition::new("queue");

/// The redb-backed store.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl EmbeddedStore {
    /// Writes a document under its version guard; `due` is `None` to leave its due mark
    /// alone, `Some(mark)` to file it anew (or take it out with `Some(None)`), in the same
    /// transaction.
    async fn write_doc(
        &self,
        pk: &str,
        sk: &str,
        body: &str,
        expected: u64,
        due: Option<Option<DueMark>>,
    ) -> Result<bool, StoreError> {
        let (pk, sk, body) = (pk.to_owned(), sk.to_owned(), body.to_owned());
        self.read(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            {
                let mut t = tx.open_table(DOCS).map_err(backend)?;
                let key = (pk.as_str(), sk.as_str());
                let stored = t
                    .get(key)
                    .map_err(backend)?
                    .map(|v| v.value().0)
                    .unwrap_or(0);
                if stored != expected {
                    return Ok(false);
                }
                t.insert(key, (expected + 1, body.as_str()))
                    .map_err(backend)?;
                // A plain put replaces the whole item, as DynamoDB's PutItem does: the
                // document leaves the index unless the write files it again.
                let mut index = tx.open_table(DUE).map_err(backend)?;
                let mut filed = tx.open_table(DUE_OF).map_err(backend)?;
                let old = filed.remove(key).map_err(backend)?.map(|v| v.value());
                if let Some((shard, at)) = old {
                    index
                        .remove((shard, at, pk.as_str(), sk.as_str()))
                        .map_err(backend)?;
                }
                if let Some(Some(mark)) = due {
                    let at = docs::due_millis(mark.at);
                    index
                        .insert((mark.shard, at, pk.as_str(), sk.as_str()), ())
                        .map_err(backend)?;
                    filed.insert(key, (mark.shard, at)).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)?;
            Ok(true)
        })
        .await
    }
}

fn backend(e: impl Into<BoxError>) -> StoreError {
    StoreError::backend(e)
}

impl EmbeddedStore {
    /// Opens (or creates) `tally.redb` in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(backend)?;
        let db = Database::create(dir.join("tally.redb")).map_err(backend)?;
        Self::init(db)
    }

    /// A store that lives only as long as the process.
    pub fn in_memory() -> Self {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("in-memory redb");
        Self::init(db).expect("in-memory redb tables")
    }

    fn init(db: Database) -> Result<Self, StoreError> {
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(ACCOUNTS).map_err(backend)?;
        tx.open_table(ENTRIES).map_err(backend)?;
        tx.open_table(IDEMPOTENCY).map_err(backend)?;
        tx.open_table(GENERATIONS).map_err(backend)?;
        tx.open_table(GENERATION_OWNERS).map_err(backend)?;
        tx.open_table(HOLDS).map_err(backend)?;
        tx.open_table(BY_STATUS).map_err(backend)?;
        tx.open_table(DOCS).map_err(backend)?;
        tx.open_table(DUE).map_err(backend)?;
        tx.open_table(DUE_OF).map_err(backend)?;
        tx.open_table(QUEUE).map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Keeps a queued message until [`queue_settle`](Self::queue_settle).
    pub async fn queue_put(&self, queue: &str, seq: u64, message: &str) -> Result<(), StoreError> {
        let (queue, message) = (queue.to_owned(), message.to_owned());
        self.read(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            tx.open_table(QUEUE)
                .map_err(backend)?
                .insert((queue.as_str(), seq), (false, message.as_str()))
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(())
        })
        .await
    }

    /// A queued message was consumed (removed) or dead-lettered (kept, marked).
    pub async fn queue_settle(&self, queue: &str, seq: u64, dead: bool) -> Result<(), StoreError> {
        let queue = queue.to_owned();
        self.read(move |db| {
            let tx = db.begin_write().map_err(backend)?;
            {
                let mut t = tx.open_table(QUEUE).map_err(backend)?;
                let key = (queue.as_str(), seq);
                let message = t
                    .remove(key)
                    .map_err(backend)?
                    .map(|v| v.value().1.to_owned());
                if let (true, Some(m)) = (dead, message) {
                    t.insert(key, (true, m.as_str())).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)?;
            Ok(())
        })
        .await
    }

    /// What a queue holds, in order: (sequence, dead-lettered, message JSON).
    pub fn queue_contents(&self, queue: &str) -> Result<Vec<(u64, bool, String)>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(QUEUE).map_err(backend)?;
        let mut out = Vec::new();
        for item in t.range((queue, 0)..=(queue, u64::MAX)).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            let (dead, m) = v.value();
            out.push((k.value().1, dead, m.to_owned()));
        }
        Ok(out)
    }

    /// redb calls block; keep them off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, CommitError> + Send + 'static,
    ) -> Result<T, CommitError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| CommitError::Store(backend(e)))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.blocking(move |db| f(db).map_err(CommitError::Store))
            .await
            .map_err(|e| match e {
                CommitError::Store(s) => s,
                other => StoreError::backend(other),
            })
    }
}

#[async_trait]
impl LedgerStore for EmbeddedStore {
    async fn load(&self, workspace: &WorkspaceId) -> Result<Option<WorkspaceState>, StoreError> {
        let workspace = workspace.to_string();
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(ACCOUNTS).map_err(backend)?;
            let v = t.get(workspace.as_str()).map_err(backend)?;
            v.map(|v| decode::<WorkspaceState>(v.value()).map(WorkspaceState::normalized))
                .transpose()
        })
        .await
    }

    async fn read_op(
        &self,
        workspace: &WorkspaceId,
        key: &IdempotencyKey,
        generation: Option<GenerationId>,
    ) -> Result<OpRead, StoreError> {
        let (workspace, key) = (workspace.to_string(), key.to_string());
        // One read transaction: a snapshot of all three.
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let accounts = tx.open_table(ACCOUNTS).map_err(backend)?;
            let state = accounts
                .get(workspace.as_str())
                .map_err(backend)?
                .map(|v| decode::<WorkspaceState>(v.value()).map(WorkspaceState::normalized))
                .transpose()?;
            let idem = tx.open_table(IDEMPOTENCY).map_err(backend)?;
            let idempotency = idem
                .get((workspace.as_str(), key.as_str()))
                .map_err(backend)?
                .map(|v| decode(v.value()))
                .transpose()?;
            let generation = match generation {
                None => None,
                Some(id) => {
                    let id = id.to_string();
                    let gens = tx.open_table(GENERATIONS).map_err(backend)?;
                    let record: Option<Generation> = gens
                        .get((workspace.as_str(), id.as_str()))
                        .map_err(backend)?
                        .map(|v| decode(v.value()))
                        .transpose()?;
                    match record {
                        None => None,
                        Some(record) => {
                            let holds = tx.open_table(HOLDS).map_err(backend)?;
                            let at = record.deadline.timestamp_millis();
                            let hold = holds
                                .get((workspace.as_str(), at, id.as_str()))
                                .map_err(backend)?
                                .map(|v| decode(v.value()))
                                .transpose()?;
                            Some(StoredGeneration { record, hold })
                        }
                    }
                }
            };
            Ok(OpRead {
                state,
                idempotency,
                generation,
            })
        })
        .await
    }

    async fn open_holds(
        &self,
        workspace: &WorkspaceId,
        until: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<Hold>, StoreError> {
        let workspace = workspace.to_string();
        let until = until.map_or(i64::MAX, |t| t.timestamp_millis());
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(HOLDS).map_err(backend)?;
            let mut out = Vec::new();
            for item in t
                .range(
                    (workspace.as_str(), i64::MIN, "")..=(workspace.as_str(), until, "\u{10FFFF}"),
                )
                .map_err(backend)?
                .take(limit)
            {
                let (_, v) = item.map_err(backend)?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn commit(&self, c: Commit) -> Result<(), CommitError> {
        c.check_size()?;
        self.blocking(move |db| {
            let workspace = c.state.workspace.to_string();
            let tx = db.begin_write().map_err(backend)?;
            {
                let mut idem = tx.open_table(IDEMPOTENCY).map_err(backend)?;
                let key = (workspace.as_str(), c.idempotency.key.as_str());
                if idem.get(key).map_err(backend)?.is_some() {
                    return Err(CommitError::Duplicate);
                }
                let mut workspaces = tx.open_table(ACCOUNTS).map_err(backend)?;
                let stored_version = match workspaces.get(workspace.as_str()).map_err(backend)? {
                    Some(v) => decode::<WorkspaceState>(v.value())?.version,
                    None => 0,
                };
                if stored_version != c.expected_version() {
                    return Err(CommitError::Conflict);
                }
                workspaces
                    .insert(workspace.as_str(), encode(&c.state)?.as_str())
                    .map_err(backend)?;
                let mut entries = tx.open_table(ENTRIES).map_err(backend)?;
                for e in &c.entries {
                    let k = (workspace.as_str(), e.seq);
                    if entries.get(k).map_err(backend)?.is_some() {
                        return Err(CommitError::Conflict);
                    }
                    entries.insert(k, encode(e)?.as_str()).map_err(backend)?;
                }
                idem.insert(key, encode(&c.idempotency)?.as_str())
                    .map_err(backend)?;
                let mut gens = tx.open_table(GENERATIONS).map_err(backend)?;
                let mut by_status = tx.open_table(BY_STATUS).map_err(backend)?;
                for (prior, g) in &c.generations {
                    let id = g.id.to_string();
                    let key = (workspace.as_str(), id.as_str());
                    let stored = gens
                        .get(key)
                        .map_err(backend)?
                        .map(|v| decode::<Generation>(v.value()).map(|g| g.status))
                        .transpose()?;
                    if stored != *prior {
                        return Err(if prior.is_none() {
                            CommitError::GenerationExists
                        } else {
                            CommitError::Conflict
                        });
                    }
                    gens.insert(key, encode(g)?.as_str()).map_err(backend)?;
                    if let Some(p) = prior {
                        by_status
                            .remove((workspace.as_str(), p.as_str(), id.as_str()))
                            .map_err(backend)?;
                    }
                    by_status
                        .insert((workspace.as_str(), g.status.as_str(), id.as_str()), ())
                        .map_err(backend)?;
                }
                let mut holds = tx.open_table(HOLDS).map_err(backend)?;
                for h in &c.closed {
                    let id = h.generation.to_string();
                    holds
                        .remove((
                            workspace.as_str(),
                            h.deadline.timestamp_millis(),
                            id.as_str(),
                        ))
                        .map_err(backend)?;
                }
                for h in &c.placed {
                    let id = h.generation.to_string();
                    holds
                        .insert(
                            (
                                workspace.as_str(),
                                h.deadline.timestamp_millis(),
                                id.as_str(),
                            ),
                            encode(h)?.as_str(),
                        )
                        .map_err(backend)?;
                }
                let mut owners = tx.open_table(GENERATION_OWNERS).map_err(backend)?;
                for id in &c.new_generations {
                    let id = id.to_string();
                    if owners.get(id.as_str()).map_err(backend)?.is_some() {
                        return Err(CommitError::GenerationExists);
                    }
                    owners
                        .insert(id.as_str(), workspace.as_str())
                        .map_err(backend)?;
                }
            }
            // Dropping `tx` without commit (the early returns above) aborts everything.
            tx.commit().map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn idempotency(
        &self,
        workspace: &WorkspaceId,
        key: &IdempotencyKey,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let (workspace, key) = (workspace.to_string(), key.to_string());
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(IDEMPOTENCY).map_err(backend)?;
            let v = t.get((workspace.as_str(), key.as_str())).map_err(backend)?;
            v.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    async fn generation(
        &self,
        workspace: &WorkspaceId,
        id: GenerationId,
    ) -> Result<Option<Generation>, StoreError> {
        let (workspace, id) = (workspace.to_string(), id.to_string());
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(GENERATIONS).map_err(backend)?;
            let v = t.get((workspace.as_str(), id.as_str())).map_err(backend)?;
            v.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    async fn generation_owner(&self, id: GenerationId) -> Result<Option<WorkspaceId>, StoreError> {
        let id = id.to_string();
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(GENERATION_OWNERS).map_err(backend)?;
            let v = t.get(id.as_str()).map_err(backend)?;
            v.map(|v| WorkspaceId::parse(v.value()).map_err(StoreError::decode))
                .transpose()
        })
        .await
    }

    async fn generations(
        &self,
        workspace: &WorkspaceId,
        query: &GenerationQuery,
    ) -> Result<Vec<Generation>, StoreError> {
        let workspace = workspace.to_string();
        let query = query.clone();
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(GENERATIONS).map_err(backend)?;
            let upper = query.upper().map(|b| b.to_string());
            // A status is read from its index: only generations with that status.
            if let Some(status) = query.status {
                let index = tx.open_table(BY_STATUS).map_err(backend)?;
                let (ws, st) = (workspace.as_str(), status.as_str());
                let range = match &upper {
                    Some(b) => index.range((ws, st, "")..(ws, st, b.as_str())),
                    None => index.range((ws, st, "")..=(ws, st, "\u{10FFFF}")),
                }
                .map_err(backend)?;
                let mut out = Vec::new();
                for item in range.rev() {
                    let (k, _) = item.map_err(backend)?;
                    let (_, _, id) = k.value();
                    let Some(v) = t.get((ws, id)).map_err(backend)? else {
                        continue;
                    };
                    let g: Generation = decode(v.value())?;
                    if query.past_range(&g) {
                        break;
                    }
                    if matches_query(&g, &query) {
                        out.push(g);
                        if out.len() >= query.limit {
                            break;
                        }
                    }
                }
                return Ok(out);
            }
            let range = match &upper {
                Some(b) => t.range((workspace.as_str(), "")..(workspace.as_str(), b.as_str())),
                None => t.range((workspace.as_str(), "")..=(workspace.as_str(), "\u{10FFFF}")),
            }
            .map_err(backend)?;
            let mut out = Vec::new();
            for item in range.rev() {
                let (_, v) = item.map_err(backend)?;
                let g: Generation = decode(v.value())?;
                if query.past_range(&g) {
                    break;
                }
                if matches_query(&g, &query) {
                    out.push(g);
                    if out.len() >= query.limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn entries(
        &self,
        workspace: &WorkspaceId,
        query: &EntryQuery,
    ) -> Result<Vec<Entry>, StoreError> {
        let workspace = workspace.to_string();
        let query = query.clone();
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(ENTRIES).map_err(backend)?;
            let upper = query.before.unwrap_or(u64::MAX);
            let mut out = Vec::new();
            for item in t
                .range((workspace.as_str(), 0)..(workspace.as_str(), upper))
                .map_err(backend)?
                .rev()
                .take(query.limit)
            {
                let (_, v) = item.map_err(backend)?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn entries_by_seq(
        &self,
        workspace: &WorkspaceId,
        seqs: &[u64],
    ) -> Result<Vec<Entry>, StoreError> {
        let workspace = workspace.to_string();
        let seqs = seqs.to_vec();
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(ENTRIES).map_err(backend)?;
            let mut out = Vec::new();
            for seq in seqs {
                if let Some(v) = t.get((workspace.as_str(), seq)).map_err(backend)? {
                    out.push(decode(v.value())?);
                }
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl DocStore for EmbeddedStore {
    async fn get_doc(&self, pk: &str, sk: &str) -> Result<Option<Doc>, StoreError> {
        let (pk, sk) = (pk.to_owned(), sk.to_owned());
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(DOCS).map_err(backend)?;
            let v = t.get((pk.as_str(), sk.as_str())).map_err(backend)?;
            Ok(v.map(|v| {
                let (version, body) = v.value();
                Doc {
                    pk: pk.clone(),
                    sk: sk.clone(),
                    body: body.to_owned(),
                    version,
                }
            }))
        })
        .await
    }

    async fn put_doc(
        &self,
        pk: &str,
        sk: &str,
        body: &str,
        expected: u64,
    ) -> Result<bool, StoreError> {
        self.write_doc(pk, sk, body, expected, None).await
    }

    async fn put_doc_due(
        &self,
        pk: &str,
        sk: &str,
        body: &str,
        expected: u64,
        due: Option<DueMark>,
    ) -> Result<bool, StoreError> {
        self.write_doc(pk, sk, body, expected, Some(due)).await
    }

    async fn due_docs(
        &self,
        shard: u32,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueDoc>, StoreError> {
        let until = docs::due_millis(until);
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(DUE).map_err(backend)?;
            let mut out = Vec::new();
            for item in t
                .range((shard, i64::MIN, "", "")..=(shard, until, "\u{10FFFF}", "\u{10FFFF}"))
                .map_err(backend)?
                .take(limit)
            {
                let (k, _) = item.map_err(backend)?;
                let (_, at, pk, sk) = k.value();
                out.push(DueDoc {
                    pk: pk.to_owned(),
                    sk: sk.to_owned(),
                    due: docs::from_millis(at)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn list_docs_before(
        &self,
        pk: &str,
        prefix: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Doc>, StoreError> {
        let (pk, prefix) = (pk.to_owned(), prefix.to_owned());
        let before = before.map(str::to_owned);
        self.read(move |db| {
            let tx = db.begin_read().map_err(backend)?;
            let t = tx.open_table(DOCS).map_err(backend)?;
            let mut out = Vec::new();
            let end = format!("{prefix}\u{10FFFF}");
            let items = match &before {
                // A key at or below the prefix has nothing of the prefix below it.
                Some(b) if b.as_str() <= prefix.as_str() => return Ok(out),
                Some(b) if b.as_str() > end.as_str() => {
                    t.range((pk.as_str(), prefix.as_str())..=(pk.as_str(), end.as_str()))
                }
                Some(b) => t.range((pk.as_str(), prefix.as_str())..(pk.as_str(), b.as_str())),
                None => t.range((pk.as_str(), prefix.as_str())..=(pk.as_str(), end.as_str())),
            }
            .map_err(backend)?;
            for item in items.rev() {
                let (k, v) = item.map_err(backend)?;
                let (_, sk) = k.value();
                if !sk.starts_with(prefix.as_str()) {
                    continue;
                }
                let (version, body) = v.value();
                out.push(Doc {
                    pk: pk.clone(),
                    sk: sk.to_owned(),
                    body: body.to_owned(),
                    version,
                });
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }
}
