//! `cersa`: convert model checkpoints into their energy-retaining SVD subspace (CERSA v1).
//!
//! Data flows one way: [`input`] (one module per source format) → [`decompose`] (routes
//! behind one trait, the rank rule; numerical kernels in a private `linalg` layer) →
//! [`convert`] (the pipeline) → `cersa-loader`'s writer. [`inspect`] and [`report`] read
//! spectra and ranks without writing a checkpoint; [`verify`] checks one; [`merge`] folds an
//! adapter into one.
//!
//! The public API is what the binary (`src/main.rs`, through [`cli`]) and the tests use: the
//! entry point of each subcommand, its options and its `Serialize` report. Internals stay
//! private so the compiler sees dead code; the kernel benchmarks (`examples/bench_symeig.rs`,
//! `examples/bench_twostage.rs`) reach `linalg` through the cargo feature `bench-internals`.
#![deny(unsafe_code)]

pub mod assemble;
mod budget;
pub mod calibration;
pub mod cli;
pub mod convert;
pub mod decompose;
pub mod error;
pub mod export;
pub mod input;
pub mod inspect;
mod journal;
#[cfg(feature = "bench-internals")]
pub mod linalg;
#[cfg(not(feature = "bench-internals"))]
mod linalg;
mod matrix;
pub mod merge;
pub mod plan;
pub mod rank_rules;
pub mod report;
mod select;
pub mod side_files;
pub mod storage;
pub mod trace;
pub mod verify;

pub use error::{ConvertError, Result};
