//! Key ranges as both sides of the wire compute them.

/// The first key past every key starting with `prefix` (empty: no such key, the range is open).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// `[start, end)` (an empty bound is open) in etcd's convention, `key` and `range_end`: an empty
/// `range_end` is the key alone, `"\0"` means no upper bound, and the smallest key is `"\0"`.
pub fn etcd_bounds(start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let key = if start.is_empty() {
        vec![0]
    } else {
        start.to_vec()
    };
    let range_end = if end.is_empty() {
        vec![0]
    } else {
        end.to_vec()
    };
    (key, range_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end(b"app/"), b"app0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"", "no end: the range is open");
        assert_eq!(etcd_bounds(b"", b""), (vec![0], vec![0]));
        assert_eq!(etcd_bounds(b"a", b"b"), (b"a".to_vec(), b"b".to_vec()));
    }
}
