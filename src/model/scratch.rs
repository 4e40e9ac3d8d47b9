//! Work buffers that the training kernels reuse from call to call on one thread.
//!
//! A training step runs the convolution kernels hundreds of times, and each call needs a large
//! work area (an im2col tile, a block of Winograd-transformed tiles) that it fills completely
//! before reading it. Allocated afresh, every such area was zeroed by the allocator and then
//! overwritten: about a tenth of a step went to `memset` and page faults. A [`Scratch`] buffer
//! comes instead from a small per-thread pool and goes back to it when dropped.

use std::cell::RefCell;
use std::mem;
use std::ops::{Deref, DerefMut};
use std::thread::LocalKey;

/// Buffers a thread keeps per element type: enough for the areas one kernel holds at once.
/// What is kept is bounded by this and by the largest area a kernel asks for (tens of MiB).
const KEPT_PER_THREAD: usize = 4;

/// An element type with a per-thread pool of buffers.
pub trait Pooled: Copy + Default + 'static {
    fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>>;
}

macro_rules! pooled {
    ($($t:ty),*) => {$(
        impl Pooled for $t {
            fn pool() -> &'static LocalKey<RefCell<Vec<Vec<Self>>>> {
                thread_local! {
                    static POOL: RefCell<Vec<Vec<$t>>> = const { RefCell::new(Vec::new()) };
                }
                &POOL
            }
        }
    )*};
}

pooled!(f32, f64);

/// `len` elements of unspecified content (whatever an earlier user left), for a work area the
/// caller overwrites before it reads. Returns to its thread's pool when dropped.
pub struct Scratch<T: Pooled> {
    buffer: Vec<T>,
    len: usize,
}

impl<T: Pooled> Scratch<T> {
    pub fn new(len: usize) -> Self {
        let taken = T::pool()
            .try_with(|pool| {
                let mut pool = pool.borrow_mut();
                match pool.iter().position(|b| b.len() >= len) {
                    Some(i) => Some(pool.swap_remove(i)),
                    None => pool.pop(),
                }
            })
            .ok()
            .flatten();
        let mut buffer = taken.unwrap_or_default();
        if buffer.len() < len {
            buffer.resize(len, T::default());
        }
        Self { buffer, len }
    }
}

impl<T: Pooled> Deref for Scratch<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.buffer[..self.len]
    }
}

impl<T: Pooled> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buffer[..self.len]
    }
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buffer = mem::take(&mut self.buffer);
        // During thread teardown the pool may be gone; the buffer is then simply freed.
        let _ = T::pool().try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < KEPT_PER_THREAD {
                pool.push(buffer);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_reused_and_the_pool_stays_bounded() {
        let first = Scratch::<f32>::new(1000);
        let address = first.as_ptr();
        drop(first);
        let again = Scratch::<f32>::new(600);
        assert_eq!(again.as_ptr(), address, "a large enough kept buffer is handed out again");
        assert_eq!(again.len(), 600);
        drop(again);

        let many: Vec<_> = (0..KEPT_PER_THREAD + 3).map(|_| Scratch::<f64>::new(10)).collect();
        drop(many);
        assert_eq!(f64::pool().with(|p| p.borrow().len()), KEPT_PER_THREAD);
    }

    #[test]
    fn a_kept_buffer_too_small_is_grown() {
        drop(Scratch::<f32>::new(4));
        let mut grown = Scratch::<f32>::new(64);
        assert_eq!(grown.len(), 64);
        grown.fill(1.);
        assert!(grown.iter().all(|&v| v == 1.));
    }
}
