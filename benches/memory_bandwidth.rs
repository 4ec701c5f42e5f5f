//! How fast this machine reads memory: the floor under a CPU decode step, which reads
//! every weight of the language model once (docs/PERFORMANCE.md, "CPU int8").
//!
//!     cargo bench --bench memory_bandwidth            # 62, 124 and 512 MB; 1 and 2 threads
//!     cargo bench --bench memory_bandwidth -- 124 4   # one size (MB) and thread count
//!
//! Each pass reads the whole buffer once, split evenly between the threads (a scoped
//! thread each, so thread start is counted, as a decode step's thread pool wakes its
//! workers); the figure is the median of the passes after two warm-up passes.

use std::hint::black_box;
use std::time::Instant;

/// Reads `bytes` once: an XOR of its 64-bit words, in 8 lanes the compiler vectorizes.
fn read(bytes: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in bytes.chunks_exact(8) {
        for (a, x) in acc.iter_mut().zip(c) {
            *a ^= *x;
        }
    }
    acc.iter().fold(0, |s, a| s ^ a)
}

fn pass(buf: &[u64], threads: usize) -> u64 {
    let chunk = buf.len().div_ceil(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = buf.chunks(chunk).map(|c| s.spawn(move || read(c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).fold(0, |a, b| a ^ b)
    })
}

fn measure(mb: usize, threads: usize) {
    let words = mb * (1 << 20) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let passes = (8192 / mb).clamp(5, 400);
    let mut times = Vec::with_capacity(passes);
    for i in 0..passes + 2 {
        let t = Instant::now();
        black_box(pass(black_box(&buf), threads));
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let s = times[times.len() / 2];
    println!(
        "{mb:>5} MB, {threads} thread(s): {:>6.1} GB/s, {:.2} ms a pass (median of {passes})",
        mb as f64 / 1024.0 / s,
        s * 1e3
    );
}

fn main() {
    // `cargo bench` passes --bench; the numbers are what is left.
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    match args[..] {
        [mb, threads, ..] => measure(mb.max(1), threads.max(1)),
        [mb] => [1, 2].into_iter().for_each(|t| measure(mb.max(1), t)),
        _ => {
            for mb in [62, 124, 512] {
                for t in [1, 2] {
                    measure(mb, t);
                }
            }
        }
    }
}
