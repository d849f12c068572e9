//! The cheapest way, in bytes, from one version to another.
//!
//! Versions of a component are nodes in dotted-numeric order. Edges:
//! - *full*: download version `v` whole (from wherever the agent is), costing
//!   `size(v)`; there is always a full edge to the target, so no plan is ever
//!   larger than the full file;
//! - *delta*: a delta `u -> v` that exists (computed and stored), costing its
//!   size; only forward (`u < v`), and only within `from..=to`.
//!
//! Dijkstra over at most a few hundred versions: microseconds per plan, which
//! matters with thousands of agents polling at the top of the hour. Ties go to
//! fewer steps (fewer round trips, fewer chances to fail).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use serde::Serialize;

use crate::digest::Digest;

/// One version as the planner sees it.
#[derive(Debug, Clone)]
pub struct Node {
    pub version: String,
    pub sha256: Digest,
    pub size: u64,
}

/// A delta that exists.
#[derive(Debug, Clone, Copy)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    pub sha256: Digest,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    Delta,
    Full,
}

/// A step of a plan, by node index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub kind: StepKind,
    pub from: usize,
    pub to: usize,
    pub sha256: Digest,
    pub size: u64,
}

/// Cheapest steps from `nodes[from]` to `nodes[to]` (indices into `nodes`,
/// which is sorted oldest first). `edges` are the deltas available.
pub fn cheapest(nodes: &[Node], edges: &[Edge], from: usize, to: usize) -> Vec<Step> {
    if from == to || to >= nodes.len() || from >= nodes.len() {
        return Vec::new();
    }
    // dist[v] = (bytes, steps); prev[v] = the step that reached v.
    let n = nodes.len();
    let mut dist: Vec<Option<(u64, u32)>> = vec![None; n];
    let mut prev: Vec<Option<Step>> = vec![None; n];
    let mut heap = BinaryHeap::new();
    dist[from] = Some((0, 0));
    heap.push(Reverse((0u64, 0u32, from)));
    let mut relax = |dist: &mut Vec<Option<(u64, u32)>>, heap: &mut BinaryHeap<_>, step: Step, base: (u64, u32)| {
        let cand = (base.0.saturating_add(step.size), base.1 + 1);
        if dist[step.to].is_none_or(|d| cand < d) {
            dist[step.to] = Some(cand);
            heap.push(Reverse((cand.0, cand.1, step.to)));
            prev[step.to] = Some(step);
        }
    };
    if to < from {
        // Going back: only a full download makes sense.
        return vec![Step { kind: StepKind::Full, from, to, sha256: nodes[to].sha256, size: nodes[to].size }];
    }
    // Full downloads leave from the start only: after a full download the
    // agent is simply at that version.
    for (v, node) in nodes.iter().enumerate().take(to + 1).skip(from + 1) {
        let step = Step { kind: StepKind::Full, from, to: v, sha256: node.sha256, size: node.size };
        relax(&mut dist, &mut heap, step, (0, 0));
    }
    while let Some(Reverse((bytes, steps, u))) = heap.pop() {
        if dist[u] != Some((bytes, steps)) {
            continue;
        }
        if u == to {
            break;
        }
        for e in edges.iter().filter(|e| e.from == u && e.to > u && e.to <= to) {
            let step = Step { kind: StepKind::Delta, from: u, to: e.to, sha256: e.sha256, size: e.size };
            relax(&mut dist, &mut heap, step, (bytes, steps));
        }
    }
    let mut path = Vec::new();
    let mut at = to;
    while at != from {
        let Some(step) = prev[at] else { break };
        at = step.from;
        path.push(step);
    }
    path.reverse();
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(sizes: &[u64]) -> Vec<Node> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Node { version: (170 + i).to_string(), sha256: Digest::of(&[i as u8]), size })
            .collect()
    }

    fn edge(from: usize, to: usize, size: u64) -> Edge {
        Edge { from, to, sha256: Digest::of(&[from as u8, to as u8]), size }
    }

    #[test]
    fn prefers_direct_chain_or_full_by_bytes() {
        let n = nodes(&[1000, 1000, 1000, 1000]);
        // Direct 0->3 (300) beats the chain 0->1->2->3 (3 x 120 = 360).
        let e = [edge(0, 1, 120), edge(1, 2, 120), edge(2, 3, 120), edge(0, 3, 300)];
        let p = cheapest(&n, &e, 0, 3);
        assert_eq!(p.iter().map(|s| (s.kind, s.from, s.to)).collect::<Vec<_>>(), [(StepKind::Delta, 0, 3)]);
        // Without the direct one, the chain.
        let p = cheapest(&n, &e[..3], 0, 3);
        assert_eq!(p.len(), 3);
        // Deltas bigger than the file: full.
        let p = cheapest(&n, &[edge(0, 3, 5000)], 0, 3);
        assert_eq!(p.iter().map(|s| (s.kind, s.to)).collect::<Vec<_>>(), [(StepKind::Full, 3)]);
        // Nothing known: full; same version: nothing to do.
        assert_eq!(cheapest(&n, &[], 1, 3)[0].kind, StepKind::Full);
        assert!(cheapest(&n, &e, 2, 2).is_empty());
        // Backwards: full.
        assert_eq!(cheapest(&n, &e, 3, 1)[0].kind, StepKind::Full);
    }

    proptest! {
        /// Never more bytes than the full file; steps chain from `from` to `to`.
        #[test]
        fn never_worse_than_full(sizes in proptest::collection::vec(1u64..10_000, 2..12),
                                 raw in proptest::collection::vec((0usize..12, 0usize..12, 1u64..20_000), 0..40),
                                 from in 0usize..12, to in 0usize..12) {
            let n = nodes(&sizes);
            let (from, to) = (from % n.len(), to % n.len());
            let edges: Vec<Edge> = raw.iter().map(|&(a, b, s)| edge(a % n.len(), b % n.len(), s)).collect();
            let p = cheapest(&n, &edges, from, to);
            if from == to {
                prop_assert!(p.is_empty());
            } else {
                let total: u64 = p.iter().map(|s| s.size).sum();
                prop_assert!(total <= n[to].size);
                prop_assert_eq!(p.first().unwrap().from, from);
                prop_assert_eq!(p.last().unwrap().to, to);
                for w in p.windows(2) {
                    prop_assert_eq!(w[0].to, w[1].from);
                }
            }
        }
    }
}
