//! The global allocator of wanserve's plugins.
//!
//! Every plugin call runs in a fresh instance, so every call starts with an empty heap. Rust's
//! default wasm allocator (dlmalloc) takes its first memory with `memory.grow`, and in the
//! host's pooling allocator a grown memory costs two `mprotect`s and a TLB shootdown per call
//! (grow, then shrink back at reset): more than the rest of an auth call. This allocator
//! ([talc](https://docs.rs/talc)) starts on a heap that is part of the initial linear memory
//! (zeroed `.bss`, free until touched) and grows memory only when a call needs more than that.
//!
//! Use: add the dependency and `use guest_alloc as _;` in the plugin's `lib.rs`.

#![no_std]

#[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
mod wasm {
    use core::alloc::Layout;
    use core::ptr::NonNull;
    use talc::base::Talc;
    use talc::base::binning::Binning;
    use talc::cell::TalcSyncCell;
    use talc::source::Source;
    use talc::wasm::WasmBinning;

    const WASM_PAGE: usize = 64 * 1024;
    /// The heap inside the initial memory: what the default plugins use in a call with the
    /// largest inputs the server accepts, with room to spare.
    const INITIAL_HEAP: usize = 256 * 1024;

    #[repr(C, align(16))]
    struct Heap([u8; INITIAL_HEAP]);
    static mut HEAP: Heap = Heap([0; INITIAL_HEAP]);

    /// Claims [`HEAP`] on the first allocation, then grows linear memory as needed.
    #[derive(Debug)]
    pub struct InitialHeapThenGrow {
        heap_claimed: bool,
        /// End of the heap made of grown memory, to extend it while growths stay contiguous.
        grown_end: Option<NonNull<u8>>,
    }

    // SAFETY: `acquire` hands talc only memory nothing else uses (the private `HEAP`, and pages
    // fresh from `memory.grow`), and never allocates.
    unsafe impl Source for InitialHeapThenGrow {
        fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
            if !talc.source.heap_claimed {
                talc.source.heap_claimed = true;
                let base = (&raw mut HEAP).cast::<u8>();
                // SAFETY: HEAP is private to this module and handed over once.
                if unsafe { talc.claim(base, INITIAL_HEAP) }.is_some() {
                    return Ok(());
                }
            }
            // Room for the chunk, its alignment and talc's per-heap bookkeeping; talc asks again
            // if it was not enough, and contiguous growths extend one heap.
            let bytes = layout.size() + layout.align() + 4 * talc::base::CHUNK_UNIT + 1024;
            let pages = bytes.div_ceil(WASM_PAGE);
            let previous_pages = core::arch::wasm32::memory_grow(0, pages);
            if previous_pages == usize::MAX {
                return Err(());
            }
            let base = (previous_pages * WASM_PAGE) as *mut u8;
            let end = base.wrapping_add(pages * WASM_PAGE);
            talc.source.grown_end = match talc.source.grown_end.take() {
                // SAFETY: the grown pages directly follow the heap that ends at `old_end`.
                Some(old_end) if old_end.as_ptr() == base => {
                    Some(unsafe { talc.extend(old_end, end) })
                }
                // SAFETY: fresh pages from memory.grow, used by nothing else.
                _ => unsafe { talc.claim(base, pages * WASM_PAGE) },
            };
            Ok(())
        }
    }

    #[global_allocator]
    static ALLOCATOR: TalcSyncCell<InitialHeapThenGrow, WasmBinning> =
        TalcSyncCell::new_wasm(InitialHeapThenGrow {
            heap_claimed: false,
            grown_end: None,
        });
}
