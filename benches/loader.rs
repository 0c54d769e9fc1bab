//! Loader throughput: placeholder replaced by the loader benchmark.
fn main() {}
