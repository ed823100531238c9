//! The dispatcher: any input (one or more request lines) in, one valid response envelope out
//! per line, and the service's books intact afterwards. See `fuzz/src/harness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    memcoord_fuzz::global().run_input(data);
});
