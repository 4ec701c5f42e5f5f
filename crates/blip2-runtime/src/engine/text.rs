//! A sequence's text as its tokens arrive: what can be streamed now, stop strings, and
//! the final text.

use super::{Event, Finish, Sink};
use crate::prompt::Prompter;

/// A sequence's tokens, its text so far, what of it has been sent, and how it ended
/// early.
///
/// The text grows incrementally, as in TGI and vLLM: each token decodes a short window
/// (the tokens since the text last grew, behind the few before them, so that a
/// tokenizer's handling of a window's first token is the same for both decodes), and the
/// new text is what the window's decode adds to its head's. Nothing re-decodes the whole
/// sequence per token; the final text ([`Stream::end`]) is one decode of every token.
pub(crate) struct Stream {
    ids: Vec<i64>,
    /// The window's head starts here; its new tokens start at `read`.
    prefix: usize,
    read: usize,
    /// The decoded text so far, untrimmed.
    raw: String,
    sent: String,
    /// Set when a stop string, the request's max_tokens or a client gone ended it.
    pub(crate) ended: Option<Finish>,
    /// The text up to the stop string, when one ended it.
    stopped_text: Option<String>,
}

/// What a sequence needs to know of its request to stream it.
pub(crate) struct Settings<'a> {
    pub stop: &'a [String],
    pub max_new_tokens: usize,
    pub sink: &'a dyn Sink,
    pub prompter: &'a Prompter,
}

impl Stream {
    pub(crate) fn new() -> Self {
        Stream {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            raw: String::new(),
            sent: String::new(),
            ended: None,
            stopped_text: None,
        }
    }

    /// Takes the sequence's next token: sends the text that has become final, and says
    /// whether the sequence goes on (not past its `max_tokens`, no stop string, the client
    /// still there).
    pub(crate) fn push(&mut self, token: i64, seq: usize, s: &Settings<'_>) -> bool {
        self.ids.push(token);
        // A client that went away gets nothing more.
        if s.sink.is_closed() {
            self.ended = Some(Finish::Stop);
            return false;
        }
        let full = self.ids.len() >= s.max_new_tokens;
        if (!s.stop.is_empty() || s.sink.wants_deltas()) && self.grow(s.prompter) {
            // The final text is the whole decode, trimmed: it starts as this does.
            let text = self.raw.trim_start();
            if let Some(at) = find_stop(text, s.stop) {
                self.ended = Some(Finish::Stop);
                self.stopped_text = Some(text[..at].to_string());
                return false;
            }
            let hold =
                s.stop.iter().map(|x| x.chars().count()).max().unwrap_or(0).saturating_sub(1);
            let ready = stable_prefix(text.trim_end(), hold);
            if ready.len() > self.sent.len() && ready.starts_with(self.sent.as_str()) {
                let delta = ready[self.sent.len()..].to_string();
                self.sent.push_str(&delta);
                s.sink.send(Event::Delta { index: seq, text: delta });
            }
        }
        if full {
            self.ended = Some(Finish::Length);
            return false;
        }
        true
    }

    /// Decodes the window of the tokens since the text last grew; returns whether it
    /// grew. A window whose text ends in half a character (a replacement character)
    /// waits for the next token, unless it is older than 3 tokens: a character's bytes
    /// span at most 4 tokens, so that replacement character is final (random weights
    /// make such text).
    fn grow(&mut self, prompter: &Prompter) -> bool {
        let (Ok(head), Ok(window)) = (
            prompter.decode_untrimmed(&self.ids[self.prefix..self.read]),
            prompter.decode_untrimmed(&self.ids[self.prefix..]),
        ) else {
            return false;
        };
        let stale = self.ids.len() - self.read > 3;
        if window.len() <= head.len()
            || !window.is_char_boundary(head.len())
            || !window.starts_with(head.as_str())
            || (window.ends_with('\u{FFFD}') && !stale)
        {
            return false;
        }
        self.raw.push_str(&window[head.len()..]);
        self.prefix = self.read;
        self.read = self.ids.len();
        true
    }

    /// Ends the sequence with the search's token ids: sends the rest of its text and its
    /// `End`.
    pub(crate) fn end(&mut self, ids: Vec<i64>, seq: usize, s: &Settings<'_>) {
        let (text, finish, ids, eos) = self.finish(ids, s);
        if text.len() > self.sent.len() && text.starts_with(self.sent.as_str()) {
            s.sink.send(Event::Delta { index: seq, text: text[self.sent.len()..].to_string() });
        } else if !text.starts_with(self.sent.as_str()) {
            tracing::warn!("streamed text of a sequence is not a prefix of its final text");
        }
        // The eos counts as generated, as the other servers count it.
        let completion_tokens = ids.len() + usize::from(eos);
        s.sink.send(Event::End { index: seq, text, finish, token_ids: ids, completion_tokens });
    }

    /// The sequence's final text, why it ended, its token ids, and whether an eos ended
    /// it, from what the search returned: cut at the request's own `max_tokens` and at
    /// the first stop string.
    fn finish(&self, mut ids: Vec<i64>, s: &Settings<'_>) -> (String, Finish, Vec<i64>, bool) {
        let max = s.max_new_tokens;
        let mut finish = if ids.len() >= max { Finish::Length } else { Finish::Stop };
        ids.truncate(max);
        // The search only ends a row short of its limit on an eos, unless the stream did.
        let mut eos = self.ended.is_none() && ids.len() < max;
        if let Some(e) = self.ended {
            finish = e;
        }
        let mut text = match &self.stopped_text {
            Some(t) => t.clone(),
            None => s.prompter.decode(&ids).unwrap_or_default(),
        };
        if self.stopped_text.is_none() {
            if let Some(at) = find_stop(&text, s.stop) {
                text.truncate(at);
                finish = Finish::Stop;
                eos = false;
            }
        }
        (text, finish, ids, eos)
    }
}

/// The part of `text` that can be sent now: not the last `hold` characters, which
/// could be the start of a stop string.
pub(crate) fn stable_prefix(text: &str, hold: usize) -> &str {
    if hold == 0 {
        return text;
    }
    let cut = text.char_indices().rev().nth(hold - 1).map_or(0, |(i, _)| i);
    &text[..cut]
}

/// The first stop string in `text`: where the text is cut.
pub(crate) fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_prefix_holds_back_possible_stop_starts() {
        assert_eq!(stable_prefix("a cat", 0), "a cat");
        assert_eq!(stable_prefix("a cat", 2), "a c");
        assert_eq!(stable_prefix("ab", 5), "");
    }

    #[test]
    fn find_stop_takes_the_earliest() {
        let stop = vec!["dog".to_string(), "cat".to_string(), String::new()];
        assert_eq!(find_stop("a cat and a dog", &stop), Some(2));
        assert_eq!(find_stop("a bird", &stop), None);
    }
}
