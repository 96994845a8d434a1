//! A checkpoint's own chat template (`chat_template` in
//! `tokenizer_config.json`), rendered as `transformers`'
//! `apply_chat_template` renders it: Jinja with `trim_blocks` and
//! `lstrip_blocks`, `raise_exception`, Python's string methods, messages with
//! roles `user` / `assistant`, the tokenizer's special-token strings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::{Environment, Error, ErrorKind, context};

use crate::tokenizer::{BOS, EOS, GEMMA_CHAT_TEMPLATE, Message, PAD, Role, UNK};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    Render(String),
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// The template parsed once, with the functions and settings it renders with.
    env: Arc<Environment<'static>>,
    bos: String,
    eos: String,
    pad: String,
    unk: String,
}

impl Default for ChatTemplate {
    /// Gemma's template with Gemma's token strings.
    fn default() -> Self {
        Self {
            env: Arc::new(
                environment(GEMMA_CHAT_TEMPLATE.to_string()).expect("Gemma's template parses"),
            ),
            bos: BOS.into(),
            eos: EOS.into(),
            pad: PAD.into(),
            unk: UNK.into(),
        }
    }
}

/// A special token's string in `tokenizer_config.json`: a string or
/// `{"content": …}`.
fn token(config: &serde_json::Value, key: &str, default: &str) -> String {
    let v = &config[key];
    v.as_str()
        .or_else(|| v["content"].as_str())
        .unwrap_or(default)
        .to_string()
}

impl ChatTemplate {
    /// The template of `tokenizer_config.json` in `dir`; Gemma's when the
    /// directory has no such file or the file no template.
    pub fn of_dir(dir: &Path) -> Result<Self, TemplateError> {
        let path = dir.join(crate::tokenizer::TOKENIZER_CONFIG_FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        let err = |reason: String| TemplateError::Config {
            path: path.clone(),
            reason,
        };
        let text = fs_err::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
        // one template, or named ones of which `default` is the chat template
        let source = match &config["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(String::from),
            serde_json::Value::Null => None,
            other => {
                return Err(err(format!(
                    "chat_template is neither text nor a list: {other}"
                )));
            }
        };
        // a template that does not parse is named at load, not at the first row
        let env = match source {
            Some(source) => Arc::new(
                environment(source)
                    .map_err(|e| err(format!("chat_template does not parse: {e}")))?,
            ),
            None => Self::default().env,
        };
        Ok(Self {
            env,
            bos: token(&config, "bos_token", BOS),
            eos: token(&config, "eos_token", EOS),
            pad: token(&config, "pad_token", PAD),
            unk: token(&config, "unk_token", UNK),
        })
    }

    /// `messages` as text; with `add_generation_prompt` it ends with the
    /// opening of the model's turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let fail = |e: Error| TemplateError::Render(e.to_string());
        let messages: Vec<_> = messages
            .iter()
            .map(|m| {
                let role = match m.role {
                    Role::User => "user",
                    Role::Model => "assistant",
                };
                context! { role => role, content => m.content }
            })
            .collect();
        self.env
            .get_template("chat")
            .map_err(fail)?
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos,
                eos_token => self.eos,
                pad_token => self.pad,
                unk_token => self.unk,
            })
            .map_err(fail)
    }
}

/// `source` as the template `chat`, rendered as `transformers` renders chat templates.
fn environment(source: String) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_template_owned("chat", source)?;
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Message {
        Message {
            role: Role::User,
            content: text.into(),
        }
    }

    #[test]
    fn gemma_template_trims_content_and_opens_the_model_turn() {
        let t = ChatTemplate::default();
        let text = t.render(&[user("  Hi there \n")], true).unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn roles_that_do_not_alternate_are_refused_with_the_template_s_message() {
        let t = ChatTemplate::default();
        let err = t.render(&[user("a"), user("b")], true).unwrap_err();
        assert!(err.to_string().contains("must alternate"), "{err}");
    }

    #[test]
    fn a_directory_s_template_and_tokens_are_used() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "chat_template": [{"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'].strip() }}{% endfor %}"}],
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let t = ChatTemplate::of_dir(dir.path()).unwrap();
        assert_eq!(t.render(&[user(" x ")], false).unwrap(), "<s>[user]x");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": "{% for m in messages %}"}"#,
        )
        .unwrap();
        let err = ChatTemplate::of_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("does not parse"),
            "{err}"
        );
    }
}
