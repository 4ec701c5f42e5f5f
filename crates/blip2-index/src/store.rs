//! The SQLite file: its schema, how it is opened (and refused), and its reads and writes.
//!
//! ```text
//! meta   (key TEXT PRIMARY KEY, value TEXT)        format, export (identity JSON), shapes
//! images (id INTEGER PRIMARY KEY, path TEXT UNIQUE, size, mtime_ns, hash TEXT,
//!         embedding BLOB)                          [queries, dim] little-endian float32
//! codes  (id INTEGER PRIMARY KEY, codes BLOB)      the scan's int8 copy (scan.rs)
//! ```
//!
//! `PRAGMA application_id` marks the file as an index and `user_version` is the schema
//! version. The file is in WAL mode: readers (search, serve) go on while an index run
//! writes, and writers wait for each other (busy timeout) instead of failing. Every
//! change is a transaction, so an index run stopped at any point leaves the file as it
//! was after its last committed batch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::codes::{encode_codes, Codes};
use crate::identity::ExportIdentity;
use crate::IndexError;

/// `PRAGMA application_id` of an index: "b2ix".
pub const APPLICATION_ID: i32 = 0x6232_6978;
/// `PRAGMA user_version`: the schema version.
pub const SCHEMA_VERSION: i32 = 1;
const FORMAT: &str = "blip2-ort image index";
/// How long a writer waits for another one (two index runs at once) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(120);

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE TABLE codes (id INTEGER PRIMARY KEY, codes BLOB NOT NULL);
";

/// Whether [`Store::open`] may make a new index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// `index`: a missing or empty file becomes a new index.
    Create,
    /// `search`, `serve --db`: the index must exist.
    Existing,
}

/// An image as the index knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: i64,
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    /// FNV-1a of the file's bytes.
    pub hash: u64,
}

/// An image to add or replace.
#[derive(Debug, Clone)]
pub struct NewImage<'a> {
    pub path: &'a str,
    pub size: u64,
    pub mtime_ns: i64,
    pub hash: u64,
    /// `[queries * dim]` normalized query embeddings.
    pub embedding: &'a [f32],
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    pub identity: ExportIdentity,
}

fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

impl Store {
    /// Opens the index at `path` for the export `identity` is of. Refused, naming the
    /// file: a file that is not an SQLite database or is damaged, another application's
    /// database, an index of another schema version, an index made with another export,
    /// and (with [`OpenMode::Existing`]) a missing file.
    pub fn open(
        path: &Path,
        identity: &ExportIdentity,
        mode: OpenMode,
    ) -> Result<Store, IndexError> {
        // A run making the same new file at this moment (its switch to WAL, its first
        // transaction) can answer "database is locked" at once, past SQLite's busy
        // handler: try again until the busy timeout.
        let started = std::time::Instant::now();
        loop {
            match Self::open_once(path, identity, mode) {
                Err(IndexError::Sqlite { source, .. })
                    if is_busy(&source) && started.elapsed() < BUSY_TIMEOUT =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn open_once(
        path: &Path,
        identity: &ExportIdentity,
        mode: OpenMode,
    ) -> Result<Store, IndexError> {
        let refuse = |message: String| IndexError::Refused { path: path.to_path_buf(), message };
        let sql = |source: rusqlite::Error| {
            if is_damage(&source) {
                refuse(format!(
                    "not a blip2-ort index: not an SQLite database, or a damaged one ({source})"
                ))
            } else {
                IndexError::Sqlite { path: path.to_path_buf(), source }
            }
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => return Err(refuse("a folder, not an index file".into())),
            Ok(m) if m.len() > 0 => {
                let mut head = [0u8; 16];
                let n = std::fs::File::open(path)
                    .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
                    .map_err(|source| IndexError::Io { path: path.to_path_buf(), source })?;
                if n < 16 || &head != b"SQLite format 3\0" {
                    return Err(refuse(
                        "not a blip2-ort index (not an SQLite database); give --db a new file name"
                            .into(),
                    ));
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if mode == OpenMode::Existing {
                    return Err(refuse(
                        "no such index; make one with `blip2-ort index --model M --db FILE IMAGES...`"
                            .into(),
                    ));
                }
            }
            Err(source) => return Err(IndexError::Io { path: path.to_path_buf(), source }),
        }
        let flags = match mode {
            OpenMode::Create => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            OpenMode::Existing => OpenFlags::SQLITE_OPEN_READ_WRITE,
        } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        let mut store = Store { conn, path: path.to_path_buf(), identity: identity.clone() };
        // The mark and the tables read in one transaction: a run creating the same new file
        // at this moment is seen either not at all or whole (marked, with its tables).
        let (app, tables) = store.mark_and_tables().map_err(sql)?;
        if app == 0 {
            if !tables.is_empty() {
                return Err(refuse(format!(
                    "an SQLite database of another application (tables {}), not a blip2-ort index",
                    tables.join(", ")
                )));
            }
            if mode == OpenMode::Existing {
                return Err(refuse(
                    "an empty database, not a blip2-ort index; make one with `blip2-ort index`"
                        .into(),
                ));
            }
            store.create(identity).map_err(sql)?;
        } else if app != APPLICATION_ID {
            return Err(refuse(format!(
                "an SQLite database of another application (application_id {app:#x}), not a blip2-ort index"
            )));
        }
        let version: i32 = store.pragma_int("user_version").map_err(sql)?;
        if version != SCHEMA_VERSION {
            return Err(refuse(format!(
                "an index of schema version {version}; this blip2-ort reads version {SCHEMA_VERSION}: \
                 index the images again into a new file"
            )));
        }
        let stored: Option<String> = store
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'export'", [], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        let stored: ExportIdentity =
            stored.as_deref().and_then(|s| serde_json::from_str(s).ok()).ok_or_else(|| {
                refuse("a blip2-ort index without a readable export record".into())
            })?;
        if let Some(why) = stored.difference(identity) {
            return Err(refuse(format!(
                "made with another export: {why}. Search it with the export it was made with, \
                 or index the images into a new --db for this one"
            )));
        }
        Ok(store)
    }

    fn pragma_int(&self, name: &str) -> rusqlite::Result<i32> {
        self.conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
    }

    /// `PRAGMA application_id` and, when it is 0, the file's tables, from one snapshot.
    fn mark_and_tables(&mut self) -> rusqlite::Result<(i32, Vec<String>)> {
        let tx = self.conn.transaction()?;
        let app: i32 = tx.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        let mut tables = Vec::new();
        if app == 0 {
            let mut st = tx.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
            tables = st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        }
        tx.commit()?;
        Ok((app, tables))
    }

    /// Makes the new index's tables, unless a concurrent run made them first.
    fn create(&mut self, identity: &ExportIdentity) -> rusqlite::Result<()> {
        // WAL first (it cannot change inside a transaction); it stays with the file.
        self.conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let app: i32 = tx.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        if app == 0 {
            tx.execute_batch(SCHEMA)?;
            tx.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
            ))?;
            let export = serde_json::to_string(identity).expect("the identity serializes");
            for (k, v) in [
                ("format", FORMAT.to_string()),
                ("export", export),
                ("num_query_tokens", identity.num_query_tokens.to_string()),
                ("embedding_dim", identity.embedding_dim.to_string()),
            ] {
                tx.execute("INSERT INTO meta (key, value) VALUES (?1, ?2)", params![k, v])?;
            }
        }
        tx.commit()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> IndexError {
        if is_damage(&source) {
            IndexError::Refused {
                path: self.path.clone(),
                message: format!("the index is damaged ({source})"),
            }
        } else {
            IndexError::Sqlite { path: self.path.clone(), source }
        }
    }

    /// Every image in the index.
    pub fn entries(&self) -> Result<Vec<Entry>, IndexError> {
        let run = || -> rusqlite::Result<Vec<Entry>> {
            let mut st = self
                .conn
                .prepare("SELECT id, path, size, mtime_ns, hash FROM images ORDER BY id")?;
            let rows = st.query_map([], |r| {
                let hash: String = r.get(4)?;
                Ok(Entry {
                    id: r.get(0)?,
                    path: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    mtime_ns: r.get(3)?,
                    hash: u64::from_str_radix(&hash, 16).unwrap_or(0),
                })
            })?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    /// Images in the index.
    pub fn len(&self) -> Result<usize, IndexError> {
        self.conn
            .query_row("SELECT count(*) FROM images", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| self.err(e))
    }

    pub fn is_empty(&self) -> Result<bool, IndexError> {
        Ok(self.len()? == 0)
    }

    /// A number that changes when another connection (an index run) commits a change.
    pub fn data_version(&self) -> Result<i64, IndexError> {
        self.conn.query_row("PRAGMA data_version", [], |r| r.get(0)).map_err(|e| self.err(e))
    }

    /// Runs `f` in one write transaction: all of its changes are kept, or none.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&Writer<'_>) -> Result<T, IndexError>,
    ) -> Result<T, IndexError> {
        let path = self.path.clone();
        let identity = self.identity.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| IndexError::Sqlite { path: path.clone(), source })?;
        let out = f(&Writer { tx: &tx, path: &path, identity: &identity })?;
        tx.commit().map_err(|source| IndexError::Sqlite { path, source })?;
        Ok(out)
    }

    /// The codes of every image, for the scan.
    pub fn load_codes(&self) -> Result<Codes, IndexError> {
        let (q, d) = (self.identity.num_query_tokens, self.identity.embedding_dim);
        let n = self.len()?;
        let mut codes = Codes::with_capacity(q, d, n);
        let mut bad = None;
        let run = |codes: &mut Codes, bad: &mut Option<String>| -> rusqlite::Result<()> {
            let mut st = self.conn.prepare("SELECT id, codes FROM codes ORDER BY id")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let id: i64 = r.get(0)?;
                let blob = r.get_ref(1)?.as_blob()?;
                if let Err(e) = codes.push(id, blob) {
                    *bad = Some(e);
                    break;
                }
            }
            Ok(())
        };
        run(&mut codes, &mut bad).map_err(|e| self.err(e))?;
        if let Some(e) = bad {
            return Err(IndexError::Refused {
                path: self.path.clone(),
                message: format!("the index is damaged: {e}"),
            });
        }
        Ok(codes)
    }

    /// The path and embeddings `[queries * dim]` of image `id`, if it is still indexed.
    pub fn embedding(&self, id: i64) -> Result<Option<(String, Vec<f32>)>, IndexError> {
        let want = self.identity.num_query_tokens * self.identity.embedding_dim * 4;
        let row = self
            .conn
            .prepare_cached("SELECT path, embedding FROM images WHERE id = ?1")
            .and_then(|mut st| {
                st.query_row([id], |r| {
                    let path: String = r.get(0)?;
                    let blob = r.get_ref(1)?.as_blob()?;
                    Ok((path, blob.to_vec()))
                })
                .optional()
            })
            .map_err(|e| self.err(e))?;
        let Some((path, blob)) = row else { return Ok(None) };
        if blob.len() != want {
            return Err(IndexError::Refused {
                path: self.path.clone(),
                message: format!(
                    "the index is damaged: {path} has an embedding of {} bytes, expected {want}",
                    blob.len()
                ),
            });
        }
        let v =
            blob.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Some((path, v)))
    }
}

/// The changes of one transaction ([`Store::write`]).
pub struct Writer<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    path: &'a Path,
    identity: &'a ExportIdentity,
}

impl Writer<'_> {
    fn err(&self, source: rusqlite::Error) -> IndexError {
        IndexError::Sqlite { path: self.path.to_path_buf(), source }
    }

    /// Adds an image, or replaces the one at the same path.
    pub fn put(&self, img: &NewImage<'_>) -> Result<(), IndexError> {
        let (q, d) = (self.identity.num_query_tokens, self.identity.embedding_dim);
        assert_eq!(img.embedding.len(), q * d, "{}: embeddings of {q} x {d}", img.path);
        let mut blob = Vec::with_capacity(img.embedding.len() * 4);
        for v in img.embedding {
            blob.extend_from_slice(&v.to_le_bytes());
        }
        let id: i64 = self
            .tx
            .prepare_cached(
                "INSERT INTO images (path, size, mtime_ns, hash, embedding) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,
                     hash = excluded.hash, embedding = excluded.embedding
                 RETURNING id",
            )
            .and_then(|mut st| {
                st.query_row(
                    params![img.path, img.size as i64, img.mtime_ns, format!("{:016x}", img.hash), blob],
                    |r| r.get(0),
                )
            })
            .map_err(|e| self.err(e))?;
        self.tx
            .prepare_cached("INSERT OR REPLACE INTO codes (id, codes) VALUES (?1, ?2)")
            .and_then(|mut st| st.execute(params![id, encode_codes(img.embedding, q, d)]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records a new size and modification time for an image whose bytes did not change.
    pub fn touch(&self, path: &str, size: u64, mtime_ns: i64) -> Result<(), IndexError> {
        self.tx
            .execute(
                "UPDATE images SET size = ?2, mtime_ns = ?3 WHERE path = ?1",
                params![path, size as i64, mtime_ns],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Drops an image; whether it was there.
    pub fn remove(&self, path: &str) -> Result<bool, IndexError> {
        let id: Option<i64> = self
            .tx
            .query_row("DELETE FROM images WHERE path = ?1 RETURNING id", [path], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(id) = id {
            self.tx.execute("DELETE FROM codes WHERE id = ?1", [id]).map_err(|e| self.err(e))?;
        }
        Ok(id.is_some())
    }
}

/// Whether an SQLite error says another connection holds the lock it needed.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::FileStamp;

    fn identity(source: &str) -> ExportIdentity {
        ExportIdentity {
            source: source.into(),
            revision: None,
            dtype: "fp32".into(),
            num_query_tokens: 2,
            embedding_dim: 4,
            image_size: [224, 224],
            files: vec![FileStamp { name: "g.onnx".into(), size: 1, sample_hash: "0".into() }],
        }
    }

    fn dir(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("blip2-index-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn refused(r: Result<Store, IndexError>) -> String {
        match r {
            Err(e @ IndexError::Refused { .. }) => e.to_string(),
            Err(e) => panic!("not refused: {e}"),
            Ok(_) => panic!("opened"),
        }
    }

    #[test]
    fn writes_are_read_back_and_other_files_are_refused_by_name() {
        let d = dir("store");
        let db = d.join("photos.db");
        let id = identity("ck");
        assert!(refuse_missing(&db, &id).contains("no such index"));
        let mut s = Store::open(&db, &id, OpenMode::Create).unwrap();
        let e = [0.6f32, 0.8, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        s.write(|w| {
            w.put(&NewImage { path: "/a.png", size: 3, mtime_ns: 5, hash: 0xabc, embedding: &e })?;
            w.put(&NewImage { path: "/b.png", size: 4, mtime_ns: 6, hash: 0xdef, embedding: &e })
        })
        .unwrap();
        s.write(|w| w.touch("/a.png", 7, 8)).unwrap();
        assert!(s.write(|w| w.remove("/b.png")).unwrap());
        let entries = s.entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].size, entries[0].mtime_ns, entries[0].hash), (7, 8, 0xabc));
        assert_eq!(s.embedding(entries[0].id).unwrap().unwrap().1, e);
        assert_eq!(s.load_codes().unwrap().len(), 1);
        drop(s);
        // The same export opens it again; another is refused, saying which it was made with.
        Store::open(&db, &id, OpenMode::Existing).unwrap();
        let m = refused(Store::open(&db, &identity("other"), OpenMode::Existing));
        assert!(m.contains("photos.db") && m.contains("another export") && m.contains("ck"), "{m}");

        let text = d.join("notes.db");
        std::fs::write(&text, "hello, this is not a database at all").unwrap();
        let m = refused(Store::open(&text, &id, OpenMode::Create));
        assert!(m.contains("notes.db") && m.contains("not an SQLite database"), "{m}");

        let foreign = d.join("foreign.db");
        Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE t (x);").unwrap();
        let m = refused(Store::open(&foreign, &id, OpenMode::Create));
        assert!(m.contains("foreign.db") && m.contains("another application"), "{m}");

        // A damaged index: the header kept, the pages after it overwritten.
        let damaged = d.join("damaged.db");
        std::fs::copy(&db, &damaged).unwrap();
        let _ = std::fs::remove_file(d.join("damaged.db-wal"));
        let mut bytes = std::fs::read(&damaged).unwrap();
        for b in bytes.iter_mut().skip(100) {
            *b = 0x5a;
        }
        std::fs::write(&damaged, &bytes).unwrap();
        let m = refused(Store::open(&damaged, &id, OpenMode::Existing));
        assert!(m.contains("damaged.db"), "{m}");
        let _ = std::fs::remove_dir_all(&d);
    }

    fn refuse_missing(db: &Path, id: &ExportIdentity) -> String {
        refused(Store::open(db, id, OpenMode::Existing))
    }
}
