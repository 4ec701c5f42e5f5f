//! The int8 codes of an index (see the scan's bounds in [`crate::scan`]): how one image's
//! embeddings are stored, and the codes of every image held in memory for the scan.

/// The int8 codes of an index, in memory: one row of `dim` codes per query vector, the
/// `queries` rows of an image together, images in `ids` order.
#[derive(Debug, Clone)]
pub struct Codes {
    pub queries: usize,
    pub dim: usize,
    pub(crate) ids: Vec<i64>,
    pub(crate) codes: Vec<i8>,
    pub(crate) scale: Vec<f32>,
    pub(crate) resid: Vec<f32>,
    pub(crate) norm: Vec<f32>,
}

/// The codes blob stored for one image's embeddings `[queries * dim]`: the int8 codes,
/// then per vector its scale, rounding-error norm and norm (little-endian float32).
pub fn encode_codes(embedding: &[f32], queries: usize, dim: usize) -> Vec<u8> {
    assert_eq!(embedding.len(), queries * dim, "embedding of {queries} x {dim}");
    let mut codes = Vec::with_capacity(queries * (dim + 12));
    let mut tail = Vec::with_capacity(queries * 12);
    let (mut scales, mut resids, mut norms) = (Vec::new(), Vec::new(), Vec::new());
    for x in embedding.chunks_exact(dim) {
        let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if m > 0.0 { m / 127.0 } else { 1.0 };
        let (mut r2, mut n2) = (0f64, 0f64);
        for &v in x {
            let q = (v / s).round().clamp(-127.0, 127.0);
            codes.push(q as i8 as u8);
            let e = f64::from(v) - f64::from(s) * f64::from(q);
            r2 += e * e;
            n2 += f64::from(v) * f64::from(v);
        }
        scales.push(s);
        // Rounded up, so that the bounds stay bounds.
        resids.push((r2.sqrt() * (1.0 + 1e-6)) as f32);
        norms.push((n2.sqrt() * (1.0 + 1e-6)) as f32);
    }
    for v in [scales, resids, norms] {
        for x in v {
            tail.extend_from_slice(&x.to_le_bytes());
        }
    }
    codes.extend_from_slice(&tail);
    codes
}

impl Codes {
    pub fn new(queries: usize, dim: usize) -> Self {
        Codes {
            queries,
            dim,
            ids: Vec::new(),
            codes: Vec::new(),
            scale: Vec::new(),
            resid: Vec::new(),
            norm: Vec::new(),
        }
    }

    pub fn with_capacity(queries: usize, dim: usize, images: usize) -> Self {
        let mut c = Codes::new(queries, dim);
        c.ids.reserve(images);
        c.codes.reserve(images * queries * dim);
        for v in [&mut c.scale, &mut c.resid, &mut c.norm] {
            v.reserve(images * queries);
        }
        c
    }

    /// Adds image `id` from its codes blob ([`encode_codes`]).
    pub fn push(&mut self, id: i64, blob: &[u8]) -> Result<(), String> {
        let (q, d) = (self.queries, self.dim);
        if blob.len() != q * (d + 12) {
            return Err(format!(
                "image {id}: codes of {} bytes, expected {} ({q} x {d} embeddings)",
                blob.len(),
                q * (d + 12)
            ));
        }
        self.ids.push(id);
        self.codes.extend(blob[..q * d].iter().map(|&b| b as i8));
        let floats = |k: usize| {
            blob[q * d + k * q * 4..q * d + (k + 1) * q * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        };
        self.scale.extend(floats(0));
        self.resid.extend(floats(1));
        self.norm.extend(floats(2));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Bytes held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scale.len() * 3) + 8 * self.ids.len()
    }

    pub fn id(&self, i: usize) -> i64 {
        self.ids[i]
    }
}
