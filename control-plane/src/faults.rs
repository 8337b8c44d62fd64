//! Fault schedules: what operators asked to inject, where, when, and what each node did with it. Pure
//! bookkeeping (times passed in); the service persists every changed schedule and sends the commands.
//!
//! A schedule is `pending` until its start, then `active` (its `StartFault` went to every target that is
//! linked, with the time left as duration; a target that is not linked is `unreachable`), then `done` once
//! its duration passed, or `cancelled`. The nodes end a fault at its duration by themselves, so a control
//! plane that dies meanwhile changes nothing. A target that (re)registers while a fault is active gets it
//! again with the time left (not a crash: that happened once).

use std::collections::{BTreeMap, BTreeSet};

use kiwi_proto::v1::fault_spec::Kind;
use kiwi_proto::v1::{
    FaultEvent, FaultSchedule, FaultSpec, NodeFaultState, ScheduleFaultRequest, StartFault,
};
use tonic::Status;

/// What the table needs to know of a registered node.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub node_id: u64,
    pub fault_injection_enabled: bool,
    pub max_duration_ms: u64,
}

/// Every schedule kept, by id: the live ones (pending or active) and the last `keep_finished` finished
/// ones (done or cancelled).
#[derive(Default)]
pub struct FaultTable {
    faults: BTreeMap<u64, FaultSchedule>,
    /// The pending and active schedules: all [`tick`](Self::tick) looks at.
    live: BTreeSet<u64>,
    keep_finished: usize,
}

fn is_live(f: &FaultSchedule) -> bool {
    f.state == "pending" || f.state == "active"
}

fn kind_name(spec: &FaultSpec) -> &'static str {
    match spec.kind {
        Some(Kind::Delay(_)) => "network delay",
        Some(Kind::Partition(_)) => "network partition",
        Some(Kind::Loss(_)) => "message loss",
        Some(Kind::Crash(_)) => "node crash",
        Some(Kind::DiskStall(_)) => "disk stall",
        None => "nothing",
    }
}

/// One line describing a schedule, for events and the CLI.
pub fn describe(f: &FaultSchedule) -> String {
    let spec = f.spec.clone().unwrap_or_default();
    let what = match &spec.kind {
        Some(Kind::Delay(d)) => format!("network delay {} ms (+0..{} ms)", d.delay_ms, d.jitter_ms),
        Some(Kind::Partition(p)) => format!("network partition isolating {:?}", p.isolated_nodes),
        Some(Kind::Loss(l)) => format!("message loss {:.0}%", l.drop_rate * 100.0),
        Some(Kind::Crash(_)) => "node crash".into(),
        Some(Kind::DiskStall(d)) => format!("disk stall {} ms", d.delay_ms),
        None => "nothing".into(),
    };
    let peers = if spec.peers.is_empty() {
        String::new()
    } else {
        format!(" with peers {:?}", spec.peers)
    };
    format!(
        "fault {}: {what}{peers} on nodes {:?} for {} ms",
        f.id, f.targets, f.duration_ms
    )
}

impl FaultTable {
    /// The table of the schedules persisted before.
    pub fn load(faults: Vec<FaultSchedule>, keep_finished: u64) -> FaultTable {
        let faults: BTreeMap<u64, FaultSchedule> = faults.into_iter().map(|f| (f.id, f)).collect();
        FaultTable {
            live: faults
                .values()
                .filter(|f| is_live(f))
                .map(|f| f.id)
                .collect(),
            faults,
            keep_finished: usize::try_from(keep_finished).unwrap_or(usize::MAX).max(1),
        }
    }

    /// Drops a schedule (one whose record could not be persisted).
    pub fn forget(&mut self, id: u64) {
        self.faults.remove(&id);
        self.live.remove(&id);
    }

    /// Drops the oldest finished schedules beyond `retention.finished_faults`; returns their ids (to
    /// delete from the store).
    pub fn prune(&mut self) -> Vec<u64> {
        let finished = self.faults.len() - self.live.len();
        let excess = finished.saturating_sub(self.keep_finished);
        let old: Vec<u64> = self
            .faults
            .keys()
            .filter(|id| !self.live.contains(id))
            .take(excess)
            .copied()
            .collect();
        for id in &old {
            self.faults.remove(id);
        }
        old
    }

    /// Every schedule, oldest first.
    pub fn list(&self) -> Vec<FaultSchedule> {
        self.faults.values().cloned().collect()
    }

    /// Checks and records a new schedule.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed request; `FAILED_PRECONDITION` when a target is unknown, has
    /// fault injection disabled, or does not accept that long a fault.
    pub fn schedule(
        &mut self,
        req: ScheduleFaultRequest,
        now_unix_ms: u64,
        registered: &[Target],
    ) -> Result<FaultSchedule, Status> {
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        match &spec.kind {
            None => return Err(Status::invalid_argument("spec names no fault type")),
            Some(Kind::Loss(l)) if !(l.drop_rate > 0.0 && l.drop_rate <= 1.0) => {
                return Err(Status::invalid_argument(format!(
                    "loss.drop_rate must be above 0 and at most 1, got {}",
                    l.drop_rate
                )));
            }
            Some(Kind::Delay(d))
                if (d.delay_ms == 0 && d.jitter_ms == 0)
                    || d.delay_ms > 60_000
                    || d.jitter_ms > 60_000 =>
            {
                return Err(Status::invalid_argument(
                    "delay needs delay_ms or jitter_ms, each at most 60000",
                ));
            }
            Some(Kind::DiskStall(d)) if d.delay_ms == 0 || d.delay_ms > 60_000 => {
                return Err(Status::invalid_argument(
                    "disk_stall.delay_ms must be 1 to 60000",
                ));
            }
            Some(Kind::Partition(p)) if p.isolated_nodes.is_empty() => {
                return Err(Status::invalid_argument(
                    "partition.isolated_nodes must name at least one node",
                ));
            }
            _ => {}
        }
        if req.duration_ms == 0 {
            return Err(Status::invalid_argument("duration_ms must be at least 1"));
        }
        if req.start_after_ms > 86_400_000 {
            return Err(Status::invalid_argument(
                "start_after_ms must be at most a day",
            ));
        }
        let mut targets = if matches!(spec.kind, Some(Kind::Partition(_))) {
            // Every node must know its side.
            registered.iter().map(|t| t.node_id).collect()
        } else {
            req.targets
        };
        targets.sort_unstable();
        targets.dedup();
        if targets.is_empty() {
            return Err(Status::invalid_argument(
                "targets must name the nodes that inject the fault",
            ));
        }
        for id in &targets {
            let Some(t) = registered.iter().find(|t| t.node_id == *id) else {
                return Err(Status::failed_precondition(format!(
                    "node {id} never registered with this control plane"
                )));
            };
            if !t.fault_injection_enabled {
                return Err(Status::failed_precondition(format!(
                    "node {id} has fault injection disabled: set raft.fault_injection.enabled = true \
                     in its config (test clusters only)"
                )));
            }
            if req.duration_ms > t.max_duration_ms {
                return Err(Status::failed_precondition(format!(
                    "duration {} ms exceeds node {id}'s raft.fault_injection.max_duration_sec ({} s)",
                    req.duration_ms,
                    t.max_duration_ms / 1000
                )));
            }
        }
        let id = self.faults.keys().next_back().map_or(1, |last| last + 1);
        let f = FaultSchedule {
            id,
            nodes: targets
                .iter()
                .map(|&node_id| NodeFaultState {
                    node_id,
                    state: "pending".into(),
                    ..NodeFaultState::default()
                })
                .collect(),
            spec: Some(spec),
            targets,
            start_at_unix_ms: now_unix_ms + req.start_after_ms,
            duration_ms: req.duration_ms,
            state: "pending".into(),
        };
        self.faults.insert(id, f.clone());
        self.live.insert(id);
        Ok(f)
    }

    /// Starts what is due and ends what is over. Returns the schedules that changed and the commands to
    /// send: (node, command). `linked` tells whether a node's link is open.
    pub fn tick(
        &mut self,
        now_unix_ms: u64,
        linked: impl Fn(u64) -> bool,
    ) -> (Vec<FaultSchedule>, Vec<(u64, StartFault)>) {
        let mut changed = Vec::new();
        let mut commands = Vec::new();
        let mut ended = Vec::new();
        let live: Vec<u64> = self.live.iter().copied().collect();
        for id in live {
            let Some(f) = self.faults.get_mut(&id) else {
                continue;
            };
            let end = f.start_at_unix_ms + f.duration_ms;
            match f.state.as_str() {
                "pending" if now_unix_ms >= f.start_at_unix_ms => {
                    f.state = if now_unix_ms >= end { "done" } else { "active" }.into();
                    for n in &mut f.nodes {
                        if now_unix_ms >= end {
                            n.state = "missed".into();
                        } else if linked(n.node_id) {
                            n.state = "sent".into();
                            commands.push((
                                n.node_id,
                                StartFault {
                                    fault_id: f.id,
                                    spec: f.spec.clone(),
                                    duration_ms: end - now_unix_ms,
                                },
                            ));
                        } else {
                            n.state = "unreachable".into();
                        }
                    }
                    changed.push(f.clone());
                }
                "active" if now_unix_ms >= end => {
                    f.state = "done".into();
                    changed.push(f.clone());
                }
                _ => {}
            }
            if !is_live(f) {
                ended.push(f.id);
            }
        }
        for id in ended {
            self.live.remove(&id);
        }
        (changed, commands)
    }

    /// The active faults `node_id` should run, with the time left, for a node that just (re)registered.
    /// A crash is not sent again.
    pub fn resend_for(&mut self, node_id: u64, now_unix_ms: u64) -> Vec<StartFault> {
        let mut out = Vec::new();
        for f in self.faults.values_mut().filter(|f| f.state == "active") {
            let end = f.start_at_unix_ms + f.duration_ms;
            let crash = f
                .spec
                .as_ref()
                .is_some_and(|s| matches!(s.kind, Some(Kind::Crash(_))));
            if crash || now_unix_ms >= end || !f.targets.contains(&node_id) {
                continue;
            }
            if let Some(n) = f.nodes.iter_mut().find(|n| n.node_id == node_id)
                && n.state == "unreachable"
            {
                n.state = "sent".into();
            }
            out.push(StartFault {
                fault_id: f.id,
                spec: f.spec.clone(),
                duration_ms: end - now_unix_ms,
            });
        }
        out
    }

    /// The faults cancelled while they still had time to run on `node_id`: a node that (re)registers
    /// gets their cancels again, in case it missed them while its link was down.
    pub fn cancels_for(&self, node_id: u64, now_unix_ms: u64) -> Vec<u64> {
        self.faults
            .values()
            .filter(|f| {
                f.state == "cancelled"
                    && f.targets.contains(&node_id)
                    && now_unix_ms < f.start_at_unix_ms + f.duration_ms
            })
            .map(|f| f.id)
            .collect()
    }

    /// Cancels a pending or active schedule; returns it and the nodes to tell.
    ///
    /// # Errors
    /// `NOT_FOUND`; `FAILED_PRECONDITION` when it is already over.
    pub fn cancel(&mut self, id: u64) -> Result<(FaultSchedule, Vec<u64>), Status> {
        let f = self
            .faults
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("no fault {id}")))?;
        if f.state != "pending" && f.state != "active" {
            return Err(Status::failed_precondition(format!(
                "fault {id} is already {}",
                f.state
            )));
        }
        let tell = if f.state == "active" {
            f.targets.clone()
        } else {
            Vec::new()
        };
        f.state = "cancelled".into();
        self.live.remove(&id);
        Ok((f.clone(), tell))
    }

    /// Records what node `node_id` reported. Returns the schedule when it changed.
    pub fn node_event(&mut self, node_id: u64, e: &FaultEvent) -> Option<FaultSchedule> {
        let f = self.faults.get_mut(&e.fault_id)?;
        let n = f.nodes.iter_mut().find(|n| n.node_id == node_id)?;
        n.state = e.kind.clone();
        n.detail = e.detail.clone();
        n.messages_delayed = e.messages_delayed;
        n.messages_dropped = e.messages_dropped;
        Some(f.clone())
    }

    /// The type name of schedule `id`, for event details.
    pub fn kind_of(&self, id: u64) -> &'static str {
        self.faults
            .get(&id)
            .and_then(|f| f.spec.as_ref())
            .map_or("unknown fault", kind_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiwi_proto::v1::{MessageLoss, NetworkPartition, NodeCrash};

    fn targets() -> Vec<Target> {
        (1..=3)
            .map(|node_id| Target {
                node_id,
                fault_injection_enabled: node_id != 3,
                max_duration_ms: 60_000,
            })
            .collect()
    }

    fn loss(targets: Vec<u64>, after: u64, duration: u64) -> ScheduleFaultRequest {
        ScheduleFaultRequest {
            spec: Some(FaultSpec {
                kind: Some(Kind::Loss(MessageLoss { drop_rate: 0.3 })),
                peers: Vec::new(),
            }),
            targets,
            start_after_ms: after,
            duration_ms: duration,
        }
    }

    #[test]
    fn schedules_start_when_due_and_end_after_their_duration() {
        let mut t = FaultTable::default();
        let f = t
            .schedule(loss(vec![1, 2], 100, 1000), 10_000, &targets())
            .unwrap();
        assert_eq!((f.id, f.state.as_str()), (1, "pending"));
        let (changed, cmds) = t.tick(10_050, |_| true);
        assert!(changed.is_empty() && cmds.is_empty());
        let (changed, cmds) = t.tick(10_100, |id| id == 1);
        assert_eq!(changed[0].state, "active");
        assert_eq!(cmds.len(), 1, "node 2 is not linked");
        assert_eq!(cmds[0].1.duration_ms, 1000);
        assert_eq!(changed[0].nodes[1].state, "unreachable");
        // Node 2 registers later: it gets the time left.
        let again = t.resend_for(2, 10_600);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].duration_ms, 500);
        let (changed, _) = t.tick(11_100, |_| true);
        assert_eq!(changed[0].state, "done");
        assert!(t.resend_for(2, 11_200).is_empty());
    }

    #[test]
    fn only_live_schedules_are_ticked_and_the_oldest_finished_ones_are_pruned() {
        let mut t = FaultTable::load(Vec::new(), 2);
        for i in 0..5 {
            let duration = if i == 4 { 10_000 } else { 100 };
            t.schedule(loss(vec![1], 0, duration), i * 1000, &targets())
                .unwrap();
        }
        // Schedule 5 stays live; 1-4 finish (3 by cancel).
        t.cancel(3).unwrap();
        t.tick(4_000, |_| true);
        t.tick(4_200, |_| true);
        assert_eq!(t.live.iter().copied().collect::<Vec<_>>(), [5]);
        assert_eq!(t.prune(), [1, 2], "finished beyond 2, oldest first");
        assert_eq!(t.list().iter().map(|f| f.id).collect::<Vec<_>>(), [3, 4, 5]);
        assert!(t.prune().is_empty());
        // Ids go on after the newest.
        let f = t
            .schedule(loss(vec![1], 0, 100), 5_000, &targets())
            .unwrap();
        assert_eq!(f.id, 6);
    }

    #[test]
    fn bad_schedules_are_refused_naming_why() {
        let mut t = FaultTable::default();
        let e = t
            .schedule(loss(vec![3], 0, 1000), 0, &targets())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message().contains("raft.fault_injection.enabled"),
            "{e:?}"
        );
        let e = t
            .schedule(loss(vec![1], 0, 120_000), 0, &targets())
            .unwrap_err();
        assert!(e.message().contains("max_duration_sec"), "{e:?}");
        let e = t
            .schedule(loss(vec![9], 0, 1000), 0, &targets())
            .unwrap_err();
        assert!(e.message().contains("node 9"), "{e:?}");
        let e = t
            .schedule(loss(vec![], 0, 1000), 0, &targets())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let mut bad = loss(vec![1], 0, 1000);
        bad.spec = Some(FaultSpec {
            kind: Some(Kind::Loss(MessageLoss { drop_rate: 1.5 })),
            peers: Vec::new(),
        });
        assert!(t.schedule(bad, 0, &targets()).is_err());
        assert!(t.list().is_empty(), "nothing recorded");
    }

    #[test]
    fn a_partition_goes_to_every_node_and_a_crash_is_not_resent() {
        let mut t = FaultTable::default();
        let all: Vec<Target> = targets()
            .into_iter()
            .map(|t| Target {
                fault_injection_enabled: true,
                ..t
            })
            .collect();
        let p = ScheduleFaultRequest {
            spec: Some(FaultSpec {
                kind: Some(Kind::Partition(NetworkPartition {
                    isolated_nodes: vec![1],
                })),
                peers: Vec::new(),
            }),
            targets: vec![],
            start_after_ms: 0,
            duration_ms: 1000,
        };
        assert_eq!(t.schedule(p, 0, &all).unwrap().targets, [1, 2, 3]);
        let crash = ScheduleFaultRequest {
            spec: Some(FaultSpec {
                kind: Some(Kind::Crash(NodeCrash {})),
                peers: Vec::new(),
            }),
            targets: vec![2],
            start_after_ms: 0,
            duration_ms: 1000,
        };
        t.schedule(crash, 0, &all).unwrap();
        let (_, cmds) = t.tick(0, |_| true);
        assert_eq!(cmds.len(), 4);
        let again = t.resend_for(2, 10);
        assert_eq!(again.len(), 1, "the partition, not the crash");
        let (f, tell) = t.cancel(1).unwrap();
        assert_eq!((f.state.as_str(), tell.len()), ("cancelled", 3));
        assert_eq!(
            t.cancel(1).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(t.cancel(7).unwrap_err().code(), tonic::Code::NotFound);
    }
}
