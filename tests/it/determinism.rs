//! Same inputs and seed, same bytes — for the stages the resume tests do
//! not already cover (pretrain, generate, data prefs, warp, eval) — and an
//! interrupted data stage leaves nothing under its final name.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::pipeline::Micro;
use crate::{ok, s};

fn same(a: &Path, b: &Path, file: &str) {
    assert_eq!(
        std::fs::read(a.join(file)).unwrap(),
        std::fs::read(b.join(file)).unwrap(),
        "{file} differs between {} and {}",
        a.display(),
        b.display()
    );
}

#[test]
fn every_stage_is_reproducible() {
    let m = Micro::new("120", "8", "200");
    let twice = |name: &str, run: &dyn Fn(&Path)| {
        let (a, b) = (m.path(&format!("a-{name}")), m.path(&format!("b-{name}")));
        run(&a);
        run(&b);
        (a, b)
    };
    let (p1, p2) = twice("pretrain", &|out| {
        ok(&m.pretrain_args(
            &m.task.join("train.jsonl"),
            out,
            &["--steps", "6", "--batch-size", "8", "--eval-every", "0"],
        ));
    });
    same(&p1, &p2, "model.safetensors");
    let prompts = m.task.join("train_prompts.jsonl");
    let (g1, g2) = twice("generate.jsonl", &|out| {
        ok(&[
            "generate",
            "--model",
            s(&p1),
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--temperature",
            "1",
            "--max-new-tokens",
            "8",
            "--topk",
            "3",
            "--seed",
            "5",
        ]);
    });
    assert_eq!(std::fs::read(&g1).unwrap(), std::fs::read(&g2).unwrap());
    let (r1, r2) = twice("rl", &|out| {
        ok(&[
            "rlhf",
            "--policy",
            s(&p1),
            "--task-reward",
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--steps",
            "3",
            "--prompts-per-step",
            "4",
            "--max-new-tokens",
            "8",
            "--seed",
            "2",
        ]);
    });
    same(&r1, &r2, "model.safetensors");
    let (w1, w2) = twice("warp", &|out| {
        ok(&[
            "warp",
            "merge",
            "--init",
            s(&p1),
            "--policies",
            s(&r1),
            s(&p2),
            "--eta",
            "0.5",
            "--out",
            s(out),
        ]);
    });
    same(&w1, &w2, "model.safetensors");
    let (e1, e2) = twice("eval.jsonl", &|out| {
        ok(&[
            "eval",
            "--checkpoints",
            s(&p1),
            s(&w1),
            "--prompts",
            s(&m.task.join("eval_prompts.jsonl")),
            "--reference",
            s(&p1),
            "--samples",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            s(out),
        ]);
    });
    assert_eq!(std::fs::read(&e1).unwrap(), std::fs::read(&e2).unwrap());
}

#[test]
fn an_interrupted_data_stage_leaves_no_output() {
    let m = Micro::new("200", "8", "200");
    let policy = m.policy();
    // enough work that neither stage can finish within the wait below
    let prompts = m.path("many_prompts.jsonl");
    let one = std::fs::read_to_string(m.task.join("train_prompts.jsonl")).unwrap();
    std::fs::write(&prompts, one.repeat(10)).unwrap();
    for (name, args) in [
        (
            "prefs.jsonl",
            vec![
                "data",
                "prefs",
                "--policy",
                s(&policy),
                "--prompts",
                s(&prompts),
                "--samples",
                "64",
            ],
        ),
        (
            "pairs.jsonl",
            vec![
                "generate",
                "--model",
                s(&policy),
                "--prompts",
                s(&prompts),
                "--topk",
                "8",
            ],
        ),
    ] {
        let out = m.path(name);
        let mut child = Command::new(env!("CARGO_BIN_EXE_posttrain"))
            .args(&args)
            .arg("--out")
            .arg(&out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let running = child.try_wait().unwrap().is_none();
        child.kill().unwrap();
        child.wait().unwrap();
        if running {
            assert!(
                !out.exists(),
                "{name}: a partial output under the final name"
            );
        }
        let visible: Vec<String> = std::fs::read_dir(m.path(""))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(name))
            .collect();
        assert!(!running || visible.is_empty(), "{visible:?}");
        assert!(
            running,
            "{name} finished within 150 ms: nothing was interrupted"
        );
    }
}
