//! The image-embedding cache: vision encoder + Q-Former outputs of recently seen images.

use std::collections::VecDeque;

use ndarray::{Array3, Array4, ArrayD, Axis, IxDyn};

use crate::error::RuntimeError;
use crate::model::{to_f32, EncodeImages};

/// How many images' query embeddings [`crate::pipeline::Pipeline`] keeps by default: enough for a chat
/// or a few questions about the same images, small next to the model (~100 KB each for
/// OPT-2.7b's 32 x 2560, plus the image's 600 KB of pixel values to check a hit exactly).
pub const DEFAULT_EMBED_CACHE: usize = 8;

/// Vision encoder + Q-Former output of recently seen images, least recently used first
/// to go. Keyed by a hash of the pixel values, a hit confirmed by comparing them all, so
/// a collision can never hand back another image's embeddings.
pub struct EmbedCache {
    capacity: usize,
    /// (hash, pixel values `[3, H, W]`, embeddings `[num_query_tokens, hidden]` as f32),
    /// most recently used last.
    entries: VecDeque<(u64, Array3<f32>, ArrayD<f32>)>,
}

impl EmbedCache {
    /// A cache of `capacity` images (0 keeps none).
    pub fn new(capacity: usize) -> Self {
        Self { capacity, entries: VecDeque::new() }
    }

    fn get(&mut self, hash: u64, px: ndarray::ArrayView3<'_, f32>) -> Option<ArrayD<f32>> {
        let i = self.entries.iter().position(|(h, p, _)| *h == hash && p.view() == px)?;
        let e = self.entries.remove(i).expect("index from position");
        let embeds = e.2.clone();
        self.entries.push_back(e);
        Some(embeds)
    }

    /// Vision encoder + Q-Former for a batch, `[B, num_query_tokens, hidden]` as f32.
    /// Images seen recently come from the cache; the others (each distinct one once) run
    /// as one batch. `model` is the model, or its encoders once handed over.
    pub fn embed(
        &mut self,
        model: &mut (impl EncodeImages + ?Sized),
        pixels: Array4<f32>,
    ) -> Result<ArrayD<f32>, RuntimeError> {
        if self.capacity == 0 || pixels.shape()[0] == 0 {
            return to_f32(&model.encode_images(pixels)?);
        }
        let rows = pixels.shape()[0];
        let hashes: Vec<u64> = pixels.outer_iter().map(pixel_hash).collect();
        let mut found: Vec<Option<ArrayD<f32>>> = Vec::with_capacity(rows);
        // Rows to encode: the first row of each distinct image not in the cache; `source[r]`
        // is the index in `todo` that row r's embeddings come from.
        let mut todo: Vec<usize> = Vec::new();
        let mut source: Vec<usize> = vec![usize::MAX; rows];
        for r in 0..rows {
            let px = pixels.index_axis(Axis(0), r);
            let hit = self.get(hashes[r], px);
            if hit.is_none() {
                if let Some(k) = todo
                    .iter()
                    .position(|&t| hashes[t] == hashes[r] && pixels.index_axis(Axis(0), t) == px)
                {
                    source[r] = k;
                } else {
                    source[r] = todo.len();
                    todo.push(r);
                }
            }
            found.push(hit);
        }
        let fresh = match todo.len() {
            0 => None,
            n if n == rows => Some(to_f32(&model.encode_images(pixels.clone())?)?),
            _ => Some(to_f32(&model.encode_images(pixels.select(Axis(0), &todo))?)?),
        };
        let mut full: Option<ArrayD<f32>> = None;
        for r in 0..rows {
            let e = match (&found[r], &fresh) {
                (Some(e), _) => e.view(),
                (None, Some(f)) => f.index_axis(Axis(0), source[r]),
                (None, None) => unreachable!("a row is either cached or encoded"),
            };
            let full = full
                .get_or_insert_with(|| ArrayD::zeros(IxDyn(&[&[rows][..], e.shape()].concat())));
            full.index_axis_mut(Axis(0), r).assign(&e);
        }
        if let Some(f) = &fresh {
            for (k, &r) in todo.iter().enumerate() {
                self.put(
                    hashes[r],
                    pixels.index_axis(Axis(0), r).to_owned(),
                    f.index_axis(Axis(0), k).to_owned(),
                );
            }
        }
        Ok(full.expect("at least one row"))
    }

    fn put(&mut self, hash: u64, px: Array3<f32>, embeds: ArrayD<f32>) {
        if self.capacity == 0 {
            return;
        }
        while self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((hash, px, embeds));
    }
}

/// A fast 64-bit hash of pixel values (multiply-xor over the f32 bits). Only picks the
/// candidate: equality is checked on the values themselves.
fn pixel_hash(px: ndarray::ArrayView3<'_, f32>) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = K ^ px.len() as u64;
    for &x in px.iter() {
        h = (h ^ u64::from(x.to_bits())).wrapping_mul(K);
        h ^= h >> 32;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn image(seed: f32) -> Array3<f32> {
        Array3::from_shape_fn((3, 4, 4), |(c, y, x)| seed + (c * 16 + y * 4 + x) as f32)
    }

    fn embeds(v: f32) -> ArrayD<f32> {
        ArrayD::from_elem(IxDyn(&[2, 3]), v)
    }

    #[test]
    fn embed_cache_hits_exact_pixels_and_evicts_the_least_recent() {
        let mut c = EmbedCache::new(2);
        let (a, b, d) = (image(0.0), image(1.0), image(2.0));
        let h = |p: &Array3<f32>| pixel_hash(p.view());
        assert_ne!(h(&a), h(&b));
        c.put(h(&a), a.clone(), embeds(1.0));
        c.put(h(&b), b.clone(), embeds(2.0));
        assert_eq!(c.get(h(&a), a.view()), Some(embeds(1.0)));
        // b is now the least recently used and goes first.
        c.put(h(&d), d.clone(), embeds(3.0));
        assert_eq!(c.get(h(&b), b.view()), None);
        assert_eq!(c.get(h(&a), a.view()), Some(embeds(1.0)));
        assert_eq!(c.get(h(&d), d.view()), Some(embeds(3.0)));
        // Same hash, other pixels: never a hit.
        let mut other = a.clone();
        other[[0, 0, 0]] += 0.5;
        assert_eq!(c.get(h(&a), other.view()), None);
        // Capacity 0 keeps nothing.
        let mut off = EmbedCache::new(0);
        off.put(h(&a), a.clone(), embeds(1.0));
        assert_eq!(off.get(h(&a), a.view()), None);
    }
}
