//! Compiles the .proto files with the vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through PROTOC; a build script is single-threaded, so setting it is sound.
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure().file_descriptor_set_path(out.join("coffer_descriptor.bin")).compile_protos(
        &[
            "proto/coffer/v1/secrets.proto",
            "proto/coffer/v1/operator.proto",
            "proto/coffer/v1/keys.proto",
            "proto/coffer/v1/auth.proto",
            "proto/coffer/raft/v1/raft.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
