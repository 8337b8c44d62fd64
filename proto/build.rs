//! Compiles `kiwi/v1/*.proto` with protox (pure Rust: no protoc needed) and generates tonic/prost code.
//! The encoded descriptor set is written next to the generated code for `tonic-reflection`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "kiwi/v1/kv.proto",
    "kiwi/v1/raft.proto",
    "kiwi/v1/admin.proto",
    "kiwi/v1/control.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("kiwi_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
