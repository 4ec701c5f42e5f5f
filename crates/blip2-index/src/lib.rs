//! A persistent index of image embeddings for BLIP-2 retrieval exports, in one SQLite
//! file, and the search over it.
//!
//! Each image is stored with its path, size, modification time, a hash of its bytes and
//! its `[num_query_tokens, embedding_dim]` query embeddings (what `infer embed-image`
//! prints), plus an int8 copy of those embeddings that the candidate scan reads. The
//! file also records the export the embeddings were made with ([`ExportIdentity`]);
//! another export is refused.
//!
//! Search ([`search`]) ranks by ITC, the best query vector's cosine with the text, in two
//! steps: a scan of every image's int8 codes gives each image a lower and an upper bound
//! of its score ([`Codes::candidates`]); the images whose upper bound reaches the k-th
//! best lower bound are rescored from their float32 embeddings. The bounds are proven
//! (rounding included), so no image outside the candidates can be in the top k: the
//! result is the exact top k of a brute-force float32 search; only the amount of work is
//! approximate.

mod codes;
mod identity;
mod scan;
mod store;

pub use codes::{encode_codes, Codes};
pub use identity::{ExportIdentity, FileStamp};
pub use scan::{itc, rerank, search, Hit, Query, SearchStats};
pub use store::{Entry, NewImage, OpenMode, Store, Writer, APPLICATION_ID, SCHEMA_VERSION};

use std::path::PathBuf;

/// Why an index could not be opened, read or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The file is not an index this build can use (another application's database, a
    /// damaged one, one made with another export or by another version).
    #[error("{}: {message}", path.display())]
    Refused { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
