//! What the command-line tests share.

use std::path::{Path, PathBuf};

/// `test-tmp` in cargo's target folder (which follows `CARGO_TARGET_DIR`).
pub fn test_tmp() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("test-tmp")
}
