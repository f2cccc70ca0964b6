//! Action embedders: what turns the actions of a clip into one embedding per frame.
//!
//! - `text` (discrete actions, the paper's choice): each action's language template is
//!   embedded once by the frozen MiniLM encoder; a trainable linear layer projects it to
//!   the conditioning width.
//! - `linear` (continuous actions): a trainable linear layer on the action vector.
//! - `table` (discrete; the ablation baseline): a learned embedding per action id.
//!
//! Frame 0 of a clip has no action before it and gets a learned "no action" embedding;
//! frame `i > 0` gets the embedding of the action taken after frame `i - 1`.

use crate::minilm::{MiniLm, WIDTH as TEXT_WIDTH};
use crate::{ModelError, Result};
use burn::module::{Initializer, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderKind {
    Text,
    Linear,
    Table,
}

impl std::str::FromStr for EmbedderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "linear" => Ok(Self::Linear),
            "table" => Ok(Self::Table),
            _ => Err(format!("unknown embedder `{s}`: text, linear or table")),
        }
    }
}

/// How actions arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ActionKind {
    /// Ids `0..n`, each with a template.
    Discrete { n: usize, templates: Vec<String> },
    /// Vectors of `dim` floats.
    Continuous { dim: usize },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedderConfig {
    pub kind: EmbedderKind,
    pub actions: ActionKind,
    /// Width of the embeddings handed to the action modules.
    pub cond_dim: usize,
}

/// The actions of a batch of clips: `F - 1` per clip.
#[derive(Clone, Debug)]
pub enum ActionBatch<B: Backend> {
    /// `[B, F-1]` ids.
    Discrete(Tensor<B, 2, Int>),
    /// `[B, F-1, D]`.
    Continuous(Tensor<B, 3>),
}

#[derive(Module, Debug)]
pub struct ActionEmbedder<B: Backend> {
    /// Frozen template embeddings `[n, 384]` (text kind).
    text: Option<Param<Tensor<B, 2>>>,
    /// Projection to `cond_dim` (text and linear kinds).
    proj: Option<Linear<B>>,
    /// Learned table (table kind).
    table: Option<Embedding<B>>,
    /// `[cond_dim]`, for frame 0.
    no_action: Param<Tensor<B, 1>>,
}

impl EmbedderConfig {
    /// Builds the embedder; the text kind runs MiniLM over the templates once (the
    /// embeddings are then part of the module, saved with it).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ActionEmbedder<B>> {
        self.build(device, true)
    }

    /// The same structure without running the text encoder (template embeddings are
    /// zeros): a skeleton to load a checkpoint into.
    pub fn init_skeleton<B: Backend>(&self, device: &B::Device) -> Result<ActionEmbedder<B>> {
        self.build(device, false)
    }

    fn build<B: Backend>(&self, device: &B::Device, encode: bool) -> Result<ActionEmbedder<B>> {
        let no_action = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        }
        .init([self.cond_dim], device);
        let mut e = ActionEmbedder {
            text: None,
            proj: None,
            table: None,
            no_action,
        };
        match (&self.actions, self.kind) {
            (ActionKind::Discrete { templates, n }, EmbedderKind::Text) => {
                if templates.len() != *n {
                    return Err(ModelError::Invalid(format!(
                        "{n} discrete actions but {} templates",
                        templates.len()
                    )));
                }
                let table = if encode {
                    MiniLm::<B>::from_asset(device)?.embed_all(templates)?
                } else {
                    Tensor::zeros([*n, TEXT_WIDTH], device)
                };
                e.text = Some(Param::from_tensor(table).set_require_grad(false));
                e.proj = Some(LinearConfig::new(TEXT_WIDTH, self.cond_dim).init(device));
            }
            (ActionKind::Discrete { n, .. }, EmbedderKind::Table) => {
                e.table = Some(EmbeddingConfig::new(*n, self.cond_dim).init(device));
            }
            (ActionKind::Continuous { dim }, EmbedderKind::Linear) => {
                e.proj = Some(LinearConfig::new(*dim, self.cond_dim).init(device));
            }
            (actions, kind) => {
                return Err(ModelError::Invalid(format!(
                    "the {kind:?} embedder does not take {actions:?} actions (discrete: text or \
                     table; continuous: linear)"
                )))
            }
        }
        Ok(e)
    }
}

impl<B: Backend> ActionEmbedder<B> {
    /// `[B, F, cond_dim]` for a batch of `F - 1` actions per clip.
    pub fn forward(&self, actions: ActionBatch<B>) -> Tensor<B, 3> {
        let embedded = match actions {
            ActionBatch::Discrete(ids) => {
                let [b, s] = ids.dims();
                if let Some(table) = &self.table {
                    table.forward(ids)
                } else {
                    let text = self.text.as_ref().expect("text or table").val().detach();
                    let rows = text.select(0, ids.reshape([b * s])); // [B*(F-1), 384]
                    let proj = self.proj.as_ref().expect("text has a projection");
                    proj.forward(rows).reshape([b, s, self.cond_dim()])
                }
            }
            ActionBatch::Continuous(v) => self.proj.as_ref().expect("linear").forward(v),
        };
        let [b, _, d] = embedded.dims();
        let first = self.no_action.val().reshape([1, 1, d]).expand([b, 1, d]);
        Tensor::cat(vec![first, embedded], 1)
    }

    pub fn cond_dim(&self) -> usize {
        self.no_action.dims()[0]
    }
}
