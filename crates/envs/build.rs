//! With the `atari` feature: builds the Arcade Learning Environment from the ale-py source
//! package (fetched by the asset step) with cmake, and the C bridge in `csrc/` with cc.
//! Without it: nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/ale_shim.cpp");
    #[cfg(feature = "atari")]
    atari::build();
}

#[cfg(feature = "atari")]
mod atari {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn run(cmd: &mut Command, what: &str) {
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e} (is cmake installed? Debian: apt-get install cmake)"));
        assert!(status.success(), "{what} failed ({status}): {cmd:?}");
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("create dir");
        for entry in std::fs::read_dir(from).expect("read dir").flatten() {
            let dest = to.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                copy_tree(&entry.path(), &dest);
            } else {
                std::fs::copy(entry.path(), &dest).expect("copy");
            }
        }
    }

    pub fn build() {
        let src = dws_assets::ensure("ale-src")
            .unwrap_or_else(|e| panic!("fetching the ALE sources: {e}"));
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        // Work on a copy: the cache stays as verified, and link-time optimisation (which
        // ALE's CMakeLists turns on, and which leaves objects a Rust link cannot use)
        // is switched off in the copy.
        let tree = out.join("ale-src");
        let _ = std::fs::remove_dir_all(&tree);
        copy_tree(&src, &tree);
        let cml = tree.join("src/ale/CMakeLists.txt");
        let text = std::fs::read_to_string(&cml).expect("read CMakeLists");
        std::fs::write(
            &cml,
            text.replace(
                "set(CMAKE_INTERPROCEDURAL_OPTIMIZATION TRUE)",
                "set(CMAKE_INTERPROCEDURAL_OPTIMIZATION FALSE)",
            ),
        )
        .expect("write CMakeLists");
        let build = out.join("ale-build");
        let jobs = std::env::var("NUM_JOBS").unwrap_or_else(|_| "2".into());
        run(
            Command::new("cmake")
                .arg("-S")
                .arg(&tree)
                .arg("-B")
                .arg(&build)
                .args([
                    "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_CPP_LIB=ON",
                    "-DBUILD_PYTHON_LIB=OFF",
                    "-DSDL_SUPPORT=OFF",
                    "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",
                ]),
            "configuring ALE",
        );
        run(
            Command::new("cmake").arg("--build").arg(&build).args([
                "--target",
                "ale-lib",
                "--parallel",
                &jobs,
            ]),
            "building ALE",
        );
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .opt_level(3)
            .warnings(false)
            .flag("-w")
            .include(tree.join("src"))
            .include(build.join("src/ale"))
            .file("csrc/ale_shim.cpp")
            .compile("dws_ale_shim");
        println!(
            "cargo:rustc-link-search=native={}",
            build.join("src/ale").display()
        );
        println!("cargo:rustc-link-lib=static=ale");
        println!("cargo:rustc-link-lib=dylib=z");
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
}
