//! The state store: SQLite at `<root>/state.db`. Sandboxes are rows keyed by id holding
//! their record as JSON, so the schema stays stable while records grow fields.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};

use crate::sandbox::Record;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open state database {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database query failed")]
    Query(#[from] rusqlite::Error),
    #[error("corrupt sandbox record {id}")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pools (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts or replaces a sandbox record.
    pub fn put(&self, rec: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec).map_err(|source| StoreError::Corrupt { id: rec.id.clone(), source })?;
        self.conn()
            .prepare_cached("INSERT OR REPLACE INTO sandboxes (id, record) VALUES (?1, ?2)")?
            .execute(params![rec.id, json])?;
        Ok(())
    }

    /// Inserts or replaces several sandbox records in one transaction: all or none.
    pub fn put_all(&self, recs: &[Record]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for rec in recs {
            let json =
                serde_json::to_string(rec).map_err(|source| StoreError::Corrupt { id: rec.id.clone(), source })?;
            tx.prepare_cached("INSERT OR REPLACE INTO sandboxes (id, record) VALUES (?1, ?2)")?
                .execute(params![rec.id, json])?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.conn().prepare_cached("DELETE FROM sandboxes WHERE id = ?1")?.execute(params![id])?;
        Ok(())
    }

    /// Every stored record; unreadable rows are returned as errors next to the good ones.
    pub fn all(&self) -> Result<Vec<Result<Record, StoreError>>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, record FROM sandboxes ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = row?;
            out.push(serde_json::from_str(&json).map_err(|source| StoreError::Corrupt { id, source }));
        }
        Ok(out)
    }
}

/// Tables other than `sandboxes` that hold JSON records by key.
#[derive(Debug, Clone, Copy)]
pub enum Table {
    Snapshots,
    Volumes,
    Pools,
    Keys,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Snapshots => "snapshots",
            Table::Volumes => "volumes",
            Table::Pools => "pools",
            Table::Keys => "keys",
        }
    }
}

impl Store {
    /// Inserts or replaces a record of `table`.
    pub fn put_in<T: serde::Serialize>(&self, table: Table, id: &str, rec: &T) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec).map_err(|source| StoreError::Corrupt { id: id.into(), source })?;
        self.conn()
            .prepare_cached(&format!("INSERT OR REPLACE INTO {} (id, record) VALUES (?1, ?2)", table.name()))?
            .execute(params![id, json])?;
        Ok(())
    }

    pub fn delete_in(&self, table: Table, id: &str) -> Result<(), StoreError> {
        self.conn().prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", table.name()))?.execute(params![id])?;
        Ok(())
    }

    /// The ids of every record of `table`, also of records that no longer parse.
    pub fn ids_in(&self, table: Table) -> Result<std::collections::HashSet<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT id FROM {}", table.name()))?;
        let ids = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// Every record of `table`, in id order; unreadable rows are skipped with a warning.
    pub fn all_in<T: serde::de::DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT id, record FROM {} ORDER BY id", table.name()))?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = row?;
            match serde_json::from_str(&json) {
                Ok(v) => out.push(v),
                Err(e) => tracing::warn!(table = table.name(), id, error = %e, "skipping unreadable record"),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_replace_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let mut rec = Record::example("abc");
        store.put(&rec).unwrap();
        rec.hostname = "changed".into();
        store.put(&rec).unwrap();
        let all = store.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].as_ref().unwrap().hostname, "changed");
        store.delete("abc").unwrap();
        assert!(store.all().unwrap().is_empty());
    }
}
