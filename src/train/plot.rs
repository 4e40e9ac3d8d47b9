//! Loss curves as a PNG, drawn directly: two panels (generator and discriminator losses), each
//! curve smoothed by a moving average, on axes with round ticks (1, 2 or 5 times a power of ten
//! apart), labelled with an 8×8 bitmap font.

use std::path::Path;

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

use super::loss_log::LossRecord;
use super::trainer::StepLosses;

const WIDTH: u32 = 1000;
const PANEL_HEIGHT: u32 = 360;
const MARGIN_LEFT: u32 = 70;
const MARGIN_RIGHT: u32 = 20;
const MARGIN_TOP: u32 = 30;
const MARGIN_BOTTOM: u32 = 40;
const PALETTE: [[u8; 3]; 6] =
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75]];
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// Most ticks on the step axis and on the loss axis.
const MAX_X_TICKS: usize = 10;
const MAX_Y_TICKS: usize = 6;

/// One named series of (step, loss) points.
struct Curve<'a> {
    name: &'a str,
    points: Vec<(f64, f64)>,
}

/// Draws the logged losses to `path`.
pub fn plot_losses(records: &[LossRecord], path: &Path) -> anyhow::Result<()> {
    let mut canvas = RgbImage::from_pixel(WIDTH, 2 * PANEL_HEIGHT, Rgb([255, 255, 255]));
    type Getter = fn(&StepLosses) -> f64;
    let generator: [(&str, Getter); 6] = [
        ("gan_G", |l| l.gan_g),
        ("gan_F", |l| l.gan_f),
        ("cycle_x", |l| l.cycle_x),
        ("cycle_y", |l| l.cycle_y),
        ("identity_x", |l| l.identity_x),
        ("identity_y", |l| l.identity_y),
    ];
    let discriminator: [(&str, Getter); 2] = [("D_X", |l| l.d_x), ("D_Y", |l| l.d_y)];
    let window = (records.len() / 100).max(1);
    for (panel, (title, series)) in
        [("generator losses", &generator[..]), ("discriminator losses", &discriminator[..])]
            .iter()
            .enumerate()
    {
        let curves: Vec<Curve> = series
            .iter()
            .map(|(name, get)| {
                let values: Vec<f64> = records.iter().map(|r| get(&r.losses)).collect();
                let smoothed = moving_average(&values, window);
                Curve { name, points: records.iter().map(|r| r.step as f64).zip(smoothed).collect() }
            })
            .collect();
        let title = format!("{title} (moving average of {window} steps)");
        draw_panel(&mut canvas, panel as u32 * PANEL_HEIGHT, &title, &curves);
    }
    canvas.save(path)?;
    Ok(())
}

fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// Round tick values from 0 up to the first at or past `max`, at most `at_most` + 1 of them.
#[derive(Debug, PartialEq)]
struct Ticks {
    step: f64,
    count: usize,
}

impl Ticks {
    fn covering(max: f64, at_most: usize) -> Self {
        let max = if max > 0.0 { max } else { 1.0 };
        let magnitude = 10f64.powi((max / at_most as f64).log10().floor() as i32);
        let intervals = |step: f64| (max / step - 1e-9).ceil().max(1.0) as usize;
        let step = [1.0, 2.0, 5.0, 10.0]
            .map(|m| m * magnitude)
            .into_iter()
            .find(|&step| intervals(step) <= at_most)
            .unwrap_or(10.0 * magnitude);
        Self { step, count: intervals(step) }
    }

    fn top(&self) -> f64 {
        self.step * self.count as f64
    }

    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        (0..=self.count).map(|i| i as f64 * self.step)
    }

    /// `value` with as many decimals as the step needs.
    fn label(&self, value: f64) -> String {
        // The margin keeps 0.1, whose logarithm may land just below -1, at one decimal.
        let decimals = (-(self.step.log10() + 1e-9).floor()).max(0.0) as usize;
        format!("{value:.decimals$}")
    }
}

fn draw_panel(canvas: &mut RgbImage, top: u32, title: &str, curves: &[Curve]) {
    let points = curves.iter().flat_map(|c| c.points.iter());
    let (mut x_max, mut y_max) = (1.0f64, 0.0f64);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_max = y_max.max(y);
    }
    let (x_ticks, y_ticks) = (Ticks::covering(x_max, MAX_X_TICKS), Ticks::covering(y_max, MAX_Y_TICKS));
    // The loss axis ends on a tick; the step axis at the last step.
    let y_top = y_ticks.top();
    let (left, right) = (MARGIN_LEFT as f64, (WIDTH - MARGIN_RIGHT) as f64);
    let (upper, lower) = ((top + MARGIN_TOP) as f64, (top + PANEL_HEIGHT - MARGIN_BOTTOM) as f64);
    let to_px = |x: f64, y: f64| (left + x / x_max * (right - left), lower - y / y_top * (lower - upper));

    for value in y_ticks.values() {
        let (_, py) = to_px(0.0, value);
        line(canvas, (left, py), (right, py), GRID);
        line(canvas, (left - 4.0, py), (left, py), INK);
        let label = y_ticks.label(value);
        let width = 8 * label.len() as u32;
        text(canvas, MARGIN_LEFT.saturating_sub(8 + width), py as u32 - 4, &label, INK);
    }
    for value in x_ticks.values().take_while(|&v| v <= x_max) {
        let (px, _) = to_px(value, 0.0);
        line(canvas, (px, upper), (px, lower), GRID);
        line(canvas, (px, lower), (px, lower + 4.0), INK);
        let label = x_ticks.label(value);
        let half_width = 4 * label.len() as u32;
        text(canvas, (px as u32).saturating_sub(half_width), lower as u32 + 8, &label, INK);
    }
    line(canvas, (left, upper), (left, lower), INK);
    line(canvas, (left, lower), (right, lower), INK);
    text(canvas, MARGIN_LEFT, top + 8, title, INK);
    text(canvas, WIDTH / 2 - 20, lower as u32 + 24, "step", INK);

    for (i, curve) in curves.iter().enumerate() {
        let color = Rgb(PALETTE[i % PALETTE.len()]);
        for pair in curve.points.windows(2) {
            line(canvas, to_px(pair[0].0, pair[0].1), to_px(pair[1].0, pair[1].1), color);
        }
        let (lx, ly) = (WIDTH - MARGIN_RIGHT - 130, top + MARGIN_TOP + 6 + 14 * i as u32);
        for dy in 0..8 {
            for dx in 0..16 {
                canvas.put_pixel(lx + dx, ly + dy, color);
            }
        }
        text(canvas, lx + 22, ly, curve.name, INK);
    }
}

fn line(canvas: &mut RgbImage, from: (f64, f64), to: (f64, f64), color: Rgb<u8>) {
    let steps = (to.0 - from.0).abs().max((to.1 - from.1).abs()).ceil().max(1.0) as usize;
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let (x, y) = (from.0 + (to.0 - from.0) * t, from.1 + (to.1 - from.1) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < canvas.width() && (y as u32) < canvas.height() {
            canvas.put_pixel(x as u32, y as u32, color);
        }
    }
}

fn text(canvas: &mut RgbImage, x: u32, y: u32, s: &str, color: Rgb<u8>) {
    for (i, c) in s.chars().enumerate() {
        let Some(glyph) = font8x8::BASIC_FONTS.get(c) else { continue };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                let (px, py) = (x + 8 * i as u32 + col, y + row as u32);
                if bits >> col & 1 == 1 && px < canvas.width() && py < canvas.height() {
                    canvas.put_pixel(px, py, color);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_smooths_over_the_window() {
        assert_eq!(moving_average(&[2.0, 4.0, 6.0, 8.0], 2), vec![2.0, 3.0, 5.0, 7.0]);
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        // (range, most ticks) → (step, intervals); an empty range still gets an axis.
        let cases = [
            ((3108.0, 10), (500.0, 7)),
            ((300.0, 10), (50.0, 6)),
            ((8.0, 10), (1.0, 8)),
            ((4.83, 6), (1.0, 5)),
            ((0.52, 6), (0.1, 6)),
            ((0.26, 6), (0.05, 6)),
            ((1.0, 6), (0.2, 5)),
            ((0.0, 6), (0.2, 5)),
        ];
        for ((max, at_most), (step, count)) in cases {
            let ticks = Ticks::covering(max, at_most);
            assert!((ticks.step - step).abs() < 1e-12 * step && ticks.count == count, "{max}: {ticks:?}");
            assert!(ticks.top() >= max);
        }
        let ticks = Ticks::covering(0.26, 6);
        assert_eq!(
            ticks.values().map(|v| ticks.label(v)).collect::<Vec<_>>(),
            ["0.00", "0.05", "0.10", "0.15", "0.20", "0.25", "0.30"]
        );
        assert_eq!(Ticks::covering(3108.0, 10).label(1500.0), "1500");
    }

    #[test]
    fn plot_draws_curves_in_both_panels() {
        let records: Vec<LossRecord> = (1..=300)
            .map(|step| {
                let decay = 1.0 / (1.0 + step as f64 / 50.0);
                let losses = StepLosses { cycle_x: 5.0 * decay, d_x: 0.5 * decay, ..Default::default() };
                LossRecord { step, epoch: 0, lr: 2e-4, seconds: 0.0, losses }
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("losses.png");
        plot_losses(&records, &path).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (WIDTH, 2 * PANEL_HEIGHT));
        let cycle_color = Rgb(PALETTE[2]);
        let d_color = Rgb(PALETTE[0]);
        let in_panel = |panel: u32, color| {
            (0..PANEL_HEIGHT)
                .any(|y| (0..WIDTH - 150).any(|x| *image.get_pixel(x, panel * PANEL_HEIGHT + y) == color))
        };
        assert!(in_panel(0, cycle_color), "cycle_x curve in the generator panel");
        assert!(in_panel(1, d_color), "D_X curve in the discriminator panel");
    }
}
