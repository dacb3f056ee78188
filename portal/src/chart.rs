//! Server-side SVG bar charts for the usage page: no script, no library, readable without
//! hovering (every non-zero bar carries its value, the axis its scale).
//!
//! In: a title and `(label, value)` bars. Out: an `<svg>` element as text, every piece of
//! text escaped.

/// Escapes text for HTML and SVG content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A round axis maximum at or above `max`: 1, 2 or 5 times a power of ten.
pub fn nice_max(max: i64) -> i64 {
    if max <= 0 {
        return 1;
    }
    let mut step = 1i64;
    loop {
        for m in [1, 2, 5] {
            if step.saturating_mul(m) >= max {
                return step * m;
            }
        }
        step = step.saturating_mul(10);
    }
}

/// Short value text: `950`, `12.5k`, `3.2M`.
pub fn short(value: i64) -> String {
    let v = value as f64;
    match value.abs() {
        0..=9_999 => value.to_string(),
        10_000..=999_999 => format!("{:.1}k", v / 1e3),
        _ => format!("{:.1}M", v / 1e6),
    }
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 40.0;

/// A bar chart; `every` says which bars get an axis label (every 6th hour, every 5th day).
pub fn bars(title: &str, bars: &[(String, i64)], every: usize) -> String {
    let max = nice_max(bars.iter().map(|(_, v)| *v).max().unwrap_or(0));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / bars.len().max(1) as f64;
    let bar_w = (slot * 0.7).max(1.0);
    let mut svg = format!(
        r#"<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" xmlns="http://www.w3.org/2000/svg"><title>{t}</title><text x="{LEFT}" y="18" class="chart-title">{t}</text>"#,
        t = escape(title)
    );
    // Gridlines and scale at 0, half and the maximum.
    for fraction in [0.0, 0.5, 1.0] {
        let y = TOP + plot_h * (1.0 - fraction);
        let value = (max as f64 * fraction).round() as i64;
        svg.push_str(&format!(
            r#"<line x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{tx}" y="{ty:.1}" class="axis" text-anchor="end">{v}</text>"#,
            x2 = WIDTH - RIGHT,
            tx = LEFT - 6.0,
            ty = y + 4.0,
            v = short(value)
        ));
    }
    for (i, (label, value)) in bars.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar_w) / 2.0;
        let h = plot_h * (*value).max(0) as f64 / max as f64;
        let y = TOP + plot_h - h;
        svg.push_str(&format!(
            r#"<rect x="{x:.1}" y="{y:.1}" width="{bar_w:.1}" height="{h:.1}" class="bar"><title>{l}: {value}</title></rect>"#,
            l = escape(label)
        ));
        if *value > 0 {
            svg.push_str(&format!(
                r#"<text x="{cx:.1}" y="{ty:.1}" class="value" text-anchor="middle">{v}</text>"#,
                cx = x + bar_w / 2.0,
                ty = y - 3.0,
                v = short(*value)
            ));
        }
        if every > 0 && i % every == 0 {
            svg.push_str(&format!(
                r#"<text x="{cx:.1}" y="{ty:.1}" class="axis" text-anchor="middle">{l}</text>"#,
                cx = x + bar_w / 2.0,
                ty = HEIGHT - BOTTOM + 16.0,
                l = escape(label)
            ));
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn values_are_written_on_their_bars() {
        let svg = bars("requests <per hour>", &[("10:00".into(), 0), ("11:00".into(), 42)], 1);
        assert!(svg.contains("requests &lt;per hour&gt;"));
        assert!(svg.contains(">42</text>"), "the bar's value is printed: {svg}");
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains(">50</text>"), "the scale is rounded up to 50");
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }

    proptest! {
        #[test]
        fn the_scale_covers_every_bar(max in 0i64..10_000_000_000) {
            let top = nice_max(max);
            prop_assert!(top >= max);
            prop_assert!(top <= (max * 5).max(1));
        }
    }
}
