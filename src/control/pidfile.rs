//! `--pid-file PATH` (SPEC §7): `PID\n`, written once every listener is
//! open (when `READY=1` goes to systemd), and by a new process when it has
//! taken over from an old one; removed at exit only if it still holds this
//! process's pid, so the old process of an upgrade never removes the new
//! one's file.
//!
//! Written beside the target and renamed over it: a reader (`kill -USR2
//! $(cat xps.pid)`) sees the old pid or the new one, never an empty file.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `pid` to `path` (through `PATH.tmp` and a rename).
pub fn write(path: &Path, pid: u32) -> io::Result<()> {
    prepare(path, pid)?.commit()
}

/// A pid file written beside its path and not yet renamed into place: a
/// new process of an upgrade prepares it before it says it is ready, so a
/// file it cannot write rolls the upgrade back instead of leaving no pid
/// file at all. Dropped uncommitted, it is removed.
#[derive(Debug)]
pub struct Prepared {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

/// Writes `PID\n` to `PATH.tmp`.
pub fn prepare(path: &Path, pid: u32) -> io::Result<Prepared> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let prepared = Prepared {
        tmp: PathBuf::from(tmp),
        path: path.to_owned(),
        committed: false,
    };
    let mut f = std::fs::File::create(&prepared.tmp)?;
    f.write_all(format!("{pid}\n").as_bytes())?;
    Ok(prepared)
}

impl Prepared {
    /// Renames it over the pid file: a reader sees the old pid or this one.
    pub fn commit(mut self) -> io::Result<()> {
        self.committed = true;
        std::fs::rename(&self.tmp, &self.path).inspect_err(|_| {
            let _ = std::fs::remove_file(&self.tmp);
        })
    }

    /// Where it goes.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Removes the pid file at `path` if it holds `pid` (the file of an
/// upgrade's new process is left alone). Returns whether it was removed.
pub fn remove_if_holds(path: &Path, pid: u32) -> bool {
    read_pid(path) == Some(pid) && std::fs::remove_file(path).is_ok()
}

/// The pid in a pid file, if it holds one.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_whole_and_removed_only_while_it_holds_our_pid() {
        let dir = std::env::temp_dir().join(format!("xps-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("xps.pid");
        write(&path, 41).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "41\n");
        assert!(!dir.join("xps.pid.tmp").exists());
        // A new process rewrote it: the old one leaves it alone.
        write(&path, 42).unwrap();
        assert!(!remove_if_holds(&path, 41));
        assert_eq!(read_pid(&path), Some(42));
        assert!(remove_if_holds(&path, 42));
        assert!(!path.exists());
        assert_eq!(read_pid(&path), None);
        assert!(write(&dir.join("no/such/dir"), 1).is_err());
        // Prepared and dropped: nothing is left, the file is unchanged.
        write(&path, 43).unwrap();
        drop(prepare(&path, 44).unwrap());
        assert!(!dir.join("xps.pid.tmp").exists());
        assert_eq!(read_pid(&path), Some(43));
        prepare(&path, 44).unwrap().commit().unwrap();
        assert_eq!(read_pid(&path), Some(44));
        assert!(remove_if_holds(&path, 44));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
