//! `--device cpu|cuda:N`: the only place that names concrete backends.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: cpu or cuda:N")),
        }
    }
}

/// Work that runs on any training backend.
pub trait Job {
    type Out;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Self::Out>;
}

/// A trained `dws ppo` agent as a collection policy, on the CPU (collection runs one env
/// step at a time per worker); and the checkpoint it acts with.
pub fn cpu_ppo_policy(
    run: &std::path::Path,
    spec: &dws_envs::EnvSpec,
    greedy: bool,
) -> Result<(Box<dyn dws_envs::Policy>, std::path::PathBuf)> {
    let p = dws_rl::policy::PpoPolicy::<burn::backend::Flex>::load(
        run,
        spec,
        greedy,
        &Default::default(),
    )?;
    let ckpt = p.checkpoint.clone();
    Ok((Box::new(p), ckpt))
}

/// Runs `job` on the chosen device.
pub fn dispatch<J: Job>(device: DeviceArg, job: J) -> Result<J::Out> {
    match device {
        DeviceArg::Cpu => {
            job.run::<burn::backend::Autodiff<burn::backend::Flex>>(Default::default())
        }
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda(i) => job.run::<burn::backend::Autodiff<burn::backend::Cuda>>(
            burn::backend::cuda::CudaDevice::new(i),
        ),
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda(_) => anyhow::bail!(
            "this dws was built without CUDA; rebuild with `cargo build --release --features cuda`"
        ),
    }
}
