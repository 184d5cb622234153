//! Giving start-up memory back on a small device.
//!
//! Starting the agent runs a lot of code once (configuration, the state
//! file, the interpreter, loading flows), and the kernel maps the pages of
//! the binary and of libpython in 64 KiB runs around each page touched: at
//! idle, most of both stays resident (on x86, 5.5 of the binary's 6.9 MB).
//! Once the agent has settled, `page_out_code` asks the kernel to reclaim
//! those code pages (`MADV_PAGEOUT`, Linux 5.4): clean file pages that only
//! runnel maps leave memory, and the few the agent goes on using come back
//! at their first touch (read again from the binary's file). Shared
//! libraries mapped by other processes too (libc) are left alone by the
//! kernel.

/// What was given back, for the log line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PagedOut {
    pub mappings: usize,
    pub bytes: u64,
}

/// Ask the kernel to reclaim the code pages of the runnel binary and of
/// libpython. Errors (an older kernel, no /proc) only mean nothing is done.
#[cfg(target_os = "linux")]
pub(crate) fn page_out_code() -> std::io::Result<PagedOut> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut done = PagedOut::default();
    let mut failed = None;
    for line in maps.lines() {
        // "start-end perms offset dev inode path"
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let path = parts.nth(3).unwrap_or("");
        let ours = std::path::Path::new(path) == exe || path.contains("/libpython");
        // Code and read-only data; never writable mappings (their pages
        // may be private copies that would have to be swapped).
        if !ours || perms.as_bytes().get(1) != Some(&b'-') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
            continue;
        };
        // SAFETY: a range of this process's own read-only file mappings;
        // MADV_PAGEOUT only drops clean pages, which fault back on access.
        let r = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        if r == 0 {
            done.mappings += 1;
            done.bytes += (end - start) as u64;
        } else {
            failed = Some(std::io::Error::last_os_error());
        }
    }
    match (done.mappings, failed) {
        (0, Some(e)) => Err(e),
        _ => Ok(done),
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn page_out_code() -> std::io::Result<PagedOut> {
    Ok(PagedOut::default())
}
