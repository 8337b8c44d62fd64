//! Compiles `kiwi/v1/*.proto` and `etcd/*.proto` with protox (pure Rust: no protoc needed) and generates tonic/prost code.
//! The encoded descriptor set is written next to the generated code for `tonic-reflection`.
//!
//! Servers and clients are generated with different codecs (see `src/codec.rs`): generated servers use
//! [`SERVER_CODEC`], which answers an undecodable request with `INVALID_ARGUMENT`; generated clients keep
//! tonic's own `tonic_prost::ProstCodec` (an undecodable *response* is the server's fault, so it stays
//! `INTERNAL`). `tonic_prost_build::Builder` takes one codec path for both, so the build runs two of its
//! service generators (one client-only, one server-only) side by side on one `prost_build::Config`.
//!
//! The server generator also sees the methods of [`ENCODED_ANSWERS`] answer `Encoded<T>` (see
//! `src/encoded.rs`) instead of `T`: their handlers encode the bulk of the answer in the storage stage.
//! Their clients still decode `T`.

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

/// Methods (package, service, method, the Rust module of the package's messages) whose generated server
/// answers `crate::encoded::Encoded<T>`.
const ENCODED_ANSWERS: &[(&str, &str, &str, &str)] =
    &[("kiwi.v1", "KvService", "Scan", "crate::v1")];

/// Runs each service through the client generator, then the server generator (the order tonic uses when
/// one generator builds both).
struct Generators {
    clients: Box<dyn prost_build::ServiceGenerator>,
    servers: Box<dyn prost_build::ServiceGenerator>,
}

impl prost_build::ServiceGenerator for Generators {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        self.clients.generate(service.clone(), buf);
        self.servers.generate(with_encoded_answers(service), buf);
    }

    fn finalize(&mut self, buf: &mut String) {
        self.clients.finalize(buf);
        self.servers.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.clients.finalize_package(package, buf);
        self.servers.finalize_package(package, buf);
    }
}

/// `service` with the answers of its [`ENCODED_ANSWERS`] methods as `Encoded<T>` (tonic takes an
/// output type starting with `crate::` as it is).
fn with_encoded_answers(mut service: prost_build::Service) -> prost_build::Service {
    for m in &mut service.methods {
        let encoded = ENCODED_ANSWERS.iter().find(|(package, name, method, _)| {
            (*package, *name, *method)
                == (
                    service.package.as_str(),
                    service.proto_name.as_str(),
                    m.proto_name.as_str(),
                )
        });
        if let Some((.., module)) = encoded {
            m.output_type = format!("crate::encoded::Encoded<{module}::{}>", m.output_type);
        }
    }
    service
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
        .service_generator(Box::new(Generators { clients, servers }));
    config.compile_fds(fds)?;
    Ok(())
}
