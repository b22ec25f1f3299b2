//! Minimal SVG drawing helpers shared by the report's plots (hand-written SVG: no
//! dependency, no JavaScript, renders in any browser).

use std::fmt::Write;

/// Escapes text for HTML/SVG content and attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A qualitative palette (Tableau 10), cycled.
pub fn color(i: usize) -> &'static str {
    const P: [&str; 10] = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
        "#9c755f", "#bab0ac",
    ];
    P[i % P.len()]
}

/// Sequential colour for t in [0, 1] (light yellow → dark blue, viridis-like stops).
pub fn ramp(t: f64) -> String {
    const STOPS: [(f64, [u8; 3]); 5] = [
        (0.0, [253, 231, 37]),
        (0.25, [94, 201, 98]),
        (0.5, [33, 145, 140]),
        (0.75, [59, 82, 139]),
        (1.0, [68, 1, 84]),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let k = STOPS
        .windows(2)
        .position(|w| t <= w[1].0)
        .unwrap_or(STOPS.len() - 2);
    let (t0, a) = STOPS[k];
    let (t1, b) = STOPS[k + 1];
    let f = if t1 > t0 { (t - t0) / (t1 - t0) } else { 0.0 };
    let mix = |i: usize| (a[i] as f64 + f * (b[i] as f64 - a[i] as f64)).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(0), mix(1), mix(2))
}

/// A plot area inside an SVG canvas, mapping data coordinates to pixels.
pub struct Frame {
    /// Canvas width.
    pub width: f64,
    /// Canvas height.
    pub height: f64,
    /// Left margin.
    pub left: f64,
    /// Right margin.
    pub right: f64,
    /// Top margin.
    pub top: f64,
    /// Bottom margin.
    pub bottom: f64,
    /// x range.
    pub x: (f64, f64),
    /// y range (log10 values when `log_y`).
    pub y: (f64, f64),
    /// Logarithmic y axis.
    pub log_y: bool,
}

impl Frame {
    /// Pixel x of data x.
    pub fn px(&self, x: f64) -> f64 {
        let w = self.width - self.left - self.right;
        self.left + (x - self.x.0) / (self.x.1 - self.x.0).max(f64::MIN_POSITIVE) * w
    }

    /// Pixel y of data y.
    pub fn py(&self, y: f64) -> f64 {
        let y = if self.log_y {
            y.max(f64::MIN_POSITIVE).log10()
        } else {
            y
        };
        let h = self.height - self.top - self.bottom;
        self.top + h - (y - self.y.0) / (self.y.1 - self.y.0).max(f64::MIN_POSITIVE) * h
    }

    /// Opens the `<svg>` element with a title for screen readers.
    pub fn open(&self, out: &mut String, title: &str) {
        let _ = write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" font-family="sans-serif" font-size="11"><title>{t}</title><rect width="{w}" height="{h}" fill="white"/>"#,
            w = self.width,
            h = self.height,
            t = esc(title)
        );
    }

    /// Draws both axes with ticks and labels.
    pub fn axes(&self, out: &mut String, x_label: &str, y_label: &str, x_ticks: &[(f64, String)]) {
        let (x0, x1) = (self.left, self.width - self.right);
        let (y0, y1) = (self.height - self.bottom, self.top);
        let _ = write!(
            out,
            r##"<path d="M{x0} {y1}V{y0}H{x1}" fill="none" stroke="#333"/>"##
        );
        for (v, label) in x_ticks {
            let x = self.px(*v);
            let _ = write!(
                out,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{:.1}" stroke="#333"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                y0 + 4.0,
                y0 + 16.0,
                esc(label)
            );
        }
        for (v, label) in self.y_ticks() {
            let y = self.py(v);
            let _ = write!(
                out,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                x0 - 4.0,
                y + 4.0,
                esc(&label)
            );
        }
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            self.height - 4.0,
            esc(x_label),
            (y0 + y1) / 2.0,
            esc(y_label)
        );
    }

    fn y_ticks(&self) -> Vec<(f64, String)> {
        if self.log_y {
            let (a, b) = (self.y.0.ceil() as i32, self.y.1.floor() as i32);
            let step = ((b - a) / 6).max(1);
            (a..=b)
                .step_by(step as usize)
                .map(|e| (10f64.powi(e), format!("1e{e}")))
                .collect()
        } else {
            (0..=5)
                .map(|k| {
                    let v = self.y.0 + (self.y.1 - self.y.0) * k as f64 / 5.0;
                    (v, format!("{v:.2}"))
                })
                .collect()
        }
    }

    /// A polyline through data points.
    pub fn line(&self, out: &mut String, points: &[(f64, f64)], stroke: &str, dash: bool) {
        if points.is_empty() {
            return;
        }
        let mut d = String::new();
        for (k, (x, y)) in points.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1} {:.1}",
                if k == 0 { "M" } else { "L" },
                self.px(*x),
                self.py(*y)
            );
        }
        let _ = write!(
            out,
            r#"<path d="{d}" fill="none" stroke="{stroke}" stroke-width="1.5"{}/>"#,
            if dash {
                r#" stroke-dasharray="4 3""#
            } else {
                ""
            }
        );
    }
}

/// A legend of coloured entries, drawn at (x, y) downwards.
pub fn legend(out: &mut String, x: f64, y: f64, entries: &[(String, String)]) {
    for (k, (label, col)) in entries.iter().enumerate() {
        let yy = y + 14.0 * k as f64;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{:.1}" width="10" height="10" fill="{col}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            yy - 9.0,
            x + 14.0,
            yy,
            esc(label)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_colours() {
        assert_eq!(esc("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
        assert_eq!(ramp(0.0), "#fde725");
        assert_eq!(ramp(1.0), "#440154");
        assert_eq!(ramp(f64::NAN), "#fde725");
        let f = Frame {
            width: 100.0,
            height: 100.0,
            left: 10.0,
            right: 10.0,
            top: 10.0,
            bottom: 10.0,
            x: (0.0, 1.0),
            y: (-2.0, 0.0),
            log_y: true,
        };
        assert_eq!(f.px(0.5), 50.0);
        assert!((f.py(0.1) - 50.0).abs() < 1e-9);
    }
}
