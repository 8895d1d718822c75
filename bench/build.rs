//! Compiles the trimmed etcd KV contract (the etcd baseline's client) with the vendored protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through PROTOC; a build script is single-threaded, so setting it is sound.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().build_server(false).compile_protos(&["proto/etcdserverpb/kv.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
