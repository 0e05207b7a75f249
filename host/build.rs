//! Builds the WebAssembly policy plugins in `plugins/` for `wasm32-wasip2` (release: debug plugins
//! run about five times slower), so that the normal `cargo build` / `cargo test` flow produces them.
//! The default plugins are embedded in the `tollgate` binary; every plugin's `.wasm` is also left in
//! `$OUT_DIR/plugins/` (exported to the crate as `TOLLGATE_PLUGIN_DIR`) for tests and benchmarks.
//!
//! The nested cargo uses its own target directory: the outer build holds the lock on the usual one.

use std::path::PathBuf;
use std::process::Command;

/// Every plugin crate, by file stem of its `.wasm`.
const PLUGINS: [&str; 4] = ["pricing-table", "health-weighted", "pricing-surge", "hostile"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("plugins");
    println!("cargo:rerun-if-changed={}", root.join("plugins").display());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!("cargo:rerun-if-changed={}", root.join("Cargo.lock").display());

    let target_dir = root.join("target").join("plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--locked",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir);
    for p in PLUGINS {
        cmd.args(["-p", &format!("tollgate-plugin-{p}")]);
    }
    // Flags meant for the host (coverage, sanitizers, native CPU) must not reach wasm.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort");
    let status = cmd.status().expect("running cargo to build the plugins");
    if !status.success() {
        panic!(
            "building the WebAssembly plugins failed. Is the target installed? Run: rustup target add wasm32-wasip2"
        );
    }
    std::fs::create_dir_all(&out).unwrap();
    for p in PLUGINS {
        let file = format!("tollgate_plugin_{}.wasm", p.replace('-', "_"));
        let from = target_dir.join("wasm32-wasip2").join("release").join(&file);
        std::fs::copy(&from, out.join(format!("{p}.wasm")))
            .unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
    }
    println!("cargo:rustc-env=TOLLGATE_PLUGIN_DIR={}", out.display());
}
