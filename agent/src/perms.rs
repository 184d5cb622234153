//! Flows are code, and secrets are secrets: who may change a flow file
//! decides what runs as the service, and a password or key readable by
//! every user is on every backup of the SD card too.
//!
//! A flow file and the folder it is in must belong to root or to the user
//! runnel runs as, and must not be writable by group or others. A password
//! or key file must not be readable by others. Each refusal says the
//! `chmod`/`chown` that fixes it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The user this process runs as (the service user under systemd).
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A user's name from /etc/passwd, else its number.
fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let id: u32 = f.nth(1)?.parse().ok()?;
                (id == uid).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// The uid of a user name in /etc/passwd.
fn user_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Whose flow files are accepted besides root's.
#[derive(Clone, Copy)]
pub(crate) enum Owners {
    /// `runnel run`: the user it runs as.
    Running,
    /// `runnel check`: the service user `runnel` (as the package makes
    /// it), or where there is none, the user running the check.
    Service,
}

impl Owners {
    fn user(self) -> u32 {
        match self {
            Owners::Running => euid(),
            Owners::Service => user_id("runnel").unwrap_or_else(euid),
        }
    }
}

/// `path` (a flow file or the folder of flows) may hold code: owned by root
/// or the service user, not writable by group or others.
pub(crate) fn check_code(path: &Path, owners: Owners) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let shown = path.display();
    let (uid, me) = (meta.uid(), owners.user());
    if uid != 0 && uid != me {
        return Err(format!(
            "{shown} belongs to {}, not to root or to {} (the user runnel runs as): flows are code, and whoever owns them decides what runs; run: sudo chown root:root {shown}",
            user_name(uid),
            user_name(me)
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "group and others",
            (true, false) => "its group",
            _ => "every user",
        };
        return Err(format!(
            "{shown} is writable by {who} (mode {:o}): flows are code, and anyone who can change them decides what runs; run: sudo chmod go-w {shown}",
            mode & 0o7777
        ));
    }
    Ok(())
}

/// A flow file and its folder may hold code (see `check_code`).
pub(crate) fn check_flow_file(path: &Path, owners: Owners) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    check_code(dir, owners)?;
    check_code(path, owners)?;
    // A symlinked file: its real folder counts too.
    if let Some(real_dir) = std::fs::canonicalize(path).ok().as_deref().and_then(Path::parent) {
        check_code(real_dir, owners)?;
    }
    Ok(())
}

/// A password or key file: not readable by others.
pub(crate) fn check_secret(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(format!(
            "{} is readable by every user; run: chmod o-rwx {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("runnel-perms-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn group_or_world_writable_flows_are_refused_with_the_chmod() {
        let dir = temp("w");
        let flow = dir.join("f.py");
        std::fs::write(&flow, "x = 1\n").unwrap();
        std::fs::set_permissions(&flow, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(check_flow_file(&flow, Owners::Running), Ok(()));
        for (mode, who) in [(0o664, "its group"), (0o646, "every user"), (0o666, "group and others")] {
            std::fs::set_permissions(&flow, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = check_flow_file(&flow, Owners::Running).unwrap_err();
            assert!(
                e.contains(who) && e.contains(&format!("chmod go-w {}", flow.display())),
                "{e}"
            );
        }
        std::fs::set_permissions(&flow, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_flow_file(&flow, Owners::Running).unwrap_err();
        assert!(
            e.contains(&format!("chmod go-w {}", dir.display())),
            "the folder counts too: {e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_readable_by_others_are_refused() {
        let dir = temp("s");
        let pw = dir.join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(check_secret(&pw), Ok(()));
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_secret(&pw).unwrap_err().contains("chmod o-rwx"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
