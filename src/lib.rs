//! Helpers shared by the cross-crate tests in tests/ and the benches.
