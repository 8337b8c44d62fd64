//! The storage conformance suite. Every function takes a [`Fixture`] and checks one property; a failing
//! assertion names the backend and the property. Engines must pass all of them.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;

use kiwi_storage::{
    BackendKind, Error, KeySpace, KvPair, Limits, OpenOptions, Scan, ScanRange, StorageBackend,
    StorageSnapshot, WriteBatch, WriteOptions,
};

/// Opens one backend kind in a private temporary directory, and reopens it there.
pub struct Fixture {
    /// The engine under test.
    pub kind: BackendKind,
    /// The limits the backend is opened with.
    pub limits: Limits,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A fresh, empty directory for `kind` with default limits.
    pub fn new(kind: BackendKind) -> Self {
        Fixture {
            kind,
            limits: Limits::default(),
            dir: tempfile::tempdir().expect("create temporary directory"),
        }
    }

    /// The data directory.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Options for this fixture's backend and directory.
    pub fn options(&self) -> OpenOptions {
        OpenOptions {
            limits: self.limits,
            ..OpenOptions::new(self.kind, self.path())
        }
    }

    /// Opens (or reopens) the backend.
    pub fn open(&self) -> Arc<dyn StorageBackend> {
        kiwi_storage::open(&self.options())
            .unwrap_or_else(|e| panic!("{}: open {}: {e}", self.kind, self.path().display()))
    }

    /// Whether data survives closing and reopening.
    pub fn persistent(&self) -> bool {
        self.kind != BackendKind::Memory
    }
}

const D: KeySpace = KeySpace::Data;
const SYNC: WriteOptions = WriteOptions::SYNC;

fn get(s: &dyn StorageBackend, key: &[u8]) -> Option<Vec<u8>> {
    s.read(D, key)
        .unwrap_or_else(|e| panic!("{}: read {key:?}: {e}", s.kind()))
}

fn keys(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    pairs.iter().map(|(k, _)| k.clone()).collect()
}

fn scan(s: &dyn StorageBackend, range: ScanRange, limit: usize, reverse: bool) -> Vec<Vec<u8>> {
    let pairs = s
        .scan(
            D,
            &Scan {
                range,
                limit,
                reverse,
            },
        )
        .unwrap_or_else(|e| panic!("{}: scan: {e}", s.kind()));
    keys(&pairs)
}

/// A write is visible to the next read.
pub fn read_your_writes(f: &Fixture) {
    let s = f.open();
    assert_eq!(get(&*s, b"k"), None, "{}: fresh store has no key", f.kind);
    s.write(D, b"k", b"v1", SYNC).unwrap();
    assert_eq!(get(&*s, b"k"), Some(b"v1".to_vec()), "{}", f.kind);
    s.write(D, b"k2", b"v2", WriteOptions::BUFFERED).unwrap();
    assert_eq!(
        get(&*s, b"k2"),
        Some(b"v2".to_vec()),
        "{}: buffered write",
        f.kind
    );
}

/// Delete removes a key; deleting a missing key succeeds.
pub fn delete(f: &Fixture) {
    let s = f.open();
    s.write(D, b"k", b"v", SYNC).unwrap();
    s.delete(D, b"k", SYNC).unwrap();
    assert_eq!(get(&*s, b"k"), None, "{}", f.kind);
    s.delete(D, b"never-written", SYNC).unwrap();
    assert_eq!(get(&*s, b"never-written"), None, "{}", f.kind);
}

/// The last write to a key wins, also inside one batch.
pub fn overwrite(f: &Fixture) {
    let s = f.open();
    s.write(D, b"k", b"first", SYNC).unwrap();
    s.write(D, b"k", b"second", SYNC).unwrap();
    assert_eq!(get(&*s, b"k"), Some(b"second".to_vec()), "{}", f.kind);
    let mut b = WriteBatch::new();
    b.put(D, b"k", b"a").delete(D, b"k").put(D, b"k", b"third");
    s.batch_write(b, SYNC).unwrap();
    assert_eq!(get(&*s, b"k"), Some(b"third".to_vec()), "{}", f.kind);
}

/// A batch with one bad operation writes nothing; a good batch writes everything, across key spaces.
pub fn batch_atomicity(f: &Fixture) {
    let s = f.open();
    s.write(D, b"existing", b"old", SYNC).unwrap();
    let mut bad = WriteBatch::new();
    bad.put(D, b"a", b"1").delete(D, b"existing").put(
        D,
        vec![b'x'; f.limits.max_key_bytes + 1],
        b"too long key",
    );
    let err = s.batch_write(bad, SYNC).unwrap_err();
    assert!(
        matches!(err, Error::KeyTooLarge { .. }),
        "{}: {err}",
        f.kind
    );
    assert_eq!(
        get(&*s, b"a"),
        None,
        "{}: refused batch wrote a key",
        f.kind
    );
    assert_eq!(
        get(&*s, b"existing"),
        Some(b"old".to_vec()),
        "{}: refused batch deleted a key",
        f.kind
    );

    let mut good = WriteBatch::new();
    good.put(D, b"a", b"1")
        .put(KeySpace::Raft, b"applied", b"7")
        .delete(D, b"existing");
    s.batch_write(good, SYNC).unwrap();
    assert_eq!(get(&*s, b"a"), Some(b"1".to_vec()), "{}", f.kind);
    assert_eq!(
        s.read(KeySpace::Raft, b"applied").unwrap(),
        Some(b"7".to_vec()),
        "{}",
        f.kind
    );
    assert_eq!(get(&*s, b"existing"), None, "{}", f.kind);
    s.batch_write(WriteBatch::new(), SYNC).unwrap();
}

/// Key spaces do not see each other's keys, in reads or scans.
pub fn key_spaces_are_separate(f: &Fixture) {
    let s = f.open();
    s.write(D, b"same", b"data", SYNC).unwrap();
    s.write(KeySpace::Raft, b"same", b"raft", SYNC).unwrap();
    s.write(KeySpace::Raft, b"zzz", b"raft", SYNC).unwrap();
    assert_eq!(get(&*s, b"same"), Some(b"data".to_vec()), "{}", f.kind);
    assert_eq!(
        s.read(KeySpace::Raft, b"same").unwrap(),
        Some(b"raft".to_vec()),
        "{}",
        f.kind
    );
    assert_eq!(
        scan(&*s, ScanRange::all(), 100, false),
        vec![b"same".to_vec()],
        "{}",
        f.kind
    );
    assert_eq!(
        scan(&*s, ScanRange::all(), 100, true),
        vec![b"same".to_vec()],
        "{}",
        f.kind
    );
    let raft = s
        .scan(KeySpace::Raft, &Scan::forward(ScanRange::all(), 100))
        .unwrap();
    assert_eq!(
        keys(&raft),
        vec![b"same".to_vec(), b"zzz".to_vec()],
        "{}",
        f.kind
    );
}

/// Scans honour bounds (inclusive and exclusive), limits and direction.
pub fn ordered_scans(f: &Fixture) {
    let s = f.open();
    let mut b = WriteBatch::new();
    for k in ["a", "b", "c", "d", "e"] {
        b.put(D, k, format!("v{k}"));
    }
    s.batch_write(b, SYNC).unwrap();
    let ks = |v: &[&str]| v.iter().map(|k| k.as_bytes().to_vec()).collect::<Vec<_>>();
    let kind = f.kind;

    assert_eq!(
        scan(&*s, ScanRange::all(), 10, false),
        ks(&["a", "b", "c", "d", "e"]),
        "{kind}: all"
    );
    assert_eq!(
        scan(&*s, ScanRange::all(), 10, true),
        ks(&["e", "d", "c", "b", "a"]),
        "{kind}: all reverse"
    );
    assert_eq!(
        scan(&*s, ScanRange::half_open(b"b", b"d"), 10, false),
        ks(&["b", "c"]),
        "{kind}: [b,d)"
    );
    assert_eq!(
        scan(&*s, ScanRange::half_open(b"b", b"d"), 10, true),
        ks(&["c", "b"]),
        "{kind}: [b,d) rev"
    );
    assert_eq!(
        scan(&*s, ScanRange::half_open(b"b", b""), 2, false),
        ks(&["b", "c"]),
        "{kind}: limit"
    );
    assert_eq!(
        scan(&*s, ScanRange::half_open(b"", b"d"), 2, true),
        ks(&["c", "b"]),
        "{kind}: limit rev"
    );
    assert_eq!(
        scan(&*s, ScanRange::half_open(b"bb", b"dd"), 10, false),
        ks(&["c", "d"]),
        "{kind}: between"
    );
    let excl_incl = ScanRange {
        start: Bound::Excluded(b"b".to_vec()),
        end: Bound::Included(b"d".to_vec()),
    };
    assert_eq!(
        scan(&*s, excl_incl.clone(), 10, false),
        ks(&["c", "d"]),
        "{kind}: (b,d]"
    );
    assert_eq!(
        scan(&*s, excl_incl, 10, true),
        ks(&["d", "c"]),
        "{kind}: (b,d] rev"
    );
    assert!(
        scan(&*s, ScanRange::half_open(b"d", b"b"), 10, false).is_empty(),
        "{kind}: inverted"
    );
    assert!(
        scan(&*s, ScanRange::half_open(b"c", b"c"), 10, true).is_empty(),
        "{kind}: empty"
    );
    assert!(
        scan(&*s, ScanRange::half_open(b"f", b""), 10, true).is_empty(),
        "{kind}: past the end"
    );
    assert!(matches!(
        s.scan(D, &Scan::forward(ScanRange::all(), 0)),
        Err(Error::ZeroScanLimit)
    ));

    let pairs = s
        .scan(D, &Scan::forward(ScanRange::half_open(b"a", b"b"), 10))
        .unwrap();
    assert_eq!(
        pairs,
        vec![(b"a".to_vec(), b"va".to_vec())],
        "{kind}: values come with keys"
    );
}

/// Keys with 0x00 and 0xFF bytes sort bytewise and round-trip, at the edges of scans too.
pub fn binary_keys(f: &Fixture) {
    let s = f.open();
    let all: Vec<Vec<u8>> = vec![
        vec![0x00],
        vec![0x00, 0x00],
        vec![0x00, 0xFF],
        vec![0x01],
        vec![0x7F, 0x00, 0x80],
        vec![0xFF],
        vec![0xFF, 0x00],
        vec![0xFF, 0xFF],
        vec![0xFF, 0xFF, 0xFF],
    ];
    let mut b = WriteBatch::new();
    for (i, k) in all.iter().enumerate().rev() {
        b.put(D, k.clone(), vec![i as u8, 0x00, 0xFF]);
    }
    s.batch_write(b, SYNC).unwrap();
    for (i, k) in all.iter().enumerate() {
        assert_eq!(
            get(&*s, k),
            Some(vec![i as u8, 0x00, 0xFF]),
            "{}: key {k:?}",
            f.kind
        );
    }
    assert_eq!(
        scan(&*s, ScanRange::all(), 100, false),
        all,
        "{}: forward order",
        f.kind
    );
    let mut rev = all.clone();
    rev.reverse();
    assert_eq!(
        scan(&*s, ScanRange::all(), 100, true),
        rev,
        "{}: reverse order",
        f.kind
    );
    assert_eq!(
        scan(&*s, ScanRange::half_open(&[0xFF], &[]), 100, true),
        vec![
            vec![0xFF, 0xFF, 0xFF],
            vec![0xFF, 0xFF],
            vec![0xFF, 0x00],
            vec![0xFF]
        ],
        "{}: reverse from the top",
        f.kind
    );
    assert_eq!(
        scan(&*s, ScanRange::half_open(&[0x00], &[0x01]), 100, false),
        vec![vec![0x00], vec![0x00, 0x00], vec![0x00, 0xFF]],
        "{}: zero-byte prefix",
        f.kind
    );
}

/// An empty value is a present key, distinct from a missing one.
pub fn empty_values(f: &Fixture) {
    let s = f.open();
    s.write(D, b"empty", b"", SYNC).unwrap();
    assert_eq!(get(&*s, b"empty"), Some(Vec::new()), "{}", f.kind);
    assert_eq!(get(&*s, b"missing"), None, "{}", f.kind);
    let pairs = s.scan(D, &Scan::forward(ScanRange::all(), 10)).unwrap();
    assert_eq!(pairs, vec![(b"empty".to_vec(), Vec::new())], "{}", f.kind);
}

/// Keys and values up to the limits are stored; one byte more is refused, and nothing changes.
pub fn size_limits(f: &Fixture) {
    let s = f.open();
    let max_key = vec![b'k'; f.limits.max_key_bytes];
    let max_value = vec![0xAB; f.limits.max_value_bytes];
    s.write(D, &max_key, &max_value, SYNC).unwrap();
    assert_eq!(
        get(&*s, &max_key).map(|v| v.len()),
        Some(max_value.len()),
        "{}",
        f.kind
    );

    let long_key = vec![b'k'; f.limits.max_key_bytes + 1];
    let err = s.write(D, &long_key, b"v", SYNC).unwrap_err();
    assert!(
        matches!(err, Error::KeyTooLarge { len, max } if len == max + 1 && max == f.limits.max_key_bytes),
        "{}: {err}",
        f.kind
    );
    assert!(err.to_string().contains("over the limit"), "{err}");

    let long_value = vec![0; f.limits.max_value_bytes + 1];
    let err = s.write(D, b"small", &long_value, SYNC).unwrap_err();
    assert!(
        matches!(err, Error::ValueTooLarge { .. }),
        "{}: {err}",
        f.kind
    );
    assert_eq!(
        get(&*s, b"small"),
        None,
        "{}: refused value was written",
        f.kind
    );

    for err in [
        s.write(D, b"", b"v", SYNC).unwrap_err(),
        s.read(D, b"").unwrap_err(),
        s.delete(D, b"", SYNC).unwrap_err(),
    ] {
        assert!(matches!(err, Error::EmptyKey { .. }), "{}: {err}", f.kind);
    }
    assert_eq!(
        scan(&*s, ScanRange::all(), 10, false),
        vec![max_key],
        "{}: store changed",
        f.kind
    );
}

/// Data written before a clean close is there after reopening; the directory can be reopened repeatedly.
pub fn reopen_after_close(f: &Fixture) {
    if !f.persistent() {
        return;
    }
    {
        let s = f.open();
        let mut b = WriteBatch::new();
        for i in 0..1000u32 {
            b.put(D, i.to_be_bytes(), i.to_le_bytes());
        }
        s.batch_write(b, WriteOptions::BUFFERED).unwrap();
        s.write(KeySpace::Raft, b"hard_state", b"hs", SYNC).unwrap();
        s.delete(D, &5u32.to_be_bytes(), WriteOptions::BUFFERED)
            .unwrap();
    }
    for round in 0..2 {
        let s = f.open();
        assert_eq!(
            get(&*s, &7u32.to_be_bytes()),
            Some(7u32.to_le_bytes().to_vec()),
            "{} round {round}",
            f.kind
        );
        assert_eq!(
            get(&*s, &5u32.to_be_bytes()),
            None,
            "{} round {round}: delete lost",
            f.kind
        );
        assert_eq!(
            s.read(KeySpace::Raft, b"hard_state").unwrap(),
            Some(b"hs".to_vec()),
            "{}",
            f.kind
        );
        assert_eq!(
            scan(&*s, ScanRange::all(), 2000, false).len(),
            999,
            "{} round {round}",
            f.kind
        );
    }
}

/// Eight threads write and read concurrently; every write lands and reads never see torn values.
pub fn concurrent_access(f: &Fixture) {
    let s = f.open();
    const THREADS: u32 = 8;
    const PER_THREAD: u32 = 300;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let s = &s;
            scope.spawn(move || {
                for i in 0..PER_THREAD {
                    let key = format!("t{t}/{i:05}");
                    let value = format!("{t}:{i}").repeat(8);
                    if i % 10 == 0 {
                        let mut b = WriteBatch::new();
                        b.put(D, key.clone(), value.clone()).put(
                            D,
                            format!("{key}/pair"),
                            value.clone(),
                        );
                        s.batch_write(b, WriteOptions::BUFFERED).unwrap();
                    } else {
                        s.write(D, key.as_bytes(), value.as_bytes(), WriteOptions::BUFFERED)
                            .unwrap();
                    }
                    let read = s.read(D, key.as_bytes()).unwrap();
                    assert_eq!(
                        read.as_deref(),
                        Some(value.as_bytes()),
                        "{}: thread {t} key {key}",
                        s.kind()
                    );
                    if i % 50 == 0 {
                        let other = (t + 1) % THREADS;
                        let pairs = s
                            .scan(
                                D,
                                &Scan::forward(
                                    ScanRange::half_open(format!("t{other}/").as_bytes(), b""),
                                    20,
                                ),
                            )
                            .unwrap();
                        for (k, v) in pairs {
                            let k = String::from_utf8(k).unwrap();
                            let v = String::from_utf8(v).unwrap();
                            let idx: u32 = k.split('/').nth(1).unwrap().parse().unwrap_or(0);
                            let t2: u32 = k[1..].split('/').next().unwrap().parse().unwrap();
                            assert_eq!(
                                v,
                                format!("{t2}:{idx}").repeat(8),
                                "{}: torn value at {k}",
                                s.kind()
                            );
                        }
                    }
                }
            });
        }
    });
    let total = scan(&*s, ScanRange::all(), 100_000, false).len();
    assert_eq!(
        total as u32,
        THREADS * (PER_THREAD + PER_THREAD / 10),
        "{}",
        f.kind
    );
}

/// A snapshot sees the store as it was, whatever is written after; read in chunks it covers everything.
pub fn snapshot_is_point_in_time(f: &Fixture) {
    let s = f.open();
    let mut b = WriteBatch::new();
    for i in 0..250u32 {
        b.put(D, format!("k{i:04}"), format!("v{i}"));
    }
    b.put(KeySpace::Raft, b"applied", b"250");
    s.batch_write(b, SYNC).unwrap();

    let snap = s.snapshot().unwrap();
    s.write(D, b"k0000", b"changed", SYNC).unwrap();
    s.write(D, b"k9999", b"new", SYNC).unwrap();
    s.delete(D, b"k0100", SYNC).unwrap();
    s.write(KeySpace::Raft, b"applied", b"253", SYNC).unwrap();

    assert_eq!(
        snap.read(D, b"k0000").unwrap(),
        Some(b"v0".to_vec()),
        "{}",
        f.kind
    );
    assert_eq!(
        snap.read(D, b"k0100").unwrap(),
        Some(b"v100".to_vec()),
        "{}",
        f.kind
    );
    assert_eq!(snap.read(D, b"k9999").unwrap(), None, "{}", f.kind);
    assert_eq!(
        snap.read(KeySpace::Raft, b"applied").unwrap(),
        Some(b"250".to_vec()),
        "{}",
        f.kind
    );

    // Iterate in chunks, as a Raft snapshot sender does.
    let mut seen = Vec::new();
    let mut start = Bound::Unbounded;
    loop {
        let range = ScanRange {
            start,
            end: Bound::Unbounded,
        };
        let chunk = snap.scan(D, &Scan::forward(range, 64)).unwrap();
        let Some((last, _)) = chunk.last() else { break };
        start = Bound::Excluded(last.clone());
        seen.extend(chunk);
    }
    assert_eq!(seen.len(), 250, "{}: chunked iteration", f.kind);
    assert_eq!(seen[0], (b"k0000".to_vec(), b"v0".to_vec()), "{}", f.kind);
    let rev = snap.scan(D, &Scan::backward(ScanRange::all(), 1)).unwrap();
    assert_eq!(
        keys(&rev),
        vec![b"k0249".to_vec()],
        "{}: reverse at snapshot",
        f.kind
    );
    drop(snap);
    assert_eq!(get(&*s, b"k0000"), Some(b"changed".to_vec()), "{}", f.kind);
}

/// A directory created by one backend is refused by another, with both names in the message.
pub fn other_backends_directory_is_refused(f: &Fixture) {
    if !f.persistent() {
        return;
    }
    drop(f.open());
    for other in BackendKind::ALL {
        if other == f.kind || other == BackendKind::Memory {
            continue;
        }
        let err = kiwi_storage::open(&OpenOptions::new(other, f.path()))
            .err()
            .expect("opening another backend's directory must fail");
        assert!(
            matches!(&err, Error::BackendMismatch { found, expected, .. } if found == f.kind.as_str() && *expected == other),
            "{err}"
        );
    }
    // The owner still opens it.
    drop(f.open());
}

/// Missing, unusable and foreign directories give typed errors naming the path.
pub fn bad_directories_are_refused(f: &Fixture) {
    if !f.persistent() {
        return;
    }
    let missing = OpenOptions {
        create_if_missing: false,
        ..f.options()
    };
    let err = kiwi_storage::open(&missing)
        .err()
        .expect("missing directory");
    assert!(matches!(err, Error::DirectoryNotFound { .. }), "{err}");
    assert!(
        err.to_string().contains(&f.path().display().to_string()),
        "{err}"
    );

    // A regular file where a directory is expected: unwritable even for root.
    let file = f.path().with_file_name("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = OpenOptions::new(f.kind, file.join("db"));
    let err = kiwi_storage::open(&under_file)
        .err()
        .expect("directory under a file");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("a-file"), "{err}");
    let err = kiwi_storage::open(&OpenOptions::new(f.kind, &file))
        .err()
        .expect("file as directory");
    assert!(matches!(err, Error::Io { .. }), "{err}");

    // A directory with someone else's files.
    std::fs::create_dir_all(f.path()).unwrap();
    std::fs::write(f.path().join("important.txt"), b"not ours").unwrap();
    let err = kiwi_storage::open(&f.options())
        .err()
        .expect("foreign directory");
    assert!(matches!(err, Error::ForeignDirectory { .. }), "{err}");
    assert_eq!(
        std::fs::read(f.path().join("important.txt")).unwrap(),
        b"not ours"
    );
}

/// Damaged engine files give a corruption error, never a panic.
pub fn corrupt_directory_is_reported(f: &Fixture) {
    if !f.persistent() {
        return;
    }
    {
        let s = f.open();
        s.write(D, b"k", b"v", SYNC).unwrap();
    }
    let engine_dir = f.path().join(f.kind.as_str());
    let current = engine_dir.join("CURRENT");
    assert!(
        current.exists(),
        "{}: expected {}",
        f.kind,
        current.display()
    );
    std::fs::write(&current, b"MANIFEST-999999\n").unwrap();
    let err = kiwi_storage::open(&f.options())
        .err()
        .expect("CURRENT names a missing manifest");
    assert!(
        matches!(err, Error::Corruption { .. } | Error::Engine { .. }),
        "{}: {err}",
        f.kind
    );

    // Garbage manifest.
    for entry in std::fs::read_dir(&engine_dir).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("MANIFEST-")
        {
            std::fs::write(&p, vec![0xA5; 4096]).unwrap();
            std::fs::write(
                &current,
                format!("{}\n", p.file_name().unwrap().to_string_lossy()),
            )
            .unwrap();
        }
    }
    let err = kiwi_storage::open(&f.options())
        .err()
        .expect("garbage manifest");
    assert!(
        matches!(err, Error::Corruption { .. } | Error::Engine { .. }),
        "{}: {err}",
        f.kind
    );
}

/// The expected contents of the [`D`] key space, kept next to a backend by the reverse-scan cases.
#[derive(Clone, Default)]
struct Model(BTreeMap<Vec<u8>, Vec<u8>>);

impl Model {
    fn put(&mut self, s: &dyn StorageBackend, key: &str, value: &str) {
        s.write(D, key.as_bytes(), value.as_bytes(), SYNC)
            .unwrap_or_else(|e| panic!("{}: put {key}: {e}", s.kind()));
        self.0
            .insert(key.as_bytes().to_vec(), value.as_bytes().to_vec());
    }

    fn delete(&mut self, s: &dyn StorageBackend, key: &str) {
        s.delete(D, key.as_bytes(), SYNC)
            .unwrap_or_else(|e| panic!("{}: delete {key}: {e}", s.kind()));
        self.0.remove(key.as_bytes());
    }

    /// What a scan must return.
    fn scan(&self, scan: &Scan) -> Vec<KvPair> {
        let range = (scan.range.start.clone(), scan.range.end.clone());
        let it = self
            .0
            .range::<Vec<u8>, _>(range)
            .map(|(k, v)| (k.clone(), v.clone()));
        if scan.reverse {
            it.rev().take(scan.limit).collect()
        } else {
            it.take(scan.limit).collect()
        }
    }
}

/// Checks that scans through `run` agree with `model`: the whole key space and every range between two of
/// `probes` (inclusive, exclusive and open bounds), both directions, several limits, and the whole key space
/// read backwards in chunks, as the Raft log is.
fn assert_scans_match(
    what: &str,
    run: &dyn Fn(&Scan) -> Vec<KvPair>,
    model: &Model,
    probes: &[&str],
) {
    let mut ranges = vec![ScanRange::all()];
    for (i, lo) in probes.iter().enumerate() {
        ranges.push(ScanRange::half_open(lo.as_bytes(), b""));
        ranges.push(ScanRange::half_open(b"", lo.as_bytes()));
        ranges.push(ScanRange {
            start: Bound::Unbounded,
            end: Bound::Included(lo.as_bytes().to_vec()),
        });
        for hi in &probes[i + 1..] {
            assert!(lo < hi, "probes must ascend");
            ranges.push(ScanRange::half_open(lo.as_bytes(), hi.as_bytes()));
            ranges.push(ScanRange {
                start: Bound::Excluded(lo.as_bytes().to_vec()),
                end: Bound::Included(hi.as_bytes().to_vec()),
            });
        }
    }
    for range in ranges {
        for limit in [1, 2, 1000] {
            for reverse in [false, true] {
                let scan = Scan {
                    range: range.clone(),
                    limit,
                    reverse,
                };
                assert_eq!(run(&scan), model.scan(&scan), "{what}: {scan:?}");
            }
        }
    }
    let mut seen = Vec::new();
    let mut end = Bound::Unbounded;
    loop {
        let range = ScanRange {
            start: Bound::Unbounded,
            end,
        };
        let chunk = run(&Scan::backward(range, 2));
        let Some((last, _)) = chunk.last() else { break };
        end = Bound::Excluded(last.clone());
        seen.extend(chunk);
    }
    let all = model.scan(&Scan::backward(ScanRange::all(), usize::MAX));
    assert_eq!(seen, all, "{what}: read backwards in chunks");
}

/// Live scans of `s` agree with `model` (see [`assert_scans_match`]).
fn assert_store_matches(what: &str, s: &dyn StorageBackend, model: &Model, probes: &[&str]) {
    let run = |scan: &Scan| {
        s.scan(D, scan)
            .unwrap_or_else(|e| panic!("{what}: {scan:?}: {e}"))
    };
    assert_scans_match(&format!("{}: {what}", s.kind()), &run, model, probes);
}

/// Scans of the snapshot `snap` agree with `model` (see [`assert_scans_match`]).
fn assert_snapshot_matches(
    what: &str,
    kind: BackendKind,
    snap: &dyn StorageSnapshot,
    model: &Model,
    probes: &[&str],
) {
    let run = |scan: &Scan| {
        snap.scan(D, scan)
            .unwrap_or_else(|e| panic!("{kind}: {what}: {scan:?}: {e}"))
    };
    assert_scans_match(&format!("{kind}: {what}"), &run, model, probes);
}

/// Writes 5 MiB to the Raft key space, above every key of [`D`], in one batch, so that an engine with a
/// small write buffer moves what it holds in memory to files at its next write (LevelDB's buffer is 4 MiB
/// and is checked before each write). After that write, the memory holds only that write and what follows,
/// all below the files' last keys. The engines keep deletions as tombstones, in memory or in files; reverse
/// scans must skip them either way.
fn fill_write_buffer(s: &dyn StorageBackend, round: u32) {
    let value = vec![0x5A; 64 * 1024];
    let mut b = WriteBatch::new();
    for i in 0..80u32 {
        b.put(
            KeySpace::Raft,
            format!("~filler/{round:02}/{i:02}"),
            value.clone(),
        );
    }
    s.batch_write(b, WriteOptions::BUFFERED)
        .unwrap_or_else(|e| panic!("{}: filler: {e}", s.kind()));
}

/// Deleted keys stay deleted in reverse scans: put a, b, c, delete c and b, and both directions give [a].
pub fn reverse_scan_after_delete(f: &Fixture) {
    let s = f.open();
    let kind = f.kind;
    let mut m = Model::default();
    for k in ["a", "b", "c"] {
        m.put(&*s, k, &format!("v{k}"));
    }
    m.delete(&*s, "c");
    m.delete(&*s, "b");
    let only_a = vec![(b"a".to_vec(), b"va".to_vec())];
    let all = ScanRange::all();
    assert_eq!(
        s.scan(D, &Scan::forward(all.clone(), 10)).unwrap(),
        only_a,
        "{kind}: forward after deleting c and b"
    );
    assert_eq!(
        s.scan(D, &Scan::backward(all.clone(), 10)).unwrap(),
        only_a,
        "{kind}: reverse after deleting c and b"
    );
    assert_eq!(
        s.scan(D, &Scan::backward(all.clone(), 1)).unwrap(),
        only_a,
        "{kind}: last key after deleting c and b"
    );
    assert!(
        scan(&*s, ScanRange::half_open(b"b", b""), 10, true).is_empty(),
        "{kind}: reverse over deleted keys only"
    );
    let probes = ["a", "b", "c", "d"];
    assert_store_matches("after deleting c and b", &*s, &m, &probes);

    m.delete(&*s, "a");
    assert!(
        scan(&*s, ScanRange::all(), 10, true).is_empty(),
        "{kind}: reverse after deleting everything"
    );
    m.put(&*s, "b", "again");
    assert_eq!(
        s.scan(D, &Scan::backward(all, 10)).unwrap(),
        vec![(b"b".to_vec(), b"again".to_vec())],
        "{kind}: reverse after writing a deleted key again"
    );
    assert_store_matches("after writing b again", &*s, &m, &probes);
}

/// A reverse scan returns each key's newest value, after overwrites and after delete-then-write.
pub fn reverse_scan_returns_newest_value(f: &Fixture) {
    let s = f.open();
    let kind = f.kind;
    let mut m = Model::default();
    m.put(&*s, "k", "first");
    m.put(&*s, "k", "second");
    m.put(&*s, "j", "old");
    m.delete(&*s, "j");
    m.put(&*s, "j", "new");
    m.put(&*s, "l", "kept");
    assert_eq!(
        s.scan(D, &Scan::backward(ScanRange::all(), 10)).unwrap(),
        vec![
            (b"l".to_vec(), b"kept".to_vec()),
            (b"k".to_vec(), b"second".to_vec()),
            (b"j".to_vec(), b"new".to_vec()),
        ],
        "{kind}: newest values in reverse"
    );
    let mut b = WriteBatch::new();
    b.put(D, b"k", b"a").delete(D, b"k").put(D, b"k", b"third");
    s.batch_write(b, SYNC).unwrap();
    m.0.insert(b"k".to_vec(), b"third".to_vec());
    assert_eq!(
        s.scan(D, &Scan::backward(ScanRange::half_open(b"k", b"l"), 10))
            .unwrap(),
        vec![(b"k".to_vec(), b"third".to_vec())],
        "{kind}: newest value of a batch in reverse"
    );
    assert_store_matches("after overwrites", &*s, &m, &["j", "k", "l", "m"]);
}

/// Deletes in the middle and at the top of a range: reverse scans with a limit skip them and still return
/// `limit` pairs.
pub fn reverse_scan_with_limit_after_delete(f: &Fixture) {
    let s = f.open();
    let kind = f.kind;
    let mut m = Model::default();
    for i in 0..20 {
        m.put(&*s, &format!("k{i:02}"), &format!("v{i}"));
    }
    for i in [0, 10, 11, 12, 13, 14, 19] {
        m.delete(&*s, &format!("k{i:02}"));
    }
    let ks = |v: &[&str]| v.iter().map(|k| k.as_bytes().to_vec()).collect::<Vec<_>>();
    assert_eq!(
        scan(&*s, ScanRange::half_open(b"k05", b"k17"), 4, true),
        ks(&["k16", "k15", "k09", "k08"]),
        "{kind}: limit across deleted keys"
    );
    assert_eq!(
        scan(&*s, ScanRange::half_open(b"k10", b"k15"), 10, true),
        Vec::<Vec<u8>>::new(),
        "{kind}: range of deleted keys only"
    );
    assert_eq!(
        scan(&*s, ScanRange::all(), 1, true),
        ks(&["k18"]),
        "{kind}: last key below a deleted top"
    );
    assert_store_matches(
        "deletes in the middle",
        &*s,
        &m,
        &["k00", "k05", "k10", "k12", "k15", "k19", "k2"],
    );
}

/// The last entry of a log kept as `log` + big-endian index in the Raft key space, found with a backward
/// scan of limit 1 (as `LogStore::open` does), after a conflicting suffix was deleted.
pub fn reverse_scan_finds_last_log_entry(f: &Fixture) {
    let s = f.open();
    let key = |i: u64| {
        let mut k = b"log".to_vec();
        k.extend_from_slice(&i.to_be_bytes());
        k
    };
    let mut b = WriteBatch::new();
    for i in 1..=10u64 {
        b.put(KeySpace::Raft, key(i), format!("entry {i}"));
    }
    b.put(KeySpace::Raft, b"hard_state", b"hs");
    s.batch_write(b, SYNC).unwrap();
    let last = |s: &dyn StorageBackend| {
        s.scan(
            KeySpace::Raft,
            &Scan::backward(ScanRange::half_open(b"log", b"log0"), 1),
        )
        .unwrap()
    };
    assert_eq!(
        last(&*s),
        vec![(key(10), b"entry 10".to_vec())],
        "{}",
        f.kind
    );
    let mut b = WriteBatch::new();
    for i in 8..=10u64 {
        b.delete(KeySpace::Raft, key(i));
    }
    s.batch_write(b, SYNC).unwrap();
    assert_eq!(
        last(&*s),
        vec![(key(7), b"entry 7".to_vec())],
        "{}: after deleting the suffix",
        f.kind
    );
    s.write(KeySpace::Raft, &key(8), b"entry 8, term 2", SYNC)
        .unwrap();
    assert_eq!(
        last(&*s),
        vec![(key(8), b"entry 8, term 2".to_vec())],
        "{}: after appending again",
        f.kind
    );
    if f.persistent() {
        drop(s);
        let s = f.open();
        assert_eq!(
            last(&*s),
            vec![(key(8), b"entry 8, term 2".to_vec())],
            "{}: after reopening",
            f.kind
        );
    }
}

/// Reverse scans of a snapshot taken after deletes skip the deleted keys, whatever is written after the
/// snapshot, also when the snapshot is scanned repeatedly in both directions.
pub fn reverse_scan_of_snapshot_after_delete(f: &Fixture) {
    let s = f.open();
    let kind = f.kind;
    let mut m = Model::default();
    for k in ["a", "b", "c", "d", "e"] {
        m.put(&*s, k, &format!("v{k}"));
    }
    let before = s.snapshot().unwrap();
    let at_before = m.clone();
    m.delete(&*s, "d");
    m.delete(&*s, "b");
    m.delete(&*s, "e");
    let snap = s.snapshot().unwrap();
    let at_snap = m.clone();

    m.put(&*s, "b", "vb2");
    m.delete(&*s, "a");
    m.put(&*s, "f", "vf");
    m.put(&*s, "e", "ve2");

    let expect = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        snap.scan(D, &Scan::backward(ScanRange::all(), 10)).unwrap(),
        expect(&[("c", "vc"), ("a", "va")]),
        "{kind}: snapshot reverse"
    );
    assert_eq!(
        snap.scan(D, &Scan::backward(ScanRange::all(), 1)).unwrap(),
        expect(&[("c", "vc")]),
        "{kind}: snapshot last key"
    );
    assert_eq!(
        s.scan(D, &Scan::backward(ScanRange::all(), 10)).unwrap(),
        expect(&[("f", "vf"), ("e", "ve2"), ("c", "vc"), ("b", "vb2")]),
        "{kind}: live reverse"
    );
    let probes = ["a", "b", "c", "d", "e", "f"];
    // Twice: a snapshot is scanned repeatedly, and the engine may keep state between scans.
    for round in 0..2 {
        assert_snapshot_matches(
            &format!("snapshot after deletes, round {round}"),
            kind,
            &*snap,
            &at_snap,
            &probes,
        );
        assert_snapshot_matches(
            &format!("snapshot before deletes, round {round}"),
            kind,
            &*before,
            &at_before,
            &probes,
        );
    }
    assert_store_matches("live after the snapshots", &*s, &m, &probes);
}

/// Reverse scans are right whether the deleted and overwritten versions are still in the engine's memory
/// or already in its files: writes enough to make LevelDB move its buffer to disk between the steps, and
/// reopens.
pub fn reverse_scan_after_flush(f: &Fixture) {
    let probes = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let mut m = Model::default();
    let s = f.open();
    for k in ["a", "b", "c", "d", "e", "f"] {
        m.put(&*s, k, &format!("{k}1"));
    }
    fill_write_buffer(&*s, 0);
    // Puts on disk; deletes, overwrites and new keys in memory.
    m.delete(&*s, "b");
    m.put(&*s, "c", "c2");
    m.put(&*s, "g", "g1");
    m.delete(&*s, "f");
    assert_eq!(
        scan(&*s, ScanRange::all(), 10, true),
        vec![
            b"g".to_vec(),
            b"e".to_vec(),
            b"d".to_vec(),
            b"c".to_vec(),
            b"a".to_vec()
        ],
        "{}: reverse with deletes in memory over puts on disk",
        f.kind
    );
    assert_store_matches("deletes in memory, puts on disk", &*s, &m, &probes);
    let snap = s.snapshot().unwrap();
    let at_snap = m.clone();

    fill_write_buffer(&*s, 1);
    // Deletes and overwrites on disk too; more of each in memory.
    m.delete(&*s, "a");
    m.put(&*s, "b", "b3");
    m.put(&*s, "h", "h1");
    m.delete(&*s, "g");
    assert_store_matches("deletes on disk and in memory", &*s, &m, &probes);
    assert_snapshot_matches(
        "snapshot from before the second flush",
        f.kind,
        &*snap,
        &at_snap,
        &probes,
    );
    drop(snap);

    if f.persistent() {
        drop(s);
        let s = f.open();
        assert_store_matches("after reopening", &*s, &m, &probes);
        m.delete(&*s, "h");
        m.put(&*s, "a", "a4");
        assert_store_matches("written after reopening", &*s, &m, &probes);
    }
}

/// A range delete removes every key of `[start, end)` and nothing else: keys on disk and in memory, a key
/// put earlier in the same batch, but not one put after it, nor the same keys in the other key space. An
/// empty or inverted range is nothing. A snapshot from before still sees the keys; a reopened store does
/// not. (The Raft log is compacted with one.)
pub fn delete_range(f: &Fixture) {
    let probes = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let mut m = Model::default();
    let s = f.open();
    for k in ["a", "b", "c", "d"] {
        m.put(&*s, k, &format!("{k}1"));
    }
    fill_write_buffer(&*s, 0);
    for k in ["e", "f", "g"] {
        m.put(&*s, k, &format!("{k}1"));
    }
    s.write(KeySpace::Raft, b"c", b"raft", SYNC).unwrap();
    let snap = s.snapshot().unwrap();
    let at_snap = m.clone();

    let mut b = WriteBatch::new();
    b.put(D, b"cc", b"in the batch, before")
        .delete_range(D, b"b", b"f")
        .put(D, b"d", b"d2")
        .delete_range(D, b"h", b"a")
        .delete_range(D, b"g", b"g");
    s.batch_write(b, SYNC)
        .unwrap_or_else(|e| panic!("{}: range delete: {e}", f.kind));
    for k in ["b", "c", "e"] {
        m.0.remove(k.as_bytes());
    }
    m.0.insert(b"d".to_vec(), b"d2".to_vec());
    assert_eq!(
        get(&*s, b"cc"),
        None,
        "{}: put before the range delete",
        f.kind
    );
    assert_store_matches("after a range delete", &*s, &m, &probes);
    assert_eq!(
        s.read(KeySpace::Raft, b"c").unwrap(),
        Some(b"raft".to_vec()),
        "{}: the other key space is untouched",
        f.kind
    );
    assert_snapshot_matches("snapshot from before", f.kind, &*snap, &at_snap, &probes);
    drop(snap);

    if f.persistent() {
        drop(s);
        let s = f.open();
        assert_store_matches("after reopening", &*s, &m, &probes);
        m.put(&*s, "c", "c2");
        assert_store_matches("a key written again after reopening", &*s, &m, &probes);
    }
}

/// Overwrites the same 5 MiB of keys in the Raft key space, above every key of [`D`], with `fill` bytes.
/// Like [`fill_write_buffer`], it makes LevelDB move its write buffer to a file at its next write; as every
/// call covers the same keys, the files overlap, and after a few calls LevelDB merges them (it compacts
/// level 0 when that holds four files), rewriting the files and deleting the old ones.
fn overwrite_filler(s: &dyn StorageBackend, fill: u8) {
    let value = vec![fill; 64 * 1024];
    let mut b = WriteBatch::new();
    for i in 0..80u32 {
        b.put(KeySpace::Raft, format!("~filler/{i:02}"), value.clone());
    }
    s.batch_write(b, WriteOptions::BUFFERED)
        .unwrap_or_else(|e| panic!("{}: filler {fill}: {e}", s.kind()));
}

/// A snapshot keeps seeing the store as it was while the engine compacts its files, as a Raft snapshot is
/// streamed from one, chunk by chunk, while writes go on. The state at the snapshot is spread over several
/// files and memory; after it, every key is overwritten, deleted or written again, with enough data between
/// chunks to make LevelDB compact several times, replacing the files that hold that state. Reads and scans
/// of the snapshot, both ways, must still find exactly that state, also for keys whose newer files hold only
/// newer versions. Before the snapshot the store is read far more often than written: an engine must not
/// take the count of its reads for a point in time (LevelDB numbers the snapshot each read takes).
pub fn snapshot_survives_compaction(f: &Fixture) {
    let probes = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let kind = f.kind;
    let s = f.open();
    let mut m = Model::default();
    for k in ["a", "b", "c", "d", "e", "f"] {
        m.put(&*s, k, &format!("{k}1"));
    }
    // The state at the snapshot: in three files, merged by the compactions that follow, and in memory.
    overwrite_filler(&*s, 0);
    m.delete(&*s, "b");
    m.put(&*s, "c", "c2");
    overwrite_filler(&*s, 0);
    m.put(&*s, "g", "g1");
    m.delete(&*s, "f");
    overwrite_filler(&*s, 0);
    m.put(&*s, "d", "d2");
    for _ in 0..2000 {
        assert_eq!(get(&*s, b"c"), Some(b"c2".to_vec()), "{kind}: read");
    }
    let snap = s.snapshot().unwrap();
    let at_snap = m.clone();
    let first_chunk = Scan::forward(ScanRange::all(), 2);
    let last_chunk = Scan::backward(ScanRange::all(), 2);

    for round in 1..=8u8 {
        m.put(&*s, "a", &format!("a{}", round + 1));
        m.put(&*s, "b", &format!("b{}", round + 1));
        m.delete(&*s, "c");
        m.put(&*s, "d", &format!("d{}", round + 1));
        m.delete(&*s, "e");
        m.put(&*s, "f", &format!("f{}", round + 1));
        m.delete(&*s, "g");
        m.put(&*s, "h", &format!("h{}", round + 1));
        overwrite_filler(&*s, round);
        // A chunk each way between compactions, as a transfer reads them.
        for chunk in [&first_chunk, &last_chunk] {
            let got = snap
                .scan(D, chunk)
                .unwrap_or_else(|e| panic!("{kind}: round {round}: snapshot {chunk:?}: {e}"));
            assert_eq!(
                got,
                at_snap.scan(chunk),
                "{kind}: round {round}: snapshot {chunk:?}"
            );
        }
    }

    for k in probes {
        assert_eq!(
            snap.read(D, k.as_bytes())
                .unwrap_or_else(|e| panic!("{kind}: snapshot read {k}: {e}")),
            at_snap.0.get(k.as_bytes()).cloned(),
            "{kind}: snapshot read {k} after compactions"
        );
    }
    assert_eq!(
        snap.read(KeySpace::Raft, b"~filler/79").unwrap(),
        Some(vec![0; 64 * 1024]),
        "{kind}: snapshot read of a rewritten filler key"
    );
    assert_snapshot_matches(
        "snapshot after compactions",
        kind,
        &*snap,
        &at_snap,
        &probes,
    );
    drop(snap);
    assert_store_matches("live after compactions", &*s, &m, &probes);
    assert_eq!(
        s.read(KeySpace::Raft, b"~filler/79").unwrap(),
        Some(vec![8; 64 * 1024]),
        "{kind}: live read of a rewritten filler key"
    );
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

/// `compact_all` (what `kiwi defrag` runs) gives back the space of deleted data on disk and changes
/// nothing a read sees; LevelDB refuses it (it cannot reclaim anything, see its backend's doc).
pub fn compact_all_reclaims_deleted_data(f: &Fixture) {
    let s = f.open();
    let value = vec![b'x'; 4096];
    for round in 0..4u32 {
        let mut b = WriteBatch::new();
        for i in 0..1000u32 {
            b.put(D, format!("big/{round}/{i:05}"), value.clone());
        }
        s.batch_write(b, SYNC).unwrap();
    }
    s.write(D, b"kept", b"v", SYNC).unwrap();
    let mut b = WriteBatch::new();
    b.delete_range(D, b"big/".to_vec(), b"big0".to_vec());
    s.batch_write(b, SYNC).unwrap();
    match (f.kind, s.compact_all()) {
        (BackendKind::LevelDb, Err(e)) => {
            assert!(e.to_string().contains("reclaims nothing"), "{e}");
        }
        (_, r) => r.unwrap_or_else(|e| panic!("{}: compact_all: {e}", f.kind)),
    }
    assert_eq!(get(&*s, b"kept"), Some(b"v".to_vec()), "{}", f.kind);
    assert_eq!(
        scan(&*s, ScanRange::all(), 10, false),
        vec![b"kept".to_vec()],
        "{}",
        f.kind
    );
    if f.kind == BackendKind::RocksDb {
        // 16 MiB were written and deleted; what is left on disk is the engine's fixed overhead.
        let bytes = dir_bytes(&f.path());
        assert!(
            bytes < 4 << 20,
            "{}: {bytes} bytes on disk after compact_all",
            f.kind
        );
    }
}
