//! A sequence's text as its tokens arrive: what can be streamed now, stop strings, and
//! the final text.

use super::{Event, Finish, Sink};
use crate::prompt::Prompter;

/// A sequence's tokens, what of its text has been sent, and how it ended early.
pub(crate) struct Stream {
    ids: Vec<i64>,
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
        Stream { ids: Vec::new(), sent: String::new(), ended: None, stopped_text: None }
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
        if s.stop.is_empty() && !s.sink.wants_deltas() {
            if full {
                self.ended = Some(Finish::Length);
            }
            return !full;
        }
        let Ok(text) = s.prompter.decode(&self.ids) else { return true };
        if let Some(at) = find_stop(&text, s.stop) {
            self.ended = Some(Finish::Stop);
            self.stopped_text = Some(text[..at].to_string());
            return false;
        }
        let hold = s.stop.iter().map(|x| x.chars().count()).max().unwrap_or(0).saturating_sub(1);
        // Decoding all but the last 3 tokens again only matters behind a replacement character.
        let settled = (text.ends_with('\u{FFFD}') && self.ids.len() > 3)
            .then(|| s.prompter.decode(&self.ids[..self.ids.len() - 3]).ok())
            .flatten();
        let ready = stable_prefix(&text, settled.as_deref(), hold);
        if ready.len() > self.sent.len() && ready.starts_with(self.sent.as_str()) {
            let delta = ready[self.sent.len()..].to_string();
            self.sent.push_str(&delta);
            s.sink.send(Event::Delta { index: seq, text: delta });
        }
        if self.ids.len() >= s.max_new_tokens {
            self.ended = Some(Finish::Length);
            return false;
        }
        true
    }

    /// Ends the sequence with the search's token ids: sends the rest of its text and its
    /// `End`.
    pub(crate) fn end(&mut self, ids: Vec<i64>, seq: usize, s: &Settings<'_>) {
        let (text, finish, ids, eos) = self.finish(ids, s);
        if text.len() > self.sent.len() && text.starts_with(self.sent.as_str()) {
            s.sink.send(Event::Delta { index: seq, text: text[self.sent.len()..].to_string() });
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

/// The part of `text` that can be sent now: not a trailing replacement character (half
/// of a character whose other bytes come with the next token), and not the last
/// `hold` characters, which could be the start of a stop string. `settled` is the text
/// of all but the last 3 tokens: a character's bytes span at most 4 tokens, so a
/// replacement character in it is final (random weights make such text) and is sent.
pub(crate) fn stable_prefix<'a>(text: &'a str, settled: Option<&str>, hold: usize) -> &'a str {
    let mut t = text.trim_end_matches('\u{FFFD}');
    if let Some(s) = settled {
        if s.len() > t.len() && text.starts_with(s) {
            t = &text[..s.len()];
        }
    }
    if hold == 0 {
        return t;
    }
    let cut = t.char_indices().rev().nth(hold - 1).map_or(0, |(i, _)| i);
    &t[..cut]
}

/// The first stop string in `text`: where the text is cut.
pub(crate) fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_prefix_holds_back_half_characters_and_possible_stop_starts() {
        assert_eq!(stable_prefix("a cat\u{FFFD}", None, 0), "a cat");
        assert_eq!(stable_prefix("a cat", None, 2), "a c");
        assert_eq!(stable_prefix("ab", None, 5), "");
        // A replacement character older than 3 tokens is final.
        assert_eq!(stable_prefix("a \u{FFFD}\u{FFFD}", Some("a \u{FFFD}"), 0), "a \u{FFFD}");
        assert_eq!(stable_prefix("a \u{FFFD}", Some("b"), 0), "a ");
    }

    #[test]
    fn find_stop_takes_the_earliest() {
        let stop = vec!["dog".to_string(), "cat".to_string(), String::new()];
        assert_eq!(find_stop("a cat and a dog", &stop), Some(2));
        assert_eq!(find_stop("a bird", &stop), None);
    }
}
