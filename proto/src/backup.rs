//! The backup file: what `NodeAdmin.Backup` streams, `kiwi snapshot save` writes, `kiwi snapshot
//! status` checks and `kiwi-node --restore` (behind `kiwi snapshot restore`) installs.
//!
//! ```text
//! file   = magic "KIWIBAK\0" | format version (u32 BE) | frame* | zeros to a multiple of 512 bytes
//!          | SHA-256 of every byte before it
//! frame  = tag (1 byte) | length (u32 BE) | a protobuf message of that length
//!          tag 1: BackupHeader (first, once), 2: BackupChunk (keys in order), 3: BackupEnd (last, once)
//! ```
//!
//! The checksum trailer is the one etcd appends to its snapshots, after a body that is a whole number of
//! 512-byte sectors as etcd's is (etcdctl 3.4 takes a file whose size is not 32 more than a multiple of
//! 512 for one without a checksum), so `etcdctl snapshot save` stores what `Maintenance.Snapshot`
//! streams unchanged. A reader checks everything it can as it goes (magic,
//! version, frame sizes, key order, the end frame's counts, no byte after the checksum) and the checksum
//! last: a consumer that must not act on a damaged file reads it twice, once with [`verify`] and once to
//! use it, and still stops if the second read fails.

use std::io::Read;

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::v1::{BackupChunk, BackupEnd, BackupHeader, KeyValue};

/// The first 8 bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"KIWIBAK\0";
/// The format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the SHA-256 trailer.
pub const CHECKSUM_LEN: usize = 32;
/// The body before the trailer is padded with zeros to a multiple of this.
pub const SECTOR: u64 = 512;
/// The largest frame a reader accepts: a chunk holds about a MiB of pairs plus one pair over (a value
/// is at most a few MiB), so anything this large is damage, not data.
pub const MAX_FRAME: usize = 64 << 20;

const TAG_HEADER: u8 = 1;
const TAG_CHUNK: u8 = 2;
const TAG_END: u8 = 3;

/// What is wrong with a backup file.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("reading the backup: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a Kiwi backup file (it does not start with the backup magic)")]
    NotABackup,
    #[error(
        "backup format version {0} is not one this build reads (it reads version {FORMAT_VERSION})"
    )]
    Version(u32),
    #[error("the backup is truncated: it ends {0} (copy it again from where it was saved)")]
    Truncated(&'static str),
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error(
        "the backup is damaged: its SHA-256 is {actual} but its trailer says {expected} (a byte \
         changed since it was saved)"
    )]
    Checksum { expected: String, actual: String },
}

type Result<T> = std::result::Result<T, BackupError>;

/// Writes a backup file's bytes: [`Writer::start`], then [`Writer::chunk`] per page of keys, then
/// [`Writer::finish`]. Each call returns the bytes to append.
pub struct Writer {
    hasher: Sha256,
    keys: u64,
    bytes: u64,
    /// Bytes of the file so far.
    len: u64,
}

impl Writer {
    /// The file's opening bytes (magic, version, header frame).
    pub fn start(header: &BackupHeader) -> (Writer, Vec<u8>) {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        frame(&mut out, TAG_HEADER, header);
        let mut w = Writer {
            hasher: Sha256::new(),
            keys: 0,
            bytes: 0,
            len: out.len() as u64,
        };
        w.hasher.update(&out);
        (w, out)
    }

    /// A chunk frame of `kvs` (in key order, after the previous chunk's).
    pub fn chunk(&mut self, kvs: Vec<KeyValue>) -> Vec<u8> {
        self.keys += kvs.len() as u64;
        self.bytes += kvs
            .iter()
            .map(|kv| (kv.key.len() + kv.value.len()) as u64)
            .sum::<u64>();
        let mut out = Vec::new();
        frame(&mut out, TAG_CHUNK, &BackupChunk { kvs });
        self.hasher.update(&out);
        self.len += out.len() as u64;
        out
    }

    /// The end frame, the padding and the checksum trailer.
    pub fn finish(mut self) -> Vec<u8> {
        let mut out = Vec::new();
        frame(
            &mut out,
            TAG_END,
            &BackupEnd {
                keys: self.keys,
                bytes: self.bytes,
            },
        );
        let len = self.len + out.len() as u64;
        out.resize(out.len() + padding(len), 0);
        self.hasher.update(&out);
        out.extend_from_slice(&self.hasher.finalize());
        out
    }
}

/// Zeros after `len` bytes to reach a multiple of [`SECTOR`].
fn padding(len: u64) -> usize {
    ((SECTOR - len % SECTOR) % SECTOR) as usize
}

fn frame(out: &mut Vec<u8>, tag: u8, msg: &impl prost::Message) {
    out.push(tag);
    let len = u32::try_from(msg.encoded_len()).expect("a frame is far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    msg.encode(out).expect("a Vec grows as needed");
}

/// Reads a backup file front to back, checking it as it goes.
pub struct Reader<R> {
    inner: R,
    hasher: Sha256,
    header: BackupHeader,
    keys: u64,
    bytes: u64,
    last_key: Option<Vec<u8>>,
    /// The checksum trailer, once checked.
    checksum: Option<String>,
    /// Bytes read so far.
    len: u64,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the opening bytes and the header.
    ///
    /// # Errors
    /// A file that is not a backup, of another version, truncated or damaged.
    pub fn open(inner: R) -> Result<Reader<R>> {
        let mut r = Reader {
            inner,
            hasher: Sha256::new(),
            header: BackupHeader::default(),
            keys: 0,
            bytes: 0,
            last_key: None,
            checksum: None,
            len: 0,
        };
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic, "inside its magic")?;
        if &magic != MAGIC {
            return Err(BackupError::NotABackup);
        }
        let mut version = [0u8; 4];
        r.read_exact(&mut version, "inside its version")?;
        let version = u32::from_be_bytes(version);
        if version != FORMAT_VERSION {
            return Err(BackupError::Version(version));
        }
        match r.frame()? {
            (TAG_HEADER, body) => {
                r.header = BackupHeader::decode(body.as_slice()).map_err(|e| {
                    BackupError::Damaged(format!("its header does not decode: {e}"))
                })?;
                Ok(r)
            }
            (tag, _) => Err(BackupError::Damaged(format!(
                "it starts with a frame of kind {tag}, not the header"
            ))),
        }
    }

    /// The header.
    pub fn header(&self) -> &BackupHeader {
        &self.header
    }

    /// The next chunk of keys; `None` after the end frame, once the checksum and the end of the file are
    /// checked.
    ///
    /// # Errors
    /// A truncated or damaged file: the chunks returned so far must not be trusted.
    pub fn next_chunk(&mut self) -> Result<Option<BackupChunk>> {
        if self.checksum.is_some() {
            return Ok(None);
        }
        let (tag, body) = self.frame()?;
        match tag {
            TAG_CHUNK => {
                let chunk = BackupChunk::decode(body.as_slice())
                    .map_err(|e| BackupError::Damaged(format!("a chunk does not decode: {e}")))?;
                for kv in &chunk.kvs {
                    if self.last_key.as_ref().is_some_and(|last| kv.key <= *last) {
                        return Err(BackupError::Damaged(format!(
                            "key {:?} is out of order",
                            String::from_utf8_lossy(&kv.key)
                        )));
                    }
                    self.last_key = Some(kv.key.clone());
                    self.keys += 1;
                    self.bytes += (kv.key.len() + kv.value.len()) as u64;
                }
                Ok(Some(chunk))
            }
            TAG_END => {
                let end = BackupEnd::decode(body.as_slice()).map_err(|e| {
                    BackupError::Damaged(format!("the end frame does not decode: {e}"))
                })?;
                if (end.keys, end.bytes) != (self.keys, self.bytes) {
                    return Err(BackupError::Damaged(format!(
                        "the end frame counts {} keys and {} bytes, the chunks hold {} and {}",
                        end.keys, end.bytes, self.keys, self.bytes
                    )));
                }
                let mut pad = vec![0u8; padding(self.len)];
                self.read_exact(&mut pad, "inside its padding")?;
                if pad.iter().any(|b| *b != 0) {
                    return Err(BackupError::Damaged("its padding is not zeros".into()));
                }
                let actual = hex(&std::mem::take(&mut self.hasher).finalize());
                let mut trailer = [0u8; CHECKSUM_LEN];
                self.inner
                    .read_exact(&mut trailer)
                    .map_err(|e| eof(e, "inside its checksum"))?;
                let expected = hex(&trailer);
                if expected != actual {
                    return Err(BackupError::Checksum { expected, actual });
                }
                let mut extra = [0u8; 1];
                if self.inner.read(&mut extra)? != 0 {
                    return Err(BackupError::Damaged(
                        "bytes follow its checksum trailer".into(),
                    ));
                }
                self.checksum = Some(actual);
                Ok(None)
            }
            tag => Err(BackupError::Damaged(format!(
                "a frame of unknown kind {tag}"
            ))),
        }
    }

    /// Keys and bytes of keys and values read so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.keys, self.bytes)
    }

    /// The checked SHA-256 (hex), once [`next_chunk`](Self::next_chunk) returned `None`.
    pub fn checksum(&self) -> Option<&str> {
        self.checksum.as_deref()
    }

    fn frame(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.read_exact(&mut head, "between two frames")?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(BackupError::Damaged(format!(
                "a frame claims {len} bytes (at most {MAX_FRAME})"
            )));
        }
        let mut body = vec![0u8; len];
        self.read_exact(&mut body, "inside a frame")?;
        Ok((head[0], body))
    }

    fn read_exact(&mut self, buf: &mut [u8], where_: &'static str) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| eof(e, where_))?;
        self.hasher.update(&*buf);
        self.len += buf.len() as u64;
        Ok(())
    }
}

fn eof(e: std::io::Error, where_: &'static str) -> BackupError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        BackupError::Truncated(where_)
    } else {
        BackupError::Io(e)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a checked backup holds.
#[derive(Debug, Clone)]
pub struct Summary {
    pub header: BackupHeader,
    pub keys: u64,
    /// Bytes of keys and values.
    pub bytes: u64,
    /// The SHA-256 trailer (hex), checked.
    pub sha256: String,
}

/// Reads a whole backup and checks it, holding one chunk at a time; `progress` is called after each
/// chunk with the keys read so far.
///
/// # Errors
/// The first thing wrong with it.
pub fn verify(inner: impl Read, mut progress: impl FnMut(u64)) -> Result<Summary> {
    let mut r = Reader::open(inner)?;
    while r.next_chunk()?.is_some() {
        progress(r.keys);
    }
    Ok(Summary {
        header: r.header.clone(),
        keys: r.keys,
        bytes: r.bytes,
        sha256: r.checksum.clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(i: u32) -> KeyValue {
        KeyValue {
            key: format!("key-{i:05}").into_bytes(),
            value: vec![b'v'; (i % 7) as usize],
            create_revision: u64::from(i) + 1,
            mod_revision: u64::from(i) + 2,
            version: 1,
            lease: u64::from(i % 3),
        }
    }

    fn sample() -> Vec<u8> {
        let header = BackupHeader {
            cluster_id: 7,
            index: 42,
            ..BackupHeader::default()
        };
        let (mut w, mut out) = Writer::start(&header);
        out.extend(w.chunk((0..100).map(kv).collect()));
        out.extend(w.chunk((100..150).map(kv).collect()));
        out.extend(w.finish());
        out
    }

    #[test]
    fn a_written_backup_reads_back_whole() {
        let file = sample();
        let mut r = Reader::open(file.as_slice()).unwrap();
        assert_eq!(r.header().index, 42);
        let mut keys = Vec::new();
        while let Some(c) = r.next_chunk().unwrap() {
            keys.extend(c.kvs);
        }
        assert_eq!(keys, (0..150).map(kv).collect::<Vec<_>>());
        let s = verify(file.as_slice(), |_| {}).unwrap();
        assert_eq!((s.keys, s.header.cluster_id), (150, 7));
        // etcdctl's test for a checksum trailer.
        assert_eq!(file.len() as u64 % SECTOR, CHECKSUM_LEN as u64);
        assert_eq!(s.sha256.len(), 64);
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        let file = sample();
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            assert!(
                verify(bad.as_slice(), |_| {}).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
        for len in 0..file.len() {
            let err = verify(&file[..len], |_| {}).unwrap_err();
            assert!(
                matches!(err, BackupError::Truncated(_) | BackupError::NotABackup),
                "cut at {len}: {err}"
            );
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(verify(longer.as_slice(), |_| {}).is_err());
    }

    #[test]
    fn keys_out_of_order_are_damage() {
        let (mut w, mut out) = Writer::start(&BackupHeader::default());
        out.extend(w.chunk(vec![kv(2), kv(1)]));
        out.extend(w.finish());
        let err = verify(out.as_slice(), |_| {}).unwrap_err();
        assert!(err.to_string().contains("out of order"), "{err}");
    }
}
