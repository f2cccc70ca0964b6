//! `--backbone ar` end to end on the debug presets (pushing task, no assets): a tokenizer,
//! an action-free AR base, DWS fine-tuning with and without actions (an interrupted and
//! resumed run logs the same losses as an uninterrupted one), `predict` and `eval` on
//! held-out episodes, and the errors a user meets on the way.

mod common;

use common::{fails, losses, ok};

#[test]
fn ar_backbone_pretrains_finetunes_resumes_predicts_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    for (out, seed) in [("push", "0"), ("held-out", "7")] {
        ok(&[
            "collect",
            "--env",
            "push",
            "--policy",
            "scripted",
            "--episodes",
            "3",
            "--seed",
            seed,
            "--env-opts",
            "max_episode_steps=24",
            "--out",
            &p(out),
        ]);
    }
    ok(&[
        "tokenizer",
        "train",
        "--data",
        &p("push"),
        "--preset",
        "debug",
        "--steps",
        "10",
        "--out",
        &p("tok"),
    ]);
    let err = fails(&[
        "pretrain",
        "--backbone",
        "ar",
        "--data",
        &p("push"),
        "--out",
        &p("x"),
    ]);
    assert!(err.contains("--tokenizer"), "{err}");
    let text = ok(&[
        "pretrain",
        "--backbone",
        "ar",
        "--tokenizer",
        &p("tok"),
        "--data",
        &p("push"),
        "--steps",
        "4",
        "--out",
        &p("base"),
    ]);
    assert!(text.contains("256 tokens per frame"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("base") + "/config.json").unwrap())
            .unwrap();
    assert_eq!(cfg["backbone"], "ar");
    assert_eq!(cfg["model"]["vocab"], 64);

    let (base, push) = (p("base"), p("push"));
    let ft = |out: &str, extra: &[&str]| {
        let out = p(out);
        let mut args = vec![
            "finetune", "--base", &base, "--data", &push, "--steps", "4", "--out", &out,
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    ft("ft", &[]);
    ft("resumed", &["--stop-after", "2"]);
    assert_eq!(losses(&tmp.path().join("resumed")).len(), 2);
    ft("resumed", &["--resume"]);
    assert_eq!(
        losses(&tmp.path().join("ft")),
        losses(&tmp.path().join("resumed")),
        "a resumed AR fine-tune differs from an uninterrupted one"
    );
    ft("no-actions", &["--action-module", "off"]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("ft") + "/config.json").unwrap()).unwrap();
    assert_eq!(cfg["train"]["motion_loss"], "softmax-max");
    assert!(cfg["dws"].is_object());

    // Past the 4-frame window: 1 context frame, 6 predicted.
    let gif = p("pred.gif");
    let text = ok(&[
        "predict",
        "--ckpt",
        &p("ft"),
        "--data",
        &p("held-out"),
        "--episodes",
        "2",
        "--horizon",
        "6",
        "--out",
        &gif,
    ]);
    assert!(
        text.contains("with actions, tokens at temperature"),
        "{text}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("pred.json")).unwrap()).unwrap();
    assert_eq!(report["backbone"], "ar");
    assert!(report["mean_psnr"].as_f64().unwrap().is_finite());
    assert!(std::fs::metadata(&gif).unwrap().len() > 1000);

    let text = ok(&[
        "eval",
        "--ckpt",
        &p("no-actions"),
        "--data",
        &p("held-out"),
        "--clips",
        "3",
        "--horizon",
        "5",
        "--no-fvd",
        "--temperature",
        "0",
        "--out",
        &p("eval"),
    ]);
    assert!(text.contains("repeat last frame"), "{text}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("eval") + "/metrics.json").unwrap())
            .unwrap();
    assert_eq!(m["with_actions"], false);
    assert_eq!(
        m["sampling"], "greedy tokens",
        "--temperature 0 overrides the config"
    );
    assert_eq!(m["model"]["psnr_per_frame"].as_array().unwrap().len(), 5);

    // Flow-only flags and commands say what they take.
    let err = fails(&[
        "predict",
        "--ckpt",
        &p("ft"),
        "--data",
        &p("held-out"),
        "--sample-steps",
        "2",
        "--out",
        &p("x.gif"),
    ]);
    assert!(err.contains("--backbone ar"), "{err}");
    let err = fails(&[
        "eval",
        "--ckpt",
        &p("ft"),
        "--data",
        &p("held-out"),
        "--temperature=-1",
    ]);
    assert!(err.contains("0 (greedy) or more"), "{err}");
    let err = fails(&[
        "finetune",
        "--base",
        &p("ft"),
        "--data",
        &p("push"),
        "--out",
        &p("ft2"),
    ]);
    assert!(err.contains("already fine-tuned"), "{err}");
    let err = fails(&["play", "--ckpt", &p("ft"), "--port", "0"]);
    assert!(err.contains("autoregressive"), "{err}");
}
