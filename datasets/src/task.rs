//! The embedded English instruction task: small questions in plain English
//! whose answers are verifiably right or wrong, answered in one complete,
//! concise sentence. The scorer stands in for human raters:
//!
//! `score = 0.7·correct + 0.1·capitalised + 0.1·ends_with_period + 0.1·concise`
//!
//! where `correct` means the last word of the completion (punctuation
//! stripped) is the expected answer, and `concise` means one sentence of at
//! most as many words as the reference answer plus three.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::records::{Prompt, SftPair};

const WORDS: &[&str] = &[
    "apple", "river", "house", "green", "music", "table", "cloud", "stone", "bread", "light",
    "water", "chair", "plant", "smile", "train", "dream", "ocean", "tiger", "paper", "horse",
    "sugar", "night", "storm", "glass", "heart", "money", "field", "beach", "snake", "grape",
    "lemon", "mouse", "queen", "robot", "sheep", "tooth", "wheel", "zebra", "candle", "garden",
    "window", "rabbit", "silver", "winter", "summer", "forest", "bottle", "pencil", "orange",
    "planet", "rocket", "spider", "turtle", "violin", "yellow", "basket", "butter", "castle",
    "dragon", "flower", "guitar", "island", "jacket", "kitten", "ladder", "market", "needle",
    "parrot", "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish", "book", "door", "milk",
    "rain", "snow", "wind", "fire", "road", "ship", "king", "lamp", "rose", "salt", "wolf", "bear",
    "frog", "duck", "cake", "corn", "hill", "lake", "leaf", "nest", "sand", "about", "above",
    "actor", "adult", "agent", "alarm", "album", "angle", "ankle", "arrow", "badge", "baker",
    "bench", "berry", "blade", "blank", "board", "boots", "brain", "brick", "brush", "cabin",
    "camel", "canal", "cargo", "chain", "chalk", "cheek", "chess", "chief", "child", "cider",
    "clock", "coach", "coast", "coral", "couch", "crane", "crown", "cycle", "dance", "delta",
    "denim", "diary", "diver", "eagle", "earth", "elbow", "fable", "fairy", "feast", "fence",
    "ferry", "flame", "flute", "frost", "giant", "globe", "glove", "goose", "honey", "hotel",
    "igloo", "ivory", "jelly", "jewel", "judge", "juice", "knife", "koala", "label", "layer",
    "lemur", "lilac", "llama", "lodge", "lunch", "magic", "mango", "maple", "medal", "melon",
    "metal", "miner", "motor", "noble", "novel", "nurse", "olive", "onion", "opera", "otter",
    "panda", "patio", "peach", "pearl", "piano", "pilot", "pizza", "plate", "poem", "pond",
    "quilt", "radio", "raven", "ridge", "rival", "robin", "salad", "scarf", "shark", "shell",
    "skirt", "slope", "solar", "spoon", "squid", "stamp", "stove", "sword", "syrup", "tango",
    "teeth", "thumb", "toast", "torch", "tower", "trail", "truck", "tulip", "uncle", "valley",
    "vapor", "venue", "vest", "video", "villa", "vocal", "wagon", "whale", "wheat", "witch",
    "yacht", "youth", "zone", "ant", "bee", "cow", "egg", "fox", "hat", "ice", "jam", "key", "map",
    "net", "owl", "pen", "pig", "rat", "sky", "toy", "van", "web", "yak",
];

/// Operands of the arithmetic and comparison questions run from 0 to this.
pub const DEFAULT_MAX_NUMBER: u32 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Add,
    Subtract,
    Larger,
    Reverse,
    Count,
    First,
    Capitals,
}

const FAMILIES: [Family; 7] = [
    Family::Add,
    Family::Subtract,
    Family::Larger,
    Family::Reverse,
    Family::Count,
    Family::First,
    Family::Capitals,
];

/// One question with its reference answer sentence and expected answer word.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub prompt: String,
    pub completion: String,
    pub answer: String,
}

fn item(rng: &mut StdRng, max_number: u32) -> Item {
    let family = *FAMILIES.choose(rng).expect("families");
    let word = *WORDS.choose(rng).expect("words");
    let (a, b) = (
        rng.random_range(0..=max_number),
        rng.random_range(0..=max_number),
    );
    let (prompt, completion, answer) = match family {
        Family::Add => (
            format!("What is {a} plus {b}?"),
            format!("{a} plus {b} is {}.", a + b),
            (a + b).to_string(),
        ),
        Family::Subtract => {
            let (hi, lo) = (a.max(b), a.min(b));
            (
                format!("What is {hi} minus {lo}?"),
                format!("{hi} minus {lo} is {}.", hi - lo),
                (hi - lo).to_string(),
            )
        }
        Family::Larger => {
            let b = if a == b {
                (b + 1) % (max_number + 1)
            } else {
                b
            };
            let (hi, lo) = (a.max(b), a.min(b));
            (
                format!("Which is larger, {a} or {b}?"),
                format!("{lo} is smaller than {hi}."),
                hi.to_string(),
            )
        }
        Family::Reverse => {
            let rev: String = word.chars().rev().collect();
            (
                format!("Reverse the word {word}."),
                format!("The word {word} reversed is {rev}."),
                rev,
            )
        }
        Family::Count => (
            format!("How many letters are in the word {word}?"),
            format!("The word {word} has {} letters.", word.len()),
            // the answer is the count, which the sentence ends with "letters"
            word.len().to_string(),
        ),
        Family::First => {
            let first = word[..1].to_string();
            (
                format!("What is the first letter of {word}?"),
                format!("The first letter of {word} is {first}."),
                first,
            )
        }
        Family::Capitals => {
            let upper = word.to_uppercase();
            (
                format!("Write the word {word} in capital letters."),
                format!("The word {word} in capital letters is {upper}."),
                upper,
            )
        }
    };
    Item {
        prompt,
        completion,
        answer,
    }
}

/// `train` and `eval` items with disjoint prompts, deterministic in `seed`;
/// numbers in the questions run from 0 to `max_number`.
pub fn synth(seed: u64, train: usize, eval: usize, max_number: u32) -> (Vec<Item>, Vec<Item>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut take = |n: usize, rng: &mut StdRng| {
        let mut out = Vec::with_capacity(n);
        let mut attempts = 0;
        while out.len() < n && attempts < 100 * n.max(1) {
            attempts += 1;
            let it = item(rng, max_number);
            if seen.insert(it.prompt.clone()) {
                out.push(it);
            }
        }
        out
    };
    let eval_items = take(eval, &mut rng);
    let train_items = take(train, &mut rng);
    (train_items, eval_items)
}

impl Item {
    pub fn pair(&self) -> SftPair {
        SftPair {
            prompt: Prompt::Text(self.prompt.clone()),
            completion: self.completion.clone(),
            teacher_topk: None,
        }
    }
}

/// What the scorer found in one completion.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Score {
    pub score: f64,
    pub correct: bool,
    pub capitalised: bool,
    pub period: bool,
    pub concise: bool,
}

/// The expected answer and reference length of a prompt of this task, or
/// `None` when the prompt is not one of its questions.
pub fn expected(prompt: &str) -> Option<(String, usize)> {
    let words: Vec<&str> = prompt
        .trim_end_matches(['?', '.'])
        .split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .collect();
    let num = |s: &str| s.parse::<u32>().ok();
    let (answer, reference) = match words.as_slice() {
        ["What", "is", a, "plus", b] => {
            let (a, b) = (num(a)?, num(b)?);
            ((a + b).to_string(), 5)
        }
        ["What", "is", a, "minus", b] => {
            let (a, b) = (num(a)?, num(b)?);
            (a.checked_sub(b)?.to_string(), 5)
        }
        ["Which", "is", "larger", a, "or", b] => (num(a)?.max(num(b)?).to_string(), 5),
        ["Reverse", "the", "word", w] => (w.chars().rev().collect(), 5),
        ["How", "many", "letters", "are", "in", "the", "word", w] => (w.len().to_string(), 5),
        ["What", "is", "the", "first", "letter", "of", w] => (w[..1].to_string(), 7),
        ["Write", "the", "word", w, "in", "capital", "letters"] => (w.to_uppercase(), 8),
        _ => return None,
    };
    Some((answer, reference))
}

/// Scores a completion against the prompt's expected answer.
pub fn score(prompt: &str, completion: &str) -> Option<Score> {
    let (answer, reference_words) = expected(prompt)?;
    let text = completion.trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    // "N letters." and "X is smaller than Y." put the answer before the last word
    let strip = |w: &&str| w.trim_matches(|c: char| !c.is_alphanumeric()).to_string();
    let last = words.last().map(strip).unwrap_or_default();
    let correct = last == answer
        || (last == "letters" && words.len() >= 2 && strip(&words[words.len() - 2]) == answer);
    let capitalised = text
        .chars()
        .next()
        .is_some_and(|c| c.is_uppercase() || c.is_ascii_digit());
    let period = text.ends_with('.');
    let sentences = text.matches(['.', '!', '?']).count();
    let concise = !words.is_empty() && words.len() <= reference_words + 3 && sentences <= 1;
    let tenths =
        7 * u8::from(correct) + u8::from(capitalised) + u8::from(period) + u8::from(concise);
    let score = f64::from(tenths) / 10.0;
    Some(Score {
        score,
        correct,
        capitalised,
        period,
        concise,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_score_full_marks() {
        let (train, eval) = synth(1, 300, 50, DEFAULT_MAX_NUMBER);
        assert_eq!((train.len(), eval.len()), (300, 50));
        for it in train.iter().chain(&eval) {
            let s = score(&it.prompt, &it.completion).unwrap();
            assert_eq!(s.score, 1.0, "{it:?}: {s:?}");
            assert_eq!(expected(&it.prompt).unwrap().0, it.answer);
        }
        let train_prompts: HashSet<_> = train.iter().map(|i| &i.prompt).collect();
        assert!(eval.iter().all(|i| !train_prompts.contains(&i.prompt)));
    }

    #[test]
    fn synth_is_deterministic_in_the_seed() {
        assert_eq!(synth(4, 20, 5, 30), synth(4, 20, 5, 30));
        assert_ne!(synth(4, 20, 5, 30), synth(5, 20, 5, 30));
    }

    #[test]
    fn a_wider_number_range_gives_more_distinct_questions() {
        let largest_answer = |items: &[Item]| {
            items
                .iter()
                .filter_map(|i| i.answer.parse::<u32>().ok())
                .max()
                .unwrap()
        };
        let (narrow, _) = synth(2, 20_000, 10, DEFAULT_MAX_NUMBER);
        let (wide, eval) = synth(2, 20_000, 10, 99);
        assert!(narrow.len() < 4_000, "{}", narrow.len());
        assert_eq!(wide.len(), 20_000);
        assert!(largest_answer(&narrow) <= 60 && largest_answer(&wide) > 100);
        for it in wide.iter().chain(&eval) {
            assert_eq!(
                score(&it.prompt, &it.completion).unwrap().score,
                1.0,
                "{it:?}"
            );
        }
    }

    #[test]
    fn hand_scored_examples() {
        let s = |p, c| score(p, c).unwrap().score;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(s("What is 2 plus 3?", "2 plus 3 is 5."), 1.0));
        assert!(close(s("What is 2 plus 3?", "2 plus 3 is 6."), 0.3));
        assert!(close(s("What is 2 plus 3?", "it is 5"), 0.8)); // lower case, no period
        assert!(close(
            s(
                "What is 2 plus 3?",
                "Well. Let me think about this one for a while, it is 5."
            ),
            0.9
        ));
        assert!(close(
            s("Reverse the word cat.", "The word cat reversed is tac."),
            1.0
        ));
        assert!(close(
            s(
                "How many letters are in the word cat?",
                "The word cat has 3 letters."
            ),
            1.0
        ));
        assert!(close(
            s("Which is larger, 4 or 9?", "4 is smaller than 9."),
            1.0
        ));
        assert!(close(
            s("Which is larger, 4 or 9?", "9 is smaller than 4."),
            0.3
        ));
        assert!(close(
            s(
                "Write the word cat in capital letters.",
                "The word cat in capital letters is CAT."
            ),
            1.0
        ));
        assert!(close(s("What is the first letter of cat?", ""), 0.0));
        assert!(score("Tell me a joke.", "No.").is_none());
    }
}
