//! Which file SIGUSR2 starts: the absolute path xps was started from,
//! resolved once at start-up, as nginx does (SPEC §7).
//!
//! Not `/proc/self/exe`: once a package manager renames the new binary over
//! the old one, that link names the old, deleted inode, and executing it
//! runs the old version again. The path does: it names whatever file is
//! there now. Symlinks are not resolved either, so `/usr/bin/xps ->
//! /opt/xps-1.3/xps` switched to another target runs the new target.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What to start on SIGUSR2: the resolved path, and the command line as it
/// was given (`argv[0]` kept as the new process's own `argv[0]`).
#[derive(Debug, Clone)]
pub struct Executable {
    /// The absolute path of the file to start.
    pub path: PathBuf,
    /// `argv[0]` as given.
    pub argv0: OsString,
    /// The arguments after it.
    pub args: Vec<OsString>,
}

impl Executable {
    /// This process's executable and arguments, resolved now (call it at
    /// start-up, before anything could change the working directory).
    pub fn at_start_up() -> Executable {
        let mut argv = std::env::args_os();
        let argv0 = argv.next().unwrap_or_default();
        let args = argv.collect();
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let path = resolve(&argv0, &cwd, std::env::var_os("PATH").as_deref())
            .or_else(|| std::fs::read_link("/proc/self/exe").ok())
            .unwrap_or_else(|| PathBuf::from(&argv0));
        Executable { path, argv0, args }
    }
}

/// The absolute path `argv0` names: with a `/`, joined to `cwd` when
/// relative; a bare name, the first executable file of that name in
/// `path_var` (as the shell found it). `None` when nothing matches (the
/// caller falls back to `/proc/self/exe` read at start-up).
pub fn resolve(argv0: &OsStr, cwd: &Path, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if argv0.is_empty() {
        return None;
    }
    if argv0.as_bytes().contains(&b'/') {
        // `components()` drops the `.` of `./xps` (lexically: no symlink
        // is resolved).
        return Some(cwd.join(argv0).components().collect());
    }
    let path_var = path_var?;
    std::env::split_paths(path_var)
        .map(|dir| {
            // An empty PATH entry means the working directory.
            let dir = if dir.as_os_str().is_empty() {
                cwd.to_path_buf()
            } else if dir.is_relative() {
                cwd.join(dir)
            } else {
                dir
            };
            dir.join(argv0)
        })
        .find(|candidate| is_executable(candidate))
}

/// A regular file with an execute bit.
fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_as_the_shell_found_them() {
        let dir = std::env::temp_dir().join(format!("xps-exe-{}", std::process::id()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let exe = bin.join("xps");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("xps"), "not executable").unwrap();
        let os = |s: &str| OsString::from(s);
        // Absolute: as given. Relative with a slash: joined to the cwd, not
        // canonicalised.
        assert_eq!(
            resolve(&os("/usr/bin/xps"), &dir, None),
            Some(PathBuf::from("/usr/bin/xps"))
        );
        assert_eq!(
            resolve(&os("./bin/xps"), &dir, None),
            Some(dir.join("bin/xps"))
        );
        assert_eq!(
            resolve(&os("../x/./xps"), &dir, None),
            Some(dir.join("../x/xps"))
        );
        // A bare name: the first executable in PATH (a non-executable file
        // of that name earlier in PATH is skipped, as by the shell).
        let path = std::env::join_paths([dir.clone(), bin.clone()]).unwrap();
        assert_eq!(resolve(&os("xps"), &dir, Some(&path)), Some(exe.clone()));
        // A relative PATH entry is relative to the cwd.
        assert_eq!(resolve(&os("xps"), &dir, Some(&os("bin"))), Some(exe));
        assert_eq!(resolve(&os("missing"), &dir, Some(&path)), None);
        assert_eq!(resolve(&os("xps"), &dir, None), None);
        assert_eq!(resolve(&os(""), &dir, Some(&path)), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
