//! Integration tests: run the real `cersa` binary in temporary directories.

mod util;

mod convert;
mod gguf;
mod malformed;
mod memory;
mod report;
mod resume;
mod verify;
