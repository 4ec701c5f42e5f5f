//! Reads safetensors weights from a Hugging Face checkpoint folder without loading them:
//! every file is memory-mapped and tensors are handed out as byte views, so exporting a
//! model never holds more than a conversion chunk of it in memory.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::Dtype as StDtype;
use safetensors::SafeTensors;

use crate::error::{io_err, ExportError, Result};

/// Element types the exporter reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// A tensor inside a memory-mapped file.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|source| ExportError::Json { path: index.clone(), source })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                ExportError::Config {
                    path: index.clone(),
                    message: "no \"weight_map\" object".into(),
                }
            })?;
            let mut shards: Vec<String> =
                map.values().filter_map(|s| s.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ExportError::MissingFile {
                path: single,
                why:
                    "the weights: model.safetensors or model.safetensors.index.json with its shards",
            });
        };
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (i, path) in names.into_iter().enumerate() {
            if !path.exists() {
                return Err(ExportError::MissingFile {
                    path,
                    why: "a weight shard named in model.safetensors.index.json",
                });
            }
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the file is opened read-only and is not expected to change while exporting.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            // Tensors are read front to back once.
            let _ = mmap.advise(memmap2::Advice::Sequential);
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                ExportError::CorruptSafetensors { path: path.clone(), message: describe(&e) }
            })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    StDtype::F32 => DType::F32,
                    StDtype::F16 => DType::F16,
                    StDtype::BF16 => DType::BF16,
                    other => {
                        // Integer buffers (none in BLIP-2 today) are skipped; float tensors must be known types.
                        if matches!(
                            other,
                            StDtype::I64 | StDtype::I32 | StDtype::BOOL | StDtype::U8
                        ) {
                            continue;
                        }
                        return Err(ExportError::UnsupportedDtype {
                            name,
                            dtype: format!("{other:?}"),
                        });
                    }
                };
                let (s, e) = info.data_offsets;
                tensors.insert(
                    name,
                    Entry {
                        file: i,
                        dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            files.push((path, mmap));
        }
        Ok(Self { files, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        let e = self.tensors.get(name).ok_or_else(|| ExportError::MissingTensor {
            name: name.to_string(),
            files: self.file_list(),
        })?;
        Ok(TensorView {
            dtype: e.dtype,
            shape: &e.shape,
            data: &self.files[e.file].1[e.start..e.end],
        })
    }

    /// Like [`Checkpoint::get`], also checking the shape that config.json implies.
    pub fn get_shaped(&self, name: &str, expected: &[usize]) -> Result<TensorView<'_>> {
        let t = self.get(name)?;
        if t.shape != expected {
            return Err(ExportError::TensorShape {
                name: name.into(),
                found: t.shape.to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }

    fn file_list(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| {
                p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            })
            .collect();
        names.join(", ")
    }

    /// Drops the tensor's pages from this process's memory once it has been written:
    /// mapped pages count as resident, and without this an export's peak RSS would be
    /// the whole checkpoint. The mapping is read-only, so pages read again come back
    /// from the file.
    pub fn release(&self, name: &str) {
        if let Some(e) = self.tensors.get(name) {
            let mmap = &self.files[e.file].1;
            let start = e.start & !4095;
            // SAFETY: read-only file mapping; DONTNEED only makes later reads refetch the file.
            let _ = unsafe {
                mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    e.end - start,
                )
            };
        }
    }
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "the file is shorter or longer than its header says (truncated download?)".into()
        }
        E::HeaderTooSmall => "the file is too small to hold a header".into(),
        E::InvalidHeaderLength => {
            "the header length points past the end of the file (truncated?)".into()
        }
        other => other.to_string(),
    }
}

/// Elements converted per chunk when streaming a tensor out: small enough to keep
/// memory flat, large enough to keep writes efficient.
const CHUNK: usize = 1 << 18;

/// Decodes `n` elements starting at element `start` into `out` as f32.
pub(crate) fn decode_into(dtype: DType, data: &[u8], start: usize, out: &mut [f32]) {
    let n = out.len();
    match dtype {
        DType::F32 => {
            let src = &data[4 * start..4 * (start + n)];
            if cfg!(target_endian = "little") {
                // SAFETY: `out` is n f32s, 4n bytes; any bit pattern is a valid f32, and on a
                // little-endian machine the file's byte order is the native one.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, 4 * n) };
                dst.copy_from_slice(src);
            } else {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        DType::F16 => {
            let src = &data[2 * start..2 * (start + n)];
            // SAFETY: any u16 bit pattern is a valid f16; align_to only yields the aligned middle.
            match unsafe { src.align_to::<f16>() } {
                ([], halves, []) if cfg!(target_endian = "little") => {
                    halves.convert_to_f32_slice(out)
                }
                _ => {
                    for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(data[2 * start..2 * (start + n)].chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
}

/// Encodes f32 values as `to`, appending to `out`.
pub(crate) fn encode(values: &[f32], to: DType, out: &mut Vec<u8>) {
    match to {
        DType::F32 if cfg!(target_endian = "little") => {
            // SAFETY: reading the f32s' bytes; little-endian is the file's byte order.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(values.as_ptr() as *const u8, 4 * values.len())
            })
        }
        DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 if cfg!(target_endian = "little") => {
            let mut halves = vec![f16::ZERO; values.len()];
            halves.convert_from_f32_slice(values);
            // SAFETY: reading the f16s' bytes; little-endian is the file's byte order.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(halves.as_ptr() as *const u8, 2 * halves.len())
            })
        }
        DType::F16 => {
            values.iter().for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes()))
        }
        DType::BF16 => {
            values.iter().for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()))
        }
    }
}

/// Writes `t` converted to `to`, optionally transposing a 2-D tensor, in bounded chunks.
pub fn write_converted(
    t: &TensorView<'_>,
    to: DType,
    transpose: bool,
    w: &mut dyn Write,
) -> std::io::Result<()> {
    if !transpose && t.dtype == to {
        for chunk in t.data.chunks(CHUNK * 4) {
            w.write_all(chunk)?;
        }
        return Ok(());
    }
    let mut vals = Vec::new();
    let mut buf = Vec::new();
    // Converts a run of whole source elements to `to` and writes it.
    let mut emit = |bytes: &[u8]| -> std::io::Result<()> {
        if t.dtype == to {
            return w.write_all(bytes);
        }
        for piece in bytes.chunks(CHUNK * t.dtype.size()) {
            vals.resize(piece.len() / t.dtype.size(), 0f32);
            decode_into(t.dtype, piece, 0, &mut vals);
            buf.clear();
            encode(&vals, to, &mut buf);
            w.write_all(&buf)?;
        }
        Ok(())
    };
    if transpose {
        // Transposed in the source type (bytes only), converted a strip at a time.
        let (rows, cols) = (t.shape[0], t.shape[1]);
        return match t.dtype.size() {
            2 => write_transposed_raw::<2>(t.data, rows, cols, &mut emit),
            _ => write_transposed_raw::<4>(t.data, rows, cols, &mut emit),
        };
    }
    emit(t.data)
}

/// Writes a row-major `[rows, cols]` matrix of `N`-byte elements transposed, without
/// converting them. A strip of 64 columns (64 output rows) is built at a time, from
/// 64 x 64 tiles: each tile's rows are copied whole into a small contiguous buffer, then
/// scattered into the strip from there. (Reading the tile's columns straight from the
/// matrix would hit 64 rows a power-of-two stride apart, which share an L1 cache set.)
pub(crate) fn write_transposed_raw<const N: usize>(
    data: &[u8],
    rows: usize,
    cols: usize,
    emit: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    const B: usize = 64;
    let elems: &[[u8; N]] = data[..rows * cols * N].as_chunks::<N>().0;
    let mut out = vec![[0u8; N]; B.min(cols) * rows];
    let mut tile = [[0u8; N]; B * B];
    let mut c0 = 0;
    while c0 < cols {
        let width = B.min(cols - c0);
        let mut r0 = 0;
        while r0 < rows {
            let height = B.min(rows - r0);
            for i in 0..height {
                let src = (r0 + i) * cols + c0;
                tile[i * B..i * B + width].copy_from_slice(&elems[src..src + width]);
            }
            for c in 0..width {
                let dst = &mut out[c * rows + r0..c * rows + r0 + height];
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = tile[i * B + c];
                }
            }
            r0 += height;
        }
        emit(out[..width * rows].as_flattened())?;
        c0 += width;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(dtype: DType, shape: &'a [usize], data: &'a [u8]) -> TensorView<'a> {
        TensorView { dtype, shape, data }
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn f16_and_bf16_sources_widen_exactly() {
        let vals = [0.5f32, -1.25, 3.0, 65504.0, -0.0, 1e-3];
        let f16: Vec<u8> =
            vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf16: Vec<u8> =
            vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let mut out = Vec::new();
        write_converted(&view(DType::F16, &[6], &f16), DType::F32, false, &mut out).unwrap();
        let want: Vec<f32> = vals.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(f32s(&out), want);
        out.clear();
        write_converted(&view(DType::BF16, &[6], &bf16), DType::F32, false, &mut out).unwrap();
        let want: Vec<f32> = vals.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(f32s(&out), want);
    }

    #[test]
    fn f32_narrows_to_f16_with_rounding() {
        let vals = [0.1f32, 1.0 / 3.0, 70000.0];
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        write_converted(&view(DType::F32, &[3], &data), DType::F16, false, &mut out).unwrap();
        let got: Vec<half::f16> =
            out.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect();
        let want: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
        assert_eq!(got, want);
        assert!(
            got[2].is_infinite(),
            "out-of-range values saturate to infinity as torch's .half() does"
        );
    }

    #[test]
    fn transposes_and_converts_f32_to_f16() {
        let (rows, cols) = (70usize, 67usize);
        let vals: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.37 - 11.0).collect();
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        write_converted(&view(DType::F32, &[rows, cols], &data), DType::F16, true, &mut out)
            .unwrap();
        let got: Vec<f16> = out.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect();
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(got[c * rows + r], f16::from_f32(vals[r * cols + c]));
            }
        }
    }

    #[test]
    fn transposes_f16_without_conversion() {
        // 70 x 3 half-precision values (more rows than one strip has columns), NaN bits
        // included: the bytes must move unchanged.
        let (rows, cols) = (70usize, 3usize);
        let bits: Vec<u16> =
            (0..rows * cols).map(|i| if i == 5 { 0x7e01 } else { i as u16 * 7 }).collect();
        let data: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut out = Vec::new();
        write_converted(&view(DType::F16, &[rows, cols], &data), DType::F16, true, &mut out)
            .unwrap();
        let got: Vec<u16> = out.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(got[c * rows + r], bits[r * cols + c]);
            }
        }
    }

    #[test]
    fn transposes_in_tiles_of_any_size() {
        // 3 x 70: wider than one 64-column tile.
        let (rows, cols) = (3usize, 70usize);
        let vals: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        write_converted(&view(DType::F32, &[rows, cols], &data), DType::F32, true, &mut out)
            .unwrap();
        let got = f32s(&out);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(got[c * rows + r], vals[r * cols + c]);
            }
        }
    }
}
