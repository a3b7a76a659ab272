//! Builds the guests in `guests/` (their own freestanding workspace) and
//! generates the table that embeds them in this crate.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guests_dir = manifest_dir.join("guests");
    let target_dir = out_dir.join("guest-target");
    println!("cargo:rerun-if-changed={}", guests_dir.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", guests_dir.join("link.ld").display());
    println!("cargo:rerun-if-changed={}", guests_dir.join(".cargo").display());

    let guests = guest_crates(&guests_dir);
    for dir in guests.iter().map(|g| guests_dir.join(&g.0)).chain([guests_dir.join("rt")]) {
        println!("cargo:rerun-if-changed={}", dir.display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(&guests_dir).args(["build", "--release", "--workspace", "--target-dir"]).arg(&target_dir);
    // The outer build's flags and target are for the VMM, not for the guests,
    // whose own .cargo/config.toml sets how they link.
    for var in
        ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER"]
    {
        build.env_remove(var);
    }
    let status = build.status().expect("could not run cargo to build the guest images");
    assert!(status.success(), "building the guest images in {} failed", guests_dir.display());

    let mut table = String::from("/// Every embedded guest, in name order.\npub static GUESTS: &[Guest] = &[\n");
    for (name, description) in &guests {
        let image = target_dir.join("release").join(name);
        assert!(image.is_file(), "guest image {} was not built", image.display());
        table.push_str(&format!(
            "    Guest {{ name: {name:?}, description: {description:?}, image: include_bytes!({:?}) }},\n",
            image.display().to_string()
        ));
    }
    table.push_str("];\n");
    fs::write(out_dir.join("guests.rs"), table).expect("could not write guests.rs");
}

/// (name, description) of each guest crate: every directory of `guests/` with
/// a Cargo.toml and a `src/main.rs`.
fn guest_crates(guests_dir: &Path) -> Vec<(String, String)> {
    let mut guests = Vec::new();
    let entries = fs::read_dir(guests_dir).expect("guest-images/guests is missing");
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("src/main.rs").is_file() {
            continue;
        }
        let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
        let field = |key: &str| {
            manifest.lines().find_map(|line| {
                let value = line.trim().strip_prefix(key)?.trim_start().strip_prefix('=')?;
                Some(value.trim().trim_matches('"').to_string())
            })
        };
        if let (Some(name), description) = (field("name"), field("description")) {
            guests.push((name, description.unwrap_or_default()));
        }
    }
    guests.sort();
    guests
}
