//! `cersa`: convert model checkpoints into their energy-retaining SVD subspace (CERSA v1).
//!
//! Data flows one way: [`input`] (one module per source format) → [`decompose`] (routes
//! behind one trait, the rank rule) → [`convert`] (the pipeline) → `cersa-loader`'s writer.
//! [`inspect`] reports spectra and ranks without writing anything.
#![deny(unsafe_code)]

pub mod budget;
pub mod cli;
pub mod convert;
pub mod decompose;
pub mod error;
pub mod input;
pub mod inspect;
pub mod journal;
pub mod linalg;
pub mod matrix;
pub mod merge;
pub mod report;
pub mod select;
pub mod storage;
pub mod trace;
pub mod verify;

pub use error::{ConvertError, Result};
