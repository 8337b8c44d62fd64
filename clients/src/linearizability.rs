//! A linearizability checker (the one `kiwi chaos` runs; usable on any recorded history of Kiwi
//! operations): a Wing-Gong search (with Lowe's memoization, as in
//! Porcupine) over each object's history separately (linearizability is compositional). An object is one
//! key (a register: put, get, compare-and-swap) or a group of keys that transactions, range deletes and
//! scans use together (a transaction is one operation on several keys).
//!
//! Each operation has an invocation and a completion time. A write whose outcome is unknown has no
//! completion: it may take effect at any point after its invocation, or never. Reads that failed tell
//! nothing and are left out by the caller; writes that certainly did nothing likewise.
//!
//! The search linearizes one operation at a time: a candidate is any operation not yet placed that was
//! invoked before every unplaced completed operation completed. States (placed set, the object's keys and
//! values) that were explored are not explored again. The history is linearizable when every completed
//! operation can be placed. The search gives up (verdict unknown) after a budget of states.

use std::collections::{BTreeMap, HashSet};

/// What an operation did, as observed by its client. Values are unique per write, so a value names the
/// write that made it (which is also why a compare on a `mod_revision` read with a value is a compare on
/// that value).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Action {
    Put {
        key: String,
        value: String,
    },
    /// `None`: the key was absent.
    Get {
        key: String,
        value: Option<String>,
    },
    /// `succeeded`, and the value before the call as the node reported it (known only when completed).
    Cas {
        key: String,
        expected: Option<String>,
        new: String,
        succeeded: bool,
        previous: Option<String>,
    },
    /// If every `compare` key holds its value (`None`: is absent), `writes` happen at once (`None`:
    /// delete) and `succeeded`; else nothing is written. `reads`: what the branch that ran read, after
    /// its writes.
    Txn {
        compare: Vec<(String, Option<String>)>,
        writes: Vec<(String, Option<String>)>,
        succeeded: bool,
        reads: Vec<(String, Option<String>)>,
    },
    /// Deletes `keys` (the object's keys inside the range) in one write; `deleted` of them existed.
    DeleteRange {
        keys: Vec<String>,
        deleted: u64,
    },
    /// One read of every key of the object: the ones present, with their values.
    Scan {
        values: Vec<(String, String)>,
    },
}

/// One operation on one object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Op {
    pub client: usize,
    /// The object: a key, or the prefix of a group of keys.
    pub object: String,
    pub action: Action,
    /// Nanoseconds since the run started.
    pub invoked: u64,
    /// `None`: a write whose outcome is unknown.
    pub completed: Option<u64>,
}

/// The checker's answer for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// The operations (indexes into the object's history) placed in the longest linearizable prefix
    /// found, and the completed operation that could never be placed after them.
    Violation {
        placed: usize,
        stuck: usize,
    },
    /// The search budget ran out.
    Unknown,
}

/// The object's keys that exist, with their values.
pub type State = BTreeMap<String, String>;

fn set(state: &mut State, key: &str, value: Option<&String>) {
    match value {
        Some(v) => state.insert(key.to_owned(), v.clone()),
        None => state.remove(key),
    };
}

/// The object after `op`, if `op` can take effect on `state`.
fn step(state: &State, op: &Op) -> Option<State> {
    let known = op.completed.is_some();
    match &op.action {
        Action::Put { key, value } => {
            let mut next = state.clone();
            set(&mut next, key, Some(value));
            Some(next)
        }
        Action::Get { key, value } => (state.get(key) == value.as_ref()).then(|| state.clone()),
        Action::Cas {
            key,
            expected,
            new,
            succeeded,
            previous,
        } => {
            let now = state.get(key);
            // Unknown: if it took effect, it succeeded (a failed CAS changes nothing either way).
            if !known || *succeeded {
                (now == expected.as_ref()).then(|| {
                    let mut next = state.clone();
                    set(&mut next, key, Some(new));
                    next
                })
            } else {
                (now != expected.as_ref() && previous.as_ref() == now).then(|| state.clone())
            }
        }
        Action::Txn {
            compare,
            writes,
            succeeded,
            reads,
        } => {
            let holds = compare.iter().all(|(k, v)| state.get(k) == v.as_ref());
            if known && holds != *succeeded {
                return None;
            }
            let mut next = state.clone();
            if holds {
                for (k, v) in writes {
                    set(&mut next, k, v.as_ref());
                }
            }
            (!known || reads.iter().all(|(k, v)| next.get(k) == v.as_ref())).then_some(next)
        }
        Action::DeleteRange { keys, deleted } => {
            let present = keys.iter().filter(|k| state.contains_key(*k)).count() as u64;
            if known && present != *deleted {
                return None;
            }
            let mut next = state.clone();
            for k in keys {
                next.remove(k);
            }
            Some(next)
        }
        Action::Scan { values } => (state.len() == values.len()
            && values.iter().all(|(k, v)| state.get(k) == Some(v)))
        .then(|| state.clone()),
    }
}

/// Checks one object's operations, starting from `initial`. `budget` bounds the states explored.
pub fn check(ops: &[Op], initial: &State, budget: usize) -> Verdict {
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let required = ops.iter().filter(|o| o.completed.is_some()).count();
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    // Depth-first search with an explicit stack: (placed set, state, placed required count, next candidate).
    struct Frame {
        placed: Vec<u64>,
        state: State,
        required_placed: usize,
        next: usize,
    }
    let is_placed = |set: &[u64], i: usize| set[i / 64] & (1 << (i % 64)) != 0;
    let mut stack = vec![Frame {
        placed: vec![0; words],
        state: initial.clone(),
        required_placed: 0,
        next: 0,
    }];
    let mut best = (0usize, 0usize);
    let mut explored = 0usize;
    while let Some(top) = stack.last_mut() {
        if top.required_placed == required {
            return Verdict::Linearizable;
        }
        // The earliest completion among unplaced completed operations bounds the candidates.
        let horizon = (0..n)
            .filter(|&i| !is_placed(&top.placed, i))
            .filter_map(|i| ops[i].completed)
            .min()
            .unwrap_or(u64::MAX);
        let mut advanced = false;
        while top.next < n {
            let i = top.next;
            top.next += 1;
            if is_placed(&top.placed, i) || ops[i].invoked > horizon {
                continue;
            }
            let Some(state) = step(&top.state, &ops[i]) else {
                continue;
            };
            let mut placed = top.placed.clone();
            placed[i / 64] |= 1 << (i % 64);
            if !seen.insert((placed.clone(), state.clone())) {
                continue;
            }
            explored += 1;
            if explored > budget {
                return Verdict::Unknown;
            }
            let required_placed = top.required_placed + usize::from(ops[i].completed.is_some());
            if required_placed > best.0 {
                best = (required_placed, 0);
            }
            stack.push(Frame {
                placed,
                state,
                required_placed,
                next: 0,
            });
            advanced = true;
            break;
        }
        if !advanced {
            stack.pop();
        }
    }
    // Nothing placed all completed operations: report the first completed operation that the longest
    // prefix could not place (the earliest-completing one left out).
    let stuck = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| o.completed.is_some())
        .min_by_key(|(_, o)| o.completed)
        .map_or(0, |(i, _)| i);
    Verdict::Violation {
        placed: best.0,
        stuck,
    }
}

/// A small window of `ops` around the operations that overlap `stuck`, to show a violation: every
/// operation whose interval overlaps the ones that overlap it.
pub fn window(ops: &[Op], stuck: usize) -> Vec<&Op> {
    let Some(s) = ops.get(stuck) else {
        return Vec::new();
    };
    let end = s.completed.unwrap_or(u64::MAX);
    let mut from = s.invoked;
    for o in ops {
        if o.completed.is_none_or(|c| c >= s.invoked) && o.invoked <= end {
            from = from.min(o.invoked);
        }
    }
    ops.iter()
        .filter(|o| o.completed.is_none_or(|c| c >= from) && o.invoked <= end)
        .take(40)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(client: usize, v: &str, a: u64, b: Option<u64>) -> Op {
        Op {
            client,
            object: "k".into(),
            action: Action::Put {
                key: "k".into(),
                value: v.into(),
            },
            invoked: a,
            completed: b,
        }
    }

    fn get(client: usize, v: Option<&str>, a: u64, b: u64) -> Op {
        Op {
            client,
            object: "k".into(),
            action: Action::Get {
                key: "k".into(),
                value: v.map(str::to_owned),
            },
            invoked: a,
            completed: Some(b),
        }
    }

    fn cas(
        client: usize,
        exp: Option<&str>,
        new: &str,
        ok: bool,
        prev: Option<&str>,
        a: u64,
        b: Option<u64>,
    ) -> Op {
        Op {
            client,
            object: "k".into(),
            action: Action::Cas {
                key: "k".into(),
                expected: exp.map(str::to_owned),
                new: new.into(),
                succeeded: ok,
                previous: prev.map(str::to_owned),
            },
            invoked: a,
            completed: b,
        }
    }

    fn verdict(ops: &[Op]) -> Verdict {
        check(ops, &State::new(), 1_000_000)
    }

    fn pairs(p: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
            .collect()
    }

    /// An operation on the group "g" of keys x and y.
    fn group(action: Action, a: u64, b: Option<u64>) -> Op {
        Op {
            client: 0,
            object: "g".into(),
            action,
            invoked: a,
            completed: b,
        }
    }

    fn txn(cmp: &[(&str, Option<&str>)], writes: &[(&str, Option<&str>)], ok: bool) -> Action {
        Action::Txn {
            compare: pairs(cmp),
            writes: pairs(writes),
            succeeded: ok,
            reads: Vec::new(),
        }
    }

    fn scan(values: &[(&str, &str)]) -> Action {
        Action::Scan {
            values: values
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn sequential_and_concurrent_histories_that_are_linearizable() {
        assert_eq!(verdict(&[]), Verdict::Linearizable);
        let h = [put(0, "a", 0, Some(10)), get(1, Some("a"), 20, 30)];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        // A read concurrent with a write may see either value.
        let h = [
            put(0, "a", 0, Some(10)),
            put(0, "b", 20, Some(40)),
            get(1, Some("a"), 25, 35),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        let h = [
            put(0, "a", 0, Some(10)),
            put(0, "b", 20, Some(40)),
            get(1, Some("b"), 25, 35),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        let h = [get(1, None, 0, 5), put(0, "a", 3, Some(10))];
        assert_eq!(verdict(&h), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_is_a_violation() {
        let h = [
            put(0, "a", 0, Some(10)),
            put(0, "b", 20, Some(30)),
            get(1, Some("a"), 40, 50),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn a_lost_write_is_a_violation() {
        // b was acknowledged, then a read sees the value before it.
        let h = [
            put(0, "a", 0, Some(10)),
            put(1, "b", 15, Some(25)),
            get(2, Some("a"), 30, 40),
            get(2, Some("b"), 50, 60),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        // A read of a value nobody wrote.
        let h = [get(0, Some("z"), 0, 10)];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn cas_anomalies_are_violations() {
        // Two CAS from the same value both succeed: only one can have seen it.
        let h = [
            put(0, "a", 0, Some(10)),
            cas(1, Some("a"), "b", true, Some("a"), 20, Some(30)),
            cas(2, Some("a"), "c", true, Some("a"), 21, Some(31)),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        // A CAS that failed but reports the value it expected.
        let h = [
            put(0, "a", 0, Some(10)),
            cas(1, Some("a"), "b", false, Some("a"), 20, Some(30)),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        // The legal counterparts.
        let h = [
            put(0, "a", 0, Some(10)),
            cas(1, Some("a"), "b", true, Some("a"), 20, Some(30)),
            cas(2, Some("a"), "c", false, Some("b"), 21, Some(31)),
            get(0, Some("b"), 40, 50),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened() {
        // Seen later: it happened (after its invocation).
        let h = [put(0, "a", 0, None), get(1, Some("a"), 100, 110)];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        // Never seen: it did not happen.
        let h = [put(0, "a", 0, None), get(1, None, 100, 110)];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        // Seen before it was invoked: impossible.
        let h = [get(1, Some("a"), 0, 10), put(0, "a", 20, None)];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        // Seen, then gone with no other write: impossible.
        let h = [
            put(0, "a", 0, None),
            get(1, Some("a"), 100, 110),
            get(1, None, 120, 130),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        // An unknown CAS that took effect.
        let h = [
            put(0, "a", 0, Some(10)),
            cas(1, Some("a"), "b", false, None, 20, None),
            get(2, Some("b"), 100, 110),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
    }

    #[test]
    fn transactions_are_one_step_on_several_keys() {
        let init = group(
            txn(&[], &[("x", Some("x1")), ("y", Some("y1"))], true),
            0,
            Some(10),
        );
        // Both writes of a transaction are seen together.
        let h = [
            init.clone(),
            group(
                txn(
                    &[("x", Some("x1"))],
                    &[("x", Some("x2")), ("y", Some("y2"))],
                    true,
                ),
                20,
                Some(30),
            ),
            group(scan(&[("x", "x2"), ("y", "y2")]), 40, Some(50)),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        // A scan that sees half of a transaction.
        let h = [
            init.clone(),
            group(
                txn(
                    &[("x", Some("x1"))],
                    &[("x", Some("x2")), ("y", Some("y2"))],
                    true,
                ),
                20,
                Some(30),
            ),
            group(scan(&[("x", "x2"), ("y", "y1")]), 25, Some(35)),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        // Two transfers that both compared the same values and both succeeded: a lost update.
        let h = [
            init.clone(),
            group(
                txn(
                    &[("x", Some("x1")), ("y", Some("y1"))],
                    &[("x", Some("a")), ("y", Some("b"))],
                    true,
                ),
                20,
                Some(30),
            ),
            group(
                txn(
                    &[("x", Some("x1")), ("y", Some("y1"))],
                    &[("x", Some("c")), ("y", Some("d"))],
                    true,
                ),
                21,
                Some(31),
            ),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        // The second failed instead: legal, and what its failure branch read must be the first's values.
        let mut failed = txn(&[("x", Some("x1"))], &[("x", Some("c"))], false);
        if let Action::Txn { reads, .. } = &mut failed {
            *reads = pairs(&[("x", Some("a"))]);
        }
        let h = [
            init.clone(),
            group(
                txn(
                    &[("x", Some("x1")), ("y", Some("y1"))],
                    &[("x", Some("a")), ("y", Some("b"))],
                    true,
                ),
                20,
                Some(30),
            ),
            group(failed.clone(), 40, Some(50)),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        if let Action::Txn { reads, .. } = &mut failed {
            *reads = pairs(&[("x", Some("x1"))]);
        }
        let h = [
            init.clone(),
            group(
                txn(
                    &[("x", Some("x1")), ("y", Some("y1"))],
                    &[("x", Some("a")), ("y", Some("b"))],
                    true,
                ),
                20,
                Some(30),
            ),
            group(failed, 40, Some(50)),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        // An unknown transaction is all or nothing.
        let h = [
            init.clone(),
            group(
                txn(&[], &[("x", Some("x3")), ("y", Some("y3"))], true),
                20,
                None,
            ),
            group(scan(&[("x", "x3"), ("y", "y1")]), 40, Some(50)),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn range_deletes_count_and_remove_what_exists() {
        let init = group(
            txn(&[], &[("x", Some("x1")), ("y", Some("y1"))], true),
            0,
            Some(10),
        );
        let del = |deleted, done: Option<u64>| {
            group(
                Action::DeleteRange {
                    keys: vec!["x".into(), "y".into()],
                    deleted,
                },
                20,
                done,
            )
        };
        let h = [
            init.clone(),
            del(2, Some(30)),
            group(scan(&[]), 40, Some(50)),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        // A wrong count, or a key that survives its delete.
        let h = [init.clone(), del(1, Some(30))];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        let h = [
            init.clone(),
            del(2, Some(30)),
            group(scan(&[("y", "y1")]), 40, Some(50)),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        // Unknown: everything or nothing.
        let h = [
            init.clone(),
            del(0, None),
            group(scan(&[("y", "y1")]), 40, Some(50)),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
        let h = [init, del(0, None), group(scan(&[]), 40, Some(50))];
        assert_eq!(verdict(&h), Verdict::Linearizable);
    }

    #[test]
    fn long_concurrent_histories_finish() {
        // 4 clients, 300 operations, overlapping: linearizable by construction (each read returns the
        // value of the last write that completed before it started, and writes do not overlap reads).
        let mut h = Vec::new();
        let mut t = 0;
        for i in 0..100 {
            let v = format!("v{i}");
            h.push(put(i % 4, &v, t, Some(t + 10)));
            h.push(put((i + 1) % 4, &format!("w{i}"), t + 1, None));
            t += 20;
            h.push(get((i + 2) % 4, Some(&v), t, t + 5));
            t += 10;
        }
        // The unknown w-writes are never seen: they did not happen (or were overwritten at once).
        assert_eq!(verdict(&h), Verdict::Linearizable);
    }
}
