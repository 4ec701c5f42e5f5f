//! Prompt assembly as transformers 5's `Blip2Processor` does it: `num_query_tokens`
//! image tokens, then the tokenizer's output for the prompt (for OPT: BOS, then the
//! text), left-padded across a batch between the image tokens and the text. Also the
//! VQA and chat templates, and keeping a chat within the context limit.

use std::path::Path;

use blip2_core::{Manifest, PromptTemplates};
use tokenizers::Tokenizer;

use crate::error::RuntimeError;
use crate::generation::{Message, Setting};

pub struct Prompter {
    tokenizer: Tokenizer,
    pub image_token_id: i64,
    pub num_query_tokens: usize,
    pub pad_token_id: i64,
    /// The manifest's context limit for a prompt, image tokens included.
    pub max_context: usize,
    /// The language model's positions: a prompt and its new tokens together get no more.
    pub max_positions: usize,
    pub templates: PromptTemplates,
}

/// Token ids and attention mask of a batch, rows padded to one length.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub ids: Vec<Vec<i64>>,
    pub mask: Vec<Vec<i64>>,
}

impl Batch {
    /// Each row's tokens as it is alone: the padding (mask 0) taken out.
    pub fn unpadded(&self) -> Vec<Vec<i64>> {
        unpadded(&self.ids, &self.mask)
    }
}

/// Each row of `ids` without the positions `mask` hides (its padding).
pub fn unpadded(ids: &[Vec<i64>], mask: &[Vec<i64>]) -> Vec<Vec<i64>> {
    ids.iter()
        .zip(mask)
        .map(|(ids, m)| ids.iter().zip(m).filter(|(_, &m)| m != 0).map(|(&i, _)| i).collect())
        .collect()
}

impl Prompter {
    pub fn load(dir: &Path, m: &Manifest) -> Result<Self, RuntimeError> {
        let path = dir.join(&m.tokenizer_file);
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| RuntimeError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        Ok(Self {
            tokenizer,
            image_token_id: m.tokens.image_token_id,
            num_query_tokens: m.num_query_tokens,
            pad_token_id: m.tokens.pad_token_id.unwrap_or(1),
            max_context: m.text.max_context,
            max_positions: m.text.max_position_embeddings,
            templates: m.prompts.clone(),
        })
    }

    /// The tokenizer's ids for `text`, special tokens included (OPT: BOS first).
    pub fn text_ids(&self, text: &str) -> Result<Vec<i64>, RuntimeError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| RuntimeError::Input(format!("cannot tokenize the prompt: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Tokens a prompt takes in the language model, image tokens included.
    pub fn prompt_len(&self, text: &str) -> Result<usize, RuntimeError> {
        Ok(self.num_query_tokens + self.text_ids(text)?.len())
    }

    /// Checks a prompt fits the context limit, with an error that says by how much not.
    pub fn check_fits(&self, text: &str) -> Result<Vec<i64>, RuntimeError> {
        let ids = self.text_ids(text)?;
        let total = self.num_query_tokens + ids.len();
        if total > self.max_context {
            return Err(RuntimeError::Input(format!(
                "the prompt is {} tokens ({} image tokens + {} text tokens), over the model's context limit of {}; \
                 shorten it",
                total,
                self.num_query_tokens,
                ids.len(),
                self.max_context
            )));
        }
        Ok(ids)
    }

    /// Image tokens, then each row's text ids left-padded to the longest.
    pub fn assemble(&self, texts: &[Vec<i64>]) -> Batch {
        let longest = texts.iter().map(Vec::len).max().unwrap_or(0);
        let mut batch = Batch { ids: Vec::new(), mask: Vec::new() };
        for t in texts {
            let pad = longest - t.len();
            let mut ids = vec![self.image_token_id; self.num_query_tokens];
            ids.extend(std::iter::repeat_n(self.pad_token_id, pad));
            ids.extend_from_slice(t);
            let mut mask = vec![1i64; self.num_query_tokens];
            mask.extend(std::iter::repeat_n(0, pad));
            mask.extend(std::iter::repeat_n(1, t.len()));
            batch.ids.push(ids);
            batch.mask.push(mask);
        }
        batch
    }

    /// Text of new tokens, special tokens skipped and whitespace trimmed (as
    /// `batch_decode(..., skip_special_tokens=True)` then `.strip()`).
    pub fn decode(&self, ids: &[i64]) -> Result<String, RuntimeError> {
        Ok(self.decode_untrimmed(ids)?.trim().to_string())
    }

    /// [`Prompter::decode`] without the trim: what a stream decodes a window of its
    /// tokens with.
    pub fn decode_untrimmed(&self, ids: &[i64]) -> Result<String, RuntimeError> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| RuntimeError::Input(format!("cannot decode tokens: {e}")))
    }

    /// The ids among `ids` that the tokenizer has no token for: [`Prompter::decode`]
    /// leaves them out of the text. A checkpoint whose tokenizer is smaller than its
    /// language model's vocabulary (the random-weight ones made for tests and benchmarks)
    /// generates such ids.
    pub fn unknown_ids(&self, ids: &[i64]) -> Vec<i64> {
        ids.iter()
            .copied()
            .filter(|&i| {
                u32::try_from(i).ok().and_then(|i| self.tokenizer.id_to_token(i)).is_none()
            })
            .collect()
    }

    /// Tokens the tokenizer knows, added tokens included.
    pub fn tokenizer_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Checks that a prompt of `len` tokens (image tokens and padding included) leaves
    /// room for `max_new_tokens` within the language model's positions.
    pub fn check_room(&self, len: usize, max_new_tokens: usize) -> Result<(), RuntimeError> {
        if len + max_new_tokens > self.max_positions {
            return Err(RuntimeError::Room(
                Message::default()
                    .text(format!("the prompt ({len} tokens) plus "))
                    .name(Setting::MaxNewTokens)
                    .text(format!(
                        " {max_new_tokens} exceeds the language model's {} positions",
                        self.max_positions
                    )),
            ));
        }
        Ok(())
    }

    pub fn vqa_prompt(&self, question: &str) -> String {
        self.templates.vqa.replace("{}", question.trim())
    }
}

/// A chat about one image: earlier turns, and the prompt for the next question.
#[derive(Debug, Default, Clone)]
pub struct Chat {
    pub turns: Vec<(String, String)>,
}

impl Chat {
    /// Earlier turns as `Question: {q} Answer: {a}.` joined by spaces, then
    /// ` Question: {q} Answer:` (just `Question: {q} Answer:` on the first turn).
    pub fn prompt(&self, t: &PromptTemplates, question: &str) -> String {
        let mut parts: Vec<String> = self
            .turns
            .iter()
            .map(|(q, a)| t.chat_turn.replace("{q}", q).replace("{a}", a))
            .collect();
        parts.push(t.chat_question.replace("{q}", question));
        parts.join(" ")
    }

    /// The prompt for `question` with as many of the latest turns as fit: the prompt within
    /// the context limit, and the prompt plus `max_new_tokens` within the language model's
    /// positions (the checks [`Prompter::check_fits`] and the pipeline make). Drops the
    /// older turns and returns the prompt with their number. When the question does not
    /// fit even alone, the error says so and the history is left as it was.
    pub fn fit(
        &mut self,
        p: &Prompter,
        question: &str,
        max_new_tokens: usize,
    ) -> Result<(String, usize), RuntimeError> {
        let fits = |len: usize| len <= p.max_context && len + max_new_tokens <= p.max_positions;
        for dropped in 0..=self.turns.len() {
            let later = Chat { turns: self.turns[dropped..].to_vec() };
            let prompt = later.prompt(&p.templates, question);
            if fits(p.prompt_len(&prompt)?) {
                self.turns.drain(..dropped);
                return Ok((prompt, dropped));
            }
        }
        // The question alone is too long: say so with the numbers.
        let alone = Chat::default().prompt(&p.templates, question);
        let text = p.text_ids(&alone)?.len();
        let len = p.num_query_tokens + text;
        let head = format!(
            "the question alone makes a prompt of {len} tokens ({} image tokens + {text} text tokens), ",
            p.num_query_tokens
        );
        if len > p.max_context {
            return Err(RuntimeError::Input(format!(
                "{head}over the model's context limit of {}; shorten it",
                p.max_context
            )));
        }
        Err(RuntimeError::Room(
            Message::default()
                .text(format!("{head}which with "))
                .name(Setting::MaxNewTokens)
                .text(format!(
                    " {max_new_tokens} is over the language model's {} positions; shorten it or lower ",
                    p.max_positions
                ))
                .name(Setting::MaxNewTokens),
        ))
    }

    pub fn push(&mut self, question: &str, answer: &str) {
        self.turns.push((question.to_string(), answer.to_string()));
    }
}
