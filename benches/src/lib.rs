//! # benches
//!
//! Reproducible performance figures for the FHIR server, each beside a baseline measured in the
//! same run:
//!
//! - [`generate`]: deterministic test data (patients with synthetic fødselsnummer, PHG home
//!   measurements, CarePlans, QuestionnaireResponses, Appointments) as NDJSON or Bundles.
//! - [`workload`]: the HTTP requests of the ingest and search benchmarks, built from a dataset.
//! - [`load`]: a closed-loop HTTP client that runs a workload at a given concurrency and keeps
//!   latency histograms per request kind.
//! - [`baseline`]: the limit: a minimal axum server that answers each request with the response
//!   bytes the real server gave for it, from memory (no store, no index).
//! - [`server`]: starts the real server in-process over a data folder, or the baseline.
//! - [`report`]: markdown table, JSON file and SVG chart of a run.
//! - [`run`]: the whole benchmark as one call, as the `fhir-bench` binary and the smoke test
//!   use it.
//!
//! The micro-benchmarks (parse, search-parameter extraction, store write, index write, search)
//! are criterion benches in `benches/micro.rs`: `cargo bench -p benches`. See `README.md` for
//! the commands and the latest figures.
#![warn(missing_docs)]

pub mod auth;
pub mod baseline;
pub mod generate;
pub mod load;
pub mod report;
pub mod run;
pub mod server;
pub mod workload;

/// What went wrong in a benchmark run, in words for the person who started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchError(pub String);

impl BenchError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> BenchError {
        BenchError(msg.into())
    }
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

impl From<std::io::Error> for BenchError {
    fn from(e: std::io::Error) -> Self {
        BenchError(e.to_string())
    }
}
