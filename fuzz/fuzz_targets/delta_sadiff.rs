//! Guards suffix-array deltas: any payload or control stream is refused or builds exactly the declared target.
#![no_main]

mod delta_common;

use libfuzzer_sys::fuzz_target;
use patchrelay::delta::Algorithm;

fuzz_target!(|data: &[u8]| delta_common::run(Algorithm::SaDiff, data));
