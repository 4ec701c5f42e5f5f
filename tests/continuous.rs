//! Continuous batching's pieces, deterministically: rows that join a running OPT batch
//! mid-generation ([`OptState::join`]), rows that leave it (`select_rows`, then
//! [`OptState::compact`] drops positions no row uses any more) and per-row searches
//! ([`RowSearch`]) give every row exactly the tokens it gets alone (`Pipeline::generate`,
//! which the recorded-case tests hold to transformers' `generate()`).

use blip2_ort_suite::{fixture, photo, session_factory, temp_dir};
use blip2_runtime::generation::{GenerationConfig, RowSearch};
use blip2_runtime::model::lm_value;
use blip2_runtime::pipeline::{EmbedCache, Pipeline};
use blip2_runtime::state::opt::OptState;
use blip2_runtime::state::DecoderState;

struct Request {
    image: &'static str,
    prompt: &'static str,
    cfg: GenerationConfig,
}

#[test]
fn rows_joining_and_leaving_a_running_batch_get_their_single_run_tokens() {
    let dir = temp_dir("continuous-join").join("export");
    blip2_export::export(
        &fixture("opt-tiny").join("checkpoint"),
        &dir,
        &Default::default(),
        &mut blip2_export::NoProgress,
    )
    .unwrap();
    let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
    let base = p.default_config();
    let with = |f: &dyn Fn(&mut GenerationConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    // Different prompt lengths, limits and processors; one sampled row.
    let requests = [
        Request {
            image: "rocket.jpg",
            prompt: "a photo of",
            cfg: with(&|c| c.max_new_tokens = 12),
        },
        Request {
            image: "camera.png",
            prompt: "Question: what is in the picture? Answer:",
            cfg: with(&|c| c.max_new_tokens = 5),
        },
        Request {
            image: "chelsea.png",
            prompt: "",
            cfg: with(&|c| {
                c.max_new_tokens = 9;
                c.repetition_penalty = 1.5;
                c.no_repeat_ngram_size = 2
            }),
        },
        Request {
            image: "no_time_for_that_tiny.gif",
            prompt: "a photo of the",
            cfg: with(&|c| {
                c.max_new_tokens = 10;
                c.min_new_tokens = 8
            }),
        },
        Request {
            image: "rocket.jpg",
            prompt: "",
            cfg: with(&|c| {
                c.max_new_tokens = 7;
                c.do_sample = true;
                c.top_k = 5;
                c.seed = Some(11)
            }),
        },
    ];
    // Each alone.
    let alone: Vec<Vec<i64>> = requests
        .iter()
        .map(|r| {
            let img = p.load_image(&photo(r.image)).unwrap();
            p.generate(&[img], &[r.prompt.to_string()], &r.cfg).unwrap()[0][0].token_ids.clone()
        })
        .collect();
    let images: Vec<_> = requests.iter().map(|r| p.load_image(&photo(r.image)).unwrap()).collect();
    let manifest_image = p.model.manifest.image.clone();
    let Pipeline { model, prompter, .. } = p;
    let mut model = model;
    let mut cache = EmbedCache::new(0);
    let eos = base.eos_token_ids.clone();

    // Request r joins the batch before step `join_at[r]`.
    let join_at = [0usize, 0, 2, 4, 6];
    let mut state: Option<OptState> = None;
    // (request, search) per row of the state, in order.
    let mut rows: Vec<(usize, RowSearch)> = Vec::new();
    let mut got: Vec<Option<Vec<i64>>> = vec![None; requests.len()];
    let mut joined_mid_run = 0;
    for step in 0.. {
        let newcomers: Vec<usize> = (0..requests.len()).filter(|&r| join_at[r] == step).collect();
        if !newcomers.is_empty() {
            let px = blip2_runtime::preprocess::preprocess_batch(
                &newcomers.iter().map(|&r| images[r].clone()).collect::<Vec<_>>(),
                &manifest_image,
            )
            .unwrap();
            let texts: Vec<Vec<i64>> =
                newcomers.iter().map(|&r| prompter.text_ids(requests[r].prompt).unwrap()).collect();
            let batch = prompter.assemble(&texts);
            let embeds = {
                let e = cache.embed(&mut model, px).unwrap();
                lm_value(&model, e).unwrap()
            };
            let (new_state, logits) =
                OptState::prefill_last(&mut model, &batch.ids, &batch.mask, embeds).unwrap();
            let prompts = batch.unpadded();
            for (i, &r) in newcomers.iter().enumerate() {
                let prompt = prompts[i].clone();
                let seed = requests[r].cfg.seed.unwrap_or(0);
                let mut s = RowSearch::new(prompt, &requests[r].cfg, seed, 0).unwrap();
                s.pick(logits.row(i));
                rows.push((r, s));
            }
            match state.as_mut() {
                Some(running) if running.rows() > 0 => {
                    running.join(&mut model, new_state).unwrap();
                    joined_mid_run += 1;
                }
                _ => state = Some(new_state),
            }
        }
        // Rows that ended leave; the batch drops positions nobody uses.
        let before = rows.len();
        let mut keep = Vec::new();
        let mut kept = Vec::new();
        for (i, (r, s)) in std::mem::take(&mut rows).into_iter().enumerate() {
            if s.is_finished() {
                got[r] = Some(s.new_tokens());
            } else {
                keep.push(i);
                kept.push((r, s));
            }
        }
        rows = kept;
        if rows.len() < before {
            if rows.is_empty() {
                state = None;
            } else {
                let st = state.as_mut().unwrap();
                st.select_rows(&mut model, &keep).unwrap();
                st.compact(&mut model).unwrap();
            }
        }
        if rows.is_empty() && join_at.iter().all(|&j| j <= step) {
            break;
        }
        if rows.is_empty() {
            continue;
        }
        let tokens: Vec<i64> = rows.iter().map(|(_, s)| s.last().unwrap()).collect();
        let logits = state.as_mut().unwrap().step(&mut model, &tokens).unwrap();
        for (i, (_, s)) in rows.iter_mut().enumerate() {
            s.pick(logits.row(i));
        }
        assert!(step < 100, "generation does not end");
    }
    assert!(joined_mid_run >= 2, "rows joined a running batch {joined_mid_run} times");
    for (r, want) in alone.iter().enumerate() {
        let got = got[r].as_ref().unwrap_or_else(|| panic!("request {r} never finished"));
        assert_eq!(
            got, want,
            "request {r} ({} {:?}): continuous batch vs alone",
            requests[r].image, requests[r].prompt
        );
        assert!(!got.iter().any(|t| eos.contains(t)));
    }
}
