//! What our custom candle ops read their arguments through.

use candle_core::{CpuStorage, Layout, Result, WithDType};

/// The values of a contiguous tensor in CPU storage; our ops make their arguments contiguous
/// before they call candle, so anything else is a bug in the caller.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::cpu_storage_as_slice(storage)?[start..end]),
        None => {
            candle_core::bail!("custom op: arguments must be contiguous, got strides {:?}", layout.stride())
        }
    }
}
