//! Leases as the state machine keeps them: replicated state, written in the same batch as the writes
//! that change it, carried by snapshots.
//!
//! Layout, in the Raft key space (beside the applied index, so a lease and the keys attached to it always
//! describe the same applied index):
//! - `lease/r/` + id (8 bytes, big-endian) → the granted TTL in seconds (8 bytes) and the number of keys
//!   attached (8 bytes);
//! - `lease/k/` + id + key → nothing: the keys attached, in key order (each key's value header names
//!   its lease too, which is what a snapshot install rebuilds this index from);
//! - `lease/n` → the number of leases.
//!
//! What is *not* here: when a lease expires. Only the leader's clock decides that (`crate::lease`), and a
//! revocation is a proposal like any write.

use std::ops::Bound;

use kiwi_storage::{KeySpace, Scan, ScanRange, WriteBatch};

use crate::raft::mvcc::Reader;

/// Most leases a cluster holds (a grant beyond is refused with RESOURCE_EXHAUSTED).
pub const MAX_LEASES: u64 = 10_000;
/// Most keys attached to one lease: its revocation deletes them in one write, which the range-delete limit
/// bounds too.
pub const MAX_KEYS_PER_LEASE: u64 = 100_000;
/// Largest lease id (etcd's ids are signed 64-bit; Kiwi's fit in them).
pub const MAX_LEASE_ID: u64 = i64::MAX as u64;
/// Longest TTL a lease may be granted (etcd's limit: 9,000,000,000 s).
pub const MAX_TTL_SECS: i64 = 9_000_000_000;

pub const RECORD_PREFIX: &[u8] = b"lease/r/";
pub const INDEX_PREFIX: &[u8] = b"lease/k/";
pub const COUNT_KEY: &[u8] = b"lease/n";
/// Everything under `lease/` (`/` + 1 ends it).
const ALL: (&[u8], &[u8]) = (b"lease/", b"lease0");

/// One lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Granted TTL, seconds.
    pub ttl: i64,
    /// Keys attached.
    pub keys: u64,
}

pub fn record_key(id: u64) -> Vec<u8> {
    let mut k = RECORD_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn index_prefix(id: u64) -> Vec<u8> {
    let mut k = INDEX_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn index_key(id: u64, key: &[u8]) -> Vec<u8> {
    let mut k = index_prefix(id);
    k.extend_from_slice(key);
    k
}

pub fn encode(r: Record) -> Vec<u8> {
    let mut v = r.ttl.to_be_bytes().to_vec();
    v.extend_from_slice(&r.keys.to_be_bytes());
    v
}

pub fn decode(v: &[u8]) -> Option<Record> {
    let (ttl, rest) = v.split_first_chunk::<8>()?;
    let keys = rest.first_chunk::<8>()?;
    Some(Record {
        ttl: i64::from_be_bytes(*ttl),
        keys: u64::from_be_bytes(*keys),
    })
}

fn corrupt(what: &str) -> kiwi_storage::Error {
    kiwi_storage::Error::Io {
        action: "decode a lease record",
        path: std::path::PathBuf::from(what),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed lease record"),
    }
}

/// One lease's record, if it exists.
///
/// # Errors
/// Storage errors; a malformed record.
pub fn read<R: Reader + ?Sized>(view: &R, id: u64) -> kiwi_storage::Result<Option<Record>> {
    view.read(KeySpace::Raft, &record_key(id))?
        .map(|v| decode(&v).ok_or_else(|| corrupt(&format!("lease/r/{id}"))))
        .transpose()
}

/// How many leases exist.
///
/// # Errors
/// Storage errors.
pub fn count<R: Reader + ?Sized>(view: &R) -> kiwi_storage::Result<u64> {
    Ok(view
        .read(KeySpace::Raft, COUNT_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

pub fn put_count(batch: &mut WriteBatch, n: u64) {
    batch.put(KeySpace::Raft, COUNT_KEY.to_vec(), n.to_be_bytes().to_vec());
}

/// Every lease, in id order.
///
/// # Errors
/// Storage errors; a malformed record.
pub fn all<R: Reader + ?Sized>(view: &R) -> kiwi_storage::Result<Vec<(u64, Record)>> {
    const PAGE: usize = 1024;
    let mut out = Vec::new();
    let mut range = ScanRange::half_open(RECORD_PREFIX, b"lease/r0");
    loop {
        let page = view.scan(KeySpace::Raft, &Scan::forward(range.clone(), PAGE))?;
        let full = page.len() == PAGE;
        for (k, v) in page {
            let id = k
                .get(RECORD_PREFIX.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| corrupt("lease/r/"))?;
            out.push((
                id,
                decode(&v).ok_or_else(|| corrupt(&format!("lease/r/{id}")))?,
            ));
            range.start = Bound::Excluded(k);
        }
        if !full {
            return Ok(out);
        }
    }
}

/// The keys attached to lease `id` in storage, in key order, at most `limit`.
///
/// # Errors
/// Storage errors.
pub fn keys<R: Reader + ?Sized>(
    view: &R,
    id: u64,
    limit: usize,
) -> kiwi_storage::Result<Vec<Vec<u8>>> {
    const PAGE: usize = 1024;
    let prefix = index_prefix(id);
    let end = kiwi_proto::keys::prefix_end(&prefix);
    let mut range = ScanRange::half_open(&prefix, &end);
    let mut out = Vec::new();
    while out.len() < limit {
        let page = view.scan(
            KeySpace::Raft,
            &Scan::forward(range.clone(), PAGE.min(limit - out.len())),
        )?;
        let full = page.len() == PAGE.min(limit - out.len());
        for (k, _) in page {
            out.push(k[prefix.len()..].to_vec());
            range.start = Bound::Excluded(k);
        }
        if !full {
            break;
        }
    }
    Ok(out)
}

/// The range of every lease entry, which a snapshot install clears before it writes the snapshot's.
pub fn all_range() -> ScanRange {
    ScanRange::half_open(ALL.0, ALL.1)
}

/// Adds a snapshot's leases to `batch`, with the keys found attached to each (`attached`).
pub fn install_records(
    batch: &mut WriteBatch,
    leases: &[(u64, i64)],
    attached: &std::collections::BTreeMap<u64, u64>,
) {
    for &(id, ttl) in leases {
        let keys = attached.get(&id).copied().unwrap_or(0);
        batch.put(KeySpace::Raft, record_key(id), encode(Record { ttl, keys }));
    }
    put_count(batch, leases.len() as u64);
}

/// Snapshot data format of the leases: (id, ttl) pairs, 16 bytes each.
pub fn encode_list(leases: &[(u64, i64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(leases.len() * 16);
    for (id, ttl) in leases {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
    }
    out
}

pub fn decode_list(mut b: &[u8]) -> Option<Vec<(u64, i64)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (id, rest) = b.split_first_chunk::<8>()?;
        let (ttl, rest) = rest.split_first_chunk::<8>()?;
        out.push((u64::from_be_bytes(*id), i64::from_be_bytes(*ttl)));
        b = rest;
    }
    Some(out)
}
