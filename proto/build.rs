//! Compiles `kiwi/v1/*.proto` and `etcd/*.proto` with protox (pure Rust: no protoc needed) and generates tonic/prost code.
//! The encoded descriptor set is written next to the generated code for `tonic-reflection`.
//!
//! Servers and clients are generated with different codecs (see `src/codec.rs`): generated servers use
//! [`SERVER_CODEC`], which answers an undecodable request with `INVALID_ARGUMENT`; generated clients keep
//! tonic's own `tonic_prost::ProstCodec` (an undecodable *response* is the server's fault, so it stays
//! `INTERNAL`). `tonic_prost_build::Builder` takes one codec path for both, so the build runs two of its
//! service generators (one client-only, one server-only) side by side on one `prost_build::Config`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "kiwi/v1/kv.proto",
    "kiwi/v1/raft.proto",
    "kiwi/v1/admin.proto",
    "kiwi/v1/control.proto",
    "etcd/kv.proto",
    "etcd/rpc.proto",
];

/// Codec of the generated servers, as a path from the generated code (which lives in this crate).
const SERVER_CODEC: &str = "crate::codec::ServerCodec";

/// Runs each service through every generator in turn (client code, then server code: the order tonic
/// uses when one generator builds both).
struct Generators(Vec<Box<dyn prost_build::ServiceGenerator>>);

impl prost_build::ServiceGenerator for Generators {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        for g in &mut self.0 {
            g.generate(service.clone(), buf);
        }
    }

    fn finalize(&mut self, buf: &mut String) {
        for g in &mut self.0 {
            g.finalize(buf);
        }
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        for g in &mut self.0 {
            g.finalize_package(package, buf);
        }
    }
}

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

    let clients = tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .service_generator();
    let servers = tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .codec_path(SERVER_CODEC)
        .service_generator();
    let mut config = prost_build::Config::new();
    config
        .out_dir(&out)
        .service_generator(Box::new(Generators(vec![clients, servers])));
    config.compile_fds(fds)?;
    Ok(())
}
