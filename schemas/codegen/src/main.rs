//! `cargo run -p tidings-codegen`: regenerate schemas/src/gen from the .proto files.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = tidings_codegen::schemas_dir().join("src/gen");
    tidings_codegen::generate(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
