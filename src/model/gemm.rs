//! A safe front for the `gemm` crate's matrix product, shared by the convolution kernels.
//!
//! The views borrow the slices they read ([`Mat`]) or write ([`MatMut`]), so the borrow checker
//! rules out the two ways a raw pointer product goes wrong: a view outliving its data, and a
//! destination that aliases a source.
//!
//! ```
//! use cycleserve::model::gemm::{matmul, Mat, MatMut, Threads};
//!
//! let a = vec![1f32, 2., 3., 4.]; // [[1, 2], [3, 4]]
//! let b = vec![5f32, 6., 7., 8.]; // [[5, 6], [7, 8]]
//! let mut c = vec![0f32; 4];
//! matmul(MatMut::new(&mut c, 2, 2, 2), false, Mat::new(&a, 2, 2, 2), Mat::new(&b, 2, 2, 2), Threads::One);
//! assert_eq!(c, [19., 22., 43., 50.]);
//! ```
//!
//! A view cannot outlive the vector it reads:
//!
//! ```compile_fail
//! use cycleserve::model::gemm::{matmul, Mat, MatMut, Threads};
//!
//! let b = vec![5f32, 6., 7., 8.];
//! let mut c = vec![0f32; 4];
//! let a = {
//!     let dropped = vec![1f32, 2., 3., 4.];
//!     Mat::new(&dropped, 2, 2, 2)
//! };
//! matmul(MatMut::new(&mut c, 2, 2, 2), false, a, Mat::new(&b, 2, 2, 2), Threads::One);
//! ```
//!
//! and the destination cannot be a vector a source reads:
//!
//! ```compile_fail
//! use cycleserve::model::gemm::{matmul, Mat, MatMut, Threads};
//!
//! let b = vec![5f32, 6., 7., 8.];
//! let mut c = vec![1f32, 2., 3., 4.];
//! let a = Mat::new(&c, 2, 2, 2);
//! matmul(MatMut::new(&mut c, 2, 2, 2), false, a, Mat::new(&b, 2, 2, 2), Threads::One);
//! ```

use candle_core::WithDType;

use super::scratch::Pooled;

/// The element types the `gemm` crate multiplies natively (it panics on others). Sealed: the
/// products here are only ever instantiated for these. The kernels built on them also take
/// their work areas from [`Pooled`] buffers.
pub trait Scalar: WithDType + Pooled + sealed::Sealed {}

impl Scalar for f32 {}
impl Scalar for f64 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A read-only matrix view of a slice: shape and strides (in elements).
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major view of `data`; panics if the view would read past its end.
    pub fn new(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(fits(data.len(), rows, cols, row_stride), "matrix view past its slice");
        Self { data, rows, cols, row_stride, col_stride: 1 }
    }

    /// The transposed view of the same elements.
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

/// A row-major matrix view that a product writes into.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A row-major view of `data`; panics if the view would write past its end, or if its rows
    /// would overlap (a parallel product would then write one element from two threads).
    pub fn new(data: &'a mut [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(fits(data.len(), rows, cols, row_stride), "matrix view past its slice");
        assert!(rows <= 1 || row_stride >= cols, "destination rows overlap");
        Self { data, rows, cols, row_stride }
    }
}

/// Whether a `rows`×`cols` row-major view with `row_stride` stays inside `len` elements (and
/// its stride fits the signed offsets `gemm` takes).
fn fits(len: usize, rows: usize, cols: usize, row_stride: usize) -> bool {
    let last_row_end =
        (rows.saturating_sub(1)).checked_mul(row_stride).and_then(|start| start.checked_add(cols));
    isize::try_from(row_stride).is_ok()
        && (rows == 0 || cols == 0 || last_row_end.is_some_and(|end| end <= len))
}

/// Whether a product may use every core or must stay on the calling thread (when the caller
/// already runs products in parallel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    All,
    One,
}

/// `dst = a · b`, or `dst += a · b` when `accumulate`; panics if the shapes disagree.
pub fn matmul<T: Scalar>(
    dst: MatMut<'_, T>,
    accumulate: bool,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    threads: Threads,
) {
    assert_eq!(a.cols, b.rows, "matmul inner dimensions");
    assert_eq!((dst.rows, dst.cols), (a.rows, b.cols), "matmul destination shape");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let available = rayon::current_num_threads();
    let parallelism = match threads {
        Threads::All if available > 1 => gemm::Parallelism::Rayon(available),
        _ => gemm::Parallelism::None,
    };
    // `fits` checked every stride against isize::MAX (a unit column stride trivially fits).
    let stride = |s: usize| s as isize;
    // SAFETY: each view was checked against the slice it borrows when it was built (`fits`), so
    // every element the strides reach lies inside that slice; those borrows last through the
    // call, so no slice is freed meanwhile; `dst` is a unique borrow, so no source aliases it,
    // and its rows do not overlap, so no two threads write one element. `T` is f32 or f64,
    // which `gemm` supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            stride(dst.row_stride),
            accumulate,
            a.data.as_ptr(),
            stride(a.col_stride),
            stride(a.row_stride),
            b.data.as_ptr(),
            stride(b.col_stride),
            stride(b.row_stride),
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2×3 block of a wider row-major buffer, times the transpose of a 2×3 matrix.
    #[test]
    fn strided_and_transposed_views_multiply_as_matrices() {
        let a = [1., 2., 3., -1., 4., 5., 6., -1.]; // rows of 4, the last column padding
        let b = [1., 0., 1., 0., 1., 1.];
        let mut c = [7.; 4];
        let (a, b) = (Mat::new(&a, 2, 3, 4), Mat::new(&b, 2, 3, 3).t());
        matmul(MatMut::new(&mut c, 2, 2, 2), false, a, b, Threads::All);
        assert_eq!(c, [4., 5., 10., 11.]);
        matmul(MatMut::new(&mut c, 2, 2, 2), true, a, b, Threads::One);
        assert_eq!(c, [8., 10., 20., 22.]);
    }

    #[test]
    #[should_panic(expected = "matrix view past its slice")]
    fn a_view_past_its_slice_is_refused() {
        Mat::new(&[0f32; 5], 2, 3, 3);
    }

    #[test]
    #[should_panic(expected = "destination rows overlap")]
    fn overlapping_destination_rows_are_refused() {
        MatMut::new(&mut [0f32; 8], 2, 4, 2);
    }
}
