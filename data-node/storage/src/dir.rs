//! The data directory: created if asked, stamped with the backend that owns it.
//!
//! Layout: `<path>/KIWI_STORAGE` holds the backend's name; the engine's own files live in
//! `<path>/<backend>/`. The marker is written (and fsynced) before the engine creates anything, so a
//! directory either has a marker or holds nothing of ours.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::backend::BackendKind;
use crate::error::{Error, Result};

/// Name of the marker file that records which backend owns a data directory.
pub const MARKER_FILE: &str = "KIWI_STORAGE";

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `path` ready for `kind` and returns the directory the engine should open.
///
/// # Errors
/// [`Error::DirectoryNotFound`] when `path` is missing and `create_if_missing` is false;
/// [`Error::BackendMismatch`] when another backend owns it; [`Error::ForeignDirectory`] when it holds files
/// but no marker; [`Error::Io`] when it cannot be created, read or written.
pub(crate) fn prepare(path: &Path, kind: BackendKind, create_if_missing: bool) -> Result<PathBuf> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Error::Io {
                action: "open data directory",
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if !create_if_missing {
                return Err(Error::DirectoryNotFound {
                    path: path.to_path_buf(),
                });
            }
            fs::create_dir_all(path).map_err(io_err("create data directory", path))?;
        }
        Err(e) => return Err(io_err("open data directory", path)(e)),
    }

    let marker = path.join(MARKER_FILE);
    match fs::read_to_string(&marker) {
        Ok(found) => {
            let found = found.trim();
            if found != kind.as_str() {
                return Err(Error::BackendMismatch {
                    path: path.to_path_buf(),
                    found: found.to_string(),
                    expected: kind,
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut entries = fs::read_dir(path).map_err(io_err("read data directory", path))?;
            if entries.next().is_some() {
                return Err(Error::ForeignDirectory {
                    path: path.to_path_buf(),
                    marker: MARKER_FILE,
                });
            }
            write_marker(path, kind)?;
        }
        Err(e) => return Err(io_err("read", &marker)(e)),
    }
    Ok(path.join(kind.as_str()))
}

/// Writes the marker atomically: a temporary file, fsync, rename, fsync of the directory.
fn write_marker(dir: &Path, kind: BackendKind) -> Result<()> {
    let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
    let marker = dir.join(MARKER_FILE);
    let mut f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(format!("{}\n", kind.as_str()).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &marker).map_err(io_err("rename", &tmp))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}
