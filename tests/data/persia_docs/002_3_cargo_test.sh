# 002 build notes, 理论 (theory). Fixes: none. Skipped: tests PERSIA's Rust crate rust/persia-embedding-server (PERSIA's repository, cargo).
cd rust/persia-embedding-server
cargo test test_indices_to_hashstack_indices -- --show-output
