//! Checkpoints of a training run: `checkpoints/step-NNNNNNNN/` holding
//! - `model.safetensors`: the weights, for other tools and for loading a base model;
//! - `model.mpk`: burn's record of the model (keeps parameter ids, which the optimizer
//!   state is keyed by: this is what `--resume` loads);
//! - `optim.bin`: the optimizer state;
//! - `state.json`: step, random-generator position, the loss of the last step.
//!
//! Each is written into a temporary directory that is renamed into place, so a crash
//! leaves the previous checkpoint intact; only the newest `keep_last` are kept.

use crate::{ModelError, Result};
use burn::module::Module;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

/// What a checkpoint records besides the weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: usize,
    /// ChaCha8 stream: seed and word position.
    pub rng_seed: u64,
    pub rng_word_pos: u128,
    pub last_loss: f32,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Checkpoint directories of a run, oldest first.
pub fn list(run: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(checkpoints_dir(run))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("step-") && !n.contains(".tmp"))
                        && p.join("state.json").is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The newest complete checkpoint of a run, or the directory itself when it is one.
pub fn latest(path: &Path) -> Option<PathBuf> {
    if path.join("state.json").is_file() {
        return Some(path.to_path_buf());
    }
    list(path).pop()
}

pub fn read_state(ckpt: &Path) -> Result<TrainState> {
    let p = ckpt.join("state.json");
    let text = fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Weights {
        path: p,
        detail: e.to_string(),
    })
}

/// Writes a checkpoint and prunes old ones.
pub fn save<B: Backend, M: Module<B>>(
    run: &Path,
    model: &M,
    optim_record: impl burn::record::Record<B>,
    state: &TrainState,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!("{name}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let weights_err = |e: String| ModelError::Weights {
        path: tmp.clone(),
        detail: e,
    };
    let mut store = SafetensorsStore::from_file(tmp.join("model.safetensors")).overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| weights_err(format!("{e:?}")))?;
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    model
        .clone()
        .save_file(tmp.join("model"), &recorder)
        .map_err(|e| weights_err(e.to_string()))?;
    let bin = burn::record::BinFileRecorder::<FullPrecisionSettings>::new();
    burn::record::Recorder::<B>::record(&bin, optim_record, tmp.join("optim"))
        .map_err(|e| weights_err(e.to_string()))?;
    let sp = tmp.join("state.json");
    fs::write(
        &sp,
        serde_json::to_string_pretty(state).expect("state serialises"),
    )
    .map_err(io(&sp))?;
    let dest = root.join(&name);
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&tmp, &dest).map_err(io(&dest))?;
    let all = list(run);
    if all.len() > keep_last.max(1) {
        for old in &all[..all.len() - keep_last.max(1)] {
            let _ = fs::remove_dir_all(old);
        }
    }
    Ok(dest)
}

/// Loads a model record into a skeleton built from the same config.
pub fn load_model<B: Backend, M: Module<B>>(
    skeleton: M,
    ckpt: &Path,
    device: &B::Device,
) -> Result<M> {
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    skeleton
        .load_file(ckpt.join("model"), &recorder, device)
        .map_err(|e| ModelError::Weights {
            path: ckpt.join("model.mpk"),
            detail: e.to_string(),
        })
}

/// Loads an optimizer record.
pub fn load_optim<B: Backend, R: burn::record::Record<B>>(
    ckpt: &Path,
    device: &B::Device,
) -> Result<R> {
    let bin = burn::record::BinFileRecorder::<FullPrecisionSettings>::new();
    burn::record::Recorder::<B>::load(&bin, ckpt.join("optim.bin"), device).map_err(|e| {
        ModelError::Weights {
            path: ckpt.join("optim.bin"),
            detail: e.to_string(),
        }
    })
}
