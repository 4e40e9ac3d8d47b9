//! Intel AMX bf16 tiles: whether this process may use them, and the one micro-kernel that every
//! bf16 convolution and product here runs on.
//!
//! An AMX core multiplies a 16×32 bf16 tile by a 32×16 one into a 16×16 f32 accumulator in a
//! single instruction (`tdpbf16ps`); on these CPUs that is about nine times the multiply-adds per
//! second of AVX-512 f32 FMAs. Inputs are rounded to bf16 (8 significant bits) and the sums are
//! kept in f32, as PyTorch's bf16 autocast does on the same hardware.
//!
//! The safe surface is small on purpose:
//! - [`Amx`] is a proof that the CPU has AMX-BF16 and that the kernel gave this process its tile
//!   state; only [`Amx::detect`] makes one, and every kernel entry takes it, so AMX code cannot be
//!   reached on a machine without it;
//! - [`PackedB`] owns right-hand operands in the tile layout `tdpbf16ps` reads (pairs of rows
//!   interleaved), padded with zeros to whole tiles;
//! - [`ATiles`] describes where left-hand rows live in a borrowed bf16 slice; [`multiply`]
//!   checks every row it will load against that slice before it loads any.

use std::cell::Cell;
use std::sync::OnceLock;

/// Rows of every tile, and the f32 columns of an accumulator.
pub const TILE_ROWS: usize = 16;
/// bf16 values in one row of a left-hand tile: the depth one instruction consumes.
pub const TILE_DEPTH: usize = 32;
/// bf16 values in one packed tile (1 KiB).
const TILE_VALUES: usize = TILE_ROWS * TILE_DEPTH;
/// f32 values of one 16×16 accumulator.
pub const ACC_VALUES: usize = TILE_ROWS * TILE_ROWS;

/// Proof that this process may execute AMX-BF16 instructions. Zero-sized and `Copy`; made only
/// by [`Amx::detect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amx {
    _proof: (),
}

impl Amx {
    /// `Some` when the CPU reports AMX-TILE and AMX-BF16 and Linux grants the process the tile
    /// data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); asked once per process.
    pub fn detect() -> Option<Self> {
        static GRANTED: OnceLock<bool> = OnceLock::new();
        GRANTED.get_or_init(request_tile_state).then_some(Self { _proof: () })
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    // CPUID leaf 7, sub-leaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
    // SAFETY: every x86_64 CPU has CPUID. The intrinsic is safe in current Rust and an `unsafe
    // fn` in the toolchains our `rust-version` still admits, hence the block and the allow.
    #[allow(unused_unsafe)]
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this arch_prctl request only asks the kernel to enlarge the process's saved
    // register state; it takes two integers and touches none of our memory.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

/// f32 to bf16, rounding to nearest even (NaN stays NaN).
#[inline]
pub fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// bf16 back to f32 (exact).
#[inline]
pub fn f32_of(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// A zeroed bf16 buffer whose first value sits on a 64-byte boundary: tile rows are 64 bytes, so
/// rows at strides that are multiples of 64 bytes each fill exactly one cache line.
pub struct Bf16Buffer {
    raw: Vec<u16>,
    start: usize,
    len: usize,
}

impl Bf16Buffer {
    /// Values allocated beyond `len` to find the boundary.
    pub const ALIGNMENT_SLACK: usize = 32;

    pub fn zeros(len: usize) -> Self {
        let raw = vec![0u16; len + Self::ALIGNMENT_SLACK];
        let misalignment = raw.as_ptr() as usize % 64;
        let start = ((64 - misalignment) % 64) / 2;
        Self { raw, start, len }
    }
}

impl std::ops::Deref for Bf16Buffer {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for Bf16Buffer {
    fn deref_mut(&mut self) -> &mut [u16] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl Clone for Bf16Buffer {
    fn clone(&self) -> Self {
        let mut copy = Self::zeros(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl std::fmt::Debug for Bf16Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Buffer({} values)", self.len)
    }
}

/// A right-hand operand, K×N, packed once into `tdpbf16ps`'s layout: 16-column by 32-row
/// tiles, each row holding 16 pairs (k, k+1) of one column pair-interleaved; tiles ordered by
/// column tile, then depth. K and N are padded with zeros to whole tiles. Optionally a bias per
/// column, which products start from instead of zero.
#[derive(Clone, Debug)]
pub struct PackedB {
    tiles: Bf16Buffer,
    /// N padded to whole tiles, when there is a bias.
    bias: Option<Vec<f32>>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// From a K×N matrix given by an element function (row k, column n).
    pub fn new(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let (k_tiles, n_tiles) = (k.div_ceil(TILE_DEPTH), n.div_ceil(TILE_ROWS));
        let mut tiles = Bf16Buffer::zeros(k_tiles * n_tiles * TILE_VALUES);
        for (t, tile) in tiles.chunks_mut(TILE_VALUES).enumerate() {
            let (nt, kt) = (t / k_tiles, t % k_tiles);
            for (i, v) in tile.iter_mut().enumerate() {
                let (pair_row, col, half) = (i / 32, (i % 32) / 2, i % 2);
                let (kk, nn) = (kt * TILE_DEPTH + 2 * pair_row + half, nt * TILE_ROWS + col);
                if kk < k && nn < n {
                    *v = bf16(at(kk, nn));
                }
            }
        }
        Self { tiles, bias: None, k, n }
    }

    /// From a row-major K×N f32 matrix.
    pub fn from_rows(b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "packed operand: {k}×{n} from {} values", b.len());
        Self::new(k, n, |kk, nn| b[kk * n + nn])
    }

    /// Products start from `bias` (one value per column, kept in f32).
    pub fn with_bias(mut self, bias: &[f32]) -> Self {
        assert_eq!(bias.len(), self.n, "one bias per column");
        let mut padded = bias.to_vec();
        padded.resize(self.n_tiles() * TILE_ROWS, 0.0);
        self.bias = Some(padded);
        self
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Depth steps of 32.
    pub fn k_tiles(&self) -> usize {
        self.k.div_ceil(TILE_DEPTH)
    }

    /// Column tiles of 16.
    pub fn n_tiles(&self) -> usize {
        self.n.div_ceil(TILE_ROWS)
    }

    fn tile(&self, n_tile: usize, k_step: usize) -> *const u16 {
        self.tiles[(n_tile * self.k_tiles() + k_step) * TILE_VALUES..].as_ptr()
    }
}

/// Where the left-hand rows of a product live in a bf16 slice: a tile's row `r` at depth step
/// `j` starts at `start + steps[j] + r·row_stride` for a start given to [`multiply`], and holds
/// the 32 values from there.
#[derive(Clone, Copy, Debug)]
pub struct ATiles<'a> {
    data: &'a [u16],
    row_stride: usize,
    steps: &'a [usize],
    /// Values a tile reads past its start: the farthest step plus 16 rows.
    reach: usize,
}

impl<'a> ATiles<'a> {
    pub fn new(data: &'a [u16], row_stride: usize, steps: &'a [usize]) -> Self {
        let farthest = steps.iter().copied().max().unwrap_or(0);
        let reach = farthest + (TILE_ROWS - 1) * row_stride + TILE_DEPTH;
        assert!(isize::try_from(row_stride * 2).is_ok(), "tile row stride out of range");
        Self { data, row_stride, steps, reach }
    }

    /// Whether a tile starting at `start` stays inside the slice at every step.
    pub fn fits(&self, start: usize) -> bool {
        start.checked_add(self.reach).is_some_and(|end| end <= self.data.len())
    }
}

/// A scratch block of accumulators: up to 2×2 tiles of 16×16 f32, tile (i, j) (A rows tile i,
/// B columns tile j) at `[(2i + j)·256..]`, rows of 16.
pub type Block = [f32; 4 * ACC_VALUES];

/// Where a product's sums go.
#[derive(Debug)]
pub enum Sums<'a> {
    /// Into a scratch [`Block`], for blocks that only partly lie inside their destination.
    Block(&'a mut Block),
    /// Straight into a row-major f32 matrix: tile (i, j) covers rows `16i..16i + 16` and
    /// columns `16j..16j + 16` counted from element `offset`, rows `row_stride` apart.
    Matrix { data: &'a mut [f32], offset: usize, row_stride: usize },
}

/// [`multiply`]'s checks, made before any tile instruction: the shapes agree, every tile it
/// loads lies inside its slice, and every accumulator it stores inside the destination. Returns
/// the destination, the element offsets of the four accumulators in it, and its row stride.
fn checked_destination<'c, const M: usize, const N: usize>(
    a: &ATiles<'_>,
    a_starts: [usize; M],
    b: &PackedB,
    b_tiles: [usize; N],
    sums: Sums<'c>,
) -> (&'c mut [f32], [usize; 4], usize) {
    assert!((1..=2).contains(&M) && (1..=2).contains(&N), "blocks are 1 or 2 tiles a side");
    assert_eq!(a.steps.len(), b.k_tiles(), "left-hand steps against right-hand depth");
    assert!(!a.steps.is_empty(), "a product of depth 0");
    assert!(a_starts.iter().all(|&s| a.fits(s)), "tile rows past the left-hand slice");
    assert!(b_tiles.iter().all(|&t| t < b.n_tiles()), "right-hand column tile out of range");
    match sums {
        Sums::Block(block) => {
            (block.as_mut_slice(), [0, ACC_VALUES, 2 * ACC_VALUES, 3 * ACC_VALUES], TILE_ROWS)
        }
        Sums::Matrix { data, offset, row_stride } => {
            let tile_row = TILE_ROWS * row_stride;
            let last = offset + (M - 1) * tile_row + (TILE_ROWS - 1) * row_stride + N * TILE_ROWS;
            assert!(row_stride >= N * TILE_ROWS && last <= data.len(), "sums past their destination");
            // Tiles past M or N are never stored; their offsets repeat a real one.
            let at = |i: usize, j: usize| offset + i.min(M - 1) * tile_row + j.min(N - 1) * TILE_ROWS;
            (data, [at(0, 0), at(0, 1), at(1, 0), at(1, 1)], row_stride)
        }
    }
}

/// The sums of `A·B` over all of B's depth (plus B's bias, if it has one), for `M` row tiles of
/// A (starting at `a_starts`) and `N` column tiles of B (`b_tiles`), `M` and `N` each 1 or 2.
/// Panics, before any tile is loaded, if a row would be read from outside A's slice or written
/// outside the destination, if A's steps are not B's depth, or if a column tile does not exist.
pub fn multiply<const M: usize, const N: usize>(
    amx: Amx,
    a: &ATiles<'_>,
    a_starts: [usize; M],
    b: &PackedB,
    b_tiles: [usize; N],
    sums: Sums<'_>,
) {
    let (c, c_offsets, c_stride) = checked_destination::<M, N>(a, a_starts, b, b_tiles, sums);
    configure_tiles(amx);
    let a_stride = (a.row_stride * 2) as isize;
    let b_stride = (TILE_ROWS * 2 * 2) as isize;
    let c_stride = (c_stride * 4) as isize;
    let a0 = a.data[a_starts[0]..].as_ptr();
    let a1 = a.data[a_starts[M - 1]..].as_ptr();
    let bias = |j: usize| b.bias.as_ref().map(|bias| bias[b_tiles[j.min(N - 1)] * TILE_ROWS..].as_ptr());
    let c = c.as_mut_ptr();
    // SAFETY: `configure_tiles` loaded the 16-row, 64-byte tile shape on this thread, which
    // `amx` proves the process may use. Every load below reads 16 rows of 64 bytes: for A at
    // `start + steps[j] + r·row_stride` (r < 16), which `fits` checked lies inside `a.data` for
    // both starts and every step; for B one whole packed tile of `b.tiles`, whose indices were
    // checked above; for the bias, the same 16 floats of the padded bias 16 times (stride 0).
    // Stores write the M×N accumulators, 16 rows of 16 floats at `c_offsets` and `c_stride`,
    // which were checked to lie inside the destination (a Block holds all four). The tile
    // registers are not used by compiled code, so nothing else is clobbered.
    unsafe {
        match (bias(0), bias(1)) {
            (Some(b0), Some(b1)) => std::arch::asm!(
                "tileloadd tmm0, [{b0} + {z}*1]",
                "tileloadd tmm1, [{b1} + {z}*1]",
                "tileloadd tmm2, [{b0} + {z}*1]",
                "tileloadd tmm3, [{b1} + {z}*1]",
                b0 = in(reg) b0, b1 = in(reg) b1, z = in(reg) 0isize,
                options(nostack, readonly),
            ),
            _ => std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack)
            ),
        }
        // Software-pipelined: each step's products are issued with the next step's loads placed
        // right after the last product that reads the register they overwrite, so loads of
        // step j + 1 overlap the products of step j.
        let pointers = |j: usize| {
            let step = a.steps[j];
            (a0.add(step), a1.add(step), b.tile(b_tiles[0], j), b.tile(b_tiles[N - 1], j))
        };
        let last = a.steps.len() - 1;
        let (pa0, pa1, pb0, pb1) = pointers(0);
        std::arch::asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            a0 = in(reg) pa0, b0 = in(reg) pb0, sa = in(reg) a_stride, sb = in(reg) b_stride,
            options(nostack, readonly),
        );
        if M == 2 {
            std::arch::asm!("tileloadd tmm5, [{a1} + {sa}*1]", a1 = in(reg) pa1, sa = in(reg) a_stride, options(nostack, readonly));
        }
        if N == 2 {
            std::arch::asm!("tileloadd tmm7, [{b1} + {sb}*1]", b1 = in(reg) pb1, sb = in(reg) b_stride, options(nostack, readonly));
        }
        for j in 1..=last {
            let (pa0, pa1, pb0, pb1) = pointers(j);
            match (M, N) {
                (2, 2) => std::arch::asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    a0 = in(reg) pa0, a1 = in(reg) pa1, b0 = in(reg) pb0, b1 = in(reg) pb1,
                    sa = in(reg) a_stride, sb = in(reg) b_stride,
                    options(nostack, readonly),
                ),
                (2, 1) => std::arch::asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    a0 = in(reg) pa0, a1 = in(reg) pa1, b0 = in(reg) pb0,
                    sa = in(reg) a_stride, sb = in(reg) b_stride,
                    options(nostack, readonly),
                ),
                (1, 2) => std::arch::asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    a0 = in(reg) pa0, b0 = in(reg) pb0, b1 = in(reg) pb1,
                    sa = in(reg) a_stride, sb = in(reg) b_stride,
                    options(nostack, readonly),
                ),
                _ => std::arch::asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    a0 = in(reg) pa0, b0 = in(reg) pb0,
                    sa = in(reg) a_stride, sb = in(reg) b_stride,
                    options(nostack, readonly),
                ),
            }
        }
        std::arch::asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack));
        if N == 2 {
            std::arch::asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack));
        }
        if M == 2 {
            std::arch::asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack));
        }
        if M == 2 && N == 2 {
            std::arch::asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack));
        }
        let at = |t: usize| c.add(c_offsets[t]);
        std::arch::asm!("tilestored [{c} + {s}*1], tmm0", c = in(reg) at(0), s = in(reg) c_stride, options(nostack));
        if N == 2 {
            std::arch::asm!("tilestored [{c} + {s}*1], tmm1", c = in(reg) at(1), s = in(reg) c_stride, options(nostack));
        }
        if M == 2 {
            std::arch::asm!("tilestored [{c} + {s}*1], tmm2", c = in(reg) at(2), s = in(reg) c_stride, options(nostack));
        }
        if M == 2 && N == 2 {
            std::arch::asm!("tilestored [{c} + {s}*1], tmm3", c = in(reg) at(3), s = in(reg) c_stride, options(nostack));
        }
    }
}

/// `ldtilecfg`'s 64-byte operand: palette 1, every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const TILES: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Loads the tile shape on the calling thread, once: tile configuration is per thread and
/// nothing else in the process changes it.
fn configure_tiles(_: Amx) {
    thread_local! {
        static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    }
    if !CONFIGURED.get() {
        // SAFETY: `Amx` proves the CPU has AMX and the process holds the tile state;
        // `ldtilecfg` reads the 64 bytes of `TILES`, a valid palette-1 configuration.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &TILES, options(nostack, readonly)) };
        CONFIGURED.set(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32_of(bf16(-2.5)), -2.5);
        assert!(f32_of(bf16(f32::NAN)).is_nan());
        assert_eq!(f32_of(bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// A product of odd sizes (neither dimension a whole number of tiles) against the same
    /// product in f64 of the bf16-rounded inputs: only the f32 accumulation differs.
    #[test]
    fn blocks_match_the_rounded_product_on_odd_shapes() {
        let Some(amx) = Amx::detect() else {
            eprintln!("no AMX on this machine: the AMX kernel is not exercised");
            return;
        };
        let (m, k, n) = (29, 75, 21);
        let value = |i: usize| ((i * 7919) % 1000) as f32 / 250.0 - 2.0;
        let a_rows: Vec<f32> = (0..m * k).map(value).collect();
        let b_rows: Vec<f32> = (0..k * n).map(|i| value(i + 13)).collect();
        let b = PackedB::from_rows(&b_rows, k, n);
        // A as rows of 96 bf16 (depth padded with zeros to three steps of 32).
        let stride = b.k_tiles() * TILE_DEPTH;
        let mut a = vec![0u16; 32 * stride];
        for r in 0..m {
            for c in 0..k {
                a[r * stride + c] = bf16(a_rows[r * k + c]);
            }
        }
        let steps: Vec<usize> = (0..b.k_tiles()).map(|j| j * TILE_DEPTH).collect();
        let tiles = ATiles::new(&a, stride, &steps);
        let mut out = [0f32; 4 * ACC_VALUES];
        multiply::<2, 2>(amx, &tiles, [0, 16 * stride], &b, [0, 1], Sums::Block(&mut out));
        let mut worst = 0f64;
        for r in 0..m {
            for c in 0..n {
                let exact: f64 = (0..k)
                    .map(|i| f32_of(bf16(a_rows[r * k + i])) as f64 * f32_of(bf16(b_rows[i * n + c])) as f64)
                    .sum();
                let got = out[((r / 16) * 2 + c / 16) * ACC_VALUES + (r % 16) * 16 + c % 16] as f64;
                worst = worst.max((got - exact).abs());
            }
        }
        assert!(worst < 1e-4, "largest difference {worst:e}");
        // The 1×1 block gives the first tile's values exactly as the 2×2 one; written straight
        // into a matrix with a bias, the 2×1 block gives the same sums plus the bias (to f32
        // rounding: the bias is where the sum starts, not added at the end).
        let mut single = [0f32; 4 * ACC_VALUES];
        multiply::<1, 1>(amx, &tiles, [0], &b, [0], Sums::Block(&mut single));
        assert_eq!(single[..ACC_VALUES], out[..ACC_VALUES]);
        let bias: Vec<f32> = (0..n).map(|c| c as f32 - 0.5).collect();
        let biased = b.clone().with_bias(&bias);
        let (offset, row_stride) = (3, 20);
        let mut matrix = vec![f32::NAN; offset + 32 * row_stride];
        let sums = Sums::Matrix { data: &mut matrix, offset, row_stride };
        multiply::<2, 1>(amx, &tiles, [0, 16 * stride], &biased, [0], sums);
        for r in 0..32 {
            for c in 0..16 {
                let expected = out[((r / 16) * 2) * ACC_VALUES + (r % 16) * 16 + c] + bias[c];
                let got = matrix[offset + r * row_stride + c];
                assert!(
                    (got - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                    "row {r}, column {c}: {got} against {expected}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "tile rows past the left-hand slice")]
    fn a_tile_past_its_slice_is_refused() {
        let b = PackedB::from_rows(&[1.0; 32 * 16], 32, 16);
        let a = vec![0u16; 16 * 32 - 1];
        let tiles = ATiles::new(&a, 32, &[0]);
        checked_destination::<1, 1>(&tiles, [0], &b, [0], Sums::Block(&mut [0.0; 4 * ACC_VALUES]));
    }

    #[test]
    #[should_panic(expected = "sums past their destination")]
    fn sums_past_their_destination_are_refused() {
        let b = PackedB::from_rows(&[1.0; 32 * 32], 32, 32);
        let a = vec![0u16; 16 * 32];
        let tiles = ATiles::new(&a, 32, &[0]);
        let mut matrix = vec![0f32; 16 * 32 - 1];
        checked_destination::<1, 2>(
            &tiles,
            [0],
            &b,
            [0, 1],
            Sums::Matrix { data: &mut matrix, offset: 0, row_stride: 32 },
        );
    }
}
