//! `kiwi txn`: a transaction read from stdin in `etcdctl txn`'s plain form, and its answer printed.
//!
//! Three blocks separated by an empty line: the compares, the success ops, the failure ops (a missing
//! block is empty).
//!
//! ```text
//! mod("accounts/a") = "42"
//! value("flag") != "off"
//!
//! put accounts/a "90"
//! put accounts/b "110"
//!
//! get accounts/a
//! ```
//!
//! Compares: `TARGET("KEY") OP "VALUE"` with TARGET `value`, `version`, `create`, `mod` or `lease` and OP
//! `=`, `!=`, `<` or `>` (a number for all but `value`). Ops: `put KEY VALUE`, `get KEY [--prefix]`,
//! `get KEY END`, `del KEY [--prefix]`, `del KEY END`. A word with spaces is written in double quotes
//! (`\"` and `\\` inside).

use kiwi_client::{Compare, KeyRange, TxnOp, TxnResponse, compare, txn_op, txn_op_response};
use serde_json::json;

use crate::text;

/// The parsed transaction: compares, success ops, failure ops.
pub type Parsed = (Vec<Compare>, Vec<TxnOp>, Vec<TxnOp>);

/// Splits a line into words; double quotes group (with `\"` and `\\` escapes).
fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(e) => word.push(e),
                        None => return Err(format!("unfinished escape in: {line}")),
                    },
                    Some(ch) => word.push(ch),
                    None => return Err(format!("unclosed quote in: {line}")),
                }
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                word.push(ch);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

fn parse_compare(line: &str) -> Result<Compare, String> {
    let bad = || {
        format!(
            "bad compare {line:?}: write TARGET(\"KEY\") OP \"VALUE\", TARGET one of value, version, \
             create, mod, lease and OP one of =, !=, <, >"
        )
    };
    let open = line.find('(').ok_or_else(bad)?;
    let close = line.rfind(')').ok_or_else(bad)?;
    let target = line[..open].trim();
    let key = words(&line[open + 1..close])?;
    let [key] = key.as_slice() else {
        return Err(bad());
    };
    let rest = words(&line[close + 1..])?;
    let [op, given] = rest.as_slice() else {
        return Err(bad());
    };
    let result = match op.as_str() {
        "=" | "==" => compare::CompareResult::Equal,
        "!=" => compare::CompareResult::NotEqual,
        "<" => compare::CompareResult::Less,
        ">" => compare::CompareResult::Greater,
        _ => return Err(bad()),
    };
    let number = || {
        given
            .parse::<u64>()
            .map_err(|_| format!("{target} compares with a number, got {given:?} in {line:?}"))
    };
    let (t, union) = match target {
        "value" => (
            compare::CompareTarget::Value,
            compare::TargetUnion::Value(given.clone().into_bytes()),
        ),
        "version" | "ver" => (
            compare::CompareTarget::Version,
            compare::TargetUnion::Version(number()?),
        ),
        "create" | "c" => (
            compare::CompareTarget::Create,
            compare::TargetUnion::CreateRevision(number()?),
        ),
        "mod" | "m" => (
            compare::CompareTarget::Mod,
            compare::TargetUnion::ModRevision(number()?),
        ),
        "lease" => (
            compare::CompareTarget::Lease,
            compare::TargetUnion::Lease(number()?),
        ),
        _ => return Err(bad()),
    };
    Ok(Compare {
        result: result as i32,
        target: t as i32,
        key: key.clone().into_bytes(),
        target_union: Some(union),
        range_end: Vec::new(),
    })
}

/// `KEY`, `KEY END` or `KEY --prefix` as etcd's key and range_end.
fn range(args: &[String], line: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    match args {
        [key] => Ok((key.clone().into_bytes(), Vec::new())),
        [key, flag] if flag == "--prefix" => {
            Ok(KeyRange::Prefix(key.clone().into_bytes()).etcd_bounds())
        }
        [key, end] => Ok((key.clone().into_bytes(), end.clone().into_bytes())),
        _ => Err(format!(
            "bad op {line:?}: give KEY, KEY END or KEY --prefix"
        )),
    }
}

fn parse_op(line: &str) -> Result<TxnOp, String> {
    let w = words(line)?;
    let op = match w.split_first() {
        Some((verb, args)) if verb == "put" => match args {
            [key, value] => txn_op::Op::Put(txn_op::Put {
                key: key.clone().into_bytes(),
                value: value.clone().into_bytes(),
                prev_kv: false,
                lease: 0,
            }),
            _ => return Err(format!("bad op {line:?}: put KEY VALUE")),
        },
        Some((verb, args)) if verb == "get" => {
            let (key, range_end) = range(args, line)?;
            txn_op::Op::Range(txn_op::Range {
                key,
                range_end,
                ..txn_op::Range::default()
            })
        }
        Some((verb, args)) if verb == "del" || verb == "delete" => {
            let (key, range_end) = range(args, line)?;
            txn_op::Op::DeleteRange(txn_op::DeleteRange {
                key,
                range_end,
                prev_kv: false,
            })
        }
        _ => {
            return Err(format!(
                "bad op {line:?}: the ops are put KEY VALUE, get KEY [END|--prefix], del KEY [END|--prefix]"
            ));
        }
    };
    Ok(TxnOp { op: Some(op) })
}

/// Parses the three blocks.
///
/// # Errors
/// The first line that does not parse, named.
pub fn parse(text: &str) -> Result<Parsed, String> {
    // Each empty line ends a block.
    let mut blocks: Vec<Vec<&str>> = vec![Vec::new()];
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        if line.is_empty() {
            blocks.push(Vec::new());
        } else {
            blocks.last_mut().expect("one block at least").push(line);
        }
    }
    // Empty lines after the last block do not make more blocks.
    while blocks.len() > 3 && blocks.last().is_some_and(Vec::is_empty) {
        blocks.pop();
    }
    if blocks.len() > 3 {
        return Err("a transaction has three blocks (compares, success ops, failure ops) separated by one empty line".into());
    }
    blocks.resize(3, Vec::new());
    let compares = blocks[0]
        .iter()
        .map(|l| parse_compare(l))
        .collect::<Result<_, _>>()?;
    let success = blocks[1]
        .iter()
        .map(|l| parse_op(l))
        .collect::<Result<_, _>>()?;
    let failure = blocks[2]
        .iter()
        .map(|l| parse_op(l))
        .collect::<Result<_, _>>()?;
    Ok((compares, success, failure))
}

/// Prints the answer as `etcdctl txn` does (SUCCESS or FAILURE, then each op's answer), or as JSON.
pub fn print(answer: &TxnResponse, json_out: bool) {
    let revision = answer.header.as_ref().map_or(0, |h| h.revision);
    if json_out {
        let responses: Vec<_> = answer
            .responses
            .iter()
            .map(|r| match &r.response {
                Some(txn_op_response::Response::Put(_)) => json!({"put": {"ok": true}}),
                Some(txn_op_response::Response::DeleteRange(d)) => {
                    json!({"delete": {"deleted": d.deleted}})
                }
                Some(txn_op_response::Response::Range(g)) => json!({"get": {
                    "count": g.count,
                    "more": g.more,
                    "kvs": g.kvs.iter().map(|kv| json!({
                        "key": text(&kv.key), "value": text(&kv.value),
                        "create_revision": kv.create_revision, "mod_revision": kv.mod_revision,
                        "version": kv.version,
                    })).collect::<Vec<_>>(),
                }}),
                None => json!(null),
            })
            .collect();
        println!(
            "{}",
            json!({"succeeded": answer.succeeded, "revision": revision, "responses": responses})
        );
        return;
    }
    println!(
        "{}",
        if answer.succeeded {
            "SUCCESS"
        } else {
            "FAILURE"
        }
    );
    for r in &answer.responses {
        println!();
        match &r.response {
            Some(txn_op_response::Response::Put(_)) => println!("OK"),
            Some(txn_op_response::Response::DeleteRange(d)) => println!("{}", d.deleted),
            Some(txn_op_response::Response::Range(g)) => {
                for kv in &g.kvs {
                    println!("{}\n{}", text(&kv.key), text(&kv.value));
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_blocks_parse() {
        let (c, s, f) = parse(
            "mod(\"acct/a\") = \"42\"\nvalue(\"flag\") != \"off now\"\n\nput acct/a \"9 0\"\ndel old --prefix\n\nget acct/a\n\n",
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0].target_union,
            Some(compare::TargetUnion::ModRevision(42))
        );
        assert_eq!(
            c[1].target_union,
            Some(compare::TargetUnion::Value(b"off now".to_vec()))
        );
        assert_eq!(c[1].result, compare::CompareResult::NotEqual as i32);
        let Some(txn_op::Op::Put(p)) = &s[0].op else {
            panic!()
        };
        assert_eq!(p.value, b"9 0");
        let Some(txn_op::Op::DeleteRange(d)) = &s[1].op else {
            panic!()
        };
        assert_eq!(
            (d.key.as_slice(), d.range_end.as_slice()),
            (&b"old"[..], &b"ole"[..])
        );
        assert_eq!(f.len(), 1);
        // Only compares; only ops after an empty compare block.
        assert_eq!(parse("version(\"k\") > \"0\"\n").unwrap().1.len(), 0);
        assert_eq!(parse("\nput k v\n").unwrap().1.len(), 1);
    }

    #[test]
    fn mistakes_are_named() {
        assert!(parse("mod(\"k\") = \"x\"").unwrap_err().contains("number"));
        assert!(
            parse("size(\"k\") = \"1\"")
                .unwrap_err()
                .contains("bad compare")
        );
        assert!(parse("\nput k").unwrap_err().contains("put KEY VALUE"));
        assert!(parse("\nfrobnicate k").unwrap_err().contains("the ops are"));
        assert!(
            parse("a\n\nb\n\nc\n\nd")
                .unwrap_err()
                .contains("three blocks")
        );
        assert!(parse("\nput \"k v").unwrap_err().contains("unclosed quote"));
    }
}
