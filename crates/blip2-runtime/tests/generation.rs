//! Parity of the search module with transformers' `generate()`, on the toy language model of
//! scripts/make_generation_fixtures.py (fixtures in tests/fixtures/generation/cases.json).
//!
//! The toy model's logits for the last position are A[x_t] + B[x_{t-1}] + C[p mod P] in f32,
//! where the B term is 0 when x_{t-1} is missing or masked and p counts the attended tokens
//! before x_t. It is rebuilt here exactly, behind the `StepModel` trait.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::path::Path;
use std::sync::OnceLock;

use blip2_runtime::generation::{
    generate, validate, EarlyStopping, GenerationConfig, GenerationError, Prompt, StepModel,
    StepOutput, Want,
};
use ndarray::Array2;
use serde_json::Value;

struct Tables {
    a: Vec<Vec<f32>>,
    b: Vec<Vec<f32>>,
    c: Vec<Vec<f32>>,
}

/// Token ids and attention masks of a prompt set, row by row.
type PromptSet = (Vec<Vec<i64>>, Vec<Vec<i64>>);

struct Fixtures {
    vocab: usize,
    models: HashMap<String, Tables>,
    prompts: HashMap<String, PromptSet>,
    doc: Value,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/generation/cases.json");
        let text = std::fs::read_to_string(path).expect("read the generation fixtures");
        let doc: Value = serde_json::from_str(&text).expect("parse the generation fixtures");
        let table = |v: &Value| -> Vec<Vec<f32>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
                })
                .collect()
        };
        let models = doc["models"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, m)| {
                (k.clone(), Tables { a: table(&m["A"]), b: table(&m["B"]), c: table(&m["C"]) })
            })
            .collect();
        let ids = |v: &Value| -> Vec<Vec<i64>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect())
                .collect()
        };
        let prompts = doc["prompts"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, p)| {
                let i = ids(&p["ids"]);
                let mask = if p["attention_mask"].is_null() {
                    i.iter().map(|r| vec![1; r.len()]).collect()
                } else {
                    ids(&p["attention_mask"])
                };
                (k.clone(), (i, mask))
            })
            .collect();
        Fixtures { vocab: doc["vocab"].as_u64().unwrap() as usize, models, prompts, doc }
    })
}

/// The toy model with its rows of (ids, attention mask).
struct Toy<'a> {
    t: &'a Tables,
    vocab: usize,
    rows: Vec<(Vec<i64>, Vec<i64>)>,
    steps: usize,
    /// Answer steps with only what the search wants, as a model that selects tokens on
    /// its device does; counts those answers.
    device: bool,
    argmax_answers: usize,
    top_k_answers: usize,
    /// Steps answered with sampling's candidates, and full logits asked for afterwards.
    top_logits_answers: usize,
    full_logits_fetches: usize,
    /// Logits rounded to multiples of this (0: exact), which makes ties common.
    grain: f32,
}

impl<'a> Toy<'a> {
    fn new(model: &str, prompts: &str) -> (Self, Vec<Prompt>) {
        let f = fixtures();
        let (ids, masks) = f.prompts[prompts].clone();
        let prompts = ids
            .iter()
            .zip(&masks)
            .map(|(i, m)| Prompt::with_attention_mask(i.clone(), m))
            .collect();
        let rows = ids.into_iter().zip(masks).collect();
        (
            Toy {
                t: &f.models[model],
                vocab: f.vocab,
                rows,
                steps: 0,
                device: false,
                argmax_answers: 0,
                top_k_answers: 0,
                top_logits_answers: 0,
                full_logits_fetches: 0,
                grain: 0.0,
            },
            prompts,
        )
    }

    fn logits_now(&self) -> Array2<f32> {
        let positions = self.t.c.len();
        let mut out = Array2::<f32>::zeros((self.rows.len(), self.vocab));
        for (r, (ids, mask)) in self.rows.iter().enumerate() {
            let n = ids.len();
            let a = &self.t.a[ids[n - 1] as usize];
            let prev = (n >= 2 && mask[n - 2] == 1).then(|| &self.t.b[ids[n - 2] as usize]);
            let pos = mask.iter().sum::<i64>() as usize - 1;
            let c = &self.t.c[pos % positions];
            for v in 0..self.vocab {
                out[[r, v]] = (a[v] + prev.map_or(0.0, |b| b[v])) + c[v];
            }
        }
        if self.grain > 0.0 {
            out.mapv_inplace(|x| (x / self.grain).round() * self.grain);
        }
        out
    }

    /// Each row's `k` largest logits and their ids, best first, ties to the lower id
    /// (ONNX TopK).
    fn top(logits: &Array2<f32>, k: usize) -> (Array2<f32>, Array2<i64>) {
        let rows = logits.nrows();
        let mut values = Array2::<f32>::zeros((rows, k));
        let mut ids = Array2::<i64>::zeros((rows, k));
        for (r, row) in logits.rows().into_iter().enumerate() {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            for (t, &i) in order[..k].iter().enumerate() {
                values[[r, t]] = row[i];
                ids[[r, t]] = i as i64;
            }
        }
        (values, ids)
    }
}

impl StepModel for Toy<'_> {
    type Error = Infallible;

    fn step(&mut self, tokens: &[i64]) -> Result<Array2<f32>, Infallible> {
        assert_eq!(tokens.len(), self.rows.len(), "one token per row");
        for ((ids, mask), &t) in self.rows.iter_mut().zip(tokens) {
            ids.push(t);
            mask.push(1);
        }
        self.steps += 1;
        Ok(self.logits_now())
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<(), Infallible> {
        self.rows = rows.iter().map(|&r| self.rows[r].clone()).collect();
        Ok(())
    }

    fn step_for(&mut self, tokens: &[i64], want: Want) -> Result<StepOutput, Infallible> {
        let logits = self.step(tokens)?;
        if !self.device {
            return Ok(StepOutput::Logits(logits));
        }
        Ok(match want {
            Want::Logits => StepOutput::Logits(logits),
            Want::Argmax => {
                self.argmax_answers += 1;
                // The first index among equal maxima, as ONNX ArgMax and torch.argmax.
                let pick = |row: ndarray::ArrayView1<f32>| {
                    row.iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |m, (i, &x)| if x > m.1 { (i, x) } else { m })
                        .0 as i64
                };
                StepOutput::Argmax(logits.rows().into_iter().map(pick).collect())
            }
            Want::TopLogProbs(k) => {
                self.top_k_answers += 1;
                let rows = logits.nrows();
                let mut logprobs = Array2::<f32>::zeros((rows, k));
                let mut ids = Array2::<i64>::zeros((rows, k));
                for (r, row) in logits.rows().into_iter().enumerate() {
                    // log-softmax in f32 with an f64 sum, as the host search computes it.
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f64 = row.iter().map(|&x| f64::from((x - max).exp())).sum();
                    let lp: Vec<f32> = row.iter().map(|&x| (x - max) - (sum as f32).ln()).collect();
                    let mut order: Vec<usize> = (0..lp.len()).collect();
                    // Best first, ties to the lower id (ONNX TopK).
                    order.sort_by(|&a, &b| lp[b].partial_cmp(&lp[a]).unwrap().then(a.cmp(&b)));
                    for (t, &i) in order[..k].iter().enumerate() {
                        logprobs[[r, t]] = lp[i];
                        ids[[r, t]] = i as i64;
                    }
                }
                StepOutput::TopLogProbs { logprobs, ids }
            }
            Want::TopLogits(k) => {
                self.top_logits_answers += 1;
                let (logits, ids) = Self::top(&logits, k);
                StepOutput::TopLogits { logits, ids }
            }
        })
    }

    fn last_logits(&mut self) -> Option<Result<Array2<f32>, Infallible>> {
        self.full_logits_fetches += 1;
        Some(Ok(self.logits_now()))
    }
}

/// transformers' generate kwargs (as recorded) to our config.
fn config(v: &Value) -> GenerationConfig {
    let mut c = GenerationConfig::default();
    let o = v.as_object().unwrap();
    for (k, x) in o {
        match k.as_str() {
            "max_new_tokens" => c.max_new_tokens = x.as_u64().unwrap() as usize,
            "min_new_tokens" => c.min_new_tokens = x.as_u64().unwrap() as usize,
            "num_beams" => c.num_beams = x.as_u64().unwrap() as usize,
            "length_penalty" => c.length_penalty = x.as_f64().unwrap(),
            "early_stopping" => {
                c.early_stopping = match x {
                    Value::Bool(b) => EarlyStopping::from(*b),
                    Value::String(s) => s.parse().unwrap(),
                    _ => panic!("early_stopping {x}"),
                }
            }
            "repetition_penalty" => c.repetition_penalty = x.as_f64().unwrap(),
            "no_repeat_ngram_size" => c.no_repeat_ngram_size = x.as_u64().unwrap() as usize,
            "do_sample" => c.do_sample = x.as_bool().unwrap(),
            "temperature" => c.temperature = x.as_f64().unwrap(),
            "top_k" => c.top_k = x.as_u64().unwrap() as usize,
            "top_p" => c.top_p = x.as_f64().unwrap(),
            "num_return_sequences" => c.num_return_sequences = x.as_u64().unwrap() as usize,
            "eos_token_id" => {
                c.eos_token_ids = match x {
                    Value::Array(a) => a.iter().map(|e| e.as_i64().unwrap()).collect(),
                    _ => vec![x.as_i64().unwrap()],
                }
            }
            "pad_token_id" => c.pad_token_id = Some(x.as_i64().unwrap()),
            other => panic!("fixture uses a setting the test does not map: {other}"),
        }
    }
    c
}

fn run(model: &str, prompts: &str, cfg: &GenerationConfig) -> (Vec<Vec<Vec<i64>>>, usize) {
    let (out, toy) = run_on(model, prompts, cfg, false);
    (out, toy.steps)
}

/// Runs a case on the toy model, which selects tokens itself when `device` is set.
fn run_on<'a>(
    model: &str,
    prompts: &str,
    cfg: &GenerationConfig,
    device: bool,
) -> (Vec<Vec<Vec<i64>>>, Toy<'a>) {
    let (mut toy, prompts) = Toy::new(model, prompts);
    toy.device = device;
    let first = toy.logits_now();
    let out = generate(&mut toy, &prompts, first, cfg).expect("generate");
    (out, toy)
}

#[test]
fn selection_on_the_model_side_matches_transformers() {
    // Every recorded case again, with a model that answers a step with only the argmax or
    // the top-k log-probabilities when the search asks for them (as CUDA-target exports
    // do on the GPU): the same sequences, and those answers were actually used.
    let (mut argmax, mut top_k) = (0, 0);
    let mut failures = Vec::new();
    for case in fixtures().doc["cases"].as_array().unwrap() {
        let cfg = config(&case["config"]);
        let (got, toy) =
            run_on(case["model"].as_str().unwrap(), case["prompts"].as_str().unwrap(), &cfg, true);
        if got != expected(&case["expected"]) {
            failures.push(case["name"].as_str().unwrap().to_string());
        }
        argmax += toy.argmax_answers;
        top_k += toy.top_k_answers;
    }
    assert!(failures.is_empty(), "cases that differ with model-side selection: {failures:?}");
    assert!(
        argmax > 0 && top_k > 0,
        "model-side selection unused: {argmax} argmax, {top_k} top-k answers"
    );
}

#[test]
fn sampling_from_the_models_candidates_draws_what_the_full_logits_draw() {
    // A model that answers sampling steps with only its top-k logits (as CUDA-target
    // exports do) must give exactly the tokens sampling from the full logits gives, for
    // every seed: temperature, top-k with its ties, top-p and the minimum length's eos
    // ban are applied to the candidates as to the full scores. With coarse logits ties at
    // the candidates' edge are common; then the search asks for the full logits.
    let configs = [
        GenerationConfig { top_k: 5, ..sampling_cfg(0) },
        GenerationConfig { top_k: 3, temperature: 0.7, top_p: 0.8, ..sampling_cfg(0) },
        GenerationConfig {
            top_k: 8,
            temperature: 1.3,
            top_p: 0.9,
            min_new_tokens: 4,
            ..sampling_cfg(0)
        },
        GenerationConfig { top_k: 1, num_return_sequences: 1, ..sampling_cfg(0) },
        GenerationConfig {
            top_k: 30,
            top_p: 0.95,
            eos_token_ids: vec![2, 5],
            min_new_tokens: 2,
            ..sampling_cfg(0)
        },
    ];
    let (mut answers, mut fetches) = ([0usize; 2], [0usize; 2]);
    for (g, grain) in [0.0f32, 0.5].into_iter().enumerate() {
        for cfg in &configs {
            for model in ["plain", "eosy", "flat", "stoppy"] {
                for seed in 0..12 {
                    let cfg = GenerationConfig { seed: Some(seed), ..cfg.clone() };
                    let run_with = |device: bool| {
                        let (mut toy, prompts) = Toy::new(model, "batch3");
                        toy.device = device;
                        toy.grain = grain;
                        let first = toy.logits_now();
                        let out = generate(&mut toy, &prompts, first, &cfg).expect("generate");
                        (out, toy.top_logits_answers, toy.full_logits_fetches)
                    };
                    let (full, ..) = run_with(false);
                    let (picked, n, f) = run_with(true);
                    assert_eq!(picked, full, "{model}, grain {grain}, {cfg:?}");
                    answers[g] += n;
                    fetches[g] += f;
                }
            }
        }
    }
    assert!(answers[0] > 0 && answers[1] > 0, "candidates never asked for: {answers:?}");
    assert!(fetches[1] > 0, "ties never sent the search to the full logits");
    assert!(
        fetches[0] < answers[0] / 10,
        "exact logits fell back too often: {fetches:?} of {answers:?}"
    );
}

fn expected(v: &Value) -> Vec<Vec<Vec<i64>>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn cases_matching(prefix: &str) -> Vec<&'static Value> {
    fixtures().doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with(prefix))
        .collect()
}

/// Runs every recorded case whose name starts with `prefix`; reports all mismatches at once.
fn check_cases(prefix: &str) {
    let cases = cases_matching(prefix);
    assert!(!cases.is_empty(), "no fixture cases named {prefix}*");
    let mut failures = Vec::new();
    for case in &cases {
        let cfg = config(&case["config"]);
        let (got, steps) =
            run(case["model"].as_str().unwrap(), case["prompts"].as_str().unwrap(), &cfg);
        let want = expected(&case["expected"]);
        if got != want {
            failures.push(format!(
                "{}:\n  transformers {want:?}\n  ours         {got:?}",
                case["name"]
            ));
        }
        // The search must stop when transformers' does: its forward calls are the prefill
        // plus one per step.
        let calls = case["forward_calls"].as_u64().unwrap() as usize;
        if steps + 1 != calls {
            failures.push(format!(
                "{}: {steps} model steps, transformers made {} after the prefill",
                case["name"],
                calls - 1
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn fixtures_come_from_transformers_5() {
    // The recorded cases were made by the transformers that scripts/requirements-fixtures.txt
    // pins (a 5.x), so remaking them with the pinned packages gives the same file.
    let f = fixtures();
    let made_with = f.doc["transformers"].as_str().unwrap();
    let reqs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/requirements-fixtures.txt"),
    )
    .unwrap();
    let pinned = reqs
        .lines()
        .find_map(|l| l.trim().strip_prefix("transformers=="))
        .expect("transformers pinned in scripts/requirements-fixtures.txt");
    assert_eq!(made_with, pinned, "the fixtures' transformers and the pinned one");
    assert!(made_with.starts_with("5."), "{made_with}");
    assert!(f.doc["cases"].as_array().unwrap().len() > 100);
}

#[test]
fn toy_model_prefill_is_exact() {
    // The first greedy pick of every prompt set must be the argmax of our prefill logits, and
    // that must equal transformers' first token.
    let cases = cases_matching("greedy_eos_");
    assert!(!cases.is_empty(), "no greedy_eos_ case recorded");
    for case in cases {
        let (toy, _) = Toy::new(case["model"].as_str().unwrap(), case["prompts"].as_str().unwrap());
        let logits = toy.logits_now();
        for (r, want) in expected(&case["expected"]).iter().enumerate() {
            let row = logits.row(r);
            let arg = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as i64;
            assert_eq!(want[0].first().copied().unwrap_or(2), arg, "{} row {r}", case["name"]);
        }
    }
}

#[test]
fn greedy_matches_transformers() {
    check_cases("greedy_");
}

#[test]
fn deterministic_sampling_matches_transformers() {
    // top_k=1 / tiny top_p leave a single token, so torch's RNG cannot matter; this checks the
    // expansion by num_return_sequences and the warpers' place in the pipeline.
    check_cases("sample_");
}

#[test]
fn beam_search_plain_matches_transformers() {
    check_cases("beam_plain_");
}

#[test]
fn beam_search_eos_heavy_matches_transformers() {
    check_cases("beam_eosy_");
}

#[test]
fn beam_search_flat_matches_transformers() {
    check_cases("beam_flat_");
}

#[test]
fn beam_search_early_stopping_matches_transformers() {
    // eos is often best here: the finished store fills within a few steps, so these cases stop
    // early on the early_stopping rules (heuristic, True, "never").
    check_cases("beam_stoppy_");
}

#[test]
fn beam_search_with_processors_matches_transformers() {
    for prefix in [
        "beam_no_eos",
        "beam_default_length",
        "beam_two_eos",
        "beam_lp0",
        "beam_rep",
        "beam_ngram",
        "beam_min_new",
        "beam_long",
    ] {
        check_cases(prefix);
    }
}

#[test]
fn sampling_keeps_the_tokens_transformers_warpers_keep() {
    // For each recorded setting: the tokens that survive temperature, top-k, top-p (and the
    // penalties) at the first step in transformers. Sampling one token with many seeds must hit
    // exactly that set: never a dropped token, and every kept one eventually.
    let f = fixtures();
    for k in f.doc["kept_sets"].as_array().unwrap() {
        let mut cfg = config(&k["config"]);
        cfg.do_sample = true;
        cfg.max_new_tokens = 1;
        let rows = k["rows"].as_array().unwrap();
        let min_prob = rows.iter().map(|r| r["min_prob"].as_f64().unwrap()).fold(1.0, f64::min);
        let draws = ((40.0 / min_prob).ceil() as u64).clamp(50, 3000);
        let mut seen: Vec<BTreeSet<i64>> = vec![BTreeSet::new(); rows.len()];
        for seed in 0..draws {
            cfg.seed = Some(seed);
            let (out, _) = run(k["model"].as_str().unwrap(), k["prompts"].as_str().unwrap(), &cfg);
            for (r, group) in out.iter().enumerate() {
                seen[r].insert(group[0][0]);
            }
        }
        for (r, row) in rows.iter().enumerate() {
            let want: BTreeSet<i64> =
                row["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
            assert_eq!(seen[r], want, "kept set of row {r} for {}", k["config"]);
        }
    }
}

fn sampling_cfg(seed: u64) -> GenerationConfig {
    GenerationConfig {
        do_sample: true,
        top_k: 0,
        max_new_tokens: 12,
        seed: Some(seed),
        num_return_sequences: 2,
        eos_token_ids: vec![2],
        pad_token_id: Some(0),
        ..Default::default()
    }
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let (a, _) = run("flat", "batch3", &sampling_cfg(11));
    let (b, _) = run("flat", "batch3", &sampling_cfg(11));
    assert_eq!(a, b);
    let (c, _) = run("flat", "batch3", &sampling_cfg(12));
    assert_ne!(a, c, "different seeds should sample differently");
    // the two samples of one prompt are independent draws
    assert_ne!(a[0][0], a[0][1]);
    assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 2]);
}

#[test]
fn beam_sampling_is_reproducible_per_seed() {
    let cfg =
        |seed| GenerationConfig { num_beams: 3, num_return_sequences: 3, ..sampling_cfg(seed) };
    let (a, _) = run("flat", "batch2", &cfg(5));
    let (b, _) = run("flat", "batch2", &cfg(5));
    assert_eq!(a, b);
    assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3]);
    let outs: BTreeSet<_> = (0..6).map(|s| run("flat", "batch2", &cfg(s)).0).collect();
    assert!(outs.len() > 1, "beam sampling ignores the seed");
    // top_k=1 keeps 2 tokens per beam (eos count + 1), fewer than the 6 candidates drawn;
    // transformers fills up with zero-probability ones and so must we.
    let narrow = GenerationConfig { top_k: 1, ..cfg(1) };
    let (n, _) = run("plain", "batch2", &narrow);
    assert_eq!(n.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3]);
}

#[test]
fn sampling_frequencies_follow_the_softmax() {
    let (toy, _) = Toy::new("flat", "one");
    let logits = toy.logits_now();
    let row: Vec<f64> = logits.row(0).iter().map(|&x| f64::from(x)).collect();
    let max = row.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
    let n = 4000;
    let mut counts = vec![0usize; row.len()];
    let mut cfg =
        GenerationConfig { do_sample: true, top_k: 0, max_new_tokens: 1, ..Default::default() };
    for seed in 0..n {
        cfg.seed = Some(seed);
        let (out, _) = run("flat", "one", &cfg);
        counts[out[0][0][0] as usize] += 1;
    }
    for (t, &c) in counts.iter().enumerate() {
        let p = (row[t] - max).exp() / z;
        let freq = c as f64 / n as f64;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((freq - p).abs() < 5.0 * sd + 1e-3, "token {t}: frequency {freq}, probability {p}");
    }
}

#[test]
fn top_k_one_sampling_equals_greedy() {
    for (model, prompts) in [("plain", "batch3"), ("eosy", "batch2"), ("flat", "placeholders")] {
        let greedy = GenerationConfig {
            max_new_tokens: 10,
            eos_token_ids: vec![2],
            repetition_penalty: 1.2,
            no_repeat_ngram_size: 3,
            ..Default::default()
        };
        let (g, _) = run(model, prompts, &greedy);
        for seed in 0..3 {
            let sample = GenerationConfig {
                do_sample: true,
                top_k: 1,
                temperature: 0.8,
                seed: Some(seed),
                num_return_sequences: 2,
                ..greedy.clone()
            };
            let (s, _) = run(model, prompts, &sample);
            for (gi, si) in g.iter().zip(&s) {
                assert_eq!(
                    si,
                    &vec![gi[0].clone(), gi[0].clone()],
                    "{model}/{prompts} seed {seed}"
                );
            }
        }
    }
}

#[test]
fn validation_names_the_flag() {
    let bad: Vec<(GenerationConfig, &str)> = vec![
        (
            GenerationConfig { num_beams: 2, num_return_sequences: 3, ..Default::default() },
            "--num-return-sequences",
        ),
        (
            GenerationConfig { num_return_sequences: 2, ..Default::default() },
            "--num-return-sequences",
        ),
        (
            GenerationConfig { num_return_sequences: 0, ..Default::default() },
            "--num-return-sequences",
        ),
        (GenerationConfig { num_beams: 0, ..Default::default() }, "--num-beams"),
        (GenerationConfig { max_new_tokens: 0, ..Default::default() }, "--max-new-tokens"),
        (
            GenerationConfig { do_sample: true, temperature: 0.0, ..Default::default() },
            "--temperature",
        ),
        (
            GenerationConfig { do_sample: true, temperature: -1.0, ..Default::default() },
            "--temperature",
        ),
        (GenerationConfig { do_sample: true, top_p: 0.0, ..Default::default() }, "--top-p"),
        (GenerationConfig { do_sample: true, top_p: 1.5, ..Default::default() }, "--top-p"),
        (GenerationConfig { do_sample: true, top_p: f64::NAN, ..Default::default() }, "--top-p"),
        (
            GenerationConfig { repetition_penalty: 0.0, ..Default::default() },
            "--repetition-penalty",
        ),
        // Sampling-only values are checked without sampling too (transformers only warns
        // and ignores them): a bad value never passes silently.
        (GenerationConfig { top_p: 3.0, ..Default::default() }, "--top-p"),
        (GenerationConfig { temperature: 0.0, ..Default::default() }, "--temperature"),
        (
            GenerationConfig { length_penalty: f64::INFINITY, ..Default::default() },
            "--length-penalty",
        ),
    ];
    for (cfg, flag) in bad {
        let err = validate(&cfg).expect_err(&format!("{cfg:?} should be rejected"));
        assert_eq!(err.setting.flag(), flag, "{err}");
        assert!(err.to_string().starts_with(flag));
        // generate refuses before touching the model
        let (mut toy, prompts) = Toy::new("plain", "one");
        let first = toy.logits_now();
        match generate(&mut toy, &prompts, first, &cfg) {
            Err(GenerationError::Config(e)) => assert_eq!(e.setting.flag(), flag),
            other => panic!("expected a config error for {flag}, got {other:?}"),
        }
        assert_eq!(toy.steps, 0);
    }
    // what transformers accepts, we accept
    let good = [
        GenerationConfig::default(),
        GenerationConfig {
            num_beams: 4,
            num_return_sequences: 4,
            early_stopping: EarlyStopping::Never,
            ..Default::default()
        },
        GenerationConfig {
            do_sample: true,
            num_return_sequences: 5,
            top_p: 1.0,
            ..Default::default()
        },
    ];
    for cfg in good {
        validate(&cfg).unwrap_or_else(|e| panic!("{cfg:?} rejected: {e}"));
    }
    assert_eq!("never".parse::<EarlyStopping>().unwrap(), EarlyStopping::Never);
    assert_eq!("True".parse::<EarlyStopping>().unwrap(), EarlyStopping::True);
    assert_eq!("maybe".parse::<EarlyStopping>().unwrap_err().setting.flag(), "--early-stopping");
}

#[test]
fn defaults_are_transformers_defaults() {
    let d = GenerationConfig::default();
    assert_eq!(
        (d.max_new_tokens, d.num_beams, d.top_k, d.num_return_sequences, d.do_sample),
        (20, 1, 50, 1, false)
    );
    assert_eq!(
        (d.temperature, d.top_p, d.repetition_penalty, d.length_penalty),
        (1.0, 1.0, 1.0, 1.0)
    );
    assert_eq!(d.early_stopping, EarlyStopping::False);
    assert_eq!((d.min_new_tokens, d.no_repeat_ngram_size), (0, 0));
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = GenerationConfig::default();
    let (mut toy, prompts) = Toy::new("plain", "batch2");
    // logits for one row, two prompts
    let first = toy.logits_now().slice(ndarray::s![..1, ..]).to_owned();
    assert!(matches!(generate(&mut toy, &prompts, first, &cfg), Err(GenerationError::Input(_))));
    // ragged prompts
    let ragged = vec![Prompt::new(vec![1, 2, 3]), Prompt::new(vec![1, 2])];
    let first = Array2::<f32>::zeros((2, 32));
    assert!(matches!(generate(&mut toy, &ragged, first, &cfg), Err(GenerationError::Input(_))));
    // a vocabulary too small for the beam candidates
    let tiny = vec![Prompt::new(vec![0])];
    let beams = GenerationConfig { num_beams: 2, eos_token_ids: vec![0, 1], ..Default::default() };
    assert!(matches!(
        generate(&mut toy, &tiny, Array2::zeros((1, 2)), &beams),
        Err(GenerationError::Input(_))
    ));
    // no prompts: nothing to do
    assert_eq!(
        generate(&mut toy, &[], Array2::zeros((0, 32)), &cfg).unwrap(),
        Vec::<Vec<Vec<i64>>>::new()
    );
}

/// A model that answers with the wrong vocabulary size after the prefill.
struct Wrong;

impl StepModel for Wrong {
    type Error = std::io::Error;
    fn step(&mut self, tokens: &[i64]) -> Result<Array2<f32>, std::io::Error> {
        Ok(Array2::zeros((tokens.len(), 7)))
    }
    fn select_rows(&mut self, _rows: &[usize]) -> Result<(), std::io::Error> {
        Err(std::io::Error::other("cannot reorder"))
    }
}

#[test]
fn model_shape_and_errors_surface() {
    let p = vec![Prompt::new(vec![3, 4])];
    let mut first = Array2::<f32>::zeros((1, 5));
    first[[0, 1]] = 1.0;
    let cfg = GenerationConfig { max_new_tokens: 3, ..Default::default() };
    match generate(&mut Wrong, &p, first.clone(), &cfg) {
        Err(GenerationError::LogitsShape { expected, got }) => {
            assert_eq!((expected, got), ((1, 5), (1, 7)))
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    let beams = GenerationConfig { num_beams: 2, ..cfg };
    match generate(&mut Wrong, &p, first, &beams) {
        Err(GenerationError::Model(e)) => assert_eq!(e.to_string(), "cannot reorder"),
        other => panic!("expected the model's error, got {other:?}"),
    }
}

/// The observer the server streams from: it hears every token of greedy and sampled
/// sequences as they are picked (the eos left out), and ending one sequence early leaves
/// every other sequence exactly as transformers made it.
#[test]
fn an_observer_hears_every_token_and_ends_only_its_own_sequence() {
    let mut checked = 0;
    for case in fixtures().doc["cases"].as_array().unwrap() {
        let cfg = config(&case["config"]);
        if cfg.num_beams > 1 {
            continue;
        }
        let want = expected(&case["expected"]);
        // Heard tokens per (prompt, sequence), and sequence (0, 0) ended after 2 tokens.
        let mut heard: std::collections::BTreeMap<(usize, usize), Vec<i64>> = Default::default();
        let (mut toy, prompts) =
            Toy::new(case["model"].as_str().unwrap(), case["prompts"].as_str().unwrap());
        let first = toy.logits_now();
        let got = blip2_runtime::generation::generate_observed(
            &mut toy,
            &prompts,
            first,
            &cfg,
            &mut |p, s, t| {
                let h = heard.entry((p, s)).or_default();
                h.push(t);
                !(p == 0 && s == 0 && h.len() == 2)
            },
        )
        .expect("generate");
        let name = case["name"].as_str().unwrap();
        for (p, seqs) in want.iter().enumerate() {
            for (s, w) in seqs.iter().enumerate() {
                let ended_early = p == 0 && s == 0 && w.len() > 2;
                let w: &[i64] = if ended_early { &w[..2] } else { w };
                assert_eq!(got[p][s], w, "{name}: prompt {p} sequence {s}");
                assert_eq!(
                    heard.get(&(p, s)).map_or(&[][..], |h| &h[..]),
                    w,
                    "{name}: tokens heard for prompt {p} sequence {s}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked > 3, "only {checked} greedy or sampled cases");
}

/// Beam search streams nothing until it ends, so a server asks it between steps whether
/// its clients are still there: told no, it stops at once (no further model step),
/// and told yes throughout, it is the recorded search.
#[test]
fn beam_search_stops_when_no_one_wants_it() {
    let cases: Vec<_> = cases_matching("beam_plain_")
        .into_iter()
        .filter(|c| c["forward_calls"].as_u64().unwrap() > 3)
        .collect();
    assert!(!cases.is_empty(), "no beam case of more than two steps");
    for case in cases {
        let cfg = config(&case["config"]);
        let name = case["name"].as_str().unwrap();
        for give_up_after in [0usize, 1] {
            let (mut toy, prompts) =
                Toy::new(case["model"].as_str().unwrap(), case["prompts"].as_str().unwrap());
            let first = toy.logits_now();
            let mut asked = 0;
            blip2_runtime::generation::generate_while(
                &mut toy,
                &prompts,
                first,
                &cfg,
                &mut |_, _, _| true,
                &mut || {
                    asked += 1;
                    asked <= give_up_after
                },
            )
            .expect("generate");
            assert_eq!(toy.steps, give_up_after, "{name}: steps after {give_up_after} yes");
        }
        let (mut toy, prompts) =
            Toy::new(case["model"].as_str().unwrap(), case["prompts"].as_str().unwrap());
        let first = toy.logits_now();
        let got = blip2_runtime::generation::generate_while(
            &mut toy,
            &prompts,
            first,
            &cfg,
            &mut |_, _, _| true,
            &mut || true,
        )
        .expect("generate");
        assert_eq!(got, expected(&case["expected"]), "{name}");
        assert_eq!(toy.steps + 1, case["forward_calls"].as_u64().unwrap() as usize, "{name}");
    }
}
