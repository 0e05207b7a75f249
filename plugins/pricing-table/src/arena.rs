//! A per-call arena in front of a general allocator. A pricing call allocates only what the host
//! hands it (each string and list is one allocation) and frees all of it before returning, so
//! once the plugin is configured, every allocation that fits is bumped from a fixed buffer, and
//! the buffer starts over whenever the last of them is freed. Larger allocations, and everything
//! made while configuring (the price table, which lives on), go to the general allocator.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

/// Bumps allocations from `N` bytes once [`CallArena::start`] was called; `A` serves the rest.
pub struct CallArena<A, const N: usize> {
    general: A,
    state: UnsafeCell<State<N>>,
}

#[repr(C, align(16))]
struct Buffer<const N: usize>([u8; N]);

struct State<const N: usize> {
    on: bool,
    /// The first free byte of `buf`.
    top: usize,
    /// Allocations in `buf` not yet freed.
    live: usize,
    buf: Buffer<N>,
}

// SAFETY: used only as the allocator of a single-threaded WebAssembly instance (no `atomics`
// target feature), or owned by one test thread.
unsafe impl<A, const N: usize> Sync for CallArena<A, N> {}

impl<A, const N: usize> CallArena<A, N> {
    pub const fn new(general: A) -> Self {
        CallArena {
            general,
            state: UnsafeCell::new(State {
                on: false,
                top: 0,
                live: 0,
                buf: Buffer([0; N]),
            }),
        }
    }

    /// From now on, allocations that fit come from the arena (call once configured).
    pub fn start(&self) {
        // SAFETY: single-threaded (see `Sync`), and no reference into the state outlives a call.
        unsafe { (*self.state.get()).on = true }
    }

    /// Where `ptr` is in the arena's buffer, if it is in it.
    fn offset(&self, ptr: *mut u8) -> Option<usize> {
        // SAFETY: only the buffer's address is taken.
        let base = unsafe { (&raw mut (*self.state.get()).buf) as usize };
        let p = ptr as usize;
        (p >= base && p < base + N).then(|| p - base)
    }
}

unsafe impl<A: GlobalAlloc, const N: usize> GlobalAlloc for CallArena<A, N> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded (see `Sync`); the reference ends before this returns.
        let s = unsafe { &mut *self.state.get() };
        if s.on && layout.align() <= 16 {
            let start = s.top.next_multiple_of(layout.align());
            if let Some(end) = start.checked_add(layout.size())
                && end <= N
            {
                s.top = end;
                s.live += 1;
                return s.buf.0.as_mut_ptr().wrapping_add(start);
            }
        }
        unsafe { self.general.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.offset(ptr).is_none() {
            return unsafe { self.general.dealloc(ptr, layout) };
        }
        // SAFETY: as in `alloc`.
        let s = unsafe { &mut *self.state.get() };
        s.live -= 1;
        if s.live == 0 {
            s.top = 0;
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(at) = self.offset(ptr) else {
            return unsafe { self.general.realloc(ptr, layout, new_size) };
        };
        {
            // SAFETY: as in `alloc`.
            let s = unsafe { &mut *self.state.get() };
            // The newest allocation grows or shrinks where it is.
            if at + layout.size() == s.top && at + new_size <= N {
                s.top = at + new_size;
                return ptr;
            }
        }
        // SAFETY: `new_size` with `layout`'s alignment is a valid layout (GlobalAlloc's contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;

    fn arena() -> Box<CallArena<System, 256>> {
        let a = Box::new(CallArena::new(System));
        a.start();
        a
    }

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 1).unwrap()
    }

    #[test]
    fn before_it_starts_everything_goes_to_the_general_allocator() {
        let a = Box::new(CallArena::<System, 256>::new(System));
        let p = unsafe { a.alloc(layout(8)) };
        assert!(a.offset(p).is_none());
        unsafe { a.dealloc(p, layout(8)) };
    }

    #[test]
    fn a_calls_allocations_are_bumped_and_the_buffer_starts_over_when_all_are_freed() {
        let a = arena();
        let p = unsafe { a.alloc(layout(10)) };
        let q = unsafe { a.alloc(Layout::from_size_align(8, 8).unwrap()) };
        assert_eq!(a.offset(p), Some(0));
        assert_eq!(a.offset(q), Some(16), "aligned past the first");
        unsafe { a.dealloc(p, layout(10)) };
        let r = unsafe { a.alloc(layout(4)) };
        assert_eq!(a.offset(r), Some(24), "one still live: no reuse yet");
        unsafe {
            a.dealloc(q, Layout::from_size_align(8, 8).unwrap());
            a.dealloc(r, layout(4));
        }
        let s = unsafe { a.alloc(layout(4)) };
        assert_eq!(a.offset(s), Some(0), "all freed: from the start again");
        unsafe { a.dealloc(s, layout(4)) };
    }

    #[test]
    fn what_does_not_fit_goes_to_the_general_allocator() {
        let a = arena();
        let p = unsafe { a.alloc(layout(200)) };
        let q = unsafe { a.alloc(layout(100)) };
        assert_eq!(a.offset(p), Some(0));
        assert!(a.offset(q).is_none());
        unsafe {
            a.dealloc(q, layout(100));
            a.dealloc(p, layout(200));
        }
    }

    #[test]
    fn the_newest_allocation_grows_in_place_and_others_move_with_their_bytes() {
        let a = arena();
        let p = unsafe { a.alloc(layout(4)) };
        unsafe { p.copy_from(b"abcd".as_ptr(), 4) };
        let p2 = unsafe { a.realloc(p, layout(4), 12) };
        assert_eq!(p2, p, "the newest grows where it is");
        let q = unsafe { a.alloc(layout(4)) };
        let p3 = unsafe { a.realloc(p2, layout(12), 100) };
        assert_ne!(p3, p2, "an older one moves");
        assert_eq!(unsafe { std::slice::from_raw_parts(p3, 4) }, b"abcd");
        let p4 = unsafe { a.realloc(p3, layout(100), 300) };
        assert!(a.offset(p4).is_none(), "too big for the arena");
        assert_eq!(unsafe { std::slice::from_raw_parts(p4, 4) }, b"abcd");
        unsafe {
            a.dealloc(q, layout(4));
            a.dealloc(p4, layout(300));
        }
        let r = unsafe { a.alloc(layout(4)) };
        assert_eq!(a.offset(r), Some(0), "every arena block was freed, moves included");
        unsafe { a.dealloc(r, layout(4)) };
    }
}
