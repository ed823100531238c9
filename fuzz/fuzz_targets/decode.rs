//! The request decoder: `parse_request` on any bytes never panics, and agrees with serde_json
//! on what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    memcoord_fuzz::check_decode(data);
});
