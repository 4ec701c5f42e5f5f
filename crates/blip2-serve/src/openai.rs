//! OpenAI's request shapes, and how a request becomes a prompt and search settings.

use blip2_runtime::generation::{self, GenerationConfig};
use blip2_runtime::prompt::{Chat, Prompter};
use serde::Deserialize;

use crate::error::ApiError;

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The parameters both endpoints share (OpenAI's, plus vLLM's extras).
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub length_penalty: Option<f64>,
    pub min_tokens: Option<i64>,
    pub num_beams: Option<i64>,
    /// transformers' `no_repeat_ngram_size` (a blip2-ort extension).
    pub no_repeat_ngram_size: Option<i64>,
    // Accepted at their neutral values only.
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<serde_json::Value>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    /// blip2-ort's extension: the image the prompt is about.
    pub image: Option<ImageUrl>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

impl PromptField {
    pub fn single(self) -> Result<String, ApiError> {
        match self {
            PromptField::One(s) => Ok(s),
            PromptField::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
            PromptField::Many(v) => Err(ApiError::bad_param(
                format!(
                    "one prompt per request (it goes with the request's one image), got {}",
                    v.len()
                ),
                "prompt",
            )),
        }
    }
}

/// A conversation as BLIP-2 sees it: the one image, earlier (question, answer) turns and
/// the question.
#[derive(Debug, PartialEq)]
pub struct Conversation {
    pub image_url: String,
    pub turns: Vec<(String, String)>,
    pub question: String,
}

fn text_of(content: &Option<Content>, images: &mut Vec<String>) -> String {
    match content {
        None => String::new(),
        Some(Content::Text(t)) => t.trim().to_string(),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::new();
            for p in parts {
                match p {
                    Part::Text { text } if !text.trim().is_empty() => {
                        texts.push(text.trim().to_string())
                    }
                    Part::Text { .. } => {}
                    Part::ImageUrl { image_url } => images.push(image_url.url.clone()),
                }
            }
            texts.join(" ")
        }
    }
}

/// Reads the messages: system and developer messages are left out (BLIP-2 has no system
/// prompt); then user and assistant turns alternate, consecutive user messages count as
/// one (their texts joined by a space), and the last message is the user's. Exactly one
/// image, in any user message.
pub fn conversation(messages: &[Message]) -> Result<Conversation, ApiError> {
    let mut images = Vec::new();
    let mut turns: Vec<(String, String)> = Vec::new();
    let mut pending: Option<String> = None;
    for (i, m) in messages.iter().enumerate() {
        match m.role.as_str() {
            "system" | "developer" => {}
            "user" => {
                let t = text_of(&m.content, &mut images);
                pending = Some(match pending.take() {
                    Some(p) if !p.is_empty() && !t.is_empty() => format!("{p} {t}"),
                    Some(p) if t.is_empty() => p,
                    _ => t,
                });
            }
            "assistant" => {
                let mut none = Vec::new();
                let a = text_of(&m.content, &mut none);
                if !none.is_empty() {
                    return Err(ApiError::bad_param(format!("messages[{i}]: an assistant message cannot hold an image"), "messages"));
                }
                let Some(q) = pending.take() else {
                    return Err(ApiError::bad_param(
                        format!("messages[{i}]: an assistant message must follow a user message"),
                        "messages",
                    ));
                };
                turns.push((q, a));
            }
            other => {
                return Err(ApiError::bad_param(
                    format!("messages[{i}]: role {other:?} is not supported (system, user and assistant are)"),
                    "messages",
                ))
            }
        }
    }
    let Some(question) = pending else {
        return Err(ApiError::bad_param("the last message must be the user's", "messages"));
    };
    let image_url = match images.len() {
        1 => images.remove(0),
        0 => {
            return Err(ApiError::bad_param(
                "the conversation has no image; BLIP-2 answers about exactly one image",
                "messages",
            ))
        }
        n => {
            return Err(ApiError::bad_param(
                format!(
                "the conversation has {n} images; at most 1 image per conversation is supported"
            ),
                "messages",
            ))
        }
    };
    Ok(Conversation { image_url, turns, question })
}

/// The prompt for a conversation: an empty question is a plain caption (prompt ""); else
/// the chat format `infer chat` uses, keeping as many of the latest turns as fit the
/// context limit and, with `max_new_tokens`, the language model's positions.
pub fn chat_prompt(
    c: &Conversation,
    prompter: &Prompter,
    max_new_tokens: usize,
) -> Result<String, ApiError> {
    if c.question.is_empty() {
        return Ok(String::new());
    }
    let mut chat = Chat { turns: c.turns.clone() };
    let (prompt, dropped) = chat
        .fit(prompter, &c.question, max_new_tokens)
        .map_err(|e| ApiError::from(e).for_param("messages"))?;
    if dropped > 0 {
        tracing::info!("dropped the {dropped} oldest turn(s) of a conversation to fit the context");
    }
    Ok(prompt)
}

/// The request's search settings over the model's defaults. Unset parameters keep the
/// model's values (its generation_config.json, else transformers' defaults: greedy, 20
/// new tokens), as `infer` does without flags. `temperature` 0 is greedy search; above 0
/// it samples at that temperature. `top_p` and `top_k` only matter when sampling.
pub fn search_settings(
    s: &Sampling,
    defaults: &GenerationConfig,
) -> Result<GenerationConfig, ApiError> {
    let mut cfg = defaults.clone();
    let whole = |v: i64, name: &'static str, min: i64| -> Result<usize, ApiError> {
        if v < min {
            return Err(ApiError::bad_param(
                format!("{name} must be at least {min}, got {v}"),
                name,
            ));
        }
        Ok(v as usize)
    };
    let (tokens, tokens_name) = match (s.max_completion_tokens, s.max_tokens) {
        (Some(v), _) => (Some(v), "max_completion_tokens"),
        (None, Some(v)) => (Some(v), "max_tokens"),
        (None, None) => (None, "max_tokens"),
    };
    if let Some(v) = tokens {
        cfg.max_new_tokens = whole(v, tokens_name, 1)?;
    }
    if let Some(t) = s.temperature {
        if !(t.is_finite() && t >= 0.0) {
            return Err(ApiError::bad_param(
                format!("temperature must be 0 or more, got {t}"),
                "temperature",
            ));
        }
        if t == 0.0 {
            cfg.do_sample = false;
        } else {
            cfg.do_sample = true;
            cfg.temperature = t;
        }
    }
    if let Some(p) = s.top_p {
        cfg.top_p = p;
    }
    if let Some(k) = s.top_k {
        // vLLM's -1 (and 0) mean every token.
        cfg.top_k = if k == -1 { 0 } else { whole(k, "top_k", 0)? };
    }
    if let Some(seed) = s.seed {
        cfg.seed = Some(seed as u64);
    }
    if let Some(n) = s.n {
        cfg.num_return_sequences = whole(n, "n", 1)?;
    }
    if let Some(b) = s.num_beams {
        cfg.num_beams = whole(b, "num_beams", 1)?;
    }
    if let Some(v) = s.repetition_penalty {
        cfg.repetition_penalty = v;
    }
    if let Some(v) = s.length_penalty {
        cfg.length_penalty = v;
    }
    if let Some(v) = s.no_repeat_ngram_size {
        cfg.no_repeat_ngram_size = whole(v, "no_repeat_ngram_size", 0)?;
    }
    if let Some(v) = s.min_tokens {
        cfg.min_new_tokens = whole(v, "min_tokens", 0)?;
    }
    for (v, name) in
        [(s.frequency_penalty, "frequency_penalty"), (s.presence_penalty, "presence_penalty")]
    {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad_param(
                format!("{name} is not supported; use repetition_penalty (transformers' penalty)"),
                name,
            ));
        }
    }
    if s.logprobs.as_ref().is_some_and(|v| {
        !(v.is_null() || v == &serde_json::json!(false) || v == &serde_json::json!(0))
    }) {
        return Err(ApiError::bad_param("logprobs are not supported", "logprobs"));
    }
    if s.top_logprobs.as_ref().is_some_and(|v| !(v.is_null() || v == &serde_json::json!(0))) {
        return Err(ApiError::bad_param("top_logprobs are not supported", "top_logprobs"));
    }
    if s.echo == Some(true) {
        return Err(ApiError::bad_param("echo is not supported", "echo"));
    }
    if s.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::bad_param("best_of is not supported; use num_beams", "best_of"));
    }
    generation::validate(&cfg).map_err(|e| ApiError::from(&e))?;
    Ok(cfg)
}

/// Parameters that take a whole number, and those that take any number, in both endpoints.
const WHOLE_PARAMS: [&str; 9] = [
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "n",
    "top_k",
    "min_tokens",
    "num_beams",
    "no_repeat_ngram_size",
    "best_of",
];
const NUMBER_PARAMS: [&str; 6] = [
    "temperature",
    "top_p",
    "repetition_penalty",
    "length_penalty",
    "frequency_penalty",
    "presence_penalty",
];
const BOOL_PARAMS: [&str; 2] = ["stream", "echo"];

/// A request body as `T`. A parameter of the wrong type (`"max_tokens": "ten"`, `2.5`)
/// gets a 400 naming it (`param`), not serde's byte column; other shape errors keep
/// serde's message.
pub fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(format!("the request body is not valid JSON for this endpoint: {e}"))
    })?;
    if let Some(obj) = v.as_object() {
        for (name, value) in obj {
            if value.is_null() {
                continue;
            }
            let expected = if WHOLE_PARAMS.contains(&name.as_str()) {
                (value.as_i64().is_none()).then_some("a whole number")
            } else if NUMBER_PARAMS.contains(&name.as_str()) {
                (!value.is_number()).then_some("a number")
            } else if BOOL_PARAMS.contains(&name.as_str()) {
                (!value.is_boolean()).then_some("true or false")
            } else {
                None
            };
            if let Some(expected) = expected {
                return Err(ApiError::bad_param(
                    format!("{name} must be {expected}, got {value}"),
                    name,
                ));
            }
        }
    }
    serde_json::from_value(v).map_err(|e| {
        ApiError::bad(format!("the request body is not valid JSON for this endpoint: {e}"))
    })
}

pub fn stop_strings(s: &Sampling) -> Result<Vec<String>, ApiError> {
    let v = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(x)) => vec![x.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if v.len() > 4 {
        return Err(ApiError::bad_param(
            format!("at most 4 stop strings, got {}", v.len()),
            "stop",
        ));
    }
    Ok(v.into_iter().filter(|x| !x.is_empty()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_of_the_wrong_type_is_named() {
        let msgs = r#""messages": [{"role": "user", "content": "hi"}]"#;
        for (param, value) in [
            ("max_tokens", r#""ten""#),
            ("max_tokens", "2.5"),
            ("max_completion_tokens", "[3]"),
            ("n", "1.5"),
            ("seed", "true"),
            ("temperature", r#""hot""#),
            ("stream", "1"),
        ] {
            let body = format!("{{{msgs}, \"{param}\": {value}}}");
            let e = from_json::<ChatRequest>(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert!(e.message.starts_with(param) && !e.message.contains("column"), "{}", e.message);
        }
        let ok = format!("{{{msgs}, \"max_tokens\": 3, \"temperature\": 0.5, \"seed\": null}}");
        let r = from_json::<ChatRequest>(ok.as_bytes()).unwrap();
        assert_eq!((r.sampling.max_tokens, r.sampling.temperature), (Some(3), Some(0.5)));
        let e = from_json::<ChatRequest>(b"{\"messages\": [").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }

    #[test]
    fn min_tokens_over_max_tokens_is_refused_naming_min_tokens() {
        let s: Sampling = serde_json::from_str(r#"{"min_tokens": 50, "max_tokens": 10}"#).unwrap();
        let e = search_settings(&s, &GenerationConfig::default()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("min_tokens"), "{}", e.message);
        assert!(e.message.contains("max_tokens") && !e.message.contains("--"), "{}", e.message);
    }

    fn msgs(v: serde_json::Value) -> Vec<Message> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_conversation_reads_turns_and_its_one_image() {
        let m = msgs(serde_json::json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}, {"type": "text", "text": " what is it? "}]},
            {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": "what color?"}
        ]));
        let c = conversation(&m).unwrap();
        assert_eq!(c.image_url, "data:x");
        assert_eq!(c.turns, vec![("what is it?".to_string(), "a cat".to_string())]);
        assert_eq!(c.question, "what color?");
    }

    #[test]
    fn conversations_that_cannot_be_rendered_are_refused() {
        let img = serde_json::json!({"type": "image_url", "image_url": {"url": "data:x"}});
        for (v, says) in [
            (
                serde_json::json!([{"role": "user", "content": [img.clone(), img.clone()]}]),
                "2 images",
            ),
            (serde_json::json!([{"role": "user", "content": "hi"}]), "no image"),
            (
                serde_json::json!([{"role": "user", "content": [img.clone()]}, {"role": "assistant", "content": "x"}]),
                "last message",
            ),
            (
                serde_json::json!([{"role": "assistant", "content": "x"}, {"role": "user", "content": [img.clone()]}]),
                "must follow",
            ),
            (serde_json::json!([{"role": "tool", "content": "x"}]), "not supported"),
        ] {
            let e = conversation(&msgs(v)).unwrap_err();
            assert_eq!(e.status.as_u16(), 400);
            assert!(e.message.contains(says), "{}", e.message);
        }
    }

    #[test]
    fn settings_map_onto_transformers_names() {
        let d = GenerationConfig::default();
        let s: Sampling = serde_json::from_value(serde_json::json!({"max_tokens": 7, "temperature": 0.5, "top_k": -1, "n": 2, "seed": 3})).unwrap();
        let c = search_settings(&s, &d).unwrap();
        assert_eq!(
            (c.max_new_tokens, c.do_sample, c.temperature, c.top_k, c.num_return_sequences, c.seed),
            (7, true, 0.5, 0, 2, Some(3))
        );
        let greedy: Sampling = serde_json::from_value(
            serde_json::json!({"temperature": 0, "max_completion_tokens": 4, "max_tokens": 9}),
        )
        .unwrap();
        let c = search_settings(&greedy, &d).unwrap();
        assert_eq!((c.do_sample, c.max_new_tokens), (false, 4));
        for (v, param) in [
            (serde_json::json!({"max_tokens": 0}), "max_tokens"),
            (serde_json::json!({"temperature": -1}), "temperature"),
            (serde_json::json!({"top_p": 1.5}), "top_p"),
            (serde_json::json!({"n": 2}), "n"),
            (serde_json::json!({"top_k": -2}), "top_k"),
            (serde_json::json!({"frequency_penalty": 0.5}), "frequency_penalty"),
        ] {
            let s: Sampling = serde_json::from_value(v.clone()).unwrap();
            let e = search_settings(&s, &d).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}: {}", e.message);
        }
    }
}
