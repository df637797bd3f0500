//! # benches
//!
//! Criterion micro-benchmarks and a load generator measuring ingest and search throughput
//! against a running server. Not built yet; see the benchmarks issue.
