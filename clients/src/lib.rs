//! `kiwi-client`, the Rust client library for Kiwi, and (as binaries of this folder) the `kiwi` CLI and the
//! benchmark tool.
//!
//! Nothing is implemented yet: the client needs the replicated KV API, which arrives with the data-node
//! issue. Until then, any gRPC stack can talk to a node with stubs generated from `proto/kiwi/v1/*.proto`.
