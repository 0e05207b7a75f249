//! The embedded durable store: one SQLite file in WAL mode, versioned migrations, and one writer
//! thread that applies operations in order and commits them in groups.
//!
//! Callers hand an operation to the writer and get a sequence number back at once; whoever must not
//! answer before the operation is durable waits for that number to be committed. Under load many
//! operations share one commit (and one fsync), and a call's charge is usually committed while the
//! upstream is still working on it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use compact_str::CompactString;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Notify;

use super::keys::{KeyHash, Status};

/// The schema, one migration per version; `PRAGMA user_version` records how many ran.
/// A segment of the request log (migration 11): the columns of migration 8's `requests`.
macro_rules! segment_table {
    ($name:literal) => {
        concat!(
            "CREATE TABLE ",
            $name,
            " (
                seq INTEGER PRIMARY KEY,
                request_id TEXT NOT NULL,
                key_id TEXT,
                method TEXT NOT NULL,
                tool TEXT,
                outcome TEXT NOT NULL,
                reason TEXT,
                credits INTEGER NOT NULL,
                duration_us INTEGER NOT NULL,
                created_at INTEGER NOT NULL
             );"
        )
    };
}

const MIGRATIONS: &[&str] = &[
    // 1: keys and the ledger.
    "CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash BLOB NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        status TEXT NOT NULL,
        credits INTEGER NOT NULL,
        spent INTEGER NOT NULL DEFAULT 0,
        calls INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE ledger (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        key_id TEXT NOT NULL REFERENCES keys(id),
        kind TEXT NOT NULL CHECK (kind IN ('grant', 'topup', 'charge', 'refund')),
        amount INTEGER NOT NULL CHECK (amount >= 0),
        created_at INTEGER NOT NULL,
        UNIQUE (request_id, kind)
     );",
    // 2: operator settings per key (tags, namespace, expiry, tool lists), as JSON.
    "ALTER TABLE keys ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';",
    // 3: the request log: one row per paid or refused call.
    "CREATE TABLE requests (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        key_id TEXT,
        method TEXT NOT NULL,
        tool TEXT,
        outcome TEXT NOT NULL,
        reason TEXT,
        credits INTEGER NOT NULL,
        duration_us INTEGER NOT NULL,
        created_at INTEGER NOT NULL
     );",
    // 4: partial refunds (the unused part of an output surcharge). SQLite cannot change a CHECK in
    // place, so the ledger is copied into a table with the new one.
    "CREATE TABLE ledger_v4 (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL,
        key_id TEXT NOT NULL REFERENCES keys(id),
        kind TEXT NOT NULL CHECK (kind IN ('grant', 'topup', 'charge', 'refund', 'partial_refund')),
        amount INTEGER NOT NULL CHECK (amount >= 0),
        created_at INTEGER NOT NULL,
        UNIQUE (request_id, kind)
     );
     INSERT INTO ledger_v4 (seq, request_id, key_id, kind, amount, created_at)
        SELECT seq, request_id, key_id, kind, amount, created_at FROM ledger;
     DROP TABLE ledger;
     ALTER TABLE ledger_v4 RENAME TO ledger;",
    // 5: consumer insights count each top key's distinct tools from its own rows, not the whole log.
    "CREATE INDEX requests_by_key ON requests (key_id, outcome, tool);",
    // 6: webhooks. Settled calls' request rows are journaled and replayed, so a row is unique by its
    // request id. Admin events (key created, topped up, ...) are an outbox of their own. Each
    // destination keeps how far it has delivered both; batches it gave up on are dead letters.
    "CREATE UNIQUE INDEX requests_by_request_id ON requests (request_id);
     CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        key_id TEXT,
        data TEXT NOT NULL,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE webhook_cursors (
        destination TEXT PRIMARY KEY,
        request_seq INTEGER NOT NULL,
        event_seq INTEGER NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE webhook_dead_letters (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        destination TEXT NOT NULL,
        events TEXT NOT NULL,
        count INTEGER NOT NULL,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        created_at INTEGER NOT NULL
     );",
    // 7: the same ledger, cheaper to append to (measured with `storebench`: the database writer's
    // CPU per settled call 15.2 -> 10.1 us). A CHECK of `kind IN (five values)` builds a temporary
    // b-tree of the values on every insert; the same test written with OR does not. No
    // AUTOINCREMENT: it updates `sqlite_sequence` on every insert, and only matters where the
    // newest rows can be deleted — ledger rows never are, so a plain rowid is already never reused.
    "CREATE TABLE ledger_v7 (
        seq INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        key_id TEXT NOT NULL REFERENCES keys(id),
        kind TEXT NOT NULL CHECK (kind = 'grant' OR kind = 'topup' OR kind = 'charge' OR kind = 'refund'
            OR kind = 'partial_refund'),
        amount INTEGER NOT NULL CHECK (amount >= 0),
        created_at INTEGER NOT NULL,
        UNIQUE (request_id, kind)
     );
     INSERT INTO ledger_v7 (seq, request_id, key_id, kind, amount, created_at)
        SELECT seq, request_id, key_id, kind, amount, created_at FROM ledger;
     DROP TABLE ledger;
     ALTER TABLE ledger_v7 RENAME TO ledger;",
    // 8: the request log without AUTOINCREMENT, for the same reason (writer CPU per settled call
    // 16.7-17.2 -> 15.1-16.0 us, `storebench 100000`, four runs each). Its seqs stay increasing
    // because pruning never deletes the newest row (see `prune`), so a new row always goes past
    // every seq a webhook cursor or a page of `GET /admin/requests` has seen. The one case that
    // rule did not cover before this migration (the newest rows already pruned) is closed by
    // moving any cursor that points past the last row back to it.
    "CREATE TABLE requests_v8 (
        seq INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        key_id TEXT,
        method TEXT NOT NULL,
        tool TEXT,
        outcome TEXT NOT NULL,
        reason TEXT,
        credits INTEGER NOT NULL,
        duration_us INTEGER NOT NULL,
        created_at INTEGER NOT NULL
     );
     INSERT INTO requests_v8 (seq, request_id, key_id, method, tool, outcome, reason, credits, duration_us, created_at)
        SELECT seq, request_id, key_id, method, tool, outcome, reason, credits, duration_us, created_at FROM requests;
     DROP TABLE requests;
     ALTER TABLE requests_v8 RENAME TO requests;
     CREATE INDEX requests_by_key ON requests (key_id, outcome, tool);
     CREATE UNIQUE INDEX requests_by_request_id ON requests (request_id);
     UPDATE webhook_cursors SET request_seq = (SELECT COALESCE(MAX(seq), 0) FROM requests)
        WHERE request_seq > (SELECT COALESCE(MAX(seq), 0) FROM requests);",
    // 9: no unique index on the request log's request id. It only kept a journal record replayed
    // after its commit from logging its call twice; a settled call's request row is the last op
    // of the record that holds its charge, always committed with it, so `apply` skips the row
    // when the charge row is already there. One index fewer to insert into per paid call.
    "DROP INDEX requests_by_request_id;",
    // 10: which tools each key has called successfully, one row per (key, tool) with the seq of
    // its latest such call, instead of an index on the request log that every call inserted into
    // (`storebench 100000`, three runs each: writer CPU per settled call 7.4, 8.2, 7.7 -> 6.1,
    // 6.5, 6.3 us). The writer upserts a pair once per commit, not once per call. A pair counts
    // while that call is still in the log (`unique_tools`).
    "CREATE TABLE key_tools (
        key_id TEXT NOT NULL,
        tool TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (key_id, tool)
     ) WITHOUT ROWID;
     INSERT INTO key_tools (key_id, tool, last_seq)
        SELECT key_id, tool, MAX(seq) FROM requests
        WHERE outcome = 'allowed' AND key_id IS NOT NULL AND tool IS NOT NULL GROUP BY key_id, tool;
     DROP INDEX requests_by_key;",
    // 11: the request log in segments, so that pruning drops a whole segment at once instead of
    // deleting its rows one by one (see `LogTail` and `prune`). The log as it was becomes the
    // first segment; `requests` is a view of them all, in which reads see one log.
    concat!(
        "ALTER TABLE requests RENAME TO requests_0;",
        segment_table!("requests_1"),
        segment_table!("requests_2"),
        segment_table!("requests_3"),
        segment_table!("requests_4"),
        segment_table!("requests_5"),
        segment_table!("requests_6"),
        segment_table!("requests_7"),
        "CREATE VIEW requests AS
            SELECT * FROM requests_0 UNION ALL SELECT * FROM requests_1
            UNION ALL SELECT * FROM requests_2 UNION ALL SELECT * FROM requests_3
            UNION ALL SELECT * FROM requests_4 UNION ALL SELECT * FROM requests_5
            UNION ALL SELECT * FROM requests_6 UNION ALL SELECT * FROM requests_7;"
    ),
    // 12: keys' balances (credits, spent, calls) are written behind the ledger, not with each
    // commit: they hold every ledger row up to `ledger_seq`, and the rows after it are added at
    // start-up (see `BALANCE_FLUSH`). Per commit, the writer had updated the row of every key that
    // made a call in it; with calls spread over many keys that is a page written per key per
    // commit (a million keys, calls spread over 200,000 of them: the writer at 26-42 us a call).
    "CREATE TABLE balance_mark (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        ledger_seq INTEGER NOT NULL
     );
     INSERT INTO balance_mark (id, ledger_seq) SELECT 1, COALESCE(MAX(seq), 0) FROM ledger;",
    // 13: `key_tools` is written behind the request log too: it holds every successful call up to
    // `tools_seq`, and the log's rows after it are added at start-up (see `ToolsPending`). Per
    // commit, the writer had upserted a row per (key, tool) with a call in it: with calls spread
    // over many keys, another page written per key per commit.
    "ALTER TABLE balance_mark ADD COLUMN tools_seq INTEGER NOT NULL DEFAULT 0;
     UPDATE balance_mark SET tools_seq = (SELECT COALESCE(MAX(seq), 0) FROM requests);",
];

/// The database writer's page cache, in KiB (see `Store::open`).
const WRITER_CACHE_KIB: i64 = 64 << 10;

/// The request log's segment tables, in the order the writer fills them (round and round).
const SEGMENTS: [&str; 8] = [
    "requests_0",
    "requests_1",
    "requests_2",
    "requests_3",
    "requests_4",
    "requests_5",
    "requests_6",
    "requests_7",
];

/// The writer's insert into each segment, in the order of [`SEGMENTS`].
static SEGMENT_INSERTS: std::sync::LazyLock<[String; 8]> = std::sync::LazyLock::new(|| {
    SEGMENTS.map(|table| {
        format!(
            "INSERT INTO {table} (seq, request_id, key_id, method, tool, outcome, reason, credits, duration_us, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        )
    })
});

/// How long and how many request-log rows are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_age_ms: i64,
    pub max_rows: i64,
    /// How many rows the writer puts in a segment of the log before it moves to the next. The
    /// count bound drops whole segments, so the log holds up to this many rows past `max_rows`.
    pub segment_rows: i64,
}

impl Retention {
    /// Rows older than `max_age_ms`, and those past the newest `max_rows` (give or take a
    /// segment, a fifth of that), are pruned. A ring of eight segments of a fifth each leaves room
    /// for a segment or two that a webhook destination has not delivered yet.
    pub const fn new(max_age_ms: i64, max_rows: i64) -> Retention {
        let segment_rows = max_rows / 5;
        Retention {
            max_age_ms,
            max_rows,
            segment_rows: if segment_rows > 0 { segment_rows } else { 1 },
        }
    }

    /// A retention that never prunes (tests and benchmarks).
    pub const fn keep_all() -> Retention {
        Retention::new(i64::MAX / 4, i64::MAX / 4)
    }
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open or read the database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("the database {path} was written by a newer Tollgate (schema {found}, this one knows {known})")]
    TooNew { path: PathBuf, found: i64, known: i64 },
    #[error("the database failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database writer has failed; no change can be made durable")]
    WriterFailed,
    #[error("the charge journal {path}: {source}")]
    Journal { path: PathBuf, source: std::io::Error },
}

/// What a ledger row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Credits given at key creation.
    Grant,
    Topup,
    Charge,
    Refund,
    /// Part of a charge given back (an output surcharge the answer did not use); the call counts.
    PartialRefund,
}

impl Entry {
    pub const ALL: [Entry; 5] = [
        Entry::Grant,
        Entry::Topup,
        Entry::Charge,
        Entry::Refund,
        Entry::PartialRefund,
    ];

    /// The entry a ledger row's `kind` names.
    pub fn parse(kind: &str) -> Option<Entry> {
        Entry::ALL.into_iter().find(|e| e.as_str() == kind)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Entry::Grant => "grant",
            Entry::Topup => "topup",
            Entry::Charge => "charge",
            Entry::Refund => "refund",
            Entry::PartialRefund => "partial_refund",
        }
    }
}

/// One change for the writer.
#[derive(Debug, Clone)]
pub enum Op {
    CreateKey {
        id: String,
        name: String,
        hash: KeyHash,
        prefix: String,
        created_at: i64,
        /// The key's settings as JSON.
        settings: String,
    },
    /// New settings (JSON) for a key.
    SetSettings {
        key_id: String,
        settings: String,
    },
    /// A ledger row; the key's balance columns move with it, in the same transaction.
    Ledger {
        request_id: CompactString,
        key_id: CompactString,
        entry: Entry,
        amount: i64,
        at: i64,
    },
    SetStatus {
        key_id: String,
        status: Status,
    },
    /// A request-log row.
    Request(RequestRow),
    /// A new secret for a key: its hash and display prefix change, nothing else.
    Rotate {
        key_id: String,
        hash: KeyHash,
        prefix: String,
    },
    /// An admin event for the webhook outbox; one with an id already there changes nothing.
    Event(EventRow),
    /// How far a webhook destination has delivered, and how many more events it delivered.
    WebhookCursor {
        destination: String,
        request_seq: i64,
        event_seq: i64,
        delivered: i64,
    },
    /// Forget the cursors of destinations no longer configured (they would hold back pruning).
    WebhookKeepOnly(Vec<String>),
    /// A batch a destination gave up on.
    DeadLetter {
        destination: String,
        /// The events, a JSON array.
        events: String,
        count: i64,
        error: String,
        attempts: i64,
        at: i64,
    },
    /// A dead letter delivered on replay.
    DropDeadLetter(i64),
}

/// An admin event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub seq: i64,
    pub id: String,
    pub kind: String,
    pub key_id: Option<String>,
    /// JSON object.
    pub data: String,
    pub created_at: i64,
}

/// A dead letter as stored.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub seq: i64,
    pub events: String,
    pub count: i64,
    pub error: String,
    pub created_at: i64,
}

/// A webhook destination's progress as stored.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cursor {
    pub request_seq: i64,
    pub event_seq: i64,
    pub delivered: i64,
}

/// A key as stored.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub id: String,
    pub name: String,
    pub hash: KeyHash,
    pub prefix: String,
    pub status: Status,
    pub credits: i64,
    pub spent: i64,
    pub calls: u64,
    pub created_at: i64,
    pub settings: String,
}

/// One call in the request log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestRow {
    pub seq: i64,
    pub request_id: CompactString,
    pub key_id: Option<CompactString>,
    pub method: CompactString,
    pub tool: Option<CompactString>,
    /// `allowed` (charge kept), `refunded`, or `denied`.
    pub outcome: CompactString,
    /// Why it was denied or refunded.
    pub reason: Option<CompactString>,
    /// Credits actually kept.
    pub credits: i64,
    pub duration_us: i64,
    pub created_at: i64,
}

/// Filters for reading the request log (newest first).
#[derive(Debug, Clone, Default)]
pub struct RequestFilter {
    pub key_id: Option<String>,
    pub tool: Option<String>,
    pub outcome: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// Rows older than this sequence number (the previous page's last).
    pub before: Option<i64>,
    pub limit: i64,
}

/// Filters for reading the ledger (oldest first), a page at a time.
#[derive(Debug, Clone, Default)]
pub struct LedgerFilter {
    pub key_id: Option<String>,
    pub request_id: Option<String>,
    pub kind: Option<Entry>,
    /// Rows newer than this sequence number (the previous page's last).
    pub after: Option<i64>,
    pub limit: i64,
}

/// Day calls, day credits, month calls, month credits.
pub type UsageRow = (i64, i64, i64, i64);

/// A ledger row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub seq: i64,
    pub request_id: String,
    pub key_id: String,
    pub kind: String,
    pub amount: i64,
    pub created_at: i64,
}

/// The store's handle; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The last sequence number given out, the writer's queue and the journal, under one lock so
    /// that numbers reach the writer (and the journal) in order.
    submit: Mutex<Submit>,
    committed: AtomicU64,
    /// How many commits have held an admin event (see [`Store::events_version`]).
    event_commits: AtomicU64,
    failed: AtomicBool,
    commit_signal: Notify,
    /// The writer thread, woken by whoever waits for a commit (see [`Store::durable`]).
    writer: std::sync::OnceLock<std::thread::Thread>,
    /// Told of every commit's request rows (see [`Store::follow`]).
    follower: Mutex<Option<Arc<dyn LogFollower>>>,
    /// How often the writer writes the keys' balances behind the ledger, and their tools behind the
    /// request log, in ms (`BALANCE_FLUSH`; tests change it).
    balance_flush_ms: AtomicU64,
    /// Committed (key, tool) pairs not yet in `key_tools` (see [`ToolsPending`]).
    tools: Mutex<ToolsPending>,
}

/// Each key's tools with a successful call, by the seq of the latest: (key id -> tool -> seq).
/// Hashed with foldhash: with calls spread over many keys, SipHash was 0.3 µs a call of the writer's.
type ToolPairs = foldhash::HashMap<CompactString, foldhash::HashMap<CompactString, i64>>;

/// The (key, tool) pairs of committed request rows that `key_tools` has not got yet. The writer
/// writes them with the keys' balances (every `BALANCE_FLUSH`, or past `BALANCE_FLUSH_KEYS`
/// pairs), and moves `balance_mark.tools_seq` to the newest row they cover in the same
/// transaction; a start-up adds the log's rows after it (`catch_up_tools`). Readers of `key_tools`
/// add these: `pending` (committed since the last write) and, while a write is under way,
/// `flushing` (what it writes), which stays until that write has committed.
#[derive(Default)]
struct ToolsPending {
    pending: ToolPairs,
    /// How many pairs `pending` holds.
    pairs: usize,
    flushing: Option<Arc<ToolPairs>>,
}

impl ToolsPending {
    /// Adds one commit's pairs (drained from `batch`).
    fn merge(&mut self, batch: &mut ToolPairs) {
        for (key_id, tools) in batch.drain() {
            match self.pending.entry(key_id) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    self.pairs += tools.len();
                    e.insert(tools);
                }
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let mine = e.get_mut();
                    for (tool, seq) in tools {
                        let was = mine.insert(tool, seq);
                        // Seqs only grow, so the newer one is the one just inserted.
                        if was.is_none() {
                            self.pairs += 1;
                        }
                    }
                }
            }
        }
    }

    /// The tools of `key_id`, pending or being written, with the seq of the latest call of each.
    fn tools_of(&self, key_id: &str) -> std::collections::HashMap<CompactString, i64> {
        let mut of_key = std::collections::HashMap::new();
        for pairs in std::iter::once(&self.pending).chain(self.flushing.as_deref()) {
            for (tool, seq) in pairs.get(key_id).into_iter().flatten() {
                let latest = of_key.entry(tool.clone()).or_insert(*seq);
                *latest = (*latest).max(*seq);
            }
        }
        of_key
    }
}

/// Follows the request log as the writer commits it (the webhook outbox does), so that it need not
/// read the rows back: told of each commit's rows on the writer thread, just after the commit. It
/// must be quick and must not wait for the store.
pub trait LogFollower: Send + Sync {
    /// One commit's request rows, oldest first, with their seqs: every row with
    /// `after < seq <= last` is among them (`after == last` when the commit added none).
    fn committed(&self, after: i64, last: i64, rows: &mut dyn Iterator<Item = (i64, &RequestRow)>);
}

struct Submit {
    seq: u64,
    /// Numbered operations the writer has not taken yet. A plain vector under the lock every
    /// submitter already takes (for the numbering and the journal): handing a settled call over
    /// is a push, with no channel of its own to synchronise, allocate blocks for or copy through;
    /// the writer swaps the whole vector out for an empty one.
    pending: Vec<(u64, Op)>,
    /// `None` with `durability = "power"`: every change then waits for its fsynced commit.
    journal: Option<super::journal::Journal>,
}

impl Submit {
    /// Numbers `ops` and queues them for the writer; returns the last number.
    fn hand_over<const N: usize>(&mut self, ops: [Op; N]) -> u64 {
        for op in ops {
            self.seq += 1;
            self.pending.push((self.seq, op));
        }
        self.seq
    }
}

impl Store {
    /// Opens (or creates) `<dir>/tollgate.db`, runs pending migrations, starts the writer thread, and
    /// returns the keys it holds. A file that is not a readable Tollgate database is an error: the
    /// store never starts empty over data it could not read.
    ///
    /// `power_safe`: fsync every commit (`synchronous=FULL`), so commits survive a power loss or an
    /// OS crash. Without it (`synchronous=NORMAL` in WAL mode) a commit is one write to the WAL: it
    /// survives the process being killed (`kill -9`), which is what a gateway crash is.
    pub fn open(dir: &Path, power_safe: bool, retention: Retention) -> Result<(Store, Vec<StoredKey>), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("tollgate.db");
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        stable_plans(&conn).map_err(open_err)?;
        // Reading the schema version is the first real read: a corrupt or foreign file fails here.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        let sync = if power_safe { "FULL" } else { "NORMAL" };
        conn.pragma_update(None, "synchronous", sync).map_err(open_err)?;
        // Checkpoints run on their own thread and connection, never in the writer's commit path.
        conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(open_err)?;
        // A WAL that grew under a burst is cut back to this when it starts over.
        conn.pragma_update(None, "journal_size_limit", 64 << 20)
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        // The writer's page cache (SQLite's default is 2 MiB), grown only as pages are read. Each
        // charge checks its key against the keys' index: with calls spread over a million keys,
        // that index (~40 MiB) was read back from the kernel page by page.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(open_err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path,
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(version = i + 1, path = %path.display(), "database migrated");
        }
        let mut tail = LogTail::load(&conn, retention)?;
        // Charges the database had not committed when the gateway stopped are in the journal.
        let journal_dir = dir.join("journal");
        let journal_err = |source| StoreError::Journal {
            path: journal_dir.clone(),
            source,
        };
        for (_, segment) in super::journal::segments(&journal_dir).map_err(journal_err)? {
            let ops = super::journal::read(&segment).map_err(|source| StoreError::Journal {
                path: segment.clone(),
                source,
            })?;
            let batch: Vec<(u64, Op)> = ops.into_iter().map(|op| (0, op)).collect();
            // Its balance moves and tools are added with the rest by the catch-ups below.
            apply(
                &mut conn,
                &batch,
                &mut tail,
                &mut Vec::new(),
                &mut Moves::default(),
                &mut ToolPairs::default(),
                None,
            )?;
            tracing::info!(segment = %segment.display(), records = batch.len(), "journal replayed");
            std::fs::remove_file(&segment).map_err(journal_err)?;
        }
        let journal = if power_safe {
            None
        } else {
            Some(super::journal::Journal::open(&journal_dir).map_err(journal_err)?)
        };
        catch_up_balances(&mut conn)?;
        catch_up_tools(&mut conn)?;
        let keys = load_keys(&conn)?;

        let journaled = journal.is_some();
        let inner = Arc::new(Inner {
            path: path.clone(),
            submit: Mutex::new(Submit {
                seq: 0,
                pending: Vec::new(),
                journal,
            }),
            committed: AtomicU64::new(0),
            event_commits: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            commit_signal: Notify::new(),
            writer: std::sync::OnceLock::new(),
            follower: Mutex::new(None),
            balance_flush_ms: AtomicU64::new(BALANCE_FLUSH.as_millis() as u64),
            tools: Mutex::new(ToolsPending::default()),
        });
        let writer_inner = inner.clone();
        let thread = std::thread::Builder::new()
            .name("tollgate-db-writer".into())
            .spawn(move || writer(conn, writer_inner, journaled, tail))
            .expect("spawning the database writer");
        let _ = inner.writer.set(thread.thread().clone());
        let checkpoint_conn = Connection::open(&path).map_err(open_err)?;
        stable_plans(&checkpoint_conn).map_err(open_err)?;
        checkpoint_conn
            .pragma_update(None, "journal_size_limit", 64 << 20)
            .map_err(open_err)?;
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("tollgate-db-checkpoint".into())
            .spawn(move || checkpointer(checkpoint_conn, weak, retention))
            .expect("spawning the checkpointer");
        Ok((Store { inner }, keys))
    }

    /// Refuses once the store has failed (a commit or a journal append did): nothing more can be
    /// recorded, so nothing more may be sold.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(StoreError::WriterFailed);
        }
        Ok(())
    }

    /// Makes `follower` the one told of each commit's request rows from the next commit on
    /// (`None`: nobody).
    pub fn follow(&self, follower: Option<Arc<dyn LogFollower>>) {
        *self.inner.follower.lock().unwrap() = follower;
    }

    /// Hands an operation to the writer; returns its sequence number.
    pub fn submit(&self, op: Op) -> Result<u64, StoreError> {
        self.check()?;
        let mut guard = self.inner.submit.lock().unwrap();
        let seq = guard.hand_over([op]);
        let journaled = guard.journal.is_some();
        drop(guard);
        if !journaled {
            self.wake_writer();
        }
        Ok(seq)
    }

    /// Wakes the writer to commit at once rather than at its next paced commit: for every change
    /// without the journal, and for whoever waits for a commit (see [`writer`]).
    fn wake_writer(&self) {
        if let Some(writer) = self.inner.writer.get() {
            writer.unpark();
        }
    }

    /// Hands charges, refunds and settled calls' request rows to the writer and makes them durable
    /// now: appended to the journal (one copy into its mapping for all of them), they survive the
    /// process being killed before the database commits them. Returns the sequence number to wait
    /// for with [`Store::durable`]: 0 (nothing to wait for) once journaled; without a journal
    /// (`durability = "power"`), the last one's commit.
    pub fn submit_money<const N: usize>(&self, ops: [Op; N]) -> Result<u64, StoreError> {
        self.check()?;
        // Formatted before taking the lock, into this thread's buffer (no allocation per call).
        thread_local! {
            static LINES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        LINES.with_borrow_mut(|lines| {
            lines.clear();
            let submitted = self.submit_lines(ops, lines);
            // A rare large record's buffer is not kept.
            if lines.capacity() > 1 << 16 {
                *lines = Vec::new();
            }
            submitted
        })
    }

    fn submit_lines<const N: usize>(&self, ops: [Op; N], lines: &mut Vec<u8>) -> Result<u64, StoreError> {
        let mut all = true;
        for op in &ops {
            all &= super::journal::write_line(op, lines);
        }
        let mut guard = self.inner.submit.lock().unwrap();
        let last_seq = guard.seq;
        let journaled = match guard.journal.as_mut() {
            Some(j) => {
                if let Err(e) = j.append(lines, last_seq) {
                    tracing::error!(error = %e, "the charge journal cannot be written; the ledger stops accepting changes");
                    self.inner.failed.store(true, Ordering::Release);
                    return Err(StoreError::WriterFailed);
                }
                all
            }
            None => false,
        };
        let seq = guard.hand_over(ops);
        drop(guard);
        if journaled {
            return Ok(0);
        }
        self.wake_writer();
        Ok(seq)
    }

    /// Waits until everything submitted so far is in the database (for reads that must see the
    /// latest charges, such as the admin ledger).
    pub async fn sync(&self) -> Result<(), StoreError> {
        let seq = self.inner.submit.lock().unwrap().seq;
        self.durable(seq).await
    }

    /// Waits until operation `seq` (and every one before it) is committed. A caller that has to
    /// wait wakes the writer, which commits at once instead of at its next paced commit.
    pub async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        if self.inner.committed.load(Ordering::Acquire) < seq {
            self.wake_writer();
        }
        loop {
            if self.inner.failed.load(Ordering::Acquire) {
                return Err(StoreError::WriterFailed);
            }
            if self.inner.committed.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            let notified = self.inner.commit_signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.committed.load(Ordering::Acquire) >= seq || self.inner.failed.load(Ordering::Acquire) {
                continue;
            }
            notified.await;
        }
    }

    /// Submits and waits until durable.
    pub async fn write(&self, op: Op) -> Result<u64, StoreError> {
        let seq = self.submit(op)?;
        self.durable(seq).await?;
        Ok(seq)
    }

    /// A fresh read-only connection (reports and admin reads never touch the writer's).
    pub fn reader(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.inner.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|conn| stable_plans(&conn).map(|()| conn))
        .map_err(|source| StoreError::Open {
            path: self.inner.path.clone(),
            source,
        })?;
        Ok(conn)
    }

    /// Every ledger row of a key (or of every key), oldest first (tests).
    #[cfg(test)]
    pub fn ledger(&self, key_id: Option<&str>) -> Result<Vec<LedgerRow>, StoreError> {
        self.ledger_rows(&LedgerFilter {
            key_id: key_id.map(str::to_string),
            limit: i64::MAX,
            ..LedgerFilter::default()
        })
    }

    /// Ledger rows matching `f`, oldest first, at most `f.limit`. A page walks the table in seq
    /// order from `f.after`; with a request id it is one lookup in the ledger's unique index
    /// instead. There is no index by key (it would cost every charge an index insert), so a key's
    /// page reads the rows between its own.
    pub fn ledger_rows(&self, f: &LedgerFilter) -> Result<Vec<LedgerRow>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(&ledger_sql(f.request_id.is_some()))?;
        let kind = f.kind.map(Entry::as_str);
        let rows = stmt
            .query_map(
                params![f.after.unwrap_or(0), f.request_id, f.key_id, kind, f.limit],
                |r| {
                    Ok(LedgerRow {
                        seq: r.get(0)?,
                        request_id: r.get(1)?,
                        key_id: r.get(2)?,
                        kind: r.get(3)?,
                        amount: r.get(4)?,
                        created_at: r.get(5)?,
                    })
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Calls and credits kept per key since two times (the start of the day and of the month):
    /// `key id → (day calls, day credits, month calls, month credits)`. Charges count, refunds
    /// take back.
    pub fn usage_since(
        &self,
        day_start: i64,
        month_start: i64,
    ) -> Result<std::collections::HashMap<String, UsageRow>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(
            "SELECT key_id,
                    SUM(CASE WHEN created_at >= ?1 THEN (CASE kind WHEN 'charge' THEN 1 WHEN 'refund' THEN -1 ELSE 0 END) ELSE 0 END),
                    SUM(CASE WHEN created_at >= ?1 THEN (CASE kind WHEN 'charge' THEN amount ELSE -amount END) ELSE 0 END),
                    SUM(CASE kind WHEN 'charge' THEN 1 WHEN 'refund' THEN -1 ELSE 0 END),
                    SUM(CASE kind WHEN 'charge' THEN amount ELSE -amount END)
             FROM ledger WHERE kind IN ('charge', 'refund', 'partial_refund') AND created_at >= ?2 GROUP BY key_id",
        )?;
        let rows = stmt
            .query_map(params![day_start, month_start.min(day_start)], |r| {
                Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            })?
            .collect::<Result<std::collections::HashMap<_, _>, _>>()?;
        Ok(rows)
    }

    /// The request log since `since_ms`, totalled per minute and outcome: (minute, outcome, count,
    /// credits, total and longest duration in µs).
    #[allow(clippy::type_complexity)]
    pub fn request_minutes(&self, since_ms: i64) -> Result<Vec<(i64, String, u64, i64, u64, u64)>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(
            "SELECT created_at / 60000, outcome, COUNT(*), SUM(credits), SUM(duration_us), MAX(duration_us)
             FROM requests WHERE created_at >= ?1 GROUP BY 1, 2 ORDER BY 1",
        )?;
        let rows = stmt
            .query_map(params![since_ms], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, i64>(2)? as u64,
                    r.get(3)?,
                    r.get::<_, i64>(4)? as u64,
                    r.get::<_, i64>(5)? as u64,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Request-log rows matching `f`, newest first.
    pub fn requests(&self, f: &RequestFilter) -> Result<Vec<RequestRow>, StoreError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare(&format!(
            "{REQUEST_COLUMNS}
             WHERE (?1 IS NULL OR key_id = ?1) AND (?2 IS NULL OR tool = ?2) AND (?3 IS NULL OR outcome = ?3)
               AND (?4 IS NULL OR created_at >= ?4) AND (?5 IS NULL OR created_at < ?5)
               AND (?6 IS NULL OR seq < ?6)
             ORDER BY seq DESC LIMIT ?7"
        ))?;
        let rows = stmt
            .query_map(
                params![f.key_id, f.tool, f.outcome, f.since, f.until, f.before, f.limit],
                request_from_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// How many distinct tools each of these keys called successfully (per the request log).
    ///
    /// Read from `key_tools`, which the writer keeps behind the log: one row per (key, tool) and
    /// the seq of its latest successful call, and the pairs committed since it last wrote them
    /// ([`ToolsPending`]). A pair counts while that call is still in the log, i.e. at or past the
    /// oldest row left (pruning deletes from the oldest end), so a tool whose calls were all pruned
    /// drops out as it would from a count over the log. One short range read per key, whatever
    /// its number of calls.
    pub fn unique_tools(&self, key_ids: &[String]) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        let mut counts = std::collections::HashMap::new();
        if key_ids.is_empty() {
            return Ok(counts);
        }
        // The pending pairs first: a write of them that commits after this still shows in the
        // database read below, while one that commits before it has already left `pending`.
        let pending: Vec<_> = {
            let t = self.inner.tools.lock().unwrap();
            key_ids.iter().map(|id| t.tools_of(id)).collect()
        };
        let conn = self.reader()?;
        // (Ordered, not `MIN`: over the segments' view, the first row of a merge of their ends.)
        let Some(oldest) = conn
            .query_row("SELECT seq FROM requests ORDER BY seq LIMIT 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
        else {
            return Ok(counts);
        };
        let mut stored = conn.prepare("SELECT tool FROM key_tools WHERE key_id = ?1 AND last_seq >= ?2")?;
        let mut tools = std::collections::HashSet::new();
        for (id, pending) in key_ids.iter().zip(pending) {
            tools.clear();
            for tool in stored.query_map(params![id, oldest], |r| r.get::<_, String>(0))? {
                tools.insert(CompactString::from(tool?));
            }
            tools.extend(
                pending
                    .into_iter()
                    .filter(|(_, seq)| *seq >= oldest)
                    .map(|(tool, _)| tool),
            );
            if !tools.is_empty() {
                counts.insert(id.clone(), tools.len() as i64);
            }
        }
        Ok(counts)
    }

    /// Settled calls (request rows with a charge kept or refunded; not shadow mode's, which charge
    /// nothing) after `seq`, oldest first.
    pub fn usage_after(conn: &Connection, seq: i64, limit: i64) -> Result<Vec<RequestRow>, StoreError> {
        let mut stmt = conn.prepare_cached(USAGE_AFTER)?;
        let rows = stmt
            .query_map(params![seq, limit], request_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Changes whenever a commit adds admin events: a reader that read every event there was
    /// after seeing version `v` has nothing new to read while the version is still `v`.
    pub fn events_version(&self) -> u64 {
        self.inner.event_commits.load(Ordering::Acquire)
    }

    /// Admin events after `seq`, oldest first.
    pub fn events_after(conn: &Connection, seq: i64, limit: i64) -> Result<Vec<EventRow>, StoreError> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, id, type, key_id, data, created_at FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![seq, limit], |r| {
                Ok(EventRow {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    kind: r.get(2)?,
                    key_id: r.get(3)?,
                    data: r.get(4)?,
                    created_at: r.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// A destination's stored progress, if it has any.
    pub fn cursor(conn: &Connection, destination: &str) -> Result<Option<Cursor>, StoreError> {
        Ok(conn
            .query_row(
                "SELECT request_seq, event_seq, delivered FROM webhook_cursors WHERE destination = ?1",
                params![destination],
                |r| {
                    Ok(Cursor {
                        request_seq: r.get(0)?,
                        event_seq: r.get(1)?,
                        delivered: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Where the outboxes end now: (last request row, last event).
    pub fn outbox_ends(conn: &Connection) -> Result<(i64, i64), StoreError> {
        Ok(conn.query_row(
            "SELECT COALESCE((SELECT seq FROM requests ORDER BY seq DESC LIMIT 1), 0),
                    COALESCE((SELECT MAX(seq) FROM events), 0)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    /// How many events are past a cursor (settled calls and admin events).
    pub fn pending(conn: &Connection, c: &Cursor) -> Result<i64, StoreError> {
        Ok(conn.query_row(
            "SELECT (SELECT COUNT(*) FROM requests WHERE seq > ?1 AND outcome IN ('allowed', 'refunded') AND key_id IS NOT NULL
                        AND (reason IS NULL OR reason NOT LIKE 'shadow:%'))
                  + (SELECT COUNT(*) FROM events WHERE seq > ?2)",
            params![c.request_seq, c.event_seq],
            |r| r.get(0),
        )?)
    }

    /// How many dead letters a destination has, and how many events they hold.
    pub fn dead_letter_counts(conn: &Connection, destination: &str) -> Result<(i64, i64), StoreError> {
        Ok(conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(count), 0) FROM webhook_dead_letters WHERE destination = ?1",
            params![destination],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    /// A destination's dead letters, oldest first.
    pub fn dead_letters(conn: &Connection, destination: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, events, count, error, created_at FROM webhook_dead_letters WHERE destination = ?1 ORDER BY seq",
        )?;
        let rows = stmt
            .query_map(params![destination], |r| {
                Ok(DeadLetter {
                    seq: r.get(0)?,
                    events: r.get(1)?,
                    count: r.get(2)?,
                    error: r.get(3)?,
                    created_at: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Has the writer write the keys' balances behind the ledger, and their tools behind the request
    /// log, this often from its next commit on (instead of every `BALANCE_FLUSH`).
    #[cfg(test)]
    pub fn flush_balances_every(&self, every: std::time::Duration) {
        self.inner
            .balance_flush_ms
            .store(every.as_millis() as u64, Ordering::Relaxed);
    }

    /// A key as stored now, as a restart would load it: its row, and the ledger rows committed
    /// after the balance mark (for checks against the live state).
    pub fn stored_key(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let conn = self.reader()?;
        let tx = conn.unchecked_transaction()?;
        let Some(mut key) = tx
            .query_row(&format!("{KEY_COLUMNS} WHERE id = ?1"), params![id], key_from_row)
            .optional()?
        else {
            return Ok(None);
        };
        let mark: i64 = tx.query_row("SELECT ledger_seq FROM balance_mark", [], |r| r.get(0))?;
        let (credits, spent, calls): (Option<i64>, Option<i64>, Option<i64>) =
            tx.query_row(&format!("{BALANCE_DELTAS} AND key_id = ?2"), params![mark, id], |r| {
                Ok((r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
        key.credits += credits.unwrap_or(0);
        key.spent += spent.unwrap_or(0);
        key.calls += calls.unwrap_or(0).max(0) as u64;
        Ok(Some(key))
    }
}

macro_rules! request_columns {
    () => {
        "SELECT seq, request_id, key_id, method, tool, outcome, reason, credits, duration_us, created_at FROM requests"
    };
}
const REQUEST_COLUMNS: &str = request_columns!();

/// Whether a request row is a usage event, as [`USAGE_AFTER`] selects them: a key's call whose
/// charge was kept or refunded, not shadow mode's (which charges nothing).
pub fn is_usage(r: &RequestRow) -> bool {
    matches!(r.outcome.as_str(), "allowed" | "refunded")
        && r.key_id.is_some()
        && !r.reason.as_deref().is_some_and(|reason| reason.starts_with("shadow:"))
}

/// The usage outbox after a seq: settled charges and refunds of keys, not shadow-mode rows.
const USAGE_AFTER: &str = concat!(
    request_columns!(),
    " WHERE seq > ?1 AND outcome IN ('allowed', 'refunded') AND key_id IS NOT NULL
       AND (reason IS NULL OR reason NOT LIKE 'shadow:%')
     ORDER BY seq LIMIT ?2"
);

/// The statement [`Store::ledger_rows`] runs. A request id is matched with `=` alone (never
/// `?2 IS NULL OR …`), so that the planner looks it up in the ledger's unique index.
fn ledger_sql(by_request_id: bool) -> String {
    let by_request = if by_request_id { "request_id = ?2" } else { "?2 IS NULL" };
    format!(
        "SELECT seq, request_id, key_id, kind, amount, created_at FROM ledger
         WHERE seq > ?1 AND {by_request} AND (?3 IS NULL OR key_id = ?3) AND (?4 IS NULL OR kind = ?4)
         ORDER BY seq LIMIT ?5"
    )
}

/// Every connection plans each statement once. SQLite (built with STAT4, as rusqlite bundles it)
/// otherwise treats a bound `LIMIT ?` as a constant while planning, and so prepares a cached
/// statement again every time that parameter is bound: once per webhook batch read, ~40 µs each.
fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map(drop)
}

/// Column `i` as text (kept inline when short).
fn text(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<CompactString> {
    Ok(CompactString::from(r.get_ref(i)?.as_str()?))
}

/// Column `i` as text, or `None` where it is NULL.
fn optional_text(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<CompactString>> {
    Ok(r.get_ref(i)?.as_str_or_null()?.map(CompactString::from))
}

fn request_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRow> {
    Ok(RequestRow {
        seq: r.get(0)?,
        request_id: text(r, 1)?,
        key_id: optional_text(r, 2)?,
        method: text(r, 3)?,
        tool: optional_text(r, 4)?,
        outcome: text(r, 5)?,
        reason: optional_text(r, 6)?,
        credits: r.get(7)?,
        duration_us: r.get(8)?,
        created_at: r.get(9)?,
    })
}

const KEY_COLUMNS: &str =
    "SELECT id, name, hash, prefix, status, credits, spent, calls, created_at, settings FROM keys";

fn key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredKey> {
    let hash: Vec<u8> = r.get(2)?;
    let status: String = r.get(4)?;
    let calls: i64 = r.get(7)?;
    Ok(StoredKey {
        id: r.get(0)?,
        name: r.get(1)?,
        hash: hash.try_into().unwrap_or([0; 32]),
        prefix: r.get(3)?,
        status: Status::parse(&status).unwrap_or(Status::Revoked),
        credits: r.get(5)?,
        spent: r.get(6)?,
        calls: calls.max(0) as u64,
        created_at: r.get(8)?,
        settings: r.get(9)?,
    })
}

/// Every key, in creation order.
fn load_keys(conn: &Connection) -> Result<Vec<StoredKey>, StoreError> {
    let mut stmt = conn.prepare(&format!("{KEY_COLUMNS} ORDER BY rowid"))?;
    let keys = stmt.query_map([], key_from_row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(keys)
}

/// The WAL length (in pages) past which the checkpointer restarts it rather than letting it grow.
const WAL_RESTART_FRAMES: i64 = 4096;

/// Copies the WAL into the database file every 500 ms (PASSIVE: it never blocks the writer; once
/// the WAL is long, RESTART, which waits for a gap between commits), so the WAL stays small.
/// Each tick it also prunes the request log towards its retention.
fn checkpointer(conn: Connection, inner: std::sync::Weak<Inner>, retention: Retention) {
    let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        if inner.upgrade().is_none() {
            return;
        }
        // (busy, frames in the WAL, frames checkpointed)
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        }) {
            // A passive checkpoint never makes the writer start the WAL over while it keeps
            // writing, so under steady load the WAL would grow without end (and every commit
            // write further into a file the page cache no longer holds). Past a bound, wait for a
            // gap between the writer's commits and restart it; the hot path never waits for
            // the writer, so the pause costs it nothing. A pending restart holds the writer off
            // while it waits for readers on older snapshots, so it waits at most 50 ms (far
            // below the writer's own busy timeout) and is tried again next tick.
            Ok((_, frames)) if frames > WAL_RESTART_FRAMES => {
                let _ = conn.busy_timeout(std::time::Duration::from_millis(50));
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())) {
                    tracing::debug!(error = %e, "WAL restart deferred");
                }
                let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
        match prune(
            &conn,
            super::now_ms() - retention.max_age_ms,
            retention.max_rows,
            PRUNE_BUDGET,
        ) {
            Ok(n) if n > 0 => tracing::debug!(rows = n, "request log pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning the request log failed"),
        }
    }
}

/// How long one pass of pruning may run (a pass every 500 ms, between checkpoints). Under steady
/// load a pass takes a few milliseconds; the bound matters when a large backlog is cleared (a
/// lowered retention, an old log at start-up), when the writer can find the lock taken at each
/// of its retries and wait for up to a pass.
const PRUNE_BUDGET: std::time::Duration = std::time::Duration::from_millis(100);

/// Each segment of the request log holding rows: (oldest seq, newest seq, which), oldest first.
fn segment_ends(conn: &Connection) -> rusqlite::Result<Vec<(i64, i64, usize)>> {
    let mut segments = Vec::with_capacity(SEGMENTS.len());
    for (i, table) in SEGMENTS.iter().enumerate() {
        let ends: (Option<i64>, Option<i64>) = conn
            // Two subqueries, each a look at one end of the table; `MIN(seq), MAX(seq)` together
            // would read every row.
            .prepare_cached(&format!(
                "SELECT (SELECT MIN(seq) FROM {table}), (SELECT MAX(seq) FROM {table})"
            ))?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if let (Some(oldest), Some(newest)) = ends {
            segments.push((oldest, newest, i));
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Prunes the request log to its retention, and admin events older than `cutoff`, except what a
/// webhook destination has not delivered yet and the segment holding the newest request row (so a
/// new row's seq is past every seq handed out).
///
/// By count, a segment at a time: a segment whose rows are all past the newest `max_rows` is
/// emptied with one `DELETE` without a `WHERE`, which SQLite does by freeing the table's pages
/// rather than deleting row by row (~0.3 µs a row, which the checkpointer used to spend on every
/// call once the log was full). By age, row by row from the oldest, in transactions of a few
/// thousand rows with pauses between: a segment holds rows of many ages, and one big delete would
/// hold the write lock for as long as it takes, so every admin change (and every admin read that
/// waits for the database to catch up) would wait behind it.
///
/// A pass goes on until nothing is past the retention or it has run for `budget`, so the log
/// keeps to its bounds under any sustained load.
fn prune(conn: &Connection, cutoff: i64, max_rows: i64, budget: std::time::Duration) -> rusqlite::Result<usize> {
    // A chunk holds the write lock for a few milliseconds; the pause gives the writer a chance.
    const CHUNK: i64 = 5_000;
    let started = std::time::Instant::now();
    let mut total = 0;
    // What the segments hold and what the destinations have delivered, read and acted on in one
    // write transaction: read outside one, a segment could be emptied after the writer had
    // added rows to it that the read did not see (rows within the bound, or not yet delivered).
    // Emptying whole segments takes milliseconds at most; the writer waits that long.
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let segments = segment_ends(&tx)?;
    let delivered: i64 = tx.query_row(
        "SELECT COALESCE(MIN(request_seq), 9223372036854775807) FROM webhook_cursors",
        [],
        |r| r.get(0),
    )?;
    let newest = segments.last().map_or(0, |s| s.1);
    // By count: the oldest segments whose every row is past the bound and delivered.
    let mut left = segments.as_slice();
    while let [(_, last, i), rest @ ..] = left {
        if !(*last < newest && *last <= newest - max_rows && *last <= delivered) {
            break;
        }
        total += tx
            .prepare_cached(&format!("DELETE FROM {}", SEGMENTS[*i]))?
            .execute([])?;
        left = rest;
    }
    tx.commit()?;
    // By age, from the oldest segment left. The bounds read above only fall behind the writer's
    // (it only adds rows past `newest`; cursors only move on, and a new destination starts at
    // the log's end), so they stay safe to delete by.
    'segments: for &(_, _, i) in left {
        let table = SEGMENTS[i];
        let mut by_age = conn.prepare_cached(&format!(
            "DELETE FROM {table} WHERE seq <= (SELECT MIN(seq) FROM {table}) + ?2
                AND created_at < ?1 AND seq < ?3 AND seq <= ?4"
        ))?;
        loop {
            if started.elapsed() >= budget {
                break 'segments;
            }
            let n = by_age.execute(params![cutoff, CHUNK - 1, newest, delivered])?;
            total += n;
            if n == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Younger rows follow in the next segment only if this one is gone.
        let emptied: bool = conn
            .prepare_cached(&format!("SELECT NOT EXISTS (SELECT 1 FROM {table})"))?
            .query_row([], |r| r.get(0))?;
        if !emptied {
            break;
        }
    }
    total += conn.execute(
        "DELETE FROM events WHERE created_at < ?1
            AND seq <= COALESCE((SELECT MIN(event_seq) FROM webhook_cursors), 9223372036854775807)",
        params![cutoff],
    )?;
    Ok(total)
}

/// The writer thread: takes everything queued, applies it in one transaction, commits, publishes.
///
/// With the journal, nothing on the hot path waits for a commit, so the writer keeps a pace:
/// callers never pay for waking it, and a busy interval's charges share one commit. Without it,
/// every charge waits for its commit, so submitters wake the writer and it commits at once.
fn writer(mut conn: Connection, inner: Arc<Inner>, journaled: bool, mut tail: LogTail) {
    // Each commit writes every page it dirtied to the WAL once: fewer, larger commits write far
    // fewer pages per call, and cost less per call besides (~0.2 ms of CPU each, whatever they
    // hold). Nothing on the request path waits for them; whoever does (an admin change, a read
    // that must see the latest calls) wakes the writer, which then commits at once.
    const POLL: std::time::Duration = std::time::Duration::from_millis(100);
    /// If the writer stops for any reason (a panic included), nothing more may be sold.
    struct Stopped<'a>(&'a Inner);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            self.0.failed.store(true, Ordering::Release);
            self.0.commit_signal.notify_waiters();
        }
    }
    let _stopped = Stopped(&inner);
    let mut batch: Vec<(u64, Op)> = Vec::new();
    // Where each committed request row is in `batch`, and its seq (for the follower).
    let mut inserted: Vec<(usize, i64)> = Vec::new();
    let mut retired: Vec<super::journal::Retired> = Vec::new();
    // When the writer last took the queue: with the journal, the next take is POLL after it.
    let mut last_take = std::time::Instant::now();
    // Balance moves committed to the ledger and not yet to the keys, and when they last were.
    let mut moves = Moves::default();
    let mut last_flush = std::time::Instant::now();
    // Each commit's (key, tool) pairs, added to `inner.tools` once it has committed.
    let mut tools = ToolPairs::default();
    loop {
        // With the journal, at most one commit per POLL (unless a waiter wakes the writer): a
        // commit takes longer than the gap between two calls, so committing whatever arrived
        // during the last one would commit a call or two at a time, each commit writing the same
        // handful of pages again (measured: ~7 page writes per call at c=1, against well under
        // one when commits are paced). Without it, a submitter's wake-up ends the wait.
        let wait = if journaled {
            POLL.checked_sub(last_take.elapsed())
        } else {
            Some(POLL)
        };
        if let Some(rest) = wait {
            std::thread::park_timeout(rest);
        }
        // Everything queued goes into this commit: under load, many calls share one.
        std::mem::swap(&mut batch, &mut inner.submit.lock().unwrap().pending);
        last_take = std::time::Instant::now();
        if batch.is_empty() {
            continue;
        }
        let last = batch.last().map(|(seq, _)| *seq).unwrap_or(0);
        let started = std::time::Instant::now();
        let log_end = tail.next_seq - 1;
        let every = std::time::Duration::from_millis(inner.balance_flush_ms.load(Ordering::Relaxed));
        // With a flush, what this commit writes to `key_tools` stays visible to readers until it
        // has committed.
        let flushing = {
            let mut t = inner.tools.lock().unwrap();
            let due =
                last_flush.elapsed() >= every || moves.len() >= BALANCE_FLUSH_KEYS || t.pairs >= BALANCE_FLUSH_KEYS;
            due.then(|| {
                t.pairs = 0;
                let pending = Arc::new(std::mem::take(&mut t.pending));
                t.flushing = Some(pending.clone());
                pending
            })
        };
        let flush = flushing.is_some();
        match apply(
            &mut conn,
            &batch,
            &mut tail,
            &mut inserted,
            &mut moves,
            &mut tools,
            flushing.as_deref(),
        ) {
            Ok(events) => {
                {
                    let mut t = inner.tools.lock().unwrap();
                    if flush {
                        t.flushing = None;
                        tools.clear();
                    } else {
                        t.merge(&mut tools);
                    }
                }
                if flush {
                    moves.clear();
                    last_flush = std::time::Instant::now();
                }
                if events {
                    inner.event_commits.fetch_add(1, Ordering::Release);
                }
                inner.committed.store(last, Ordering::Release);
                crate::metrics::commit(started.elapsed(), batch.len());
                tracing::trace!(
                    ops = batch.len(),
                    us = started.elapsed().as_micros() as u64,
                    "committed"
                );
            }
            Err(e) => {
                // Money cannot be made durable: stop taking changes rather than pretend.
                tracing::error!(error = %e, "database commit failed; the ledger stops accepting changes");
                inner.failed.store(true, Ordering::Release);
            }
        }
        // Whoever follows the log when a commit is announced is told of it (after announcing it,
        // so that nobody waits for the telling).
        let follower = inner.follower.lock().unwrap().clone();
        inner.commit_signal.notify_waiters();
        if let Some(f) = follower.filter(|_| !inner.failed.load(Ordering::Acquire)) {
            let mut rows = inserted.iter().filter_map(|&(i, seq)| match &batch[i].1 {
                Op::Request(r) => Some((seq, r)),
                _ => None,
            });
            f.committed(log_end, tail.next_seq - 1, &mut rows);
        }
        batch.clear();
        if inner.failed.load(Ordering::Acquire) {
            return;
        }
        // A batch far larger than usual (a backlog) is not kept as the next one's capacity.
        if batch.capacity() > 1 << 16 {
            batch = Vec::new();
        }
        if journaled {
            // Make the next segment ahead of time, without holding the lock (it takes a few
            // milliseconds); delete closed segments whose records are all committed.
            let wanted = inner.submit.lock().unwrap().journal.as_mut().and_then(|j| {
                retired.extend(j.take_retired());
                j.next_wanted()
            });
            if let Some((dir, number)) = wanted {
                match super::journal::Segment::create(&dir, number, super::journal::SEGMENT_BYTES) {
                    Ok(s) => {
                        if let Some(j) = inner.submit.lock().unwrap().journal.as_mut() {
                            j.offer_next(s);
                        }
                    }
                    // A segment rolled over meanwhile made it inline; or the disk is full, which
                    // the append that needs a segment will report.
                    Err(e) => tracing::debug!(error = %e, "could not make the next journal segment ahead"),
                }
            }
            let committed = inner.committed.load(Ordering::Acquire);
            retired.retain(|r| {
                if r.last_seq > committed {
                    return true;
                }
                if let Err(e) = std::fs::remove_file(&r.path) {
                    tracing::warn!(path = %r.path.display(), error = %e, "could not delete a committed journal segment");
                }
                false
            });
        }
    }
}

/// Where the writer appends to the request log: which segment, how many rows it holds, and the
/// seq the next row gets. Seqs are handed out here, one past the newest row (or a webhook cursor,
/// if one is further), so they only ever increase: pruning never drops the segment that holds the
/// newest row.
#[derive(Debug, Clone, Copy)]
struct LogTail {
    segment: usize,
    rows: i64,
    next_seq: i64,
    segment_rows: i64,
    /// The next segment was found still holding rows in this commit: not looked at again.
    held: bool,
}

impl LogTail {
    fn load(conn: &Connection, retention: Retention) -> rusqlite::Result<LogTail> {
        let (newest, segment) = segment_ends(conn)?.last().map_or((0, 0), |&(_, newest, i)| (newest, i));
        let delivered: i64 = conn.query_row("SELECT COALESCE(MAX(request_seq), 0) FROM webhook_cursors", [], |r| {
            r.get(0)
        })?;
        let rows = conn.query_row(&format!("SELECT COUNT(*) FROM {}", SEGMENTS[segment]), [], |r| r.get(0))?;
        Ok(LogTail {
            segment,
            rows,
            next_seq: newest.max(delivered) + 1,
            segment_rows: retention.segment_rows,
            held: false,
        })
    }

    /// The segment the next row goes into: the next one round once this one is full, if that
    /// one is empty (pruning has dropped it); otherwise this one, for as long as it takes.
    fn segment_for_next(&mut self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<usize> {
        if self.rows >= self.segment_rows && !self.held {
            let next = (self.segment + 1) % SEGMENTS.len();
            let empty: bool = tx
                .prepare_cached(&format!("SELECT NOT EXISTS (SELECT 1 FROM {})", SEGMENTS[next]))?
                .query_row([], |r| r.get(0))?;
            if empty {
                self.segment = next;
                self.rows = 0;
            } else {
                self.held = true;
            }
        }
        Ok(self.segment)
    }
}

/// Balance moves per key not yet written to `keys`: (credits, spent, calls), summed over the
/// ledger rows committed since the last flush.
type Moves = foldhash::HashMap<CompactString, (i64, i64, i64)>;

/// How often the writer writes the keys' balances behind the ledger (or sooner, past
/// `BALANCE_FLUSH_KEYS` keys). A key's balance row is written once per flush however many calls it
/// made; a start-up after a kill adds at most this long's ledger rows to the balances it reads.
const BALANCE_FLUSH: std::time::Duration = std::time::Duration::from_secs(30);
const BALANCE_FLUSH_KEYS: usize = 250_000;

/// What the ledger rows after `?1` add to each key's balance, as `apply` counts them: (key id,
/// credits, spent, calls).
const BALANCE_DELTAS: &str = "SELECT key_id,
        SUM(CASE kind WHEN 'charge' THEN -amount ELSE amount END) AS credits,
        SUM(CASE kind WHEN 'charge' THEN amount WHEN 'grant' THEN 0 WHEN 'topup' THEN 0 ELSE -amount END) AS spent,
        SUM(kind = 'charge') AS calls
     FROM ledger WHERE seq > ?1";

/// Brings the keys' balances up to the ledger: adds the rows after the balance mark (those written
/// after the last flush, before a kill or a stop, and any a journal replay just committed) and
/// moves the mark past them, in one transaction.
fn catch_up_balances(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let mark: i64 = tx.query_row("SELECT ledger_seq FROM balance_mark", [], |r| r.get(0))?;
    tx.execute(
        &format!(
            "UPDATE keys SET credits = keys.credits + d.credits, spent = keys.spent + d.spent, calls = keys.calls + d.calls
             FROM ({BALANCE_DELTAS} GROUP BY key_id) AS d WHERE keys.id = d.key_id"
        ),
        [mark],
    )?;
    tx.execute(
        "UPDATE balance_mark SET ledger_seq = (SELECT COALESCE(MAX(seq), ?1) FROM ledger)",
        [mark],
    )?;
    tx.commit()
}

/// Brings `key_tools` up to the request log: adds the successful calls after its mark (those
/// committed after the last write of the pairs, before a kill or a stop, and any a journal replay
/// just committed) and moves the mark past them, in one transaction. A call pruned meanwhile is
/// not added, as it would not count anyway.
fn catch_up_tools(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let mark: i64 = tx.query_row("SELECT tools_seq FROM balance_mark", [], |r| r.get(0))?;
    tx.execute(
        "INSERT INTO key_tools (key_id, tool, last_seq)
            SELECT key_id, tool, MAX(seq) FROM requests
            WHERE seq > ?1 AND outcome = 'allowed' AND key_id IS NOT NULL AND tool IS NOT NULL
            GROUP BY key_id, tool
         ON CONFLICT (key_id, tool) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
        [mark],
    )?;
    tx.execute(
        "UPDATE balance_mark SET tools_seq = MAX(?1, (SELECT COALESCE(MAX(seq), 0) FROM requests))",
        [mark],
    )?;
    tx.commit()
}

/// Applies `batch` in one transaction. `inserted` gets, for each request row it added, the row's
/// place in `batch` and its seq; `tools`, the (key, tool) pairs of its successful calls. The
/// balance moves of the ledger rows it adds are summed into `moves`. With `flush` (the pairs not
/// yet in `key_tools`), `moves` is written to the keys and the pairs, with `tools`, to `key_tools`
/// in the same transaction, and the marks moved past the last ledger row and the last request
/// row (the caller clears `moves` and the flushed pairs once it has committed). Returns whether
/// the batch held admin events.
fn apply(
    conn: &mut Connection,
    batch: &[(u64, Op)],
    log: &mut LogTail,
    inserted: &mut Vec<(usize, i64)>,
    moves: &mut Moves,
    tools: &mut ToolPairs,
    flush: Option<&ToolPairs>,
) -> rusqlite::Result<bool> {
    inserted.clear();
    tools.clear();
    let mut events = false;
    // Changed in place only once the commit has succeeded.
    let mut tail = LogTail { held: false, ..*log };
    let tx = conn.transaction()?;
    {
        let mut insert_key = tx.prepare_cached(
            "INSERT INTO keys (id, name, hash, prefix, status, credits, created_at, settings) VALUES (?1, ?2, ?3, ?4, 'active', 0, ?5, ?6)",
        )?;
        let mut insert_row = tx.prepare_cached(
            // Only a repeated (request, kind) is skipped; any other constraint failing is an error.
            "INSERT INTO ledger (request_id, key_id, kind, amount, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (request_id, kind) DO NOTHING",
        )?;
        let mut set_status = tx.prepare_cached("UPDATE keys SET status = ?2 WHERE id = ?1")?;
        // The insert into the segment the log's rows go to (see `LogTail`).
        let mut insert_request: Option<(usize, rusqlite::CachedStatement<'_>)> = None;
        // A journal record replayed after its commit: the request id whose charge row was already
        // there. Its request row, the record's last op, was committed with it and is skipped.
        let mut replayed: Option<&str> = None;
        for (i, (_, op)) in batch.iter().enumerate() {
            match op {
                Op::CreateKey {
                    id,
                    name,
                    hash,
                    prefix,
                    created_at,
                    settings,
                } => {
                    insert_key.execute(params![id, name, &hash[..], prefix, created_at, settings])?;
                }
                Op::SetSettings { key_id, settings } => {
                    tx.prepare_cached("UPDATE keys SET settings = ?2 WHERE id = ?1")?
                        .execute(params![key_id, settings])?;
                }
                Op::Ledger {
                    request_id,
                    key_id,
                    entry,
                    amount,
                    at,
                } => {
                    // A row already there (same request and kind) changes nothing: no double charge.
                    if insert_row.execute(params![
                        request_id.as_str(),
                        key_id.as_str(),
                        entry.as_str(),
                        amount,
                        at
                    ])? == 0
                    {
                        if *entry == Entry::Charge {
                            replayed = Some(request_id);
                        }
                    } else {
                        // (credits, spent, calls)
                        let m = moves.entry(key_id.clone()).or_default();
                        match entry {
                            Entry::Grant | Entry::Topup => m.0 += amount,
                            Entry::Charge => {
                                m.0 -= amount;
                                m.1 += amount;
                                m.2 += 1;
                            }
                            Entry::Refund | Entry::PartialRefund => {
                                m.0 += amount;
                                m.1 -= amount;
                            }
                        }
                    }
                }
                Op::SetStatus { key_id, status } => {
                    set_status.execute(params![key_id, status.as_str()])?;
                }
                Op::Request(r) => {
                    if replayed.take_if(|id| *id == r.request_id).is_some() {
                        continue;
                    }
                    let segment = tail.segment_for_next(&tx)?;
                    let seq = tail.next_seq;
                    // One statement for the rows of a segment, not a cache lookup per row.
                    let insert_request = match &mut insert_request {
                        Some((s, stmt)) if *s == segment => stmt,
                        _ => {
                            &mut insert_request
                                .insert((segment, tx.prepare_cached(&SEGMENT_INSERTS[segment])?))
                                .1
                        }
                    };
                    insert_request.execute(params![
                        seq,
                        r.request_id.as_str(),
                        r.key_id.as_deref(),
                        r.method.as_str(),
                        r.tool.as_deref(),
                        r.outcome.as_str(),
                        r.reason.as_deref(),
                        r.credits,
                        r.duration_us,
                        r.created_at
                    ])?;
                    inserted.push((i, seq));
                    tail.next_seq += 1;
                    tail.rows += 1;
                    if let (Some(key_id), Some(tool), "allowed") = (&r.key_id, &r.tool, r.outcome.as_str()) {
                        let of_key = match tools.get_mut(key_id.as_str()) {
                            Some(of_key) => of_key,
                            None => tools.entry(key_id.clone()).or_default(),
                        };
                        match of_key.get_mut(tool.as_str()) {
                            Some(latest) => *latest = seq,
                            None => {
                                of_key.insert(tool.clone(), seq);
                            }
                        }
                    }
                }
                Op::Rotate { key_id, hash, prefix } => {
                    tx.prepare_cached("UPDATE keys SET hash = ?2, prefix = ?3 WHERE id = ?1")?
                        .execute(params![key_id, &hash[..], prefix])?;
                }
                Op::Event(e) => {
                    events = true;
                    tx.prepare_cached(
                        "INSERT INTO events (id, type, key_id, data, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (id) DO NOTHING",
                    )?
                    .execute(params![e.id, e.kind, e.key_id, e.data, e.created_at])?;
                }
                Op::WebhookCursor {
                    destination,
                    request_seq,
                    event_seq,
                    delivered,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO webhook_cursors (destination, request_seq, event_seq, delivered) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (destination) DO UPDATE SET request_seq = MAX(request_seq, ?2),
                            event_seq = MAX(event_seq, ?3), delivered = delivered + ?4",
                    )?
                    .execute(params![destination, request_seq, event_seq, delivered])?;
                }
                Op::WebhookKeepOnly(keep) => {
                    let keep = serde_json::to_string(keep).unwrap_or_else(|_| "[]".into());
                    tx.prepare_cached(
                        "DELETE FROM webhook_cursors WHERE destination NOT IN (SELECT value FROM json_each(?1))",
                    )?
                    .execute(params![keep])?;
                }
                Op::DeadLetter {
                    destination,
                    events,
                    count,
                    error,
                    attempts,
                    at,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO webhook_dead_letters (destination, events, count, error, attempts, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![destination, events, count, error, attempts, at])?;
                }
                Op::DropDeadLetter(seq) => {
                    tx.prepare_cached("DELETE FROM webhook_dead_letters WHERE seq = ?1")?
                        .execute(params![seq])?;
                }
            }
        }
        if let Some(pending) = flush {
            let mut update = tx.prepare_cached(
                "UPDATE keys SET credits = credits + ?2, spent = spent + ?3, calls = calls + ?4 WHERE id = ?1",
            )?;
            // In key order, so that each page of the keys' index is read and written once, not
            // once per key on it (with many keys, far more pages than SQLite's cache holds).
            let mut by_key: Vec<_> = moves.iter().collect();
            by_key.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key_id, (credits, spent, calls)) in by_key {
                update.execute(params![key_id.as_str(), credits, spent, calls])?;
            }
            // Every ledger row so far is in the balances now, this batch's included.
            tx.prepare_cached("UPDATE balance_mark SET ledger_seq = (SELECT COALESCE(MAX(seq), 0) FROM ledger)")?
                .execute([])?;
            let mut used = tx.prepare_cached(
                "INSERT INTO key_tools (key_id, tool, last_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key_id, tool) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
            )?;
            // In key order too (`key_tools` is ordered by key).
            let mut pairs: Vec<(&str, &str, i64)> = [pending, &*tools]
                .into_iter()
                .flatten()
                .flat_map(|(key_id, of_key)| of_key.iter().map(|(tool, seq)| (key_id.as_str(), tool.as_str(), *seq)))
                .collect();
            pairs.sort_unstable();
            for (key_id, tool, seq) in pairs {
                used.execute(params![key_id, tool, seq])?;
            }
            // And every successful call so far is in `key_tools`.
            tx.prepare_cached("UPDATE balance_mark SET tools_seq = ?1")?
                .execute([tail.next_seq - 1])?;
        }
    }
    tx.commit()?;
    *log = tail;
    Ok(events)
}

#[cfg(test)]
impl RequestRow {
    /// An allowed `tools/call` of `echo` by `key_1` for 1 credit, for tests (change fields with
    /// `..RequestRow::sample(id)`).
    pub fn sample(request_id: &str) -> RequestRow {
        RequestRow {
            seq: 0,
            request_id: request_id.into(),
            key_id: Some("key_1".into()),
            method: "tools/call".into(),
            tool: Some("echo".into()),
            outcome: "allowed".into(),
            reason: None,
            credits: 1,
            duration_us: 10,
            created_at: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: usize, created_at: i64) -> RequestRow {
        RequestRow {
            created_at,
            ..RequestRow::sample(&format!("req_{i:08}"))
        }
    }

    fn seqs(conn: &Connection) -> (i64, i64, i64) {
        conn.query_row("SELECT COUNT(*), MIN(seq), MAX(seq) FROM requests", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap()
    }

    /// A pruning pass with all the time it needs (a loaded test machine is no measure of its pace).
    const ANY_TIME: std::time::Duration = std::time::Duration::from_secs(60);

    /// A store holding `n` request-log rows made at `created_at`, committed, and a connection to
    /// its database (the directory lives as long as the first value).
    async fn log_of(n: usize, created_at: i64) -> (tempfile::TempDir, Store, Connection) {
        log_in_segments_of(i64::MAX, n, created_at).await
    }

    /// The same, the writer moving to the next segment every `segment_rows` rows (nothing is
    /// pruned but by the test's own calls of `prune`).
    async fn log_in_segments_of(
        segment_rows: i64,
        n: usize,
        created_at: i64,
    ) -> (tempfile::TempDir, Store, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            segment_rows,
            ..Retention::keep_all()
        };
        let (store, _) = Store::open(dir.path(), false, retention).unwrap();
        for i in 0..n {
            store.submit(Op::Request(row(i, created_at))).unwrap();
        }
        store.sync().await.unwrap();
        let conn = Connection::open(dir.path().join("tollgate.db")).unwrap();
        (dir, store, conn)
    }

    /// A database in `dir` as schema version `version` left it, before any newer migration.
    fn database_at(dir: &Path, version: usize) -> Connection {
        let conn = Connection::open(dir.join("tollgate.db")).unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64).unwrap();
        conn
    }

    /// How many rows each segment of the log holds, in ring order.
    fn segment_sizes(conn: &Connection) -> Vec<i64> {
        SEGMENTS
            .iter()
            .map(|t| {
                conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))
                    .unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn pruning_by_count_drops_whole_segments_and_keeps_what_a_webhook_has_not_delivered() {
        let now = crate::ledger::now_ms();
        // Seven segments of 200 rows; the eighth was still full when the ring came round, so the
        // writer stayed in the last one.
        let (_dir, store, conn) = log_in_segments_of(200, 2_300, now).await;
        assert_eq!(segment_sizes(&conn), [200, 200, 200, 200, 200, 200, 200, 900]);

        // Past 1,000 rows, the segments whose rows are all older go, in one pass. The one holding
        // seq 1,300 (the 1,000th newest) stays whole.
        assert_eq!(prune(&conn, 0, 1_000, ANY_TIME).unwrap(), 1_200);
        assert_eq!(seqs(&conn), (1_100, 1_201, 2_300));

        // By age, rows go one by one, but a destination that has delivered up to seq 1,500 holds
        // the rest, whatever their age.
        store
            .write(Op::WebhookCursor {
                destination: "d".into(),
                request_seq: 1_500,
                event_seq: 0,
                delivered: 0,
            })
            .await
            .unwrap();
        assert_eq!(prune(&conn, now + 1, 1_000, ANY_TIME).unwrap(), 300);
        assert_eq!(seqs(&conn), (800, 1_501, 2_300));
    }

    #[tokio::test]
    async fn under_steady_load_the_log_goes_round_its_segments_within_a_segment_of_its_bound() {
        let now = crate::ledger::now_ms();
        let (_dir, store, conn) = log_in_segments_of(200, 0, now).await;
        // 6,000 calls, a pass after each hundred: nearly four times round the ring of eight.
        for batch in 0..60 {
            for i in 0..100 {
                store.submit(Op::Request(row(batch * 100 + i, now))).unwrap();
            }
            store.sync().await.unwrap();
            prune(&conn, 0, 1_000, ANY_TIME).unwrap();
            let (count, oldest, newest) = seqs(&conn);
            assert_eq!(newest, (batch as i64 + 1) * 100);
            assert_eq!(count, newest - oldest + 1, "the newest rows, none missing");
            assert!(
                (newest.min(1_000)..=1_200).contains(&count),
                "{count} rows after {newest} calls"
            );
        }
        assert!(
            segment_sizes(&conn).iter().all(|n| *n <= 200),
            "{:?}",
            segment_sizes(&conn)
        );
    }

    #[tokio::test]
    async fn rows_committed_together_are_logged_field_for_field_across_a_segment_boundary() {
        // 75 rows, the writer moving to the next segment after the 50th.
        let (_dir, store, conn) = log_in_segments_of(50, 0, 0).await;
        let rows: Vec<RequestRow> = (0..75)
            .map(|i| RequestRow {
                key_id: (i % 5 != 0).then(|| format!("key_{i}").into()),
                method: if i % 7 == 0 { "tools/list" } else { "tools/call" }.into(),
                tool: (i % 3 != 0).then(|| format!("tool_{i}").into()),
                outcome: if i % 4 == 0 { "refunded" } else { "allowed" }.into(),
                reason: (i % 4 == 0).then(|| format!("why_{i}").into()),
                credits: i as i64 * 3,
                duration_us: i as i64 * 1_000 + 7,
                created_at: 1_000 + i as i64,
                ..RequestRow::sample(&format!("req_{i:04}"))
            })
            .collect();
        for r in &rows {
            store.submit(Op::Request(r.clone())).unwrap();
        }
        store.sync().await.unwrap();
        assert_eq!(segment_sizes(&conn), [50, 25, 0, 0, 0, 0, 0, 0]);
        let mut logged = store
            .requests(&RequestFilter {
                limit: 1_000,
                ..Default::default()
            })
            .unwrap();
        logged.reverse();
        let expected: Vec<RequestRow> = rows
            .into_iter()
            .enumerate()
            .map(|(i, r)| RequestRow { seq: i as i64 + 1, ..r })
            .collect();
        assert_eq!(logged, expected);
    }

    #[tokio::test]
    async fn the_events_version_changes_with_each_commit_that_adds_admin_events_and_only_then() {
        let (_dir, store, _) = log_of(0, 0).await;
        let before = store.events_version();
        store.write(Op::Request(row(1, 0))).await.unwrap();
        assert_eq!(store.events_version(), before, "a call is not an admin event");
        let event = |id: &str| {
            Op::Event(EventRow {
                seq: 0,
                id: id.into(),
                kind: "key.created".into(),
                key_id: None,
                data: "{}".into(),
                created_at: 0,
            })
        };
        store.write(event("evt_1")).await.unwrap();
        let after_one = store.events_version();
        assert_ne!(after_one, before);
        store.write(Op::Request(row(2, 0))).await.unwrap();
        assert_eq!(store.events_version(), after_one);
        store.write(event("evt_2")).await.unwrap();
        assert_ne!(store.events_version(), after_one);
    }

    #[tokio::test]
    async fn a_writer_started_again_goes_on_in_the_segment_of_the_newest_row_with_the_next_seq() {
        let (dir, _store, _) = log_in_segments_of(200, 900, 0).await;
        let conn = Connection::open(dir.path().join("tollgate.db")).unwrap();
        let retention = Retention {
            segment_rows: 200,
            ..Retention::keep_all()
        };
        let tail = LogTail::load(&conn, retention).unwrap();
        assert_eq!((tail.segment, tail.rows, tail.next_seq), (4, 100, 901));
    }

    #[tokio::test]
    async fn a_change_that_waits_for_its_commit_wakes_the_writer_instead_of_waiting_for_its_pace() {
        let (_dir, store, conn) = log_of(1, 0).await;
        // Paced, twenty commits one after the other would take at least nineteen paces (380 ms).
        let started = std::time::Instant::now();
        for i in 1..=20 {
            store.write(Op::Request(row(i, 0))).await.unwrap();
        }
        let took = started.elapsed();
        assert_eq!(seqs(&conn).0, 21, "every change is committed when its write returns");
        assert!(
            took < std::time::Duration::from_millis(190),
            "twenty waited-for commits took {took:?}"
        );
    }

    #[tokio::test]
    async fn pruning_a_whole_idle_log_keeps_its_newest_row_so_seqs_never_go_back() {
        let now = crate::ledger::now_ms();
        let (_dir, store, conn) = log_of(10, now).await;

        // Every row is past its age; the newest stays, so the next one is numbered after it.
        assert_eq!(prune(&conn, now + 1, 1_000, ANY_TIME).unwrap(), 9);
        assert_eq!(seqs(&conn), (1, 10, 10));
        store.write(Op::Request(row(10, now))).await.unwrap();
        assert_eq!(seqs(&conn), (2, 10, 11));
    }

    #[tokio::test]
    async fn the_rows_a_follower_counts_as_usage_are_the_ones_the_usage_outbox_reads() {
        let (_dir, store, _) = log_of(0, 0).await;
        let variants = [
            ("allowed", Some("key_1"), None),
            ("refunded", Some("key_1"), Some("upstream error")),
            ("denied", Some("key_1"), Some("no credits")),
            ("allowed", None, None),
            ("allowed", Some("key_1"), Some("shadow: would be denied")),
            ("refunded", Some("key_1"), Some("shadow:x")),
            ("allowed", Some("key_1"), Some("a shadow: later")),
        ];
        let rows: Vec<RequestRow> = variants
            .iter()
            .enumerate()
            .map(|(i, (outcome, key_id, reason))| RequestRow {
                outcome: (*outcome).into(),
                key_id: key_id.map(Into::into),
                reason: reason.map(Into::into),
                ..row(i, 0)
            })
            .collect();
        for r in &rows {
            store.write(Op::Request(r.clone())).await.unwrap();
        }
        let conn = store.reader().unwrap();
        let read: Vec<CompactString> = Store::usage_after(&conn, 0, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        let counted: Vec<CompactString> = rows.into_iter().filter(is_usage).map(|r| r.request_id).collect();
        assert_eq!(read, counted);
        assert_eq!(read.len(), 3);
    }

    /// One commit as a follower was told of it: after, last, and (seq, request id) per row.
    type Commit = (i64, i64, Vec<(i64, String)>);

    #[derive(Default)]
    struct Told(Mutex<Vec<Commit>>);

    impl LogFollower for Told {
        fn committed(&self, after: i64, last: i64, rows: &mut dyn Iterator<Item = (i64, &RequestRow)>) {
            let rows = rows.map(|(seq, r)| (seq, r.request_id.to_string())).collect();
            self.0.lock().unwrap().push((after, last, rows));
        }
    }

    #[tokio::test]
    async fn a_follower_is_told_of_each_commits_request_rows_with_their_seqs() {
        let (_dir, store, _) = log_of(3, 0).await;
        let told = Arc::new(Told::default());
        store.follow(Some(told.clone()));
        // Handed over together: one commit.
        store
            .submit_money([Op::Request(row(3, 0)), Op::Request(row(4, 0))])
            .unwrap();
        store.sync().await.unwrap();
        store
            .write(Op::SetStatus {
                key_id: "key_1".into(),
                status: Status::Suspended,
            })
            .await
            .unwrap();
        store.follow(None);
        store.write(Op::Request(row(5, 0))).await.unwrap();
        let told = told.0.lock().unwrap();
        assert_eq!(
            *told,
            vec![
                (
                    3,
                    5,
                    vec![
                        (4, row(3, 0).request_id.to_string()),
                        (5, row(4, 0).request_id.to_string())
                    ]
                ),
                (5, 5, vec![]),
            ]
        );
    }

    #[tokio::test]
    async fn reading_the_usage_outbox_batch_after_batch_plans_its_statement_once() {
        let (_dir, store, _) = log_of(250, 0).await;
        let conn = store.reader().unwrap();
        let mut cursor = 0;
        let mut read = Vec::new();
        for _ in 0..3 {
            let batch = Store::usage_after(&conn, cursor, 100).unwrap();
            cursor = batch.last().unwrap().seq;
            read.extend(batch.into_iter().map(|r| r.seq));
        }
        assert_eq!(read, (1..=250).collect::<Vec<i64>>());
        // A new binding of `LIMIT ?2` must not send the cached statement back to the planner.
        let stmt = conn.prepare_cached(USAGE_AFTER).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    /// A store with keys `key_a` and `key_b`: each a grant, then 30 charges alternating between
    /// them (`req_0`…`req_29`), every third refunded.
    async fn ledger_of_two_keys() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), false, Retention::keep_all()).unwrap();
        let entry = |request_id: String, key_id: &str, entry, amount| Op::Ledger {
            request_id: request_id.into(),
            key_id: key_id.into(),
            entry,
            amount,
            at: 0,
        };
        for id in ["key_a", "key_b"] {
            store
                .submit(Op::CreateKey {
                    id: id.to_string(),
                    name: id.to_string(),
                    hash: [id.as_bytes()[4]; 32],
                    prefix: "tg_".to_string(),
                    created_at: 0,
                    settings: "{}".to_string(),
                })
                .unwrap();
            store
                .submit(entry(format!("grant-{id}"), id, Entry::Grant, 100))
                .unwrap();
        }
        for i in 0..30 {
            let key = if i % 2 == 0 { "key_a" } else { "key_b" };
            store.submit(entry(format!("req_{i}"), key, Entry::Charge, 2)).unwrap();
            if i % 3 == 0 {
                store.submit(entry(format!("req_{i}"), key, Entry::Refund, 2)).unwrap();
            }
        }
        store.sync().await.unwrap();
        (dir, store)
    }

    fn pages(store: &Store, filter: LedgerFilter) -> Vec<Vec<LedgerRow>> {
        let mut pages = Vec::new();
        let mut f = filter;
        loop {
            let page = store.ledger_rows(&f).unwrap();
            let Some(last) = page.last() else { break };
            f.after = Some(last.seq);
            pages.push(page);
        }
        pages
    }

    #[tokio::test]
    async fn the_ledger_read_page_by_page_gives_every_row_once_oldest_first() {
        let (_dir, store) = ledger_of_two_keys().await;
        let all = store.ledger(None).unwrap();
        assert_eq!(all.len(), 2 + 30 + 10);
        let pages = pages(
            &store,
            LedgerFilter {
                limit: 7,
                ..Default::default()
            },
        );
        assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [7, 7, 7, 7, 7, 7]);
        assert_eq!(pages.concat(), all, "the pages are the whole ledger, in seq order");
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[tokio::test]
    async fn a_ledger_page_filters_by_key_by_kind_and_by_request_id() {
        let (_dir, store) = ledger_of_two_keys().await;
        let filter = |key: Option<&str>, kind: Option<Entry>, request: Option<&str>| LedgerFilter {
            key_id: key.map(str::to_string),
            kind,
            request_id: request.map(str::to_string),
            limit: 4,
            after: None,
        };
        let a = pages(&store, filter(Some("key_a"), None, None)).concat();
        assert_eq!(a.len(), 1 + 15 + 5, "key_a's grant, charges and refunds");
        assert!(a.iter().all(|r| r.key_id == "key_a"));
        let refunds = pages(&store, filter(Some("key_b"), Some(Entry::Refund), None)).concat();
        let ids: Vec<&str> = refunds.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["req_3", "req_9", "req_15", "req_21", "req_27"]);
        let one = store.ledger_rows(&filter(None, None, Some("req_9"))).unwrap();
        let kinds: Vec<&str> = one.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["charge", "refund"], "a request's charge and its refund");
        let none = store.ledger_rows(&filter(Some("key_a"), None, Some("req_9"))).unwrap();
        assert!(none.is_empty(), "req_9 is key_b's");
    }

    #[tokio::test]
    async fn a_ledger_page_by_request_id_is_a_lookup_in_the_unique_index_not_a_scan() {
        let (_dir, store) = ledger_of_two_keys().await;
        let conn = store.reader().unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt
                .query_map(params![0, "req_9", None::<String>, None::<String>, 10], |r| {
                    r.get::<_, String>(3)
                })
                .unwrap();
            rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
        };
        let by_request = plan(&ledger_sql(true));
        assert!(by_request.contains("USING INDEX"), "{by_request}");
        assert!(!by_request.contains("SCAN"), "{by_request}");
        let paged = plan(&ledger_sql(false));
        assert!(
            paged.contains("USING INTEGER PRIMARY KEY"),
            "a page starts at its cursor: {paged}"
        );
    }

    #[tokio::test]
    async fn a_request_log_whose_newest_rows_were_pruned_keeps_its_webhook_cursors_valid_after_migration() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Version 7, with AUTOINCREMENT: rows 1-3 kept, 4-5 pruned, a destination at 5.
            let conn = database_at(dir.path(), 7);
            for i in 1..=5 {
                conn.execute(
                    "INSERT INTO requests (request_id, method, outcome, credits, duration_us, created_at, key_id)
                        VALUES (?1, 'tools/call', 'allowed', 1, 1, 0, 'key_1')",
                    params![format!("req_{i}")],
                )
                .unwrap();
            }
            conn.execute_batch(
                "DELETE FROM requests WHERE seq > 3;
                 INSERT INTO webhook_cursors (destination, request_seq, event_seq) VALUES ('d', 5, 0);",
            )
            .unwrap();
        }
        let (store, _) = Store::open(dir.path(), false, Retention::keep_all()).unwrap();
        let conn = store.reader().unwrap();
        assert_eq!(seqs(&conn), (3, 1, 3));
        // The cursor moved back to the last row, so the next call's row is past it and delivered.
        let cursor = Store::cursor(&conn, "d").unwrap().unwrap();
        assert_eq!(cursor.request_seq, 3);
        store.write(Op::Request(row(6, 0))).await.unwrap();
        let next = Store::usage_after(&conn, cursor.request_seq, 10).unwrap();
        assert_eq!(next.iter().map(|r| r.seq).collect::<Vec<_>>(), [4]);
    }

    /// Each key's distinct successful tools, counted over the request log itself.
    fn count_distinct_tools(conn: &Connection) -> std::collections::HashMap<String, i64> {
        let mut stmt = conn
            .prepare(
                "SELECT key_id, COUNT(DISTINCT tool) FROM requests
                 WHERE outcome = 'allowed' AND tool IS NOT NULL GROUP BY key_id",
            )
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[tokio::test]
    async fn unique_tools_counts_each_keys_distinct_successful_tools_as_count_distinct_does() {
        let dir = tempfile::tempdir().unwrap();
        // A segment a row, so that pruning by count can drop them one by one.
        let retention = Retention {
            segment_rows: 1,
            ..Retention::keep_all()
        };
        let (store, _) = Store::open(dir.path(), false, retention).unwrap();
        let calls: &[(&str, Option<&str>, &str)] = &[
            ("key_1", Some("search"), "allowed"),
            ("key_1", Some("echo"), "allowed"),
            ("key_1", Some("search"), "allowed"),
            ("key_1", Some(""), "allowed"),
            ("key_1", Some("fetch"), "refunded"),
            ("key_1", None, "allowed"),
            ("key_2", Some("echo"), "denied"),
            ("key_3", Some("zeta"), "allowed"),
        ];
        for (i, (key, tool, outcome)) in calls.iter().enumerate() {
            store
                .submit(Op::Request(RequestRow {
                    key_id: Some((*key).into()),
                    tool: tool.map(Into::into),
                    outcome: (*outcome).into(),
                    ..RequestRow::sample(&format!("req_{i}"))
                }))
                .unwrap();
        }
        store.sync().await.unwrap();
        let ids: Vec<String> = ["key_1", "key_2", "key_3", "key_9"].map(String::from).to_vec();
        let counts = store.unique_tools(&ids).unwrap();
        // "search", "echo" and "" for key_1; key_2 and key_9 have no successful call.
        assert_eq!(counts, [("key_1".to_string(), 3), ("key_3".to_string(), 1)].into());
        let conn = Connection::open(dir.path().join("tollgate.db")).unwrap();
        assert_eq!(counts, count_distinct_tools(&conn));

        // Once the three oldest calls are pruned, key_1's "search" and "echo" are out of the log.
        assert_eq!(prune(&conn, 0, 5, ANY_TIME).unwrap(), 3);
        let counts = store.unique_tools(&ids).unwrap();
        assert_eq!(counts, [("key_1".to_string(), 1), ("key_3".to_string(), 1)].into());
        assert_eq!(counts, count_distinct_tools(&conn));
    }

    #[tokio::test]
    async fn the_tools_each_key_called_are_carried_over_from_an_older_request_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Version 9: key_1 called search twice and echo once, key_2's call was refunded.
            let conn = database_at(dir.path(), 9);
            for (i, (key, tool, outcome)) in [
                ("key_1", "search", "allowed"),
                ("key_1", "echo", "allowed"),
                ("key_1", "search", "allowed"),
                ("key_2", "echo", "refunded"),
            ]
            .into_iter()
            .enumerate()
            {
                conn.execute(
                    "INSERT INTO requests (request_id, method, tool, outcome, credits, duration_us, created_at, key_id)
                        VALUES (?1, 'tools/call', ?2, ?3, 1, 1, 0, ?4)",
                    params![format!("req_{i}"), tool, outcome, key],
                )
                .unwrap();
            }
        }
        let (store, _) = Store::open(dir.path(), false, Retention::keep_all()).unwrap();
        let counts = store.unique_tools(&["key_1".into(), "key_2".into()]).unwrap();
        assert_eq!(counts, [("key_1".to_string(), 2)].into());
        // And the next successful call of a new tool adds to what was carried over.
        store
            .write(Op::Request(RequestRow {
                tool: Some("fetch".into()),
                ..RequestRow::sample("req_9")
            }))
            .await
            .unwrap();
        assert_eq!(
            store.unique_tools(&["key_1".into()]).unwrap(),
            [("key_1".to_string(), 3)].into()
        );
    }

    #[tokio::test]
    async fn the_tools_each_key_called_count_before_they_are_written_and_after_a_restart_that_never_wrote_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tollgate.db");
        let written = || -> (i64, i64) {
            let conn = Connection::open(&db).unwrap();
            let pairs = conn
                .query_row("SELECT COUNT(*) FROM key_tools", [], |r| r.get(0))
                .unwrap();
            let mark = conn
                .query_row("SELECT tools_seq FROM balance_mark", [], |r| r.get(0))
                .unwrap();
            (pairs, mark)
        };
        let call = |store: &Store, i: usize, key: &str, tool: &str| {
            store
                .submit(Op::Request(RequestRow {
                    key_id: Some(key.into()),
                    tool: Some(tool.into()),
                    ..RequestRow::sample(&format!("req_{i}"))
                }))
                .unwrap();
        };
        let ids: Vec<String> = ["key_1", "key_2"].map(String::from).to_vec();
        {
            let (store, _) = Store::open(dir.path(), false, Retention::keep_all()).unwrap();
            for (i, (key, tool)) in [
                ("key_1", "search"),
                ("key_1", "echo"),
                ("key_2", "search"),
                ("key_1", "search"),
            ]
            .into_iter()
            .enumerate()
            {
                call(&store, i, key, tool);
            }
            store.sync().await.unwrap();
            assert_eq!(written(), (0, 0), "the pairs are not written with each commit");
            let counts = store.unique_tools(&ids).unwrap();
            assert_eq!(counts, [("key_1".to_string(), 2), ("key_2".to_string(), 1)].into());
            // The store is dropped without writing them, as a kill would leave it.
        }
        let (store, _) = Store::open(dir.path(), false, Retention::keep_all()).unwrap();
        assert_eq!(written(), (3, 4), "the start-up added the log's calls after the mark");
        assert_eq!(
            store.unique_tools(&ids).unwrap(),
            [("key_1".to_string(), 2), ("key_2".to_string(), 1)].into()
        );

        // Written with the balances (here at every commit), the mark moves with them.
        store.flush_balances_every(std::time::Duration::ZERO);
        call(&store, 4, "key_1", "fetch");
        call(&store, 5, "key_2", "search");
        store.sync().await.unwrap();
        assert_eq!(written(), (4, 6));
        let conn = Connection::open(&db).unwrap();
        assert_eq!(
            store.unique_tools(&ids).unwrap(),
            [("key_1".to_string(), 3), ("key_2".to_string(), 1)].into()
        );
        assert_eq!(store.unique_tools(&ids).unwrap(), count_distinct_tools(&conn));
    }

    #[tokio::test]
    async fn a_ledger_written_by_an_older_schema_keeps_its_rows_and_its_rules_after_migration() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A database as version 6 left it: a key with a grant, a charge and a refund.
            let conn = database_at(dir.path(), 6);
            conn.execute_batch(
                "INSERT INTO keys (id, name, hash, prefix, status, credits, spent, calls, created_at)
                    VALUES ('key_1', 'old', x'00', 'tg_', 'active', 95, 5, 2, 0);
                 INSERT INTO ledger (request_id, key_id, kind, amount, created_at) VALUES
                    ('grant-key_1', 'key_1', 'grant', 100, 0),
                    ('req_1', 'key_1', 'charge', 5, 1),
                    ('req_2', 'key_1', 'charge', 3, 2),
                    ('req_2', 'key_1', 'refund', 3, 3);",
            )
            .unwrap();
        }
        let (store, keys) = Store::open(dir.path(), false, Retention::keep_all()).unwrap();
        assert_eq!((keys[0].credits, keys[0].spent, keys[0].calls), (95, 5, 2));
        let before: Vec<(i64, String, String, i64)> = store
            .ledger(None)
            .unwrap()
            .into_iter()
            .map(|r| (r.seq, r.request_id, r.kind, r.amount))
            .collect();
        let row = |seq, id: &str, kind: &str, amount| (seq, id.to_string(), kind.to_string(), amount);
        assert_eq!(
            before,
            [
                row(1, "grant-key_1", "grant", 100),
                row(2, "req_1", "charge", 5),
                row(3, "req_2", "charge", 3),
                row(4, "req_2", "refund", 3)
            ]
        );

        // New rows continue the sequence; a repeated charge still changes nothing.
        for request_id in ["req_3", "req_1"] {
            store
                .write(Op::Ledger {
                    request_id: request_id.into(),
                    key_id: "key_1".into(),
                    entry: Entry::Charge,
                    amount: 2,
                    at: 4,
                })
                .await
                .unwrap();
        }
        let after = store.ledger(None).unwrap();
        assert_eq!(after.len(), 5);
        let newest = after.iter().max_by_key(|r| r.seq).unwrap();
        assert_eq!((newest.request_id.as_str(), newest.seq), ("req_3", 5));
        assert_eq!(store.stored_key("key_1").unwrap().unwrap().credits, 93);

        // The table's rules hold: an unknown kind, a negative amount, an unknown key.
        let conn = Connection::open(dir.path().join("tollgate.db")).unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        for bad in [
            "INSERT INTO ledger (request_id, key_id, kind, amount, created_at) VALUES ('r', 'key_1', 'gift', 1, 0)",
            "INSERT INTO ledger (request_id, key_id, kind, amount, created_at) VALUES ('r', 'key_1', 'charge', -1, 0)",
            "INSERT INTO ledger (request_id, key_id, kind, amount, created_at) VALUES ('r', 'key_9', 'charge', 1, 0)",
        ] {
            assert!(conn.execute(bad, []).is_err(), "accepted: {bad}");
        }
    }
}
