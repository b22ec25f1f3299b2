//! Integration tests: run the real `cersa` binary in temporary directories.

mod util;

mod convert;
mod report;
mod verify;
