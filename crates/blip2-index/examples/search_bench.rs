//! Search latency, index size and recall of `blip2-ort search`'s index on synthetic
//! embeddings, against brute force over every float32 vector.
//!
//!     cargo run --release -p blip2-index --example search_bench -- --images 100000
//!
//! Makes an index of N images with 32 random unit vectors of 256 values each (BLIP-2's
//! shapes) in a temporary SQLite file, then runs queries of two kinds: random unit
//! vectors (no image stands out: the hardest case for the candidate scan, whose bounds
//! then admit the most images), and vectors at cosine ~0.4 from one query vector of a
//! random image (a text that matches a photo). For each it times the search (int8 scan +
//! float32 rescoring from SQLite) and a brute-force float32 scan of every vector, and
//! checks the top 10 against the brute force's.

use std::path::PathBuf;
use std::time::Instant;

use blip2_index::{itc, search, ExportIdentity, FileStamp, NewImage, OpenMode, Store};

const QUERIES: usize = 32;
const DIM: usize = 256;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
    /// A random unit vector (Gaussian-like by summing uniforms, then normalized).
    fn unit(&mut self, out: &mut [f32]) {
        for x in out.iter_mut() {
            *x = self.next() + self.next() + self.next();
        }
        normalize(out);
    }
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number: {v}")))
        .unwrap_or(default)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--images", 10_000);
    let per_kind = arg(&args, "--queries", 50);
    let k = arg(&args, "--top", 10);
    let threads =
        arg(&args, "--threads", std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dir = std::env::temp_dir().join(format!("blip2-search-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db: PathBuf = dir.join("bench.db");
    let identity = ExportIdentity {
        source: "synthetic".into(),
        revision: None,
        dtype: "fp32".into(),
        num_query_tokens: QUERIES,
        embedding_dim: DIM,
        image_size: [224, 224],
        files: vec![FileStamp { name: "none".into(), size: 0, sample_hash: "0".into() }],
    };

    // The index, in transactions of 1000 images, as `blip2-ort index` writes it.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut all = vec![0f32; n * QUERIES * DIM];
    let started = Instant::now();
    {
        let mut store = Store::open(&db, &identity, OpenMode::Create).unwrap();
        for (chunk_no, chunk) in all.chunks_mut(1000 * QUERIES * DIM).enumerate() {
            for v in chunk.chunks_exact_mut(DIM) {
                rng.unit(v);
            }
            store
                .write(|w| {
                    for (i, e) in chunk.chunks_exact(QUERIES * DIM).enumerate() {
                        let path = format!("/photos/{:07}.jpg", chunk_no * 1000 + i);
                        w.put(&NewImage {
                            path: &path,
                            size: 1,
                            mtime_ns: 0,
                            hash: 0,
                            embedding: e,
                        })?;
                    }
                    Ok(())
                })
                .unwrap();
        }
    }
    let build_s = started.elapsed().as_secs_f64();
    let size: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bench.db"))
        .map(|e| e.metadata().unwrap().len())
        .sum();

    let started = Instant::now();
    let store = Store::open(&db, &identity, OpenMode::Existing).unwrap();
    let codes = store.load_codes().unwrap();
    let load_s = started.elapsed().as_secs_f64();
    assert_eq!(codes.len(), n);

    println!(
        "{n} images x {QUERIES} x {DIM}: index {:.1} MB on disk (built in {build_s:.1} s), \
         codes {:.1} MB in memory (loaded in {load_s:.2} s); {threads} threads, top {k}",
        size as f64 / 1e6,
        codes.memory_bytes() as f64 / 1e6
    );
    for kind in ["random", "matching"] {
        let (mut lat, mut brute, mut cands) = (Vec::new(), Vec::new(), Vec::new());
        let (mut scan_ms, mut rescore_ms) = (Vec::new(), Vec::new());
        let (mut found, mut wanted) = (0usize, 0usize);
        for _ in 0..per_kind {
            let mut t = vec![0f32; DIM];
            rng.unit(&mut t);
            if kind == "matching" {
                let img = (rng.next() + 0.5) as f64 * n as f64;
                let q = ((rng.next() + 0.5) * QUERIES as f32) as usize % QUERIES;
                let base = ((img as usize).min(n - 1) * QUERIES + q) * DIM;
                // x + noise of norm ~2.3: cosine ~0.4 with x.
                for (j, v) in t.iter_mut().enumerate() {
                    *v = all[base + j] + 2.3 * *v;
                }
                normalize(&mut t);
            }
            let started = Instant::now();
            let (hits, stats) = search(&store, &codes, &t, k, threads).unwrap();
            lat.push(started.elapsed().as_secs_f64() * 1e3);
            cands.push(stats.candidates as f64);
            scan_ms.push(stats.scan_ms);
            rescore_ms.push(stats.rescore_ms);

            let started = Instant::now();
            let per = n.div_ceil(threads);
            let mut scores = vec![0f32; n];
            std::thread::scope(|s| {
                for (c, out) in scores.chunks_mut(per).enumerate() {
                    let (all, t) = (&all, &t);
                    s.spawn(move || {
                        for (j, o) in out.iter_mut().enumerate() {
                            let i = c * per + j;
                            *o = itc(&all[i * QUERIES * DIM..(i + 1) * QUERIES * DIM], t);
                        }
                    });
                }
            });
            let mut order: Vec<usize> = (0..n).collect();
            order.select_nth_unstable_by(k.min(n) - 1, |&a, &b| scores[b].total_cmp(&scores[a]));
            brute.push(started.elapsed().as_secs_f64() * 1e3);
            let exact: Vec<String> =
                order[..k.min(n)].iter().map(|i| format!("/photos/{i:07}.jpg")).collect();
            wanted += exact.len();
            found += hits.iter().filter(|h| exact.contains(&h.path)).count();
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let max_c = cands.iter().copied().fold(0f64, f64::max);
        println!(
            "{kind:>8} queries ({per_kind}): search p50 {:.1} ms, p95 {:.1} ms, mean {:.1} ms \
             (scan {:.1} ms + rescoring {:.1} ms; {:.0} candidates on average, {max_c:.0} at most); \
             brute force mean {:.1} ms; recall@{k} {:.3}",
            percentile(&mut lat.clone(), 0.5),
            percentile(&mut lat.clone(), 0.95),
            mean(&lat),
            mean(&scan_ms),
            mean(&rescore_ms),
            mean(&cands),
            mean(&brute),
            found as f64 / wanted as f64
        );
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
