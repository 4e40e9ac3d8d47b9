//! A safe front for the `gemm` crate's matrix product, shared by the convolution kernels.

use candle_core::WithDType;

/// A read-only matrix view: pointer, shape and strides (in elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    ptr: *const T,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<T> Mat<T> {
    /// A row-major view of `data`; panics if the view would read past its end.
    pub fn new(data: &[T], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * row_stride + cols <= data.len(),
            "matrix view past its slice"
        );
        Self { ptr: data.as_ptr(), rows, cols, row_stride: row_stride as isize, col_stride: 1 }
    }

    /// The transposed view.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// Whether a product may use every core or must stay on the calling thread (when the caller
/// already runs products in parallel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    All,
    One,
}

/// `dst = a · b`, or `dst += a · b` when `accumulate`; `dst` is row-major with `dst_row_stride`.
pub(crate) fn matmul<T: WithDType>(
    dst: &mut [T],
    dst_row_stride: usize,
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    threads: Threads,
) {
    assert_eq!(a.cols, b.rows, "matmul inner dimensions");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(m == 0 || n == 0 || (m - 1) * dst_row_stride + n <= dst.len(), "matmul destination too small");
    let available = rayon::current_num_threads();
    let parallelism = match threads {
        Threads::All if available > 1 => gemm::Parallelism::Rayon(available),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: `Mat::new` checked each view against the slice it borrows, the destination was
    // checked above, and `dst` is borrowed mutably for the call, so nothing else touches it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}
