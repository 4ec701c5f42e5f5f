//! Which export an index was made with: embeddings of another export (another checkpoint,
//! another dtype, another image size) are not comparable with this one's text embeddings.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use blip2_core::hash::Fnv64;
use blip2_core::RetrievalManifest;
use serde::{Deserialize, Serialize};

use crate::IndexError;

/// Bytes hashed at each end of a graph file: enough to tell weights apart without
/// reading gigabytes on every search.
const SAMPLE: u64 = 1 << 20;

/// What identifies a retrieval export for an index: the manifest's source, dtype and
/// shapes, and each graph file's name, size and a hash of its first and last MiB.
/// Moving the export folder keeps it; exporting another checkpoint changes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportIdentity {
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub dtype: String,
    pub num_query_tokens: usize,
    pub embedding_dim: usize,
    pub image_size: [u32; 2],
    pub files: Vec<FileStamp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileStamp {
    pub name: String,
    pub size: u64,
    /// FNV-1a of the first and last MiB, hex.
    pub sample_hash: String,
}

fn stamp(dir: &Path, name: &str) -> Result<FileStamp, IndexError> {
    let path = dir.join(name);
    let io = |source| IndexError::Io { path: path.clone(), source };
    let mut f = std::fs::File::open(&path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut h = Fnv64::default();
    let mut buf = Vec::with_capacity(SAMPLE as usize);
    (&mut f).take(SAMPLE).read_to_end(&mut buf).map_err(io)?;
    h.write_field(&buf);
    if size > SAMPLE {
        buf.clear();
        f.seek(SeekFrom::Start(size - SAMPLE.min(size - SAMPLE))).map_err(io)?;
        f.read_to_end(&mut buf).map_err(io)?;
        h.write_field(&buf);
    }
    Ok(FileStamp { name: name.to_string(), size, sample_hash: format!("{:016x}", h.finish()) })
}

impl ExportIdentity {
    /// The identity of the retrieval export in `dir`, whose manifest is `m`.
    pub fn of(dir: &Path, m: &RetrievalManifest) -> Result<Self, IndexError> {
        let g = &m.graphs;
        let mut files = Vec::new();
        for info in [&g.vision_encoder, &g.image_embedding, &g.text_embedding, &g.itm] {
            files.push(stamp(dir, &info.file)?);
            if let Some(data) = &info.external_data {
                files.push(stamp(dir, data)?);
            }
        }
        Ok(Self {
            source: m.source.clone(),
            revision: m.revision.clone(),
            dtype: m.dtype.to_string(),
            num_query_tokens: m.num_query_tokens,
            embedding_dim: m.embedding_dim,
            image_size: [m.image.height, m.image.width],
            files,
        })
    }

    /// One line for messages: `SOURCE (fp32, 224x224 px, 32 x 256)`.
    pub fn describe(&self) -> String {
        let rev = self.revision.as_deref().map(|r| format!(" at {r}")).unwrap_or_default();
        format!(
            "{}{rev} ({}, {}x{} px, {} x {} embeddings)",
            self.source,
            self.dtype,
            self.image_size[1],
            self.image_size[0],
            self.num_query_tokens,
            self.embedding_dim
        )
    }

    /// What differs from `other`, in words; `None` when they are the same export.
    pub fn difference(&self, other: &Self) -> Option<String> {
        if self == other {
            return None;
        }
        let (a, b) = (self.describe(), other.describe());
        if a != b {
            return Some(format!("{a}, not {b}"));
        }
        for f in &self.files {
            match other.files.iter().find(|o| o.name == f.name) {
                Some(o) if o == f => {}
                Some(_) => return Some(format!("{a}, but its {} differs", f.name)),
                None => {
                    return Some(format!("{a}, with a graph file {} this export lacks", f.name))
                }
            }
        }
        Some(format!("{a}, with other graph files"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_changes_with_the_bytes_at_either_end() {
        let dir = std::env::temp_dir().join(format!("blip2-index-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = vec![7u8; (3 * SAMPLE) as usize];
        std::fs::write(dir.join("g.onnx"), &bytes).unwrap();
        let a = stamp(&dir, "g.onnx").unwrap();
        assert_eq!(a, stamp(&dir, "g.onnx").unwrap());
        *bytes.last_mut().unwrap() = 8;
        std::fs::write(dir.join("g.onnx"), &bytes).unwrap();
        let b = stamp(&dir, "g.onnx").unwrap();
        assert_ne!(a.sample_hash, b.sample_hash);
        bytes[0] = 9;
        std::fs::write(dir.join("g.onnx"), &bytes).unwrap();
        assert_ne!(b.sample_hash, stamp(&dir, "g.onnx").unwrap().sample_hash);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
