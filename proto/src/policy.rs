//! The rules of a runtime policy (`[runtime.scaling]`, `[runtime.priority]`), in one place: the node's
//! config validation, its `SetRuntimePolicy`, a policy the control plane pushes, and the control plane's
//! own check before it pushes anything all call [`check`].

use crate::v1::{PriorityPolicy, RuntimePolicy, ScalingPolicy};

/// Most storage threads a pool may have.
pub const MAX_STORAGE_THREADS: u32 = 256;
/// Shortest scaler evaluation interval, milliseconds.
pub const MIN_EVALUATION_INTERVAL_MS: u32 = 10;
/// Longest scaler evaluation interval, milliseconds.
pub const MAX_EVALUATION_INTERVAL_MS: u32 = 60_000;
/// Largest priority weight.
pub const MAX_PRIORITY_WEIGHT: u32 = 1000;

/// The policy a node runs without a config file or a control plane (the defaults of `[runtime.scaling]`
/// and `[runtime.priority]`; the node's config test keeps them equal).
pub fn default_policy() -> RuntimePolicy {
    RuntimePolicy {
        scaling: Some(ScalingPolicy {
            enabled: true,
            min_storage_threads: 4,
            max_storage_threads: 32,
            scale_up_threshold: 80,
            scale_down_threshold: 20,
            scale_increment: 2,
            evaluation_interval_ms: 1000,
        }),
        priority: Some(PriorityPolicy {
            enabled: true,
            high_priority_weight: 3,
            normal_priority_weight: 2,
            low_priority_weight: 1,
        }),
    }
}

/// One broken rule, named by its config key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every rule `policy` breaks (empty: valid). A missing section is a broken rule: a policy is whole.
pub fn check(policy: &RuntimePolicy) -> Vec<PolicyError> {
    let mut errs = Vec::new();
    let mut rule = |ok: bool, field: &'static str, message: String| {
        if !ok {
            errs.push(PolicyError { field, message });
        }
    };
    match &policy.scaling {
        None => rule(false, "runtime.scaling", "is missing".into()),
        Some(s) => {
            rule(
                s.min_storage_threads >= 1,
                "runtime.scaling.min_storage_threads",
                format!("must be at least 1, got {}", s.min_storage_threads),
            );
            rule(
                s.max_storage_threads <= MAX_STORAGE_THREADS,
                "runtime.scaling.max_storage_threads",
                format!(
                    "must be at most {MAX_STORAGE_THREADS}, got {}",
                    s.max_storage_threads
                ),
            );
            rule(
                s.min_storage_threads <= s.max_storage_threads,
                "runtime.scaling.min_storage_threads",
                format!(
                    "must not exceed runtime.scaling.max_storage_threads ({}), got {}",
                    s.max_storage_threads, s.min_storage_threads
                ),
            );
            rule(
                (1..=100).contains(&s.scale_up_threshold),
                "runtime.scaling.scale_up_threshold",
                format!(
                    "must be a percentage from 1 to 100, got {}",
                    s.scale_up_threshold
                ),
            );
            rule(
                (1..=100).contains(&s.scale_down_threshold),
                "runtime.scaling.scale_down_threshold",
                format!(
                    "must be a percentage from 1 to 100, got {}",
                    s.scale_down_threshold
                ),
            );
            rule(
                s.scale_down_threshold < s.scale_up_threshold,
                "runtime.scaling.scale_down_threshold",
                format!(
                    "must be below runtime.scaling.scale_up_threshold ({}), got {}",
                    s.scale_up_threshold, s.scale_down_threshold
                ),
            );
            rule(
                (1..=MAX_STORAGE_THREADS).contains(&s.scale_increment),
                "runtime.scaling.scale_increment",
                format!(
                    "must be from 1 to {MAX_STORAGE_THREADS}, got {}",
                    s.scale_increment
                ),
            );
            rule(
                (MIN_EVALUATION_INTERVAL_MS..=MAX_EVALUATION_INTERVAL_MS)
                    .contains(&s.evaluation_interval_ms),
                "runtime.scaling.evaluation_interval_ms",
                format!(
                    "must be from {MIN_EVALUATION_INTERVAL_MS} to {MAX_EVALUATION_INTERVAL_MS}, got {}",
                    s.evaluation_interval_ms
                ),
            );
        }
    }
    match &policy.priority {
        None => rule(false, "runtime.priority", "is missing".into()),
        Some(p) => {
            for (field, w) in [
                (
                    "runtime.priority.high_priority_weight",
                    p.high_priority_weight,
                ),
                (
                    "runtime.priority.normal_priority_weight",
                    p.normal_priority_weight,
                ),
                (
                    "runtime.priority.low_priority_weight",
                    p.low_priority_weight,
                ),
            ] {
                rule(
                    (1..=MAX_PRIORITY_WEIGHT).contains(&w),
                    field,
                    format!("must be from 1 to {MAX_PRIORITY_WEIGHT}, got {w}"),
                );
            }
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_the_field() {
        assert!(check(&default_policy()).is_empty());
        let mut p = default_policy();
        p.scaling.as_mut().unwrap().min_storage_threads = 40;
        p.priority.as_mut().unwrap().low_priority_weight = 0;
        let fields: Vec<_> = check(&p).iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "runtime.scaling.min_storage_threads",
                "runtime.priority.low_priority_weight"
            ]
        );
        let missing = check(&RuntimePolicy::default());
        assert_eq!(missing.len(), 2, "{missing:?}");
    }
}
