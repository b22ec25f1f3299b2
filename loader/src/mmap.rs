//! The one place that maps files into memory.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use memmap2::{Mmap, UncheckedAdvice};
use std::path::Path;

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    map: Option<Mmap>,
    /// Its slot in the table [`report_sigbus_as_error`] looks faults up in.
    #[cfg(unix)]
    slot: Option<usize>,
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(slot) = self.slot {
            sigbus::unregister(slot);
        }
    }
}

impl MappedFile {
    /// Maps `path` read-only.
    ///
    /// # Safety
    /// The caller must ensure the file is not truncated or modified while the map is
    /// alive: a truncated file makes reads through the map raise SIGBUS, and a modified
    /// file changes bytes that were already validated. CERSA outputs are written once and
    /// never modified in place; converters compare size and mtime of sources before and
    /// after use.
    pub unsafe fn open(path: &Path) -> Result<Self> {
        let file = crate::regular::open_regular(path).map_err(|e| Error::io(path, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        if len == 0 {
            // mmap of an empty file fails on Linux; an empty slice says the same.
            return Ok(MappedFile {
                map: None,
                #[cfg(unix)]
                slot: None,
            });
        }
        // SAFETY: read-only map; the caller upholds that the file is not changed while
        // mapped (see the `# Safety` section above).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap", e))?;
        Ok(MappedFile {
            #[cfg(unix)]
            slot: sigbus::register(map.as_ptr() as usize, map.len(), path),
            map: Some(map),
        })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drops the pages of `range` from this process's resident set (they stay in the page
    /// cache and are faulted back in on the next access). Used to keep RSS bounded while
    /// streaming through files larger than memory. Best effort: errors are ignored.
    pub fn release(&self, range: std::ops::Range<usize>) {
        let Some(map) = &self.map else { return };
        let page = 4096usize;
        // Only whole pages inside the range, so neighbours being read are not affected.
        let start = range.start.div_ceil(page) * page;
        let end = (range.end.min(map.len()) / page) * page;
        if end > start {
            // SAFETY: the map is read-only and shared, so MADV_DONTNEED only discards
            // page-table entries; later reads refault the same file contents. No
            // reference into these pages is used to observe a change.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// Makes a SIGBUS from reading a mapped file that was truncated under the map (the one
/// fault [`MappedFile::open`]'s safety contract cannot rule out: another process shrinking
/// the file) print `error: PATH: …{advice}` to stderr and exit with status 2, instead of
/// the shell's bare "Bus error". A fault outside every map gets the default action.
/// Process-wide; meant for binaries (the `cersa` CLI calls it first thing), not libraries.
/// Installed once; later calls do nothing.
#[cfg(unix)]
pub fn report_sigbus_as_error(advice: &'static str) {
    sigbus::install(advice);
}

/// A no-op where there is no SIGBUS.
#[cfg(not(unix))]
pub fn report_sigbus_as_error(_advice: &'static str) {}

/// The table of live maps and the handler that reads it. Everything the handler touches
/// is an atomic or memory owned by a live slot, and it calls only async-signal-safe
/// functions (`write`, `_exit`, `sigaction`).
#[cfg(unix)]
mod sigbus {
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    /// Maps open at once beyond this are not looked up (their faults stay plain SIGBUS).
    const SLOTS: usize = 256;
    /// `len` of a slot being filled or emptied: the handler skips it.
    const BUSY: usize = usize::MAX;

    struct Slot {
        start: AtomicUsize,
        /// 0: free.
        len: AtomicUsize,
        path: AtomicPtr<u8>,
        path_len: AtomicUsize,
    }

    #[allow(clippy::declare_interior_mutable_const)]
    const FREE: Slot = Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        path: AtomicPtr::new(std::ptr::null_mut()),
        path_len: AtomicUsize::new(0),
    };
    static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
    static ADVICE: OnceLock<&'static str> = OnceLock::new();

    pub(super) fn register(start: usize, len: usize, path: &Path) -> Option<usize> {
        let (i, slot) = TABLE.iter().enumerate().find(|(_, s)| {
            s.len
                .compare_exchange(0, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        let name: Box<[u8]> = path.as_os_str().as_bytes().into();
        let n = name.len();
        slot.path
            .store(Box::into_raw(name).cast::<u8>(), Ordering::Relaxed);
        slot.path_len.store(n, Ordering::Relaxed);
        slot.start.store(start, Ordering::Relaxed);
        slot.len.store(len, Ordering::Release);
        Some(i)
    }

    pub(super) fn unregister(i: usize) {
        let slot = &TABLE[i];
        slot.len.store(BUSY, Ordering::Release);
        let p = slot.path.swap(std::ptr::null_mut(), Ordering::AcqRel);
        let n = slot.path_len.load(Ordering::Relaxed);
        if !p.is_null() {
            // SAFETY: `p` and `n` are the pointer and length of the boxed slice `register`
            // leaked into this slot, taken out exactly once (swapped to null above). A
            // handler only reads a slot whose map is live, and this runs in the map's drop.
            #[allow(unsafe_code)]
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) });
        }
        slot.len.store(0, Ordering::Release);
    }

    pub(super) fn install(advice: &'static str) {
        if ADVICE.set(advice).is_err() {
            return;
        }
        #[allow(unsafe_code)]
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler has the
        // SA_SIGINFO signature and is async-signal-safe (see the module comment).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    }

    /// Decimal digits of `v` into `buf`, returning the used tail.
    fn decimal(mut v: usize, buf: &mut [u8; 20]) -> &[u8] {
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                return &buf[i..];
            }
        }
    }

    #[allow(unsafe_code)]
    extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as usize;
        for slot in &TABLE {
            let len = slot.len.load(Ordering::Acquire);
            let start = slot.start.load(Ordering::Relaxed);
            if len == 0 || len == BUSY || addr < start || addr - start >= len {
                continue;
            }
            let p = slot.path.load(Ordering::Acquire);
            let n = slot.path_len.load(Ordering::Relaxed);
            if p.is_null() {
                continue;
            }
            let mut digits = [0u8; 20];
            let offset = decimal(addr - start, &mut digits);
            // SAFETY: `p`..`p + n` is the live slot's path (see `unregister`).
            let path = unsafe { std::slice::from_raw_parts(p, n) };
            let advice = ADVICE.get().copied().unwrap_or("");
            let parts: [&[u8]; 7] = [
                b"error: ",
                path,
                b": the file shrank while it was being read through a memory map (SIGBUS at byte ",
                offset,
                b"): it was truncated or rewritten by another process",
                advice.as_bytes(),
                b"\n",
            ];
            for part in parts {
                // SAFETY: write(2) of a valid buffer; short writes only shorten the message.
                unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
            }
            // SAFETY: _exit is async-signal-safe and never returns.
            unsafe { libc::_exit(2) };
        }
        // Not a mapped file of ours: the default action (re-raised when the faulting
        // instruction runs again).
        // SAFETY: resetting a disposition with a zeroed action is valid.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn decimal_digits() {
            let mut b = [0u8; 20];
            assert_eq!(super::decimal(0, &mut b), b"0");
            assert_eq!(super::decimal(4096, &mut b), b"4096");
            assert_eq!(
                super::decimal(usize::MAX, &mut b),
                usize::MAX.to_string().as_bytes()
            );
        }

        #[test]
        fn a_slot_is_freed_on_unregister() {
            use std::sync::atomic::Ordering;
            let a = super::register(100, 10, std::path::Path::new("/x")).unwrap();
            assert_eq!(super::TABLE[a].len.load(Ordering::Acquire), 10);
            assert_eq!(super::TABLE[a].path_len.load(Ordering::Acquire), 2);
            super::unregister(a);
            assert_eq!(super::TABLE[a].len.load(Ordering::Acquire), 0);
            assert!(super::TABLE[a].path.load(Ordering::Acquire).is_null());
        }
    }
}
