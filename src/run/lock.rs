//! The run directory's lock (`run.lock`): one process at a time creates, trains or resumes a
//! run. flock(2) ties the lock to the open file, so the kernel releases it when its holder
//! exits, crashed or not; the file names the holder (pid and host) for the error.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{io_error, Error, Result};

/// The lock file's name in the run directory.
pub(crate) const FILE: &str = "run.lock";

/// A held lock on a run directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub(crate) struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of the run directory `dir` (which must exist), or refuses with the
    /// holder's pid and host.
    pub(crate) fn take(dir: &Path) -> Result<RunLock> {
        let path = dir.join(FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error(&path, "opening"))?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::WouldBlock {
                return Err(io_error(&path, "locking")(err));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("another sae process ({})", holder.escape_debug())
            };
            return Err(Error::RunDir {
                path: dir.to_path_buf(),
                reason: format!(
                    "in use by {holder}, which holds {FILE}; wait for it to end or stop it, or \
                     give another directory"
                ),
            });
        }
        let me = format!("pid {} on host {}\n", std::process::id(), hostname());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()))
            .map_err(io_error(&path, "writing"))?;
        Ok(RunLock { _file: file })
    }
}

/// This machine's name, or `?` when the system will not say.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "?".into()
    }
}
