//! posttrain's ids of a conversation equal `transformers`' `apply_chat_template(…,
//! tokenize=True)` on the checkpoint's own template, for a Gemma-structured
//! tokenizer and a Metaspace-"first" one (fixtures made by
//! `fixtures/chat-template/make.py`).

use std::path::{Path, PathBuf};

use posttrain_datasets::{ChatTokenizer, Message, Role};

fn fixture(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat-template")
        .join(kind)
}

fn messages(case: &serde_json::Value) -> Vec<Message> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            role: if m["role"] == "user" {
                Role::User
            } else {
                Role::Model
            },
            content: m["content"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn equals_transformers(kind: &str) {
    let dir = fixture(kind);
    let tok = ChatTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 6);
    for case in &cases {
        let all = messages(case);
        let (prompt, reply) = all.split_at(all.len() - 1);
        let want_prompt = ids(&case["prompt_ids"]);
        assert_eq!(
            tok.render_prompt(prompt).unwrap(),
            want_prompt,
            "{kind}: {}",
            case["text"]
        );
        // the conversation up to the reply's end-of-turn token; Gemma's template adds "\n" after it
        let (got, prompt_len) = tok.render_reply(prompt, &reply[0].content).unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(prompt_len, want_prompt.len());
        assert_eq!(
            got,
            want[..got.len().min(want.len())],
            "{kind}: {}",
            case["text"]
        );
        assert_eq!(*got.last().unwrap(), tok.end_of_turn);
        let after: Vec<u32> = want[got.len()..].to_vec();
        assert!(after.len() <= 1, "{kind}: {after:?} after the turn's end");
        // the whole conversation as a prompt: every earlier turn, then the model's turn opened
        let whole = tok.render_prompt(&all).unwrap();
        assert_eq!(whole[..want.len()], want[..], "{kind}: {}", case["text"]);
    }
}

#[test]
fn a_gemma_structured_tokenizer_renders_what_transformers_renders() {
    equals_transformers("gemma");
}

#[test]
fn a_metaspace_first_tokenizer_with_its_own_template_renders_what_transformers_renders() {
    equals_transformers("metaspace-first");
}

#[test]
fn a_literal_control_token_in_a_message_stays_text() {
    let tok = ChatTokenizer::from_file(&fixture("metaspace-first").join("tokenizer.json")).unwrap();
    let text = |content: &str| {
        let m = [Message {
            role: Role::User,
            content: content.into(),
        }];
        tok.render_prompt(&m).unwrap()
    };
    let literal = text("a <start_of_turn> b");
    let controls = |ids: &[u32]| ids.iter().filter(|&&i| i == tok.start_of_turn).count();
    // the template's own, none from the message
    assert_eq!(controls(&literal), controls(&text("a b")), "{literal:?}");
    assert!(literal.len() > text("a b").len() + 3);
}

#[test]
fn a_reply_that_would_merge_into_the_prompt_keeps_the_prompt_s_ids() {
    // a generation prompt that ends in a space: one pass merges it with the reply's first word
    let dir = tempfile::tempdir().unwrap();
    let from = fixture("metaspace-first");
    std::fs::copy(
        from.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'user' if m['role'] == 'user' else 'model' }} {{ m['content'] }}<end_of_turn>{% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}";
    let config = serde_json::json!({ "chat_template": template });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = ChatTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let prompt = [Message {
        role: Role::User,
        content: "what is two".into(),
    }];
    let ids = tok.render_prompt(&prompt).unwrap();
    let (reply, prompt_len) = tok.render_reply(&prompt, "three").unwrap();
    assert_eq!(prompt_len, ids.len());
    assert_eq!(
        reply[..ids.len()],
        ids[..],
        "the prompt's ids are what generation continues"
    );
    assert_eq!(tok.decode(&reply[ids.len()..]).unwrap().trim(), "three");
}
