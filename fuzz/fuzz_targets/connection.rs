//! A whole connection fed arbitrary bytes, in chunks, next to a subscriber:
//! `ternmq::fuzz::connection`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ternmq::fuzz::connection(data));
