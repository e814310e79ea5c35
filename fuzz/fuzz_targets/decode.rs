//! The packet decoder (3.1, 3.1.1, 5.0) on arbitrary bytes, with the round trip
//! decode → encode → decode: `ternmq::fuzz::decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ternmq::fuzz::decode(data));
