//! Guards the agent's plan check: accepted plans cost at most the full file, and full steps are the manifest's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patchrelay::fuzzing::{PLAN_COMPONENT, check_plan, plan_catalog};

// Input: a byte choosing the version the agent updates to (any listed one,
// as with `--to`), then the plan JSON a server answered.
fuzz_target!(|data: &[u8]| {
    let Some((&pick, json)) = data.split_first() else { return };
    let catalog = plan_catalog();
    let (_, component) = catalog.component(PLAN_COMPONENT).expect("the fixed catalog");
    let (_, target) = catalog
        .version(PLAN_COMPONENT, component.versions[usize::from(pick) % component.versions.len()].version.as_str())
        .expect("a listed version");
    let full_bytes = target.size;

    let Some((steps, verdict)) = check_plan(json, full_bytes) else { return };
    if verdict.is_err() {
        return;
    }
    assert!(steps.len() <= component.versions.len(), "{} steps accepted", steps.len());
    let total: u128 = steps.iter().map(|s| u128::from(s.size)).sum();
    assert!(total <= u128::from(full_bytes), "accepted a plan of {total} bytes for a {full_bytes}-byte file");
    for step in &steps {
        let (entry, obj) = catalog
            .version(PLAN_COMPONENT, &step.to)
            .unwrap_or_else(|| panic!("accepted a step to unlisted version {:?}", step.to));
        match step.kind.as_str() {
            "full" => assert!(
                step.size == entry.size && step.size == obj.size && step.sha256 == entry.sha256,
                "accepted a full step that is not the manifest's: {step:?}"
            ),
            "delta" => assert!(step.size < obj.size, "accepted a delta no smaller than its target: {step:?}"),
            other => panic!("accepted a step of kind {other:?}"),
        }
    }
});
