//! Compiles `proto/` into the client and server code that `coordinator/` and `clients/` share.
//!
//! protox parses the .proto files in Rust, so a fresh machine needs no `protoc`. The encoded
//! descriptor set is also written to OUT_DIR for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &[
    "proto/lockstep/coordinator/v1/coordinator.proto",
    "proto/lockstep/coordinator/v1/admin.proto",
    "proto/lockstep/coordinator/v1/peer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::Compiler::new([PROTO_ROOT])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTO_FILES)?
        .file_descriptor_set();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("lockstep_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
