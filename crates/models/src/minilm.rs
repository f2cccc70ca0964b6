//! all-MiniLM-L6-v2 (a 6-layer BERT, width 384) in burn: the frozen text encoder that
//! turns action templates into embeddings (mean pooling over tokens, L2-normalised, as
//! sentence-transformers does). Weights and tokenizer come from the `minilm` asset.

use crate::{ModelError, Result};
use burn::prelude::*;
use dws_kernels::{gelu, softmax};
use safetensors::SafeTensors;
use std::path::Path;

const LAYERS: usize = 6;
const HEADS: usize = 12;
const EPS: f64 = 1e-12;
/// Output width.
pub const WIDTH: usize = 384;

struct Dense<B: Backend> {
    /// `[in, out]` (transposed from the checkpoint's `[out, in]`).
    w: Tensor<B, 2>,
    b: Tensor<B, 1>,
}

impl<B: Backend> Dense<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.w.clone()) + self.b.clone().unsqueeze::<2>()
    }
}

struct Norm<B: Backend> {
    g: Tensor<B, 1>,
    b: Tensor<B, 1>,
}

impl<B: Backend> Norm<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mean = x.clone().mean_dim(1);
        let centred = x - mean;
        let var = centred.clone().powf_scalar(2.0).mean_dim(1);
        centred / (var + EPS).sqrt() * self.g.clone().unsqueeze::<2>()
            + self.b.clone().unsqueeze::<2>()
    }
}

struct Layer<B: Backend> {
    q: Dense<B>,
    k: Dense<B>,
    v: Dense<B>,
    out: Dense<B>,
    norm1: Norm<B>,
    up: Dense<B>,
    down: Dense<B>,
    norm2: Norm<B>,
}

/// The encoder with its tokenizer.
pub struct MiniLm<B: Backend> {
    tokenizer: tokenizers::Tokenizer,
    word: Tensor<B, 2>,
    position: Tensor<B, 2>,
    token_type: Tensor<B, 2>,
    norm: Norm<B>,
    layers: Vec<Layer<B>>,
}

impl<B: Backend> MiniLm<B> {
    /// Loads from the `minilm` asset (fetched on first use).
    pub fn from_asset(device: &B::Device) -> Result<Self> {
        let dir = dws_assets::ensure("minilm")?;
        Self::load(&dir, device)
    }

    /// Loads `model.safetensors` and `tokenizer.json` from a model folder.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let weights_path = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights_path).map_err(|e| ModelError::Io {
            path: weights_path.clone(),
            source: e,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Weights {
            path: weights_path.clone(),
            detail: e.to_string(),
        })?;
        let tensor = |name: &str| -> Result<(Vec<f32>, Vec<usize>)> {
            let t = st.tensor(name).map_err(|_| ModelError::Weights {
                path: weights_path.clone(),
                detail: format!("no tensor `{name}`"),
            })?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(ModelError::Weights {
                    path: weights_path.clone(),
                    detail: format!("`{name}` is {:?}, expected F32", t.dtype()),
                });
            }
            let data = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok((data, t.shape().to_vec()))
        };
        let t1 = |name: &str| -> Result<Tensor<B, 1>> {
            let (d, s) = tensor(name)?;
            Ok(Tensor::from_data(TensorData::new(d, [s[0]]), device))
        };
        let t2 = |name: &str| -> Result<Tensor<B, 2>> {
            let (d, s) = tensor(name)?;
            Ok(Tensor::from_data(TensorData::new(d, [s[0], s[1]]), device))
        };
        let dense = |prefix: &str| -> Result<Dense<B>> {
            Ok(Dense {
                w: t2(&format!("{prefix}.weight"))?.transpose(),
                b: t1(&format!("{prefix}.bias"))?,
            })
        };
        let norm = |prefix: &str| -> Result<Norm<B>> {
            Ok(Norm {
                g: t1(&format!("{prefix}.weight"))?,
                b: t1(&format!("{prefix}.bias"))?,
            })
        };
        let layers = (0..LAYERS)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    q: dense(&format!("{p}.attention.self.query"))?,
                    k: dense(&format!("{p}.attention.self.key"))?,
                    v: dense(&format!("{p}.attention.self.value"))?,
                    out: dense(&format!("{p}.attention.output.dense"))?,
                    norm1: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    up: dense(&format!("{p}.intermediate.dense"))?,
                    down: dense(&format!("{p}.output.dense"))?,
                    norm2: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ModelError::Weights {
                path: tok_path.clone(),
                detail: e.to_string(),
            })?;
        // One sentence at a time: no padding, so every token counts in the mean.
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer,
            word: t2("embeddings.word_embeddings.weight")?,
            position: t2("embeddings.position_embeddings.weight")?,
            token_type: t2("embeddings.token_type_embeddings.weight")?,
            norm: norm("embeddings.LayerNorm")?,
            layers,
        })
    }

    /// Token ids of a sentence (with `[CLS]` and `[SEP]`, truncated at 128).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Invalid(format!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Unit-length sentence embedding `[384]`.
    pub fn embed(&self, text: &str) -> Result<Tensor<B, 1>> {
        let ids = self.tokenize(text)?;
        let n = ids.len();
        let device = self.word.device();
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [n]),
            &device,
        );
        let pos = Tensor::<B, 1, Int>::arange(0..n as i64, &device);
        let x = self.word.clone().select(0, idx)
            + self.position.clone().select(0, pos)
            + self.token_type.clone().narrow(0, 0, 1);
        let mut x = self.norm.forward(x); // [n, 384]
        let hd = WIDTH / HEADS;
        for layer in &self.layers {
            let heads = |t: Tensor<B, 2>| t.reshape([n, HEADS, hd]).swap_dims(0, 1); // [H, n, hd]
            let q = heads(layer.q.forward(x.clone()));
            let k = heads(layer.k.forward(x.clone()));
            let v = heads(layer.v.forward(x.clone()));
            let scores = q.matmul(k.swap_dims(1, 2)) / (hd as f64).sqrt();
            let ctx = softmax(scores)
                .matmul(v)
                .swap_dims(0, 1)
                .reshape([n, WIDTH]);
            x = layer.norm1.forward(x + layer.out.forward(ctx));
            let h = layer.down.forward(gelu(layer.up.forward(x.clone())));
            x = layer.norm2.forward(x + h);
        }
        let pooled = x.mean_dim(0).reshape([WIDTH]);
        let norm = pooled
            .clone()
            .powf_scalar(2.0)
            .sum()
            .sqrt()
            .clamp_min(1e-12);
        Ok(pooled / norm)
    }

    /// Embeddings of several sentences, `[n, 384]`.
    pub fn embed_all(&self, texts: &[String]) -> Result<Tensor<B, 2>> {
        let rows = texts
            .iter()
            .map(|t| self.embed(t))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(rows, 0))
    }
}
