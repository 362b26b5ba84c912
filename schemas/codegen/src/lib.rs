//! Regenerates `schemas/src/gen/*.rs` from `schemas/proto/**/*.proto`.
//!
//! The generated code is committed so that building tidings needs neither `protoc` nor this
//! crate; `cargo run -p tidings-codegen` rewrites it after a .proto change, and the test
//! `generated_code_is_current` fails when someone forgets.

use std::path::{Path, PathBuf};

/// The .proto files, relative to `schemas/proto`.
pub const PROTOS: &[&str] = &[
    "tidings/v1/events.proto",
    "tidings/storage/v1/storage.proto",
    "tidings/client/v1/client.proto",
    "tidings/internal/v1/delivery.proto",
];

/// `schemas/`, found from this crate's manifest directory.
pub fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("codegen lives inside schemas/")
        .to_path_buf()
}

/// Compiles the .proto files with protox (pure Rust) and writes prost code into `out_dir`.
pub fn generate(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = schemas_dir().join("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| proto_root.join(p)).collect();
    let descriptors = protox::compile(&files, [&proto_root])?;
    std::fs::create_dir_all(out_dir)?;
    prost_build::Config::new()
        .out_dir(out_dir)
        .compile_fds(descriptors)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_code_is_current() {
        let tmp = std::env::temp_dir().join(format!("tidings-codegen-{}", std::process::id()));
        generate(&tmp).expect("generate");
        let committed = schemas_dir().join("src/gen");
        let mut names: Vec<_> = std::fs::read_dir(&tmp)
            .expect("read generated dir")
            .map(|e| e.expect("dir entry").file_name())
            .collect();
        names.sort();
        assert!(!names.is_empty(), "codegen produced no files");
        for name in names {
            let fresh = std::fs::read_to_string(tmp.join(&name)).expect("read fresh");
            let old = std::fs::read_to_string(committed.join(&name)).unwrap_or_default();
            assert!(
                fresh == old,
                "schemas/src/gen/{} is stale: run `cargo run -p tidings-codegen`",
                name.to_string_lossy()
            );
        }
        std::fs::remove_dir_all(&tmp).ok();
    }
}
