//! Integration tests: run the real `cersa` binary in temporary directories.

mod util;

mod convert;
mod cuda_route;
mod experts;
mod experts_inspect;
mod export;
mod faults;
mod gguf;
mod gguf_split;
mod lapack;
mod malformed;
mod memory;
mod merge;
mod parts;
mod plan;
mod pytorch;
mod pytorch_sharded;
mod quant;
mod report;
mod resume;
mod side_files;
mod special_files;
mod verify;
mod whitened;
