//! The storage conformance suite against every backend: RocksDB and LevelDB on disk, and memory.

use kiwi_storage::BackendKind;
use kiwi_tests::conformance::{self, Fixture};

macro_rules! suite {
    ($backend:ident, $kind:expr) => {
        mod $backend {
            use super::*;

            macro_rules! case {
                ($name:ident) => {
                    #[test]
                    fn $name() {
                        conformance::$name(&Fixture::new($kind));
                    }
                };
            }

            case!(read_your_writes);
            case!(delete);
            case!(delete_range);
            case!(overwrite);
            case!(batch_atomicity);
            case!(key_spaces_are_separate);
            case!(ordered_scans);
            case!(binary_keys);
            case!(empty_values);
            case!(size_limits);
            case!(reopen_after_close);
            case!(concurrent_access);
            case!(snapshot_is_point_in_time);
            case!(reverse_scan_after_delete);
            case!(reverse_scan_returns_newest_value);
            case!(reverse_scan_with_limit_after_delete);
            case!(reverse_scan_finds_last_log_entry);
            case!(reverse_scan_of_snapshot_after_delete);
            case!(reverse_scan_after_flush);
            case!(snapshot_survives_compaction);
            case!(other_backends_directory_is_refused);
            case!(bad_directories_are_refused);
            case!(corrupt_directory_is_reported);
            case!(compact_all_reclaims_deleted_data);

            #[test]
            fn size_limits_follow_the_configuration() {
                let mut f = Fixture::new($kind);
                f.limits = kiwi_storage::Limits {
                    max_key_bytes: 16,
                    max_value_bytes: 100,
                };
                conformance::size_limits(&f);
            }
        }
    };
}

suite!(rocksdb, BackendKind::RocksDb);
suite!(leveldb, BackendKind::LevelDb);
suite!(memory, BackendKind::Memory);
