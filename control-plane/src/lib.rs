//! `kiwi-control`, Kiwi's control plane: nodes register and heartbeat to it with their metrics, and its
//! replies carry scaling and priority policy and fault commands (see `proto/kiwi/v1/control.proto` and
//! `ARCHITECTURE.md`).
//!
//! Nothing is implemented yet: this crate holds the place in the workspace so that the layout is fixed
//! from the start. Its modules arrive with the control-plane issue.
