//! Checks every Raft message that arrives from the network before it may reach `raft::RawNode`.
//!
//! raft-rs trusts its input: a heartbeat whose commit index is beyond the local log, an append whose
//! entries are not contiguous, a term near `u64::MAX` or an empty proposal each make it panic, and a
//! local-only message type (an election "hup", a snapshot status) sent over the wire makes it act on
//! something that never happened. One such message would stop the Raft thread of every node it reaches,
//! and again after a restart once a term is persisted. So the transport and the driver refuse, and count,
//! every message that:
//! - comes from a node that is not a current member, claims another sender than the batch it came in,
//!   is addressed to another node, or comes from this node itself ([`check_envelope`]);
//! - is of a type peers never send each other ([`PEER_TYPES`]);
//! - carries a term, index or commit that raft-rs would act on unsafely ([`check_message`]).
//!
//! Members are trusted to run the protocol (mutual TLS on the Raft port is what keeps others from
//! claiming a member's id); the checks here stop malformed and forged input, not a Byzantine member.

use raft::eraftpb::{Message, MessageType};

/// Terms and indexes above this are refused: no honest cluster gets there, and below it raft-rs's
/// `term + 1` and `index + 1` arithmetic cannot overflow.
pub const MAX_TERM_OR_INDEX: u64 = 1 << 62;

/// How far a peer's term may run ahead of this node's. With pre-vote, terms only grow by real
/// elections; a node that was down through a million elections is not a case to plan for, while a
/// forged term near the top would pin the group there for good.
pub const MAX_TERM_AHEAD: u64 = 1 << 20;

/// Message types one node sends another. Everything else (hup, beat, propose, read index, unreachable,
/// snapshot status, check quorum) is local to a node, and a snapshot only arrives through the
/// snapshot stream, whose staging it needs.
pub const PEER_TYPES: [MessageType; 10] = [
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgTimeoutNow,
    MessageType::MsgTransferLeader,
];

/// Why a message was refused; the label of `kiwi_raft_messages_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Sender not in the current membership (and this node has one).
    NotMember,
    /// The message names another sender than its batch, another receiver, or this node as sender.
    Envelope,
    /// Unset or another cluster's id.
    Cluster,
    /// A local-only message type, or a snapshot outside the snapshot stream.
    MessageType,
    /// A term of 0, far ahead of this node's, or beyond [`MAX_TERM_OR_INDEX`].
    Term,
    /// An index, commit or hint beyond this node's log or beyond [`MAX_TERM_OR_INDEX`].
    Index,
    /// Append entries that are not contiguous after the message's index, or whose terms are out of order.
    Entries,
    /// A snapshot whose metadata cannot be right.
    Snapshot,
    /// With mutual TLS, a caller that presented no certificate.
    Certificate,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotMember => "not_member",
            Refusal::Envelope => "envelope",
            Refusal::Cluster => "cluster",
            Refusal::MessageType => "message_type",
            Refusal::Term => "term",
            Refusal::Index => "index",
            Refusal::Entries => "entries",
            Refusal::Snapshot => "snapshot",
            Refusal::Certificate => "certificate",
        }
    }

    /// Every refusal, for metrics that start at zero.
    pub const ALL: [Refusal; 9] = [
        Refusal::NotMember,
        Refusal::Envelope,
        Refusal::Cluster,
        Refusal::MessageType,
        Refusal::Term,
        Refusal::Index,
        Refusal::Entries,
        Refusal::Snapshot,
        Refusal::Certificate,
    ];
}

/// What the checks need to know of the receiving node's Raft state.
#[derive(Debug, Clone, Copy)]
pub struct LocalView {
    pub term: u64,
    pub last_index: u64,
}

/// Checks who a message claims to be from and to, against the batch it arrived in.
///
/// # Errors
/// [`Refusal::Envelope`].
pub fn check_envelope(m: &Message, batch_from: u64, me: u64) -> Result<(), Refusal> {
    if m.from != batch_from || m.to != me || m.from == me || m.from == 0 {
        return Err(Refusal::Envelope);
    }
    Ok(())
}

/// Checks a message against this node's state. Call on the Raft thread, with the state at the moment
/// the message would be stepped.
///
/// # Errors
/// The first [`Refusal`] that applies.
pub fn check_message(m: &Message, local: LocalView) -> Result<(), Refusal> {
    let kind = m.get_msg_type();
    if !PEER_TYPES.contains(&kind) {
        return Err(Refusal::MessageType);
    }
    if m.term == 0
        || m.term > MAX_TERM_OR_INDEX
        || m.term > local.term.saturating_add(MAX_TERM_AHEAD)
    {
        return Err(Refusal::Term);
    }
    if [m.index, m.log_term, m.commit, m.commit_term, m.reject_hint]
        .iter()
        .any(|v| *v > MAX_TERM_OR_INDEX)
        || m.log_term > m.term
    {
        return Err(Refusal::Index);
    }
    if kind == MessageType::MsgAppend {
        return check_entries(m);
    }
    if m.term < local.term {
        // raft-rs ignores a stale message (or answers it with its term) without reading its indexes;
        // a delayed response from an earlier term may name entries a later leader truncated.
        return Ok(());
    }
    match kind {
        // raft-rs commits to the heartbeat's commit index and panics when it is beyond the log; a leader
        // never sends more than what the follower acknowledged.
        MessageType::MsgHeartbeat if m.commit > local.last_index => Err(Refusal::Index),
        // The leader would advance the follower's progress past its own log and then fail to read the
        // entries it should send next.
        MessageType::MsgAppendResponse
            if m.index > local.last_index || m.reject_hint > local.last_index =>
        {
            Err(Refusal::Index)
        }
        _ => Ok(()),
    }
}

/// Entries must follow the message's index one by one, with terms that never decrease, start at or
/// after the previous entry's term and do not exceed the message's term. raft-rs panics when a
/// "conflicting" entry lands at or below the commit index, which a gap or a rewind would produce.
fn check_entries(m: &Message) -> Result<(), Refusal> {
    let mut expected = m.index;
    let mut term = m.log_term;
    for e in m.get_entries() {
        expected = expected.checked_add(1).ok_or(Refusal::Entries)?;
        if e.index != expected || e.term < term || e.term > m.term {
            return Err(Refusal::Entries);
        }
        term = e.term;
    }
    Ok(())
}

/// Checks the `MsgSnapshot` that opens a snapshot stream. A snapshot is only sent by a leader, for a
/// term it holds, and covers at least the bootstrap entry; its membership must not be empty.
///
/// # Errors
/// [`Refusal::MessageType`] or [`Refusal::Snapshot`].
pub fn check_snapshot(m: &Message, local: LocalView) -> Result<(), Refusal> {
    if m.get_msg_type() != MessageType::MsgSnapshot {
        return Err(Refusal::MessageType);
    }
    if m.term == 0
        || m.term > MAX_TERM_OR_INDEX
        || m.term > local.term.saturating_add(MAX_TERM_AHEAD)
    {
        return Err(Refusal::Term);
    }
    let meta = m.get_snapshot().get_metadata();
    if meta.index == 0
        || meta.index > MAX_TERM_OR_INDEX
        || meta.term == 0
        || meta.term > m.term
        || meta.get_conf_state().voters.is_empty()
    {
        return Err(Refusal::Snapshot);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use raft::eraftpb::Entry;

    const LOCAL: LocalView = LocalView {
        term: 5,
        last_index: 100,
    };

    fn msg(kind: MessageType) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = 2;
        m.to = 1;
        m.term = 5;
        m
    }

    fn append(index: u64, log_term: u64, entries: &[(u64, u64)]) -> Message {
        let mut m = msg(MessageType::MsgAppend);
        m.index = index;
        m.log_term = log_term;
        m.set_entries(
            entries
                .iter()
                .map(|&(index, term)| Entry {
                    index,
                    term,
                    ..Entry::default()
                })
                .collect(),
        );
        m
    }

    #[test]
    fn honest_messages_pass() {
        for kind in PEER_TYPES {
            assert_eq!(check_message(&msg(kind), LOCAL), Ok(()), "{kind:?}");
        }
        assert_eq!(
            check_message(&append(100, 4, &[(101, 4), (102, 5)]), LOCAL),
            Ok(())
        );
        let mut hb = msg(MessageType::MsgHeartbeat);
        hb.commit = 100;
        assert_eq!(check_message(&hb, LOCAL), Ok(()));
        // A peer a few elections ahead is normal.
        let mut vote = msg(MessageType::MsgRequestPreVote);
        vote.term = 40;
        vote.index = 10_000;
        assert_eq!(check_message(&vote, LOCAL), Ok(()));
    }

    #[test]
    fn local_types_are_refused() {
        for kind in [
            MessageType::MsgHup,
            MessageType::MsgBeat,
            MessageType::MsgPropose,
            MessageType::MsgReadIndex,
            MessageType::MsgReadIndexResp,
            MessageType::MsgUnreachable,
            MessageType::MsgSnapStatus,
            MessageType::MsgCheckQuorum,
            MessageType::MsgSnapshot,
        ] {
            assert_eq!(
                check_message(&msg(kind), LOCAL),
                Err(Refusal::MessageType),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn the_probe_findings_are_refused() {
        let mut hb = msg(MessageType::MsgHeartbeat);
        hb.term = u64::MAX;
        assert_eq!(check_message(&hb, LOCAL), Err(Refusal::Term));
        let mut hb = msg(MessageType::MsgHeartbeat);
        hb.commit = 1_000_000_000_000;
        assert_eq!(check_message(&hb, LOCAL), Err(Refusal::Index));
        let mut zero = msg(MessageType::MsgAppend);
        zero.term = 0;
        assert_eq!(check_message(&zero, LOCAL), Err(Refusal::Term));
        let mut resp = msg(MessageType::MsgAppendResponse);
        resp.index = 101;
        assert_eq!(check_message(&resp, LOCAL), Err(Refusal::Index));
        // The same from an earlier term is stale, and raft-rs ignores it.
        resp.term = 4;
        assert_eq!(check_message(&resp, LOCAL), Ok(()));
    }

    #[test]
    fn gaps_and_rewinds_in_entries_are_refused() {
        assert_eq!(
            check_message(&append(100, 4, &[(102, 4)]), LOCAL),
            Err(Refusal::Entries)
        );
        assert_eq!(
            check_message(&append(100, 4, &[(1, 4)]), LOCAL),
            Err(Refusal::Entries)
        );
        assert_eq!(
            check_message(&append(100, 4, &[(101, 3)]), LOCAL),
            Err(Refusal::Entries)
        );
        assert_eq!(
            check_message(&append(100, 4, &[(101, 6)]), LOCAL),
            Err(Refusal::Entries)
        );
        assert_eq!(
            check_message(&append(100, 4, &[(101, 5), (102, 4)]), LOCAL),
            Err(Refusal::Entries)
        );
        assert_eq!(
            check_message(&append(100, 6, &[]), LOCAL),
            Err(Refusal::Index)
        );
    }

    #[test]
    fn envelope_must_match_the_batch() {
        let m = msg(MessageType::MsgHeartbeat);
        assert_eq!(check_envelope(&m, 2, 1), Ok(()));
        assert_eq!(check_envelope(&m, 3, 1), Err(Refusal::Envelope));
        assert_eq!(check_envelope(&m, 2, 4), Err(Refusal::Envelope));
        let mut me = m.clone();
        me.from = 1;
        assert_eq!(check_envelope(&me, 1, 1), Err(Refusal::Envelope));
    }

    #[test]
    fn snapshot_metadata_is_checked() {
        let mut m = msg(MessageType::MsgSnapshot);
        let meta = m.mut_snapshot().mut_metadata();
        meta.index = 50;
        meta.term = 5;
        meta.mut_conf_state().voters = vec![1, 2, 3];
        assert_eq!(check_snapshot(&m, LOCAL), Ok(()));
        let mut bad = m.clone();
        bad.mut_snapshot().mut_metadata().term = 6;
        assert_eq!(check_snapshot(&bad, LOCAL), Err(Refusal::Snapshot));
        let mut bad = m.clone();
        bad.mut_snapshot()
            .mut_metadata()
            .mut_conf_state()
            .voters
            .clear();
        assert_eq!(check_snapshot(&bad, LOCAL), Err(Refusal::Snapshot));
        let mut bad = m;
        bad.term = u64::MAX;
        assert_eq!(check_snapshot(&bad, LOCAL), Err(Refusal::Term));
    }

    proptest! {
        /// Whatever passes the checks stays within the bounds raft-rs's arithmetic and log reads rely on.
        #[test]
        fn what_passes_is_safe_to_step(
            kind in 0i32..19,
            term in prop_oneof![Just(0u64), 1u64..50, Just(u64::MAX), any::<u64>()],
            index in prop_oneof![0u64..200, any::<u64>()],
            log_term in prop_oneof![0u64..10, any::<u64>()],
            commit in prop_oneof![0u64..200, any::<u64>()],
            hint in prop_oneof![0u64..200, any::<u64>()],
            entries in proptest::collection::vec((0u64..300, 0u64..60), 0..5),
        ) {
            let mut m = Message::default();
            m.set_msg_type(<MessageType as protobuf::ProtobufEnum>::from_i32(kind).unwrap());
            m.from = 2;
            m.to = 1;
            m.term = term;
            m.index = index;
            m.log_term = log_term;
            m.commit = commit;
            m.reject_hint = hint;
            m.set_entries(entries.iter().map(|&(index, term)| Entry { index, term, ..Entry::default() }).collect());
            if check_message(&m, LOCAL).is_ok() {
                prop_assert!(PEER_TYPES.contains(&m.get_msg_type()));
                prop_assert!(m.term >= 1 && m.term <= LOCAL.term + MAX_TERM_AHEAD);
                if m.get_msg_type() == MessageType::MsgHeartbeat && m.term >= LOCAL.term {
                    prop_assert!(m.commit <= LOCAL.last_index);
                }
                if m.get_msg_type() == MessageType::MsgAppendResponse && m.term >= LOCAL.term {
                    prop_assert!(m.index <= LOCAL.last_index);
                }
                if m.get_msg_type() == MessageType::MsgAppend {
                    for (i, e) in m.get_entries().iter().enumerate() {
                        prop_assert_eq!(e.index, m.index + 1 + i as u64);
                    }
                }
            }
        }
    }
}
