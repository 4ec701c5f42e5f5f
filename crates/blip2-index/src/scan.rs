//! Search by ITC: a scan of int8 codes with proven bounds picks the candidates, float32
//! rescoring ranks them.
//!
//! Each query vector `x` (L2-normalized, `dim` values) is stored as `xi = round(x / s)`
//! in int8 with its own scale `s = max|x| / 127`, with the norm of its rounding error
//! `r = ||x - s xi||` and its norm `n = ||x||`. The text `t` is rounded the same way to
//! int16 (`t = s_t ti + e_t`). Then exactly
//!
//! ```text
//! <t, x> = s_t s <ti, xi> + <e_t, x> + s_t <ti, x - s xi>
//! |<t, x> - s_t s <ti, xi>| <= ||e_t|| n + s_t ||ti|| r        (Cauchy-Schwarz, twice)
//! ```
//!
//! so every vector's score lies within a known distance of its integer estimate, and an
//! image's ITC (its best vector) between the best lower and the best upper estimate. An
//! image whose upper bound is below the k-th best lower bound cannot be in the top k.
//! The integer dot products are the whole cost: `dim` int8 x int16 products per vector,
//! a quarter of the bytes of float32, in a loop the compiler vectorizes (AVX2 when the
//! processor has it).

use std::time::Instant;

use crate::codes::Codes;
use crate::store::Store;
use crate::IndexError;

/// Slack added to every bound: covers float32 rounding in the estimates and in the exact
/// rescoring (a 256-term float32 dot product of unit vectors is off by under 2e-5).
const SLACK: f32 = 5e-5;

impl Codes {
    /// Lower and upper bounds of every image's ITC with `t`, in `ids` order, computed on
    /// `threads` threads.
    pub fn bounds(&self, t: &Query, threads: usize) -> (Vec<f32>, Vec<f32>) {
        let n = self.len();
        let (mut lb, mut ub) = (vec![0f32; n], vec![0f32; n]);
        if n == 0 {
            return (lb, ub);
        }
        let per = n.div_ceil(threads.clamp(1, n));
        std::thread::scope(|s| {
            for (c, (lb, ub)) in lb.chunks_mut(per).zip(ub.chunks_mut(per)).enumerate() {
                let first = c * per;
                s.spawn(move || scan(self, t, first, lb, ub));
            }
        });
        (lb, ub)
    }

    /// The images (indices into this matrix) that may be among the `k` best for `t`:
    /// every image whose upper bound reaches the k-th best lower bound. The top k by
    /// exact ITC are always among them.
    pub fn candidates(&self, t: &Query, k: usize, threads: usize) -> Vec<usize> {
        let (lb, ub) = self.bounds(t, threads);
        if k == 0 {
            return Vec::new();
        }
        if k >= lb.len() {
            return (0..lb.len()).collect();
        }
        let mut sorted = lb.clone();
        let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let floor = *kth;
        (0..ub.len()).filter(|&i| ub[i] >= floor).collect()
    }
}

/// A text embedding rounded for the scan (`t = s_t ti + e_t`).
#[derive(Debug, Clone)]
pub struct Query {
    ti: Vec<i16>,
    /// `s_t`
    scale: f32,
    /// `||e_t||`, rounded up
    err: f32,
    /// `s_t ||ti||`, rounded up
    size: f32,
}

impl Query {
    pub fn new(t: &[f32]) -> Self {
        // The largest magnitude that keeps `dim` products of int16 and int8 in an i32.
        let qmax = (i32::MAX as f64 / (t.len().max(1) as f64 * 127.0)).min(32767.0).floor();
        let m = t.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if m > 0.0 { (f64::from(m) / qmax) as f32 } else { 1.0 };
        let (mut e2, mut q2) = (0f64, 0f64);
        let ti: Vec<i16> = t
            .iter()
            .map(|&v| {
                let q = (v / scale).round().clamp(-qmax as f32, qmax as f32);
                let e = f64::from(v) - f64::from(scale) * f64::from(q);
                e2 += e * e;
                q2 += f64::from(q) * f64::from(q);
                q as i16
            })
            .collect();
        Query {
            ti,
            scale,
            err: (e2.sqrt() * (1.0 + 1e-6)) as f32,
            size: (f64::from(scale) * q2.sqrt() * (1.0 + 1e-6)) as f32,
        }
    }
}

/// `<t, x>` in integers. A plain sum (integer addition is associative), which the
/// compiler turns into multiply-adds of int16 pairs (`pmaddwd`).
#[inline(always)]
fn dot(t: &[i16], x: &[i8]) -> i32 {
    t.iter().zip(x).map(|(&a, &b)| i32::from(a) * i32::from(i16::from(b))).sum()
}

#[inline(always)]
fn scan_portable(c: &Codes, t: &Query, first: usize, lb: &mut [f32], ub: &mut [f32]) {
    let (q, d) = (c.queries, c.dim);
    for (j, (lo, hi)) in lb.iter_mut().zip(ub.iter_mut()).enumerate() {
        let img = first + j;
        let (mut best_lo, mut best_hi) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for v in img * q..(img + 1) * q {
            let est = dot(&t.ti, &c.codes[v * d..(v + 1) * d]) as f32 * (c.scale[v] * t.scale);
            let err = t.err * c.norm[v] + t.size * c.resid[v] + SLACK;
            best_lo = best_lo.max(est - err);
            best_hi = best_hi.max(est + err);
        }
        *lo = best_lo;
        *hi = best_hi;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(c: &Codes, t: &Query, first: usize, lb: &mut [f32], ub: &mut [f32]) {
    scan_portable(c, t, first, lb, ub)
}

fn scan(c: &Codes, t: &Query, first: usize, lb: &mut [f32], ub: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the processor has AVX2, checked just above.
        return unsafe { scan_avx2(c, t, first, lb, ub) };
    }
    scan_portable(c, t, first, lb, ub)
}

/// The ITC score of an image's embeddings `[queries * dim]` with a text embedding: the
/// best query vector's dot product (summed in 16 lanes, which the compiler vectorizes).
pub fn itc(embedding: &[f32], t: &[f32]) -> f32 {
    embedding.chunks_exact(t.len()).map(|x| dot_f32(x, t)).fold(f32::NEG_INFINITY, f32::max)
}

fn dot_f32(x: &[f32], t: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (xc, tc) = (x.chunks_exact(16), t.chunks_exact(16));
    let rest: f32 = xc.remainder().iter().zip(tc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in xc.zip(tc) {
        for k in 0..16 {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: i64,
    pub path: String,
    pub itc: f32,
}

/// `hits` (best ITC first) with the first `itm.len()` of them reordered by their ITM
/// probability, highest first (equal ones keep their ITC order); those whose ITM could
/// not be had (`None`) follow the reranked ones. What `infer rank --rerank K` prints.
pub fn rerank(hits: Vec<Hit>, itm: &[Option<f32>]) -> Vec<(Hit, Option<f32>)> {
    let k = itm.len().min(hits.len());
    let mut out: Vec<(Hit, Option<f32>)> =
        hits.into_iter().enumerate().map(|(i, h)| (h, itm.get(i).copied().flatten())).collect();
    out[..k].sort_by(|a, b| match (a.1, b.1) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    out
}

/// How a search went: images scanned, candidates rescored, time in each step.
#[derive(Debug, Clone, Default)]
pub struct SearchStats {
    pub images: usize,
    pub candidates: usize,
    pub scan_ms: f64,
    pub rescore_ms: f64,
}

/// The `k` images with the highest ITC with the text embedding `t`, best first (equal
/// scores in the order the images were indexed): the int8 scan of `codes` picks the
/// candidates, their float32 embeddings in `store` give the scores.
pub fn search(
    store: &Store,
    codes: &Codes,
    t: &[f32],
    k: usize,
    threads: usize,
) -> Result<(Vec<Hit>, SearchStats), IndexError> {
    if t.len() != codes.dim {
        return Err(IndexError::Refused {
            path: store.path().to_path_buf(),
            message: format!(
                "a text embedding of {} values, but the index holds {}-value embeddings",
                t.len(),
                codes.dim
            ),
        });
    }
    let started = Instant::now();
    let cands = codes.candidates(&Query::new(t), k, threads);
    let scan_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let mut hits = Vec::with_capacity(cands.len());
    for &i in &cands {
        let id = codes.id(i);
        // An image removed by an index run since the codes were read is left out.
        if let Some((path, emb)) = store.embedding(id)? {
            hits.push((i, Hit { id, path, itc: itc(&emb, t) }));
        }
    }
    hits.sort_by(|a, b| b.1.itc.total_cmp(&a.1.itc).then(a.0.cmp(&b.0)));
    hits.truncate(k);
    let stats = SearchStats {
        images: codes.len(),
        candidates: cands.len(),
        scan_ms,
        rescore_ms: started.elapsed().as_secs_f64() * 1e3,
    };
    Ok((hits.into_iter().map(|(_, h)| h).collect(), stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::encode_codes;

    fn unit(seed: &mut u64, d: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..d)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    #[test]
    fn bounds_hold_and_the_candidates_hold_the_exact_top_k() {
        let (q, d, n) = (4, 40, 300);
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let mut codes = Codes::new(q, d);
        let mut all = Vec::new();
        for id in 0..n {
            let e: Vec<f32> = (0..q).flat_map(|_| unit(&mut seed, d)).collect();
            codes.push(id as i64, &encode_codes(&e, q, d)).unwrap();
            all.push(e);
        }
        for _ in 0..20 {
            let t = unit(&mut seed, d);
            let query = Query::new(&t);
            let (lb, ub) = codes.bounds(&query, 3);
            let exact: Vec<f32> = all.iter().map(|e| itc(e, &t)).collect();
            for i in 0..n {
                assert!(
                    lb[i] <= exact[i] && exact[i] <= ub[i],
                    "{} <= {} <= {}",
                    lb[i],
                    exact[i],
                    ub[i]
                );
                // The bounds are tight enough to be useful: well under the spread of scores.
                assert!(ub[i] - lb[i] < 0.05, "{}", ub[i] - lb[i]);
            }
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| exact[b].total_cmp(&exact[a]));
            for k in [1, 5, 10] {
                let c = codes.candidates(&query, k, 2);
                assert!(order[..k].iter().all(|i| c.contains(i)), "k {k}");
                assert!(c.len() < n / 2, "k {k}: {} candidates of {n}", c.len());
            }
        }
    }

    #[test]
    fn a_malformed_codes_blob_is_named() {
        let mut c = Codes::new(2, 8);
        let e = c.push(7, &[0u8; 10]).unwrap_err();
        assert!(e.contains("image 7") && e.contains("40"), "{e}");
    }
}
