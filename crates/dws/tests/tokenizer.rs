//! `dws tokenizer train|eval` on the debug preset (pushing task, no assets): a run
//! interrupted and resumed logs the same losses as an uninterrupted one; eval scores
//! held-out frames and draws them.

mod common;

use common::{fails, ok};
use std::fs;
use std::path::Path;

fn losses(run: &Path) -> Vec<(u64, String)> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                format!("{} {}", v["loss"], v["restarted"]),
            )
        })
        .collect()
}

#[test]
fn tokenizer_trains_resumes_and_scores_held_out_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    for (out, seed) in [("push", "0"), ("held-out", "1")] {
        ok(&[
            "collect",
            "--env",
            "push",
            "--policy",
            "scripted",
            "--episodes",
            "2",
            "--seed",
            seed,
            "--out",
            &p(out),
        ]);
    }
    let push = p("push");
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "tokenizer",
            "train",
            "--data",
            &push,
            "--preset",
            "debug",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    let text = train(&p("tok"), &[]);
    assert!(text.contains("16×16 tokens of 64 codes"), "{text}");
    let full = losses(&tmp.path().join("tok"));
    assert_eq!(full.len(), 20);
    let first: f32 = full[0].1.split(' ').next().unwrap().parse().unwrap();
    let last: f32 = full[19].1.split(' ').next().unwrap().parse().unwrap();
    assert!(last < first, "the loss fell: {first} -> {last}");
    // Interrupted after a checkpoint, then resumed: the same losses and restarts.
    train(&p("tok2"), &["--stop-after", "10"]);
    assert_eq!(losses(&tmp.path().join("tok2")).len(), 10);
    train(&p("tok2"), &["--resume"]);
    assert_eq!(losses(&tmp.path().join("tok2")), full);

    let text = ok(&[
        "tokenizer",
        "eval",
        "--ckpt",
        &p("tok"),
        "--data",
        &p("held-out"),
        "--frames",
        "12",
    ]);
    assert!(text.contains("PSNR"), "{text}");
    let scores: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("tok/eval.json")).unwrap())
            .unwrap();
    let s = &scores[0];
    assert_eq!(s["frames"], 12);
    assert!(s["psnr"].as_f64().unwrap() > 5.0, "{s}");
    let usage = s["codebook_usage"].as_f64().unwrap();
    assert!(usage > 0.0 && usage <= 1.0, "{s}");
    assert!(s["perplexity"].as_f64().unwrap() >= 1.0, "{s}");
    let png = fs::read(tmp.path().join("tok/recon.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    let err = fails(&[
        "tokenizer",
        "train",
        "--data",
        &p("push"),
        "--preset",
        "huge",
        "--out",
        &p("x"),
    ]);
    assert!(err.contains("unknown tokenizer preset"), "{err}");
    let err = fails(&[
        "tokenizer",
        "eval",
        "--ckpt",
        &p("push"),
        "--data",
        &p("held-out"),
    ]);
    assert!(err.contains("not a tokenizer"), "{err}");
}
