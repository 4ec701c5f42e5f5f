//! The engine ([`blip2_runtime::engine`]): requests admitted at different steps into
//! running batches of every kind of export get exactly the tokens the search gives each
//! alone (`generate()` on its own decoder state, which the recorded-case tests hold to
//! transformers); a request whose search fails, or whose model run fails, fails alone;
//! and every language-model run happens on the engine's one thread, every image-encoder
//! run on its image stage's thread ([`image_stage`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use blip2_core::Target;
use blip2_ort_suite::{fixture, photo, session_factory, temp_dir};
use blip2_runtime::engine::{
    EngineMetrics, EngineOptions, Event, ImageStage, NoMetrics, Queued, Request, Scheduler, Sink,
};
use blip2_runtime::generation::{self, GenerationConfig};
use blip2_runtime::model::Blip2Model;
use blip2_runtime::pipeline::{EmbedCache, Pipeline};
use blip2_runtime::state::{self, Bound};
use ndarray::{Array3, Axis};

fn export(name: &str, target: Target, test: &str) -> PathBuf {
    let kind = if target == Target::Cuda { "cuda" } else { "portable" };
    let out = temp_dir(&format!("engine-{test}-{name}-{kind}")).join("export");
    let opts = blip2_export::ExportOptions { target, ..Default::default() };
    blip2_export::export(
        &fixture(name).join("checkpoint"),
        &out,
        &opts,
        &mut blip2_export::NoProgress,
    )
    .unwrap();
    out
}

struct Case {
    image: &'static str,
    prompt: &'static str,
    cfg: GenerationConfig,
    /// Admitted before this step of the scheduler.
    join_at: usize,
}

/// Greedy rows with their own limits and processors, beams, beam sampling and seeded
/// samples, joining at different steps.
fn cases(base: &GenerationConfig) -> Vec<Case> {
    let with = |f: &dyn Fn(&mut GenerationConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    vec![
        Case {
            image: "camera.png",
            prompt: "Question: what is in the picture? Answer:",
            cfg: with(&|c| {
                c.max_new_tokens = 6;
                c.num_beams = 3;
                c.num_return_sequences = 2;
                c.length_penalty = 0.5
            }),
            join_at: 0,
        },
        Case {
            image: "rocket.jpg",
            prompt: "a photo of",
            cfg: with(&|c| c.max_new_tokens = 9),
            join_at: 0,
        },
        Case {
            image: "chelsea.png",
            prompt: "",
            cfg: with(&|c| {
                c.max_new_tokens = 8;
                c.do_sample = true;
                c.top_k = 5;
                c.num_return_sequences = 2;
                c.seed = Some(11)
            }),
            join_at: 2,
        },
        Case {
            image: "no_time_for_that_tiny.gif",
            prompt: "a photo of the",
            cfg: with(&|c| {
                c.max_new_tokens = 7;
                c.repetition_penalty = 1.5;
                c.min_new_tokens = 5
            }),
            join_at: 2,
        },
        Case {
            image: "rocket.jpg",
            prompt: "",
            cfg: with(&|c| {
                c.max_new_tokens = 5;
                c.num_beams = 2;
                c.do_sample = true;
                c.seed = Some(3)
            }),
            join_at: 5,
        },
    ]
}

fn pixels(p: &Pipeline, image: &str) -> Array3<f32> {
    let img = p.load_image(&photo(image)).unwrap();
    blip2_runtime::preprocess::preprocess(&img, &p.model.manifest.image).unwrap()
}

/// The request's sequences from the search run alone on its own decoder state.
fn alone(p: &mut Pipeline, case: &Case) -> Vec<Vec<i64>> {
    let px = pixels(p, case.image).insert_axis(Axis(0));
    let text = p.prompter.check_fits(case.prompt).unwrap();
    let batch = p.prompter.assemble(&[text]);
    let embeds = p.image_embeds(px).unwrap();
    let model = &mut p.model;
    let mut pre = state::prefill(model, &batch, embeds, case.cfg.max_new_tokens).unwrap();
    let mut bound = Bound { model: &mut *model, state: &mut *pre.state };
    let out = generation::generate(&mut bound, &pre.prompts, pre.logits, &case.cfg).unwrap();
    pre.state.release(model);
    out.into_iter().next().unwrap()
}

/// Events of request `.0`.
struct Tagged(usize, mpsc::Sender<(usize, Event)>);

impl Sink for Tagged {
    fn send(&self, event: Event) {
        let _ = self.1.send((self.0, event));
    }
}

fn request(p: &Pipeline, i: usize, case: &Case, tx: &mpsc::Sender<(usize, Event)>) -> Request {
    Request {
        pixels: pixels(p, case.image),
        text_ids: p.prompter.check_fits(case.prompt).unwrap(),
        cfg: case.cfg.clone(),
        stop: Vec::new(),
        first_stream: 0,
        sink: Box::new(Tagged(i, tx.clone())),
    }
}

/// Per request: its sequences' token ids, or its failure.
type Outcome = Result<Vec<Vec<i64>>, String>;

fn collect(rx: mpsc::Receiver<(usize, Event)>, n: usize, seqs: &[usize]) -> Vec<Outcome> {
    let mut got: Vec<Vec<Option<Vec<i64>>>> = seqs.iter().map(|&k| vec![None; k]).collect();
    let mut out: Vec<Option<Outcome>> = vec![None; n];
    for (i, e) in rx {
        match e {
            Event::End { index, token_ids, .. } => got[i][index] = Some(token_ids),
            Event::Done { .. } => {
                out[i] = Some(Ok(got[i]
                    .iter()
                    .map(|s| s.clone().expect("every sequence ended"))
                    .collect()))
            }
            Event::Failed(e) => out[i] = Some(Err(e.to_string())),
            Event::Delta { .. } => {}
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, o)| o.unwrap_or_else(|| panic!("request {i} never ended")))
        .collect()
}

/// Drives a scheduler on this thread, admitting each case before its step; returns
/// each request's outcome and how often newcomers joined a running batch.
fn run_joined(
    p: &mut Pipeline,
    cases: &[Case],
    extra: Vec<(usize, Request)>,
) -> (Vec<Outcome>, usize) {
    let (tx, rx) = mpsc::channel();
    let mut pending: Vec<(usize, Request)> =
        cases.iter().enumerate().map(|(i, c)| (c.join_at, request(p, i, c, &tx))).collect();
    let n = pending.len();
    let seqs: Vec<usize> = pending.iter().map(|(_, r)| r.cfg.num_return_sequences).collect();
    let extra_rows = extra.len();
    pending.extend(extra);
    drop(tx);
    // Batches make room for newcomers as a server's do.
    let joins = Arc::new(JoinCount::default());
    let mut sched = Scheduler::new(16, joins.clone()).with_room();
    let mut joined = 0;
    drive(p, &mut sched, pending, |sched, rows, batches| {
        if rows > 0 && sched.batches() == batches && sched.rows() > rows {
            joined += 1;
        }
    });
    // The engine reports each join to its metrics (the server's blip2_batch_joins_total).
    assert_eq!(joins.0.load(Ordering::Relaxed), joined, "joins reported to the metrics");
    // And each admission with its rows (requests admitted at the same step are taken in
    // together), and each decode step (blip2_admission_rows, blip2_decode_step_seconds).
    let mut want = std::collections::BTreeMap::<usize, usize>::new();
    for c in cases {
        *want.entry(c.join_at).or_default() += blip2_runtime::engine::batch_rows(&c.cfg);
    }
    let (admitted, stepped) = joins.1.lock().unwrap().clone();
    if extra_rows == 0 {
        assert_eq!(admitted, want.into_values().collect::<Vec<_>>(), "rows of each admission");
    }
    assert!(
        !stepped.is_empty() && stepped.iter().all(|&r| (1..=16).contains(&r)),
        "rows of each step: {stepped:?}"
    );
    (collect(rx, n, &seqs), joined)
}

/// Drives `sched` on this thread, admitting each request before its step (`.0`);
/// `admitted` sees the scheduler after each admission, with its rows and batches before.
fn drive(
    p: &mut Pipeline,
    sched: &mut Scheduler,
    pending: Vec<(usize, Request)>,
    mut admitted: impl FnMut(&Scheduler, usize, usize),
) {
    let mut embeds = EmbedCache::new(0);
    let mut step = 0;
    let mut pending: Vec<Option<(usize, Request)>> = pending.into_iter().map(Some).collect();
    while !(sched.is_idle() && pending.iter().all(Option::is_none)) {
        let now: Vec<Queued> = pending
            .iter_mut()
            .filter(|x| x.as_ref().is_some_and(|(at, _)| *at <= step))
            .map(|x| Queued::new(x.take().unwrap().1))
            .collect();
        if !now.is_empty() {
            let (rows, batches) = (sched.rows(), sched.batches());
            sched.admit(&mut p.model, &mut embeds, &p.prompter, now);
            admitted(sched, rows, batches);
        }
        sched.step(&mut p.model, &p.prompter);
        step += 1;
        assert!(step < 200, "generation does not end");
    }
}

/// A server's batch of fixed buffers (OPT, `--target cuda`) starts as wide as the power
/// of two that holds its rows, and moves into buffers twice as wide when newcomers find
/// no free row, up to `max_batch`: a lone request's steps run one row. Every request
/// still gets its single-run tokens.
#[test]
fn a_server_batch_starts_as_wide_as_its_rows_and_doubles_for_newcomers() {
    for fixed_buffers in [false, true] {
        let dir =
            export("opt-tiny", Target::Cuda, if fixed_buffers { "width-fixed" } else { "width" });
        let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
        if fixed_buffers {
            p.model.use_fixed_step_buffers().unwrap();
        }
        let base = p.default_config();
        let greedy = |image, prompt, join_at| Case {
            image,
            prompt,
            cfg: GenerationConfig { max_new_tokens: 10, min_new_tokens: 10, ..base.clone() },
            join_at,
        };
        // Rows after each admission: 1, 2, 3, 5; widths 1, 2, 4, 8 (max_batch 6 caps
        // the last at 6).
        let cases = [
            greedy("camera.png", "", 0),
            greedy("rocket.jpg", "a photo of", 1),
            greedy("chelsea.png", "Question: what is in the picture? Answer:", 2),
            greedy("no_time_for_that_tiny.gif", "a photo of the", 3),
            greedy("rocket.jpg", "", 3),
        ];
        let want: Vec<Vec<Vec<i64>>> = cases.iter().map(|c| alone(&mut p, c)).collect();
        let (tx, rx) = mpsc::channel();
        let pending: Vec<(usize, Request)> =
            cases.iter().enumerate().map(|(i, c)| (c.join_at, request(&p, i, c, &tx))).collect();
        drop(tx);
        let mut sched = Scheduler::new(6, Arc::new(NoMetrics)).with_room();
        let mut widths = Vec::new();
        drive(&mut p, &mut sched, pending, |sched, _, _| widths.push(sched.widths()));
        assert_eq!(widths, [vec![1], vec![2], vec![4], vec![6]], "fixed buffers: {fixed_buffers}");
        let got = collect(rx, cases.len(), &[1; 5]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.as_ref().unwrap(), w, "request {i} (fixed buffers: {fixed_buffers})");
        }
    }
}

/// Counts the joins the engine reports, and keeps the rows of each admission and of
/// each decode step.
#[derive(Default)]
struct JoinCount(AtomicUsize, std::sync::Mutex<(Vec<usize>, Vec<usize>)>);
impl EngineMetrics for JoinCount {
    fn joined(&self, rows: usize) {
        assert!(rows > 0, "a join of no rows");
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn admitted(&self, rows: usize, took: std::time::Duration) {
        assert!(took > std::time::Duration::ZERO);
        self.1.lock().unwrap().0.push(rows);
    }
    fn stepped(&self, rows: usize, _took: std::time::Duration) {
        self.1.lock().unwrap().1.push(rows);
    }
}

fn check_kind(name: &str, target: Target, fixed_buffers: bool) {
    let test = if fixed_buffers { "join-fixed" } else { "join" };
    let dir = export(name, target, test);
    let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
    if fixed_buffers {
        p.model.use_fixed_step_buffers().unwrap();
    }
    let cases = cases(&p.default_config());
    let want: Vec<Vec<Vec<i64>>> = cases.iter().map(|c| alone(&mut p, c)).collect();
    p.model.take_lm_threads();
    let (got, joined) = run_joined(&mut p, &cases, Vec::new());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let g = g.as_ref().unwrap_or_else(|e| panic!("{name} {target:?}: request {i} failed: {e}"));
        assert_eq!(
            g, w,
            "{name} {target:?}: request {i} joined at step {} vs alone",
            cases[i].join_at
        );
    }
    // Every state takes newcomers into the running batch: the portable ones by
    // left-padding their growing caches under a mask, OPT's CUDA-target one by copying
    // the newcomers' rows into free rows of its fixed buffers, Flan-T5's CUDA-target one
    // by running the newcomers' start step again at the running rows' position, earlier
    // positions masked for them.
    assert!(joined >= 2, "{name} {target:?}: newcomers joined a running batch {joined} times");
    assert_eq!(p.model.take_lm_threads(), vec![std::thread::current().id()]);
}

/// opt-tiny with every row of its (tied) token embeddings equal to the first: every
/// logit of every step is the same number, so a sampled row's candidates always tie at
/// their edge.
fn tied_logits_checkpoint(test: &str) -> PathBuf {
    let src = fixture("opt-tiny").join("checkpoint");
    let ck = temp_dir(&format!("engine-{test}")).join("checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        if f.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&f, ck.join(f.file_name().unwrap())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = "language_model.model.decoder.embed_tokens.weight";
    let e = st.tensor(name).unwrap();
    let (rows, width) = (e.shape()[0], e.shape()[1] * 4);
    let tied: Vec<u8> = e.data()[..width].repeat(rows);
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != name).collect();
    tensors.push((
        name.into(),
        safetensors::tensor::TensorView::new(e.dtype(), e.shape().to_vec(), &tied).unwrap(),
    ));
    safetensors::serialize_to_file(tensors, None, &ck.join("model.safetensors")).unwrap();
    ck
}

/// Sampled rows of `--target cuda` exports ask the step for their top-k candidates; when
/// those tie at their edge the draw cannot be made from them, and the whole batch takes
/// that step's full logits. With every logit equal that happens at every step: the
/// sampled requests (top-k 5 of 616 equal logits keeps all 616), beside a greedy one,
/// still get their single-run tokens, joining at different steps.
#[test]
fn sampled_rows_whose_candidates_tie_take_the_full_logits_and_stay_exact() {
    for fixed_buffers in [false, true] {
        let test = if fixed_buffers { "tied-fixed" } else { "tied" };
        let ck = tied_logits_checkpoint(test);
        let dir = ck.parent().unwrap().join("export");
        let opts = blip2_export::ExportOptions { target: Target::Cuda, ..Default::default() };
        blip2_export::export(&ck, &dir, &opts, &mut blip2_export::NoProgress).unwrap();
        let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
        if fixed_buffers {
            p.model.use_fixed_step_buffers().unwrap();
        }
        let base = p.default_config();
        let sampled = |image, seed, join_at| Case {
            image,
            prompt: "a photo of",
            cfg: GenerationConfig {
                max_new_tokens: 8,
                min_new_tokens: 8,
                do_sample: true,
                top_k: 5,
                seed: Some(seed),
                ..base.clone()
            },
            join_at,
        };
        let cases = [
            sampled("camera.png", 5, 0),
            Case {
                image: "rocket.jpg",
                prompt: "",
                cfg: GenerationConfig { max_new_tokens: 6, ..base.clone() },
                join_at: 0,
            },
            sampled("chelsea.png", 17, 2),
        ];
        let want: Vec<Vec<Vec<i64>>> = cases.iter().map(|c| alone(&mut p, c)).collect();
        // A draw over all 616 tokens, not over the 6 candidates the step returned.
        let drawn: std::collections::BTreeSet<i64> =
            want[0][0].iter().chain(&want[2][0]).copied().collect();
        assert!(drawn.len() > 6, "draws over the whole vocabulary: {want:?}");
        let (got, joined) = run_joined(&mut p, &cases, Vec::new());
        assert!(joined >= 1, "the last request joined the running batch");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.as_ref().unwrap(), w, "request {i} (fixed buffers: {fixed_buffers})");
        }
    }
}

#[test]
fn opt_portable_requests_joining_at_different_steps_get_their_single_run_tokens() {
    check_kind("opt-tiny", Target::Portable, false);
}

#[test]
fn opt_cuda_target_requests_joining_at_different_steps_get_their_single_run_tokens() {
    check_kind("opt-tiny", Target::Cuda, false);
    check_kind("opt-tiny", Target::Cuda, true);
}

#[test]
fn flan_t5_requests_joining_at_different_steps_get_their_single_run_tokens() {
    check_kind("t5-tiny", Target::Portable, false);
    check_kind("t5-tiny", Target::Cuda, false);
}

#[test]
fn flan_t5_cuda_target_exports_without_kv_join_run_newcomers_beside() {
    // An export made before kv_join cannot make zeroed buffers on the device: its
    // newcomers form batches of their own, which step in turn with the running one,
    // and every request still gets its single-run tokens.
    let dir = export("t5-tiny", Target::Cuda, "join-older");
    let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
    p.model.drop_kv_join();
    let cases = cases(&p.default_config());
    let want: Vec<Vec<Vec<i64>>> = cases.iter().map(|c| alone(&mut p, c)).collect();
    let (got, joined) = run_joined(&mut p, &cases, Vec::new());
    assert_eq!(joined, 0, "newcomers joined without kv_join");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.as_ref().unwrap(), w, "request {i} beside the running batch vs alone");
    }
}

/// A sink that panics on the request's first text (a fault in one request's handling),
/// and passes its failure on.
struct Panicking(Tagged);

impl Sink for Panicking {
    fn send(&self, event: Event) {
        if matches!(event, Event::Delta { .. } | Event::End { .. }) {
            panic!("a sink that fails");
        }
        self.0.send(event);
    }
}

#[test]
fn a_failing_request_fails_alone_and_the_others_stay_exact() {
    let dir = export("opt-tiny", Target::Portable, "faults");
    let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
    let cases = cases(&p.default_config());
    let want: Vec<Vec<Vec<i64>>> = cases.iter().map(|c| alone(&mut p, c)).collect();
    let (tx, rx) = mpsc::channel::<(usize, Event)>();
    let base = &cases[0];
    // Settings its search refuses (the server checks them first; the engine copes).
    let mut bad_settings = request(&p, 0, base, &tx);
    bad_settings.cfg.top_p = 2.0;
    let mut panicking = request(&p, 1, base, &tx);
    panicking.sink = Box::new(Panicking(Tagged(1, tx.clone())));
    // Pixels of another size: the prefill of the newcomers it comes with fails.
    let mut bad_pixels = request(&p, 2, base, &tx);
    bad_pixels.pixels = Array3::zeros((3, 8, 8));
    drop(tx);
    let extra = vec![(1, bad_settings), (2, panicking), (4, bad_pixels)];
    let (got, _) = run_joined(&mut p, &cases, extra);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(got[i].as_ref().unwrap(), w, "request {i}");
    }
    let failed = collect(rx, 3, &[1, 1, 1]);
    for (i, what) in ["--top-p", "a sink that fails", "pixel"].iter().enumerate() {
        let e = failed[i].as_ref().expect_err("the faulty request failed");
        assert!(e.contains(what), "request {i}: {e}");
    }
}

#[test]
fn every_language_model_run_of_the_threaded_engine_is_on_its_one_thread() {
    // Clients on several threads; every step input written and every run made by the
    // engine's thread, for a --target cuda export on fixed step buffers.
    let dir = export("opt-tiny", Target::Cuda, "thread");
    let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
    p.model.use_fixed_step_buffers().unwrap();
    let cases = Arc::new(cases(&p.default_config()));
    let reqs: Vec<Request> = {
        let (tx, _) = mpsc::channel();
        cases.iter().enumerate().map(|(i, c)| request(&p, i, c, &tx)).collect()
    };
    let opts = EngineOptions {
        max_batch: 16,
        max_wait: std::time::Duration::from_millis(5),
        max_queue: 64,
        image_stage: ImageStage::Auto,
        admit_wait: std::time::Duration::ZERO,
    };
    let engine = p.into_engine(opts, Arc::new(NoMetrics)).unwrap();
    let (tx, rx) = mpsc::channel();
    let clients: Vec<_> = reqs
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            let (engine, tx) = (engine.clone(), tx.clone());
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(3 * i as u64));
                r.sink = Box::new(Tagged(i, tx));
                engine.submit(r).unwrap();
                std::thread::current().id()
            })
        })
        .collect();
    drop(tx);
    let client_threads: Vec<_> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let seqs: Vec<usize> = cases.iter().map(|c| c.cfg.num_return_sequences).collect();
    let got = collect(rx, cases.len(), &seqs);
    assert!(got.iter().all(Result::is_ok), "{got:?}");
    let mut model: Blip2Model = engine.shutdown_into_model().unwrap();
    let threads = model.take_lm_threads();
    assert_eq!(threads.len(), 1, "language-model runs on {} threads", threads.len());
    assert!(!client_threads.contains(&threads[0]));
    assert_ne!(threads[0], std::thread::current().id());
}

/// Every event of a request, in order.
struct Recording(mpsc::Sender<Event>);

impl Sink for Recording {
    fn send(&self, event: Event) {
        let _ = self.0.send(event);
    }
}

#[test]
fn streamed_deltas_add_up_to_the_final_text() {
    // The stream decodes a window of tokens at a time: on both tokenizers (byte-level
    // BPE, SentencePiece) and the odd bytes random weights sample, the deltas of each
    // sequence must add up to the one decode of all its tokens, with or without a stop
    // string, and text must arrive before the end.
    for name in ["opt-tiny", "t5-tiny"] {
        let dir = export(name, Target::Portable, "stream");
        let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
        let base = p.default_config();
        let (mut early, mut sequences) = (0, 0);
        for (seed, stop) in [(1, None), (2, None), (3, Some("e")), (4, Some(" a"))] {
            let cfg = GenerationConfig {
                max_new_tokens: 30,
                do_sample: true,
                top_k: 0,
                temperature: 1.5,
                num_return_sequences: 3,
                seed: Some(seed),
                ..base.clone()
            };
            let (tx, rx) = mpsc::channel();
            let case = Case { image: "rocket.jpg", prompt: "a photo of", cfg, join_at: 0 };
            let mut req = request(&p, 0, &case, &mpsc::channel().0);
            req.stop = stop.map(|s| vec![s.to_string()]).unwrap_or_default();
            req.sink = Box::new(Recording(tx));
            let mut sched = Scheduler::new(8, Arc::new(NoMetrics));
            sched.run_to_end(
                &mut p.model,
                &mut EmbedCache::new(0),
                &p.prompter,
                vec![Queued::new(req)],
            );
            let mut streamed = vec![String::new(); 3];
            let mut deltas = [0; 3];
            for e in rx {
                match e {
                    Event::Delta { index, text } => {
                        streamed[index].push_str(&text);
                        deltas[index] += 1;
                    }
                    Event::End { index, text, token_ids, .. } => {
                        sequences += 1;
                        assert_eq!(streamed[index], text, "{name}: the deltas against the text");
                        // Without a stop string the text is the decode of the tokens.
                        if stop.is_none() {
                            assert_eq!(text, p.prompter.decode(&token_ids).unwrap());
                        }
                        // More than the closing delta: text came as it was generated.
                        early += usize::from(deltas[index] > 1);
                    }
                    Event::Done { .. } => {}
                    Event::Failed(e) => panic!("{name}: {e}"),
                }
            }
        }
        assert_eq!(sequences, 12);
        assert!(early > 0, "{name}: no text arrived before a sequence ended");
    }
}

/// The engine's image stage ([`Engine`]'s `blip2-images` thread): what runs where, exact
/// tokens for requests that arrive while others decode, faults on the image thread, and
/// shutdown with requests still being encoded.
mod image_stage {
    use super::*;
    use blip2_runtime::engine::{EngineMetrics, SubmitError};
    use std::sync::Mutex;
    use std::time::Duration;

    /// A pixel value no preprocessed image has: the encoder hook panics on an image
    /// that starts with it.
    const MARK: f32 = 1234.5;

    fn options(max_wait_ms: u64, image_stage: ImageStage) -> EngineOptions {
        EngineOptions {
            max_batch: 16,
            max_wait: Duration::from_millis(max_wait_ms),
            max_queue: 64,
            image_stage,
            admit_wait: Duration::ZERO,
        }
    }

    /// A freshly loaded pipeline of an opt-tiny export (its image-embedding cache empty,
    /// so that the engine encodes every image), the cases, and each case's tokens alone.
    fn loaded(target: Target, test: &str) -> (Pipeline, Vec<Case>, Vec<Vec<Vec<i64>>>) {
        let dir = export("opt-tiny", target, test);
        let load = || {
            let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
            if target == Target::Cuda {
                p.model.use_fixed_step_buffers().unwrap();
            }
            p
        };
        let mut p = load();
        let cases = cases(&p.default_config());
        let want = cases.iter().map(|c| alone(&mut p, c)).collect();
        (load(), cases, want)
    }

    fn seqs(cases: &[Case]) -> Vec<usize> {
        cases.iter().map(|c| c.cfg.num_return_sequences).collect()
    }

    fn assert_exact(got: &[Outcome], want: &[Vec<Vec<i64>>]) {
        for (i, w) in want.iter().enumerate() {
            let g = got[i].as_ref().unwrap_or_else(|e| panic!("request {i} failed: {e}"));
            assert_eq!(g, w, "request {i} against its tokens alone");
        }
    }

    /// Holds the engine thread at the first token of the first request until released
    /// (so that what is submitted meanwhile arrives while that request decodes).
    struct Gate {
        reached: Mutex<Option<mpsc::Sender<()>>>,
        release: Mutex<Option<mpsc::Receiver<()>>>,
    }

    impl EngineMetrics for Gate {
        fn first_token(&self, _since_queued: Duration) {
            let reached = self.reached.lock().unwrap().take();
            if let Some(reached) = reached {
                let release = self.release.lock().unwrap().take().unwrap();
                reached.send(()).unwrap();
                release.recv().unwrap();
            }
        }
    }

    /// Submits case 0, and the other cases while its rows decode: every request gets its
    /// tokens alone. Returns the model the engine hands back and the submitting thread.
    fn serve_while_decoding(
        p: Pipeline,
        stage: ImageStage,
        cases: &[Case],
        want: &[Vec<Vec<i64>>],
    ) -> (Blip2Model, std::thread::ThreadId) {
        let (tx, rx) = mpsc::channel();
        let reqs: Vec<Request> =
            cases.iter().enumerate().map(|(i, c)| request(&p, i, c, &tx)).collect();
        drop(tx);
        let (reached_tx, reached) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let gate =
            Gate { reached: Mutex::new(Some(reached_tx)), release: Mutex::new(Some(release_rx)) };
        let engine = p.into_engine(options(5, stage), Arc::new(gate)).unwrap();
        let client = std::thread::current().id();
        let mut reqs = reqs.into_iter();
        engine.submit(reqs.next().unwrap()).unwrap();
        reached.recv_timeout(Duration::from_secs(60)).expect("request 0 got its first token");
        for r in reqs {
            engine.submit(r).unwrap();
        }
        // Time for the image stage to hand them on, so they join at the next step.
        std::thread::sleep(Duration::from_millis(100));
        release.send(()).unwrap();
        let got = collect(rx, cases.len(), &seqs(cases));
        assert_exact(&got, want);
        (engine.shutdown_into_model().unwrap(), client)
    }

    #[test]
    fn requests_submitted_while_a_batch_decodes_get_their_single_run_tokens() {
        for target in [Target::Portable, Target::Cuda] {
            for stage in [ImageStage::Thread, ImageStage::Inline] {
                let (p, cases, want) = loaded(target, &format!("decoding-{stage:?}"));
                serve_while_decoding(p, stage, &cases, &want);
            }
        }
    }

    /// Holds the engine thread after each decode step until the test has submitted what
    /// it wants to arrive before the next one (it hangs up to let the engine run free),
    /// and keeps the rows of each admission.
    struct Lockstep {
        stepped: Mutex<Option<mpsc::Sender<()>>>,
        go: Mutex<Option<mpsc::Receiver<()>>>,
        admitted: Mutex<Vec<usize>>,
    }

    impl EngineMetrics for Lockstep {
        fn stepped(&self, _rows: usize, _took: Duration) {
            let told = self.stepped.lock().unwrap().as_ref().is_some_and(|tx| tx.send(()).is_ok());
            if told {
                let go = self.go.lock().unwrap();
                let _ = go.as_ref().unwrap().recv_timeout(Duration::from_secs(60));
            }
        }
        fn admitted(&self, rows: usize, _took: Duration) {
            self.admitted.lock().unwrap().push(rows);
        }
    }

    /// `--admit-wait-ms`: while a batch of 4 beams decodes, one-row newcomers arriving one
    /// a step are taken in a step at a time without it, and two at a time with it (once
    /// they hold half the running rows, or their wait is over); their tokens stay their
    /// single-run tokens either way.
    #[test]
    fn newcomers_wait_to_be_taken_in_together_with_admit_wait() {
        for (wait_ms, want_admissions) in [(0, vec![4, 1, 1, 1, 1]), (300, vec![4, 2, 2])] {
            let (mut p, _, _) = loaded(Target::Cuda, &format!("admit-wait-{wait_ms}"));
            let base = p.default_config();
            let mut cases = vec![Case {
                image: "camera.png",
                prompt: "",
                cfg: GenerationConfig {
                    max_new_tokens: 12,
                    min_new_tokens: 12,
                    num_beams: 4,
                    ..base.clone()
                },
                join_at: 0,
            }];
            for (i, image) in
                ["rocket.jpg", "chelsea.png", "no_time_for_that_tiny.gif", "camera.png"]
                    .iter()
                    .enumerate()
            {
                cases.push(Case {
                    image,
                    prompt: "a photo of",
                    cfg: GenerationConfig { max_new_tokens: 4 + i, ..base.clone() },
                    join_at: i + 1,
                });
            }
            let want: Vec<_> = cases.iter().map(|c| alone(&mut p, c)).collect();
            let (tx, rx) = mpsc::channel();
            let reqs: Vec<Request> =
                cases.iter().enumerate().map(|(i, c)| request(&p, i, c, &tx)).collect();
            drop(tx);
            let (stepped_tx, stepped) = mpsc::channel();
            let (go, go_rx) = mpsc::channel();
            let hook = Arc::new(Lockstep {
                stepped: Mutex::new(Some(stepped_tx)),
                go: Mutex::new(Some(go_rx)),
                admitted: Mutex::new(Vec::new()),
            });
            let opts = EngineOptions {
                admit_wait: Duration::from_millis(wait_ms),
                ..options(5, ImageStage::Inline)
            };
            let engine = p.into_engine(opts, hook.clone()).unwrap();
            let mut reqs = reqs.into_iter();
            engine.submit(reqs.next().unwrap()).unwrap();
            for r in reqs {
                stepped.recv_timeout(Duration::from_secs(60)).expect("a decode step");
                engine.submit(r).unwrap();
                go.send(()).unwrap();
            }
            drop((stepped, go));
            let got = collect(rx, cases.len(), &seqs(&cases));
            assert_exact(&got, &want);
            assert_eq!(*hook.admitted.lock().unwrap(), want_admissions, "admit wait {wait_ms} ms");
            engine.shutdown();
        }
    }

    #[test]
    fn image_encoders_run_on_the_image_thread_and_the_language_model_on_the_engine_thread() {
        let (p, cases, want) = loaded(Target::Cuda, "where");
        let (mut model, client) = serve_while_decoding(p, ImageStage::Thread, &cases, &want);
        let encoders = model.take_encoder_threads();
        let lm = model.take_lm_threads();
        assert_eq!(encoders.len(), 1, "the image encoders ran on {} threads", encoders.len());
        assert_eq!(lm.len(), 1, "language-model runs on {} threads", lm.len());
        assert_ne!(encoders[0], lm[0], "the image encoders ran on the engine thread");
        for t in [&encoders[0], &lm[0]] {
            assert_ne!(*t, client, "a model run on the submitting thread");
        }
    }

    #[test]
    fn by_default_the_engine_thread_encodes_the_images_itself() {
        // ImageStage::Auto: one thread runs every graph.
        let (p, cases, want) = loaded(Target::Cuda, "inline");
        let (mut model, client) = serve_while_decoding(p, ImageStage::Auto, &cases, &want);
        let encoders = model.take_encoder_threads();
        let lm = model.take_lm_threads();
        assert_eq!(encoders, lm, "the image encoders ran on {encoders:?}, the LM on {lm:?}");
        assert_eq!(lm.len(), 1, "language-model runs on {} threads", lm.len());
        assert_ne!(lm[0], client, "a model run on the submitting thread");
    }

    /// Outcomes of requests numbered 0..n, gathered event by event.
    struct Outcomes {
        got: Vec<Vec<Option<Vec<i64>>>>,
        out: Vec<Option<Outcome>>,
    }

    impl Outcomes {
        fn new(seqs: &[usize]) -> Self {
            Outcomes {
                got: seqs.iter().map(|&k| vec![None; k]).collect(),
                out: vec![None; seqs.len()],
            }
        }

        /// Takes one event; true when it ended its request.
        fn take(&mut self, (i, e): (usize, Event)) -> bool {
            match e {
                Event::End { index, token_ids, .. } => self.got[i][index] = Some(token_ids),
                Event::Done { .. } => {
                    let seqs = self.got[i].iter().map(|s| s.clone().expect("every sequence ended"));
                    self.out[i] = Some(Ok(seqs.collect()));
                }
                Event::Failed(e) => self.out[i] = Some(Err(e.to_string())),
                Event::Delta { .. } => {}
            }
            self.out[i].is_some()
        }

        /// Reads events until `n` more requests have ended.
        fn wait_for(&mut self, rx: &mpsc::Receiver<(usize, Event)>, mut n: usize) {
            while n > 0 {
                let e = rx.recv_timeout(Duration::from_secs(120)).expect("a request never ended");
                n -= usize::from(self.take(e));
            }
        }

        /// Takes the events that have arrived; every request must have ended.
        fn arrived(mut self, rx: &mpsc::Receiver<(usize, Event)>) -> Vec<Outcome> {
            for e in rx.try_iter() {
                self.take(e);
            }
            let out = self.out.into_iter().enumerate();
            out.map(|(i, o)| o.unwrap_or_else(|| panic!("request {i} was not answered"))).collect()
        }
    }

    #[test]
    fn a_failing_image_fails_its_request_alone_and_the_engine_goes_on() {
        for stage in [ImageStage::Thread, ImageStage::Inline] {
            image_faults(stage);
        }
    }

    fn image_faults(stage: ImageStage) {
        let (mut p, cases, want) = loaded(Target::Portable, &format!("image-faults-{stage:?}"));
        p.model.image_encoders().unwrap().before_each_run(|px| {
            if px.outer_iter().any(|im| im[[0, 0, 0]] == MARK) {
                panic!("a marked image");
            }
        });
        let (tx, rx) = mpsc::channel();
        let n = cases.len();
        let mut reqs: Vec<Request> =
            cases.iter().enumerate().map(|(i, c)| request(&p, i, c, &tx)).collect();
        // Pixels of another size, which the vision encoder refuses, and an image on which
        // the encoders panic, among the others.
        let mut bad_pixels = request(&p, n, &cases[1], &tx);
        bad_pixels.pixels = Array3::zeros((3, 8, 8));
        let mut marked = request(&p, n + 1, &cases[1], &tx);
        marked.pixels[[0, 0, 0]] = MARK;
        reqs.insert(2, bad_pixels);
        reqs.insert(4, marked);
        let later = request(&p, n + 2, &cases[1], &tx);
        drop(tx);
        // max_wait long enough for all of them to share one encoder batch.
        let engine = p.into_engine(options(300, stage), Arc::new(NoMetrics)).unwrap();
        for r in reqs {
            engine.submit(r).unwrap();
        }
        let mut seqs = seqs(&cases);
        seqs.extend([1, 1, 1]);
        let mut outcomes = Outcomes::new(&seqs);
        outcomes.wait_for(&rx, n + 2);
        // The engine goes on after the fault and the panic.
        engine.submit(later).unwrap();
        outcomes.wait_for(&rx, 1);
        engine.shutdown();
        let got = outcomes.arrived(&rx);
        assert_exact(&got, &want);
        let e = got[n].as_ref().expect_err("the image of another size failed");
        assert!(e.contains("pixel"), "{e}");
        let e = got[n + 1].as_ref().expect_err("the marked image failed");
        assert!(e.contains("a marked image"), "{e}");
        assert_eq!(got[n + 2].as_ref().unwrap(), &want[1], "the request after the faults");
    }

    /// Panics whenever the engine reports a batch's rows: a fault on the engine thread
    /// outside any request's search (a bug), which stops that thread.
    struct PanicOnRows;
    impl EngineMetrics for PanicOnRows {
        fn batch_rows(&self, _rows: usize) {
            panic!("a fault on the engine thread");
        }
    }

    #[test]
    fn an_engine_thread_that_stopped_is_reported_and_later_requests_fail_at_once() {
        for stage in [ImageStage::Inline, ImageStage::Thread] {
            let dir = export("opt-tiny", Target::Portable, &format!("stopped-{stage:?}"));
            let p = Pipeline::load(&dir, &mut session_factory()).unwrap();
            let case = &cases(&p.default_config())[1];
            let (tx, rx) = mpsc::channel();
            let (first, later) = (request(&p, 0, case, &tx), request(&p, 1, case, &tx));
            drop(tx);
            let engine = p.into_engine(options(0, stage), Arc::new(PanicOnRows)).unwrap();
            assert!(engine.is_running());
            engine.submit(first).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while engine.is_running() {
                assert!(std::time::Instant::now() < deadline, "{stage:?}: the engine still runs");
                std::thread::sleep(Duration::from_millis(10));
            }
            // The request the engine thread held hears why.
            let (i, e) = rx.recv_timeout(Duration::from_secs(60)).expect("an answer");
            assert_eq!(i, 0);
            let Event::Failed(e) = e else { panic!("{stage:?}: {e:?}") };
            assert!(e.to_string().contains("a fault on the engine thread"), "{e}");
            match stage {
                // The queue's reader has gone: refused at once.
                ImageStage::Inline => assert!(
                    matches!(engine.submit(later), Err(SubmitError::Stopped)),
                    "{stage:?}: a request after the fault was not refused"
                ),
                // The image stage still takes it, and fails it when it cannot hand it on.
                _ => {
                    engine.submit(later).unwrap();
                    let (i, e) = rx.recv_timeout(Duration::from_secs(60)).expect("an answer");
                    assert_eq!(i, 1);
                    let Event::Failed(e) = e else { panic!("{stage:?}: {e:?}") };
                    assert!(e.to_string().contains("engine thread has stopped"), "{e}");
                }
            }
            engine.shutdown();
        }
    }

    /// Counts the places released in the queue.
    struct Releases(Arc<std::sync::atomic::AtomicUsize>);
    impl EngineMetrics for Releases {
        fn released(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Tells, when its request is done, whether its place in the queue was free by then.
    struct PlaceFreeWhenDone(Arc<std::sync::atomic::AtomicUsize>, mpsc::Sender<bool>);
    impl Sink for PlaceFreeWhenDone {
        fn send(&self, event: Event) {
            if let Event::Done { .. } = event {
                let _ = self.1.send(self.0.load(std::sync::atomic::Ordering::SeqCst) == 1);
            }
        }
    }

    #[test]
    fn a_finished_request_frees_its_queue_place_before_its_client_hears() {
        // A client that sends its next request as soon as the last one is done must not
        // find the queue still full of it (a 503 with max_queue 1).
        let dir = export("opt-tiny", Target::Portable, "place");
        let p = Pipeline::load(&dir, &mut session_factory()).unwrap();
        let (tx, _) = mpsc::channel();
        let mut req = request(&p, 0, &cases(&p.default_config())[1], &tx);
        let released = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (done_tx, done) = mpsc::channel();
        req.sink = Box::new(PlaceFreeWhenDone(released.clone(), done_tx));
        let engine =
            p.into_engine(options(0, ImageStage::Auto), Arc::new(Releases(released))).unwrap();
        engine.submit(req).unwrap();
        let free = done.recv_timeout(Duration::from_secs(60)).expect("the request is done");
        assert!(free, "the client heard Done while the request still held its place");
        engine.shutdown();
    }

    #[test]
    fn shutdown_answers_the_requests_still_in_the_image_stage() {
        let (mut p, cases, want) = loaded(Target::Portable, "image-shutdown");
        // A slow encoder: shutdown comes while the first image is encoded and the others
        // wait in the image stage's queue.
        let (started_tx, started) = mpsc::channel();
        p.model.image_encoders().unwrap().before_each_run(move |_| {
            let _ = started_tx.send(());
            std::thread::sleep(Duration::from_millis(200));
        });
        let (tx, rx) = mpsc::channel();
        let reqs: Vec<Request> =
            cases.iter().enumerate().map(|(i, c)| request(&p, i, c, &tx)).collect();
        let after = request(&p, cases.len(), &cases[1], &tx);
        drop(tx);
        let engine = p.into_engine(options(0, ImageStage::Thread), Arc::new(NoMetrics)).unwrap();
        let mut reqs = reqs.into_iter();
        engine.submit(reqs.next().unwrap()).unwrap();
        started.recv_timeout(Duration::from_secs(60)).expect("the image stage started");
        for r in reqs {
            engine.submit(r).unwrap();
        }
        engine.shutdown();
        // Every request was answered before shutdown returned.
        let got = Outcomes::new(&seqs(&cases)).arrived(&rx);
        assert_exact(&got, &want);
        assert!(
            matches!(engine.submit(after), Err(SubmitError::Closed)),
            "a request after shutdown is refused"
        );
    }
}

/// The admission rule of `--admit-wait-ms`: newcomers wait while batches run, until they
/// hold half as many rows as are running or the first has waited long enough; never when
/// nothing runs, and not at all with no wait.
#[test]
fn newcomers_are_held_only_while_few_and_not_yet_waited_out() {
    use blip2_runtime::engine::holds_newcomers;
    use std::time::Duration;
    let (ms, wait) = (Duration::from_millis, Duration::from_millis(20));
    assert!(holds_newcomers(8, 3, ms(5), wait), "3 rows against 8 running, 5 of 20 ms");
    assert!(!holds_newcomers(8, 4, ms(5), wait), "half the running rows go in");
    assert!(!holds_newcomers(7, 4, ms(5), wait), "half of 7 rounds up to 4");
    assert!(holds_newcomers(7, 3, ms(5), wait));
    assert!(!holds_newcomers(8, 3, ms(20), wait), "waited out");
    assert!(!holds_newcomers(0, 1, ms(0), wait), "nothing runs");
    assert!(!holds_newcomers(1, 1, ms(0), wait), "one running row: any newcomer is half");
    assert!(!holds_newcomers(8, 1, ms(0), Duration::ZERO), "no wait asked for");
}
