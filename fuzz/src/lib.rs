//! Shared pieces of the fuzz targets: an allocation cap, so that a parser that asks for a huge
//! buffer because of a few input bytes is reported as a crash (with `--sanitizer none`
//! libFuzzer's `-malloc_limit_mb` has no hook, and untouched pages never show in the RSS), and the
//! decoding of a text input into a property list.

use std::alloc::{GlobalAlloc, Layout, System};

/// The most one allocation may ask for. Fuzz inputs are a few KiB: nothing in a parser should
/// need more than this for them, and a real file's sizes are bounded by the file.
pub const MAX_ALLOCATION: usize = 256 << 20;

/// The system allocator, aborting (a crash libFuzzer records, with the input) on any single
/// allocation over [`MAX_ALLOCATION`].
pub struct CappedAlloc;

fn check(size: usize) {
    if size > MAX_ALLOCATION {
        // eprintln! takes the unbuffered stderr lock and does not allocate.
        eprintln!("fuzz: one allocation of {size} bytes, over the cap of {MAX_ALLOCATION}");
        std::process::abort();
    }
}

unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// A property list in text: one `key=value` per line (split at the first `=`); a line without
/// `=` continues the previous value after a newline, so multi-line values (an OME-XML or Aperio
/// ImageDescription) fit. Later keys replace earlier ones, as in a map.
pub fn properties(text: &str) -> std::collections::HashMap<String, String> {
    let mut map = std::collections::HashMap::new();
    let mut last: Option<String> = None;
    for line in text.split('\n') {
        match line.split_once('=') {
            Some((k, v)) => {
                map.insert(k.to_string(), v.to_string());
                last = Some(k.to_string());
            }
            None => {
                if let Some(v) = last.as_ref().and_then(|k| map.get_mut(k)) {
                    v.push('\n');
                    v.push_str(line);
                }
            }
        }
    }
    map
}
