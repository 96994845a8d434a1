//! `tokenizer.json` through the `tokenizers` crate, and conversations
//! rendered by the checkpoint's chat template ([`ChatTemplate`]; Gemma's
//!
//! ```text
//! <bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n{completion}<end_of_turn>\n
//! ```
//!
//! when the directory has none) and encoded in one pass as `transformers`'
//! `apply_chat_template(…, tokenize=True)` encodes them. One difference, on
//! purpose: a special token's spelling inside a message (a literal
//! `<start_of_turn>` in a prompt) stays text and never becomes the control
//! token.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chat_template::ChatTemplate;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerImpl,
};

pub const PAD: &str = "<pad>";
pub const EOS: &str = "<eos>";
pub const BOS: &str = "<bos>";
pub const UNK: &str = "<unk>";
pub const START_OF_TURN: &str = "<start_of_turn>";
pub const END_OF_TURN: &str = "<end_of_turn>";

/// The control tokens in id order of a trained tokenizer (Gemma's first ids).
pub const CONTROL_TOKENS: [&str; 6] = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot read tokenizer: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("{path}: tokenizer has no {token} token")]
    MissingControl { path: PathBuf, token: &'static str },
    #[error("{path}: cannot write tokenizer: {reason}")]
    Save { path: PathBuf, reason: String },
    #[error("tokenizer training failed: {0}")]
    Train(String),
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error(transparent)]
    Template(#[from] crate::chat_template::TemplateError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    /// `assistant` is accepted as the OpenAI / TRL spelling.
    #[serde(alias = "assistant")]
    Model,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// Gemma's chat template, as `tokenizer_config.json` of the published
/// instruction-tuned checkpoints carries it.
pub const GEMMA_CHAT_TEMPLATE: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

/// Hugging Face's tokenizer settings beside `tokenizer.json`.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";

#[derive(Clone)]
pub struct ChatTokenizer {
    inner: Tokenizer,
    /// `inner` for text that does not start the rendered string (a
    /// Metaspace pre-tokenizer that prepends `▁` to the first piece only
    /// leaves it alone, as it does after a special token in one pass).
    rest: Tokenizer,
    /// The special tokens' spellings, longest first, and their ids.
    specials: Vec<(String, u32)>,
    template: ChatTemplate,
    /// The directory `tokenizer.json` was read from.
    source: Option<PathBuf>,
    pub pad: u32,
    pub eos: u32,
    pub bos: u32,
    pub start_of_turn: u32,
    pub end_of_turn: u32,
}

impl ChatTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut t = Self::new(inner, path)?;
        t.source = path.parent().map(Path::to_path_buf);
        if let Some(dir) = &t.source {
            t.template = ChatTemplate::of_dir(dir)?;
        }
        Ok(t)
    }

    fn new(mut inner: Tokenizer, path: &Path) -> Result<Self, TokenizerError> {
        inner.set_encode_special_tokens(true);
        let id = |token: &'static str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingControl {
                    path: path.to_path_buf(),
                    token,
                })
        };
        let mut specials: Vec<(String, u32)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(Self {
            pad: id(PAD)?,
            eos: id(EOS)?,
            bos: id(BOS)?,
            start_of_turn: id(START_OF_TURN)?,
            end_of_turn: id(END_OF_TURN)?,
            rest: not_first(&inner).map_err(|reason| TokenizerError::Load {
                path: path.to_path_buf(),
                reason,
            })?,
            specials,
            template: ChatTemplate::default(),
            inner,
            source: None,
        })
    }

    /// Trains a BPE tokenizer (Metaspace `▁` word boundaries, as Gemma's) on
    /// `texts`, with the control tokens as the first ids.
    pub fn train<I, S>(texts: I, vocab_size: usize) -> Result<Self, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let specials: Vec<AddedToken> = CONTROL_TOKENS
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect();
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(specials)
            .build();
        let bpe = BPE::builder()
            .unk_token(UNK.to_string())
            .build()
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        let mut tk: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerImpl::new(bpe);
        let metaspace = Metaspace::new('▁', PrependScheme::Always, true);
        tk.with_pre_tokenizer(Some(metaspace.clone()));
        tk.with_decoder(Some(metaspace));
        tk.train(&mut trainer, texts)
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        Self::new(Tokenizer::from(tk), Path::new("<trained>"))
    }

    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        let mut plain = self.inner.clone();
        plain.set_encode_special_tokens(false);
        plain.save(path, true).map_err(|e| TokenizerError::Save {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// `tokenizer.json` plus Hugging Face's `tokenizer_config.json` (with
    /// Gemma's chat template) and `special_tokens_map.json` into `dir`: the
    /// source directory's own when it has them, else written here, so that
    /// `AutoTokenizer.from_pretrained(dir).apply_chat_template(…)` works.
    pub fn save_with_configs(&self, dir: &Path) -> Result<(), TokenizerError> {
        self.save(&dir.join("tokenizer.json"))?;
        let io = |path: &Path, e: std::io::Error| TokenizerError::Save {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        for (file, made) in [
            (TOKENIZER_CONFIG_FILE, self.tokenizer_config()),
            (SPECIAL_TOKENS_FILE, special_tokens_map()),
        ] {
            let to = dir.join(file);
            let own = self
                .source
                .as_ref()
                .map(|d| d.join(file))
                .filter(|p| p.is_file());
            let bytes = match own {
                Some(from) => std::fs::read(&from).map_err(|e| io(&from, e))?,
                None => made.into_bytes(),
            };
            std::fs::write(&to, bytes).map_err(|e| io(&to, e))?;
        }
        Ok(())
    }

    fn tokenizer_config(&self) -> String {
        let v = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": UNK,
            "additional_special_tokens": [START_OF_TURN, END_OF_TURN],
            "add_bos_token": false,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "padding_side": "left",
            "chat_template": GEMMA_CHAT_TEMPLATE,
        });
        serde_json::to_string_pretty(&v).expect("json") + "\n"
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Plain text to ids; control-token spellings stay text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids to text, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Rendered text to ids in one pass, as the tokenizer splits it: the
    /// special tokens that `literal` (the text rendered with the messages'
    /// special-token spellings defused, byte for byte as long) holds become
    /// their ids, the text between them is encoded piece by piece.
    /// `first`: `text` starts the rendered string.
    fn encode_rendered(
        &self,
        (text, literal): (&str, &str),
        first: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let (mut ids, mut start, mut at) = (Vec::new(), 0, 0);
        while at < literal.len() {
            let found = self
                .specials
                .iter()
                .find(|(s, _)| literal[at..].starts_with(s.as_str()));
            match found {
                Some((spelling, id)) => {
                    self.encode_piece(&text[start..at], first && start == 0, &mut ids)?;
                    ids.push(*id);
                    at += spelling.len();
                    start = at;
                }
                None => at += literal[at..].chars().next().map_or(1, char::len_utf8),
            }
        }
        self.encode_piece(&text[start..], first && start == 0, &mut ids)?;
        Ok(ids)
    }

    fn encode_piece(
        &self,
        text: &str,
        first: bool,
        ids: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        if text.is_empty() {
            return Ok(());
        }
        let tokenizer = if first { &self.inner } else { &self.rest };
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        ids.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// `messages` rendered by the template, and the same rendered with the
    /// messages' special-token spellings defused (byte for byte as long).
    fn rendered(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, String), TokenizerError> {
        let text = self.template.render(messages, add_generation_prompt)?;
        let defused: Vec<Message> = messages
            .iter()
            .map(|m| Message {
                role: m.role,
                content: self.defuse(&m.content),
            })
            .collect();
        if defused == messages {
            return Ok((text.clone(), text));
        }
        let literal = self.template.render(&defused, add_generation_prompt)?;
        // a template that changed the messages' lengths: its specials count as such
        let literal = if literal.len() == text.len() {
            literal
        } else {
            text.clone()
        };
        Ok((text, literal))
    }

    /// `text` with the first character of every special token's spelling
    /// replaced by as many bytes of U+0001.
    fn defuse(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (spelling, _) in &self.specials {
            let first = spelling.chars().next().map_or(0, char::len_utf8);
            let blank = "\u{1}".repeat(first) + &spelling[first..];
            out = out.replace(spelling.as_str(), &blank);
        }
        out
    }

    /// A conversation, ending with the opening of the model's turn so that
    /// generation continues it.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, TokenizerError> {
        let (text, literal) = self.rendered(messages, true)?;
        self.encode_rendered((&text, &literal), true)
    }

    /// A conversation and the model's reply to it: the ids of the whole
    /// rendered conversation up to and including the first `<end_of_turn>`
    /// or `<eos>` after the prompt (what a template puts after the turn's
    /// end, Gemma's `\n`, is not part of it: generation stops there), and
    /// the length of the rendered prompt ([`ChatTokenizer::render_prompt`]).
    /// Where one pass merges the reply's first characters into the prompt's
    /// last token, the prompt keeps its own ids (those generation continues)
    /// and the reply is encoded after them.
    pub fn render_reply(
        &self,
        messages: &[Message],
        reply: &str,
    ) -> Result<(Vec<u32>, usize), TokenizerError> {
        let (prompt_text, prompt_literal) = self.rendered(messages, true)?;
        let prompt = self.encode_rendered((&prompt_text, &prompt_literal), true)?;
        let prompt_len = prompt.len();
        let mut all = messages.to_vec();
        all.push(Message {
            role: Role::Model,
            content: reply.to_string(),
        });
        let (text, literal) = self.rendered(&all, false)?;
        let mut ids = self.encode_rendered((&text, &literal), true)?;
        if !ids.starts_with(&prompt) && text.starts_with(&prompt_text) {
            let at = prompt_text.len();
            ids = prompt;
            ids.extend(self.encode_rendered((&text[at..], &literal[at..]), false)?);
        }
        let stop = [self.end_of_turn, self.eos];
        if let Some(end) = ids.iter().skip(prompt_len).position(|id| stop.contains(id)) {
            ids.truncate(prompt_len + end + 1);
        }
        Ok((ids, prompt_len))
    }

    /// A single-turn prompt and its completion: the ids and, per id, whether
    /// it is a completion token to learn (the completion and the
    /// `<end_of_turn>` that closes it, so trained models learn to stop).
    pub fn render_pair(
        &self,
        prompt: &str,
        completion: &str,
    ) -> Result<(Vec<u32>, Vec<bool>), TokenizerError> {
        let user = Message {
            role: Role::User,
            content: prompt.to_string(),
        };
        let (ids, prompt_len) = self.render_reply(&[user], completion)?;
        let mask = (0..ids.len()).map(|i| i >= prompt_len).collect();
        Ok((ids, mask))
    }
}

/// `tokenizer` with a Metaspace pre-tokenizer's `prepend_scheme: first`
/// made `never` (the same tokenizer when it has none).
fn not_first(tokenizer: &Tokenizer) -> Result<Tokenizer, String> {
    let mut json: serde_json::Value =
        serde_json::from_str(&tokenizer.to_string(false).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                if map.get("type").and_then(|t| t.as_str()) == Some("Metaspace")
                    && map.get("prepend_scheme").and_then(|p| p.as_str()) == Some("first")
                {
                    map.insert("prepend_scheme".into(), "never".into());
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    match json.get_mut("pre_tokenizer") {
        Some(pre) => walk(pre),
        None => return Ok(tokenizer.clone()),
    }
    let mut rest: Tokenizer = json
        .to_string()
        .parse()
        .map_err(|e: tokenizers::Error| e.to_string())?;
    rest.set_encode_special_tokens(true);
    Ok(rest)
}

fn special_tokens_map() -> String {
    let v = serde_json::json!({
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": [START_OF_TURN, END_OF_TURN],
    });
    serde_json::to_string_pretty(&v).expect("json") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        [
            "What is two plus three?",
            "Two plus three is five.",
            "Reverse the word cat.",
            "The word cat reversed is tac.",
            "user\nmodel\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn trained() -> ChatTokenizer {
        ChatTokenizer::train(corpus().into_iter(), 120).unwrap()
    }

    #[test]
    fn control_tokens_come_first() {
        let t = trained();
        assert_eq!(
            (t.pad, t.eos, t.bos, t.start_of_turn, t.end_of_turn),
            (0, 1, 2, 4, 5)
        );
    }

    #[test]
    fn literal_control_text_stays_text() {
        let t = trained();
        let ids = t.encode("say <start_of_turn> now").unwrap();
        assert!(!ids.contains(&t.start_of_turn), "{ids:?}");
        let (ids, _) = t.render_pair("a <end_of_turn> b", "ok").unwrap();
        assert_eq!(
            ids.iter().filter(|&&i| i == t.end_of_turn).count(),
            2,
            "only the template's two turn ends: {ids:?}"
        );
    }

    #[test]
    fn pair_mask_covers_completion_and_turn_end() {
        let t = trained();
        let (ids, mask) = t.render_pair("What is two plus three?", "five").unwrap();
        let prompt = t
            .render_prompt(&[Message {
                role: Role::User,
                content: "What is two plus three?".into(),
            }])
            .unwrap();
        assert_eq!(&ids[..prompt.len()], &prompt[..]);
        assert!(mask[..prompt.len()].iter().all(|m| !m));
        assert!(mask[prompt.len()..].iter().all(|&m| m));
        assert_eq!(*ids.last().unwrap(), t.end_of_turn);
        assert_eq!(prompt[0], t.bos);
        assert_eq!(prompt[1], t.start_of_turn);
        assert_eq!(t.decode(&ids[prompt.len()..]).unwrap().trim(), "five");
    }

    #[test]
    fn save_and_load_roundtrip() {
        let t = trained();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        t.save(&path).unwrap();
        let back = ChatTokenizer::from_file(&path).unwrap();
        let text = "Reverse the word <start_of_turn>.";
        assert_eq!(back.encode(text).unwrap(), t.encode(text).unwrap());
    }

    #[test]
    fn missing_control_token_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let t = trained();
        t.save(&path).unwrap();
        let text = fs_err::read_to_string(&path)
            .unwrap()
            .replace("<end_of_turn>", "<eot>");
        fs_err::write(&path, text).unwrap();
        let err = ChatTokenizer::from_file(&path).err().unwrap().to_string();
        assert!(
            err.contains("<end_of_turn>") && err.contains("tokenizer.json"),
            "{err}"
        );
    }
}
