//! The relay's own state that must outlive a restart and is too large or too
//! often changed for one JSON file: the fleet inventory, the event log,
//! rollout decisions. One file, `state/patchrelay.redb`.
//!
//! redb (pure Rust, copy-on-write B-trees, crash-safe commits) rather than
//! SQLite: no C to build, and these are key -> value tables that want no
//! query language. Values are JSON (small, readable with `redb`'s tools or
//! by hand when something must be looked into). Callers write in batches
//! from background tasks: a commit fsyncs, and nothing on the hot path ever
//! waits for one.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A table of the state database: byte keys, JSON values.
#[derive(Debug, Clone, Copy)]
pub struct Table(&'static str);

impl Table {
    pub const fn new(name: &'static str) -> Table {
        Table(name)
    }

    fn def(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(self.0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("state database {path}: {message}")]
pub struct DbError {
    path: String,
    message: String,
}

/// The state database; cheap to clone.
#[derive(Clone)]
pub struct StateDb {
    db: std::sync::Arc<Database>,
    path: String,
}

/// One batch of changes, committed together.
#[derive(Default)]
pub struct Batch {
    puts: Vec<(Table, Vec<u8>, Vec<u8>)>,
    deletes: Vec<(Table, Vec<u8>)>,
}

impl Batch {
    pub fn put(&mut self, table: Table, key: &[u8], value: &impl Serialize) {
        if let Ok(v) = serde_json::to_vec(value) {
            self.puts.push((table, key.to_vec(), v));
        }
    }

    pub fn delete(&mut self, table: Table, key: &[u8]) {
        self.deletes.push((table, key.to_vec()));
    }

    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.puts.len() + self.deletes.len()
    }
}

impl StateDb {
    /// Open (creating) `state/patchrelay.redb` under a store's state directory.
    pub fn open(state: &Path) -> Result<StateDb, DbError> {
        let path = state.join("patchrelay.redb");
        let shown = path.display().to_string();
        let db = Database::create(&path).map_err(|e| DbError { path: shown.clone(), message: e.to_string() })?;
        Ok(StateDb { db: std::sync::Arc::new(db), path: shown })
    }

    /// Whether another handle to the database is still alive (a task that
    /// has not ended yet): the file stays locked until the last one goes.
    pub fn is_shared(&self) -> bool {
        std::sync::Arc::strong_count(&self.db) > 1
    }

    fn err(&self, e: impl std::fmt::Display) -> DbError {
        DbError { path: self.path.clone(), message: e.to_string() }
    }

    /// Commit a batch (one fsync). Blocking.
    pub fn commit(&self, batch: Batch) -> Result<(), DbError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut tables: Vec<&'static str> =
            batch.puts.iter().map(|p| p.0.0).chain(batch.deletes.iter().map(|d| d.0.0)).collect();
        tables.sort_unstable();
        tables.dedup();
        for name in tables {
            let mut t = txn.open_table(Table(name).def()).map_err(|e| self.err(e))?;
            // Deletes first: a key dropped and written again in one batch stays.
            for (_, key) in batch.deletes.iter().filter(|d| d.0.0 == name) {
                t.remove(key.as_slice()).map_err(|e| self.err(e))?;
            }
            for (_, key, value) in batch.puts.iter().filter(|p| p.0.0 == name) {
                t.insert(key.as_slice(), value.as_slice()).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Every entry of `table` whose value parses (others are skipped with
    /// a warning: a newer patchrelay may have written them). Blocking.
    pub fn scan<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(Vec<u8>, T)>, DbError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = match txn.open_table(table.def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match serde_json::from_slice(v.value()) {
                Ok(value) => out.push((k.value().to_vec(), value)),
                Err(e) => {
                    tracing::warn!(table = table.0, error = %e, "skipping an unreadable entry of the state database")
                }
            }
        }
        Ok(out)
    }

    /// One entry. Blocking.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &[u8]) -> Result<Option<T>, DbError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = match txn.open_table(table.def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let Some(v) = t.get(key).map_err(|e| self.err(e))? else { return Ok(None) };
        Ok(serde_json::from_slice(v.value()).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        const T: Table = Table::new("t");
        {
            let db = StateDb::open(dir.path()).unwrap();
            let mut b = Batch::default();
            b.put(T, b"a", &1u32);
            b.put(T, b"b", &2u32);
            db.commit(b).unwrap();
            let mut b = Batch::default();
            b.delete(T, b"a");
            b.put(T, b"c", &"three");
            db.commit(b).unwrap();
        }
        let db = StateDb::open(dir.path()).unwrap();
        let rows: Vec<(Vec<u8>, serde_json::Value)> = db.scan(T).unwrap();
        assert_eq!(rows, vec![(b"b".to_vec(), serde_json::json!(2)), (b"c".to_vec(), serde_json::json!("three"))]);
        assert_eq!(db.get::<u32>(T, b"b").unwrap(), Some(2));
        assert!(db.scan::<u32>(Table::new("none")).unwrap().is_empty());
    }
}
