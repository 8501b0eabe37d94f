//! Counts the heap allocations of a benchmark process, for the allocations-per-event figures.
//! A bench binary installs it with
//! `#[global_allocator] static ALLOC: outbox_tests::alloc_count::Counting = outbox_tests::alloc_count::Counting;`;
//! threads that stand in for the bus call `exclude_this_thread`, so what is counted is the
//! dispatcher's own (its code, the SDK, the PostgreSQL client, the runtime).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static ENABLED: AtomicBool = AtomicBool::new(true);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(true) };
}

/// The system allocator, counting allocations (and reallocations) and the bytes they ask for.
pub struct Counting;

fn count(bytes: usize) {
    // `try_with`: a thread being torn down has no thread-locals left; count it.
    if ENABLED.load(Ordering::Relaxed) && COUNTED.try_with(Cell::get).unwrap_or(true) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to `System` unchanged; counting touches only atomics and a
// const-initialised thread-local without a destructor, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations made on this thread from now on are not counted.
pub fn exclude_this_thread() {
    COUNTED.with(|c| c.set(false));
}

/// Nothing is counted from now on (under a profiler, whose figures counting would skew).
pub fn disable() {
    ENABLED.store(false, Ordering::Relaxed);
}

/// (allocations, bytes) counted so far; zero unless a binary installed `Counting`.
pub fn counted() -> (u64, u64) {
    (
        ALLOCATIONS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}
