//! Guards zstd patch-from deltas: any payload is refused or builds exactly the declared target; round trips hold.
#![no_main]

mod delta_common;

use libfuzzer_sys::fuzz_target;
use patchrelay::delta::Algorithm;

fuzz_target!(|data: &[u8]| delta_common::run(Algorithm::ZstdPatch, data));
