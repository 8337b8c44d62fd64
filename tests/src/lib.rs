//! Kiwi's shared test code. Test helpers are ordinary code, so scenarios read like their description.
//!
//! Modules:
//! - [`browser`]: headless Chromium through ChromeDriver (WebDriver), for tests of web pages.
//! - [`cluster`]: a cluster of real `kiwi-node` processes (start, SIGTERM, SIGKILL, restart, find the
//!   leader, `must_put`, `must_get_local`) for the replication scenarios in `tests/cluster.rs`.
//! - [`control`]: a `kiwi-control` process and its operator client, for tests with a control plane.
//! - [`conformance`]: the storage conformance suite, one function per property, run against every
//!   backend by `tests/storage_conformance.rs` (and by any new backend's tests).
//! - [`http`]: a bare HTTP GET, for the metrics endpoints and a real Prometheus server's API.
//! - [`ports`]: loopback ports for test processes, outside the kernel's ephemeral range.
//! - [`prometheus`]: a real Prometheus server scraping given jobs, and its query API.
//! - `src/bin/kiwi-crash-writer.rs`: a child process that writes acknowledged batches until it is killed,
//!   for the SIGKILL durability and atomicity tests in `tests/storage_crash.rs`.

pub mod browser;
pub mod cluster;
pub mod conformance;
pub mod control;
pub mod http;
pub mod ports;
pub mod prometheus;
