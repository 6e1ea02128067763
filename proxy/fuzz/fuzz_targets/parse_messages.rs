//! Feeds arbitrary bytes to every parser that sees network input: startup
//! packets, tagged frames, and the message views. None may panic.
//! Run: `cd proxy/fuzz && cargo +nightly fuzz run parse_messages -- -max_total_time=60`

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgha_proxy::protocol::fuzz_all(data);
});
