//! Fuzz the ClientHello peek of spliced CONNECT tunnels.
//!
//! `peek` must never panic on any input, and its verdict must be monotonic
//! the way the tunnel uses it: the tunnel stops reading as soon as a prefix
//! of the client's bytes gets a final answer (anything but `NeedMore`), so
//! every longer input starting with that prefix must get the same answer.
//! Otherwise a client could make the proxy judge one thing while the
//! upstream, which sees all the bytes, reads another.
#![no_main]

use egress_proxy::proxy::peek::{peek, Peek};
use libfuzzer_sys::fuzz_target;

/// The prefix lengths checked against the whole input: every one of the
/// first 64 (record and handshake headers), then a bounded stride so one
/// input costs O(len) calls at most.
fn prefix_lengths(len: usize) -> impl Iterator<Item = usize> {
    let stride = (len / 64).max(1);
    (0..len.min(64)).chain((64..len).step_by(stride))
}

fuzz_target!(|data: &[u8]| {
    let whole = peek(data);
    for n in prefix_lengths(data.len()) {
        let part = peek(&data[..n]);
        if part != Peek::NeedMore {
            assert_eq!(
                part,
                whole,
                "peek of the first {n} of {} bytes is final but differs from peek of all of them",
                data.len()
            );
        }
    }
});
