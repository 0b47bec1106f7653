//! What a scale-out run produced, shared by `shoal bench scale-out` and `shoal sim`: the
//! JSON document (`--json`), the table printed at the end, and the HTML page with SVG
//! plots (`--report DIR`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use serde::Serialize;

/// Percentiles of per-node completion times, in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Completion {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Completion {
    /// Nearest-rank percentiles of `times` (any order).
    pub fn of(times: &[f64]) -> Completion {
        let mut t = times.to_vec();
        t.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if t.is_empty() {
                return 0.0;
            }
            let rank = (q * t.len() as f64).ceil() as usize;
            t[rank.clamp(1, t.len()) - 1]
        };
        Completion {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

/// One way of distributing the image (shoal or a baseline), measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub completion_s: Completion,
    pub registry_egress_bytes: u64,
    /// Registry egress over the image size.
    pub registry_egress_ratio: f64,
    pub peer_bytes: u64,
    pub seed_bytes: u64,
    pub fallback_bytes: u64,
    pub failures: usize,
    /// Mean time from a piece request to the peer's answer, in seconds: measured by the
    /// nodes in netns mode, the modelled round trip (`--rtt-ms`) in the sim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_answer_s: Option<f64>,
    /// Mean round trip to the peers that answered piece requests (QUIC's estimate at each
    /// answer, no wait for an upload slot), in seconds: measured by the nodes in netns mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_rtt_s: Option<f64>,
    /// Mean round trip to the supernode (QUIC's estimate at each of its answers), in
    /// seconds: measured by the nodes in netns mode, `--supernode-rtt-ms` in the sim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_rtt_s: Option<f64>,
    /// Pieces the nodes sent beyond their upload slots while their known link had room
    /// (`--upload-link-known`; shoald's `--upload-link`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploads_beyond_slots: Option<u64>,
    /// Bytes of the supernodes' answers to the nodes' questions (control traffic on the
    /// links their seeds send from): counted by the supernodes in netns mode, the encoded
    /// size of every answer in the sim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_answer_bytes: Option<u64>,
    /// Answers the supernodes sent (the sim).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_answers: Option<u64>,
    /// Announcements of new pieces the supernodes received, each a stream of its own
    /// (the sim).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_announcements: Option<u64>,
    /// The most answer bytes one supernode sent in one second of the run (the sim).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_answer_peak_bytes_per_s: Option<u64>,
    /// The longest an answer took to go out on its supernode's link (behind the answers
    /// queued before it), in seconds (the sim: answers go out ahead of the seed's uploads,
    /// which share the rest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_answer_wait_s: Option<f64>,
    /// What the supernodes' hosts sent on their links during the pull: the seed's pieces,
    /// the answers, and in netns mode everything around them (packet headers,
    /// acknowledgements, the streams that carry questions and announcements), read from
    /// the links' counters; the sim counts the seed's pieces and the answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_sent_bytes: Option<u64>,
    /// What they received: the blobs their seeds read from the registry, and the nodes'
    /// questions and announcements with their packets (netns; the sim counts the blobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_received_bytes: Option<u64>,
    /// Upload capacity of a supernode's host, shared by its answers and its seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_link_bytes_per_s: Option<u64>,
    /// p50 and p99 over the lower bound (0 when there is no bound, on loopback).
    pub p50_over_bound: f64,
    pub p99_over_bound: f64,
    /// Completion time of every node that finished, in seconds (for the CDF).
    pub node_completion_s: Vec<f64>,
    /// (seconds since the start, registry bytes sent so far).
    pub registry_egress_over_time: Vec<(f64, u64)>,
}

impl Outcome {
    /// What the supernodes' links carried, split into the seed's pieces, the answers and
    /// the rest, as a line of the table.
    fn supernode_links(&self) -> Option<String> {
        let (sent, received) = (self.supernode_sent_bytes?, self.supernode_received_bytes?);
        let answers = self.supernode_answer_bytes.unwrap_or(0);
        let blobs = self
            .registry_egress_bytes
            .saturating_sub(self.fallback_bytes);
        let besides = sent.saturating_sub(self.seed_bytes + answers);
        Some(format!(
            "the supernodes' links sent {} ({} of the seed's pieces, {} of answers, {} \
             besides: {:.0}% of it) and received {} ({} of blobs from the registry)\n",
            human_bytes(sent),
            human_bytes(self.seed_bytes),
            human_bytes(answers),
            human_bytes(besides),
            100.0 * besides as f64 / sent.max(1) as f64,
            human_bytes(received),
            human_bytes(blobs),
        ))
    }

    /// Fills the derived fields from the raw ones.
    pub fn finish(mut self, image_bytes: u64, lower_bound_s: f64) -> Outcome {
        self.completion_s = Completion::of(&self.node_completion_s);
        self.registry_egress_ratio = self.registry_egress_bytes as f64 / image_bytes.max(1) as f64;
        if lower_bound_s > 0.0 {
            self.p50_over_bound = self.completion_s.p50 / lower_bound_s;
            self.p99_over_bound = self.completion_s.p99 / lower_bound_s;
        }
        self
    }
}

/// A whole run: shoal and its baselines.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub mode: &'static str,
    pub nodes: usize,
    pub image_bytes: u64,
    pub layers: usize,
    pub bandwidth_bytes_per_s: u64,
    /// Image size over per-node bandwidth: no distribution does better when every node has
    /// the same bandwidth (0 on loopback, where there is no cap).
    pub lower_bound_s: f64,
    pub wall_s: f64,
    #[serde(flatten)]
    pub shoal: Outcome,
    pub baselines: BTreeMap<String, Outcome>,
    /// `--cross-check`: the same swarm in `shoal sim`, beside this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_check: Option<CrossCheck>,
}

/// A `--netns` run beside `shoal sim` of the same swarm, given the round trips measured in
/// the run.
#[derive(Debug, Clone, Serialize)]
pub struct CrossCheck {
    /// The `shoal sim` command that was run.
    pub command: String,
    pub sim_p50_over_bound: f64,
    pub sim_p99_over_bound: f64,
    pub sim_registry_egress_ratio: f64,
    /// (sim - real) / real, for p50 and for registry egress.
    pub p50_apart: f64,
    pub egress_apart: f64,
    /// The same for the supernodes' answer bytes (informational, not part of the
    /// agreement: the real nodes ask more often when their run takes longer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_bytes_apart: Option<f64>,
    /// The same for all the supernodes sent (informational: the model sends only the
    /// seed's pieces and the answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supernode_sent_apart: Option<f64>,
}

impl CrossCheck {
    /// How far apart the two may be and still agree.
    pub const AGREE_WITHIN: f64 = 0.15;

    pub fn of(command: String, real: &Outcome, sim: &Outcome) -> Self {
        let apart = |sim: f64, real: f64| (sim - real) / real.max(f64::MIN_POSITIVE);
        CrossCheck {
            command,
            sim_p50_over_bound: sim.p50_over_bound,
            sim_p99_over_bound: sim.p99_over_bound,
            sim_registry_egress_ratio: sim.registry_egress_ratio,
            p50_apart: apart(sim.p50_over_bound, real.p50_over_bound),
            egress_apart: apart(sim.registry_egress_ratio, real.registry_egress_ratio),
            answer_bytes_apart: sim
                .supernode_answer_bytes
                .zip(real.supernode_answer_bytes)
                .map(|(sim, real)| apart(sim as f64, real as f64)),
            supernode_sent_apart: sim
                .supernode_sent_bytes
                .zip(real.supernode_sent_bytes)
                .map(|(sim, real)| apart(sim as f64, real as f64)),
        }
    }

    pub fn agrees(&self) -> bool {
        self.p50_apart.abs() <= Self::AGREE_WITHIN && self.egress_apart.abs() <= Self::AGREE_WITHIN
    }
}

impl Run {
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let bound = if self.lower_bound_s > 0.0 {
            format!("lower bound S/B = {:.2} s", self.lower_bound_s)
        } else {
            "no bandwidth cap: no lower bound".to_owned()
        };
        out += &format!(
            "{} nodes, image {} in {} layer(s), {bound}\n\n",
            self.nodes,
            human_bytes(self.image_bytes),
            self.layers
        );
        out += "| | p50 s | p90 s | p99 s | max s | p50/bound | p99/bound | registry egress | from peers | from seed | fallback | failures |\n";
        out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
        let rows = std::iter::once(("shoal", &self.shoal))
            .chain(self.baselines.iter().map(|(k, v)| (k.as_str(), v)));
        for (name, o) in rows {
            let c = &o.completion_s;
            out += &format!(
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} ({:.2}x) | {} | {} | {} | {} |\n",
                c.p50,
                c.p90,
                c.p99,
                c.max,
                ratio(o.p50_over_bound),
                ratio(o.p99_over_bound),
                human_bytes(o.registry_egress_bytes),
                o.registry_egress_ratio,
                human_bytes(o.peer_bytes),
                human_bytes(o.seed_bytes),
                human_bytes(o.fallback_bytes),
                o.failures
            );
        }
        if self.mode == "loopback" {
            let direct = self
                .baselines
                .get("direct")
                .map(|d| {
                    format!(
                        ", every node pulling directly {:.2}x",
                        d.registry_egress_ratio
                    )
                })
                .unwrap_or_default();
            out += &format!(
                "\nOn loopback no link is shared: the times measure this machine's cores (every \
                 node decrypts, hashes and stores every byte). What shoal saves is registry \
                 egress: {:.2}x the image with shoal{direct}. `--netns` (root) gives every host \
                 a capped link of its own.\n",
                self.shoal.registry_egress_ratio
            );
        }
        if let Some(answer) = self.shoal.peer_answer_s {
            out += &format!(
                "\npeers answered piece requests after {:.1} ms on average (a round trip with \
                 the queues on the way, and any wait for an upload slot)\n",
                answer * 1000.0
            );
        }
        if let Some(rtt) = self.shoal.peer_rtt_s {
            out += &format!(
                "the round trip to those peers was {:.1} ms on average (QUIC's estimate; \
                 `shoal sim --rtt-ms` models it, and the wait for a slot itself)\n",
                rtt * 1000.0
            );
        }
        if let Some(rtt) = self.shoal.supernode_rtt_s {
            out += &format!(
                "the round trip to the supernode was {:.1} ms on average (its seed's uploads \
                 share its link; `shoal sim --supernode-rtt-ms` models it)\n",
                rtt * 1000.0
            );
        }
        if let Some(bytes) = self.shoal.supernode_answer_bytes {
            out += &format!(
                "the supernodes answered the nodes' questions with {:.1} MiB ({:.0} KiB per node)",
                bytes as f64 / f64::from(1 << 20),
                bytes as f64 / 1024.0 / self.nodes.max(1) as f64
            );
            match (
                self.shoal.supernode_answer_peak_bytes_per_s,
                self.shoal.supernode_link_bytes_per_s,
            ) {
                (Some(peak), Some(link)) if link > 0 => {
                    out += &format!(
                        ", at most {:.1} MiB in one second from one supernode ({:.0}% of its \
                         link; its seed's uploads share the rest)",
                        peak as f64 / f64::from(1 << 20),
                        100.0 * peak as f64 / link as f64
                    )
                }
                _ => {}
            }
            if let Some(wait) = self.shoal.supernode_answer_wait_s {
                out += &format!(
                    "; an answer took at most {:.1} ms to go out on that link",
                    wait * 1000.0
                );
            }
            out += "\n";
        }
        if let (Some(answers), Some(announced)) = (
            self.shoal.supernode_answers,
            self.shoal.supernode_announcements,
        ) {
            let seconds = self.shoal.completion_s.max.max(f64::MIN_POSITIVE);
            out += &format!(
                "the supernodes answered {answers} questions and took {announced} \
                 announcements, about {:.0} streams a second until the last node was done\n",
                (answers + announced) as f64 / seconds
            );
        }
        if let Some(line) = self.shoal.supernode_links() {
            out += &line;
        }
        if let Some(beyond) = self.shoal.uploads_beyond_slots {
            out += &format!(
                "the nodes knew their link and sent {beyond} pieces beyond their upload slots \
                 while it had room\n"
            );
        }
        if let Some(c) = &self.cross_check {
            out += &format!(
                "\ncross-check, the same swarm in the model ({}): p50 {:.2}x S/B against \
                 {:.2}x here ({:+.0}%), registry egress {:.2}x against {:.2}x ({:+.0}%): {}\n",
                c.command,
                c.sim_p50_over_bound,
                self.shoal.p50_over_bound,
                c.p50_apart * 100.0,
                c.sim_registry_egress_ratio,
                self.shoal.registry_egress_ratio,
                c.egress_apart * 100.0,
                if c.agrees() {
                    "they agree within 15%"
                } else {
                    "they do not agree within 15%: the model or the scheduler is wrong, or \
                     this machine is the limit (see docs/benchmarks.md)"
                }
            );
            if let Some(apart) = c.answer_bytes_apart {
                out += &format!(
                    "the supernodes' answers in the model: {:+.0}% of the bytes here\n",
                    apart * 100.0
                );
            }
            if let Some(apart) = c.supernode_sent_apart {
                out += &format!(
                    "all the supernodes sent, in the model: {:+.0}% of what their links sent \
                     here (the model sends no packet headers, acknowledgements or streams)\n",
                    apart * 100.0
                );
            }
        }
        out
    }

    /// Writes `DIR/index.html` with the completion-time CDFs and registry egress over time.
    pub fn write_report(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cdf = self
            .plot_cdf()
            .context("plotting the completion-time CDF")?;
        let egress = self.plot_egress().context("plotting registry egress")?;
        let json = serde_json::to_string_pretty(self)?;
        let html = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>shoal {mode}: {nodes} nodes</title>\
             <style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}\
             table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px}}</style>\
             </head><body>\n<h1>shoal {mode}: {nodes} nodes pull {image}</h1>\n<pre>{table}</pre>\n\
             <h2>Completion time, CDF over nodes</h2>\n{cdf}\n<h2>Registry egress over time</h2>\n{egress}\n\
             <h2>Data</h2>\n<details><summary>JSON</summary><pre>{json}</pre></details>\n</body></html>\n",
            mode = self.mode,
            nodes = self.nodes,
            image = human_bytes(self.image_bytes),
            table = html_escape(&self.table()),
            json = html_escape(&json),
        );
        let path = dir.join("index.html");
        std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))
    }

    fn series(&self) -> Vec<(&str, &Outcome)> {
        std::iter::once(("shoal", &self.shoal))
            .chain(self.baselines.iter().map(|(k, v)| (k.as_str(), v)))
            .collect()
    }

    fn plot_cdf(&self) -> anyhow::Result<String> {
        let series = self.series();
        let x_max = series
            .iter()
            .flat_map(|(_, o)| o.node_completion_s.iter().copied())
            .fold(self.lower_bound_s, f64::max)
            .max(0.001)
            * 1.05;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (900, 480)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .margin(16)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
            chart
                .configure_mesh()
                .x_desc("seconds since the start")
                .y_desc("fraction of nodes done")
                .draw()?;
            for (i, (name, o)) in series.iter().enumerate() {
                let mut t = o.node_completion_s.clone();
                t.sort_by(f64::total_cmp);
                let n = t.len().max(1) as f64;
                let points = t.iter().enumerate().map(|(k, x)| (*x, (k + 1) as f64 / n));
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
            }
            if self.lower_bound_s > 0.0 {
                let b = self.lower_bound_s;
                chart
                    .draw_series(LineSeries::new([(b, 0.0), (b, 1.0)], BLACK.mix(0.5)))?
                    .label("lower bound S/B")
                    .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.5)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()?;
            root.present()?;
        }
        Ok(svg)
    }

    fn plot_egress(&self) -> anyhow::Result<String> {
        let series = self.series();
        let x_max = series
            .iter()
            .flat_map(|(_, o)| o.registry_egress_over_time.iter().map(|p| p.0))
            .fold(0.001, f64::max);
        let y_max = series
            .iter()
            .flat_map(|(_, o)| o.registry_egress_over_time.iter().map(|p| p.1))
            .fold(self.image_bytes, u64::max) as f64
            / 1e6
            * 1.05;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (900, 480)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .margin(16)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
            chart
                .configure_mesh()
                .x_desc("seconds since the start")
                .y_desc("registry bytes sent (MB)")
                .draw()?;
            for (i, (name, o)) in series.iter().enumerate() {
                let points = o
                    .registry_egress_over_time
                    .iter()
                    .map(|(t, b)| (*t, *b as f64 / 1e6));
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
            }
            let image = self.image_bytes as f64 / 1e6;
            chart
                .draw_series(LineSeries::new(
                    [(0.0, image), (x_max, image)],
                    BLACK.mix(0.5),
                ))?
                .label("image size")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.5)));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()?;
            root.present()?;
        }
        Ok(svg)
    }
}

/// Prints the table and writes the JSON and the report when asked to.
pub fn finish(run: &Run, json: Option<&Path>, report: Option<&Path>) -> anyhow::Result<()> {
    println!("{}", run.table());
    println!("(took {:.1} s of wall time)", run.wall_s);
    if let Some(path) = json {
        run.write_json(path)?;
        println!("JSON: {}", path.display());
    }
    if let Some(dir) = report {
        run.write_report(dir)?;
        println!("report: {}", dir.join("index.html").display());
    }
    Ok(())
}

fn ratio(r: f64) -> String {
    if r > 0.0 {
        format!("{r:.2}x")
    } else {
        "-".to_owned()
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `1.5 GiB`, `64.0 MiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A size: `1GiB`, `256MiB`, `3GB`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| format!("{s:?} is not a size like 256MiB or 3GB: {e}"))
}

/// `flag`'s value is within `range`, or an error that says so.
pub fn flag_in(
    flag: &str,
    value: usize,
    range: std::ops::RangeInclusive<usize>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        range.contains(&value),
        "{flag} must be between {} and {}, not {value}",
        range.start(),
        range.end()
    );
    Ok(())
}

/// A rate in bytes per second: `100mbit`, `1gbit`, `300MB/s`, `12500000`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    if let Some(num) = lower.strip_suffix("bit") {
        let (num, scale) = match num.chars().last() {
            Some('k') => (&num[..num.len() - 1], 1e3),
            Some('m') => (&num[..num.len() - 1], 1e6),
            Some('g') => (&num[..num.len() - 1], 1e9),
            _ => (num, 1.0),
        };
        let bits: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a rate like 100mbit, 1gbit or 300MB/s"))?;
        if !(bits.is_finite() && bits > 0.0) {
            return Err(format!("{s:?}: a rate must be positive"));
        }
        let bytes = (bits * scale / 8.0) as u64;
        if bytes == 0 {
            return Err(format!("{s:?} is below one byte per second"));
        }
        return Ok(bytes);
    }
    let bytes = parse_bytes(lower.trim_end_matches("/s"))
        .map_err(|_| format!("{s:?} is not a rate like 100mbit, 1gbit or 300MB/s"))?;
    if bytes == 0 {
        return Err(format!("{s:?}: a rate must be positive"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cross_check_says_how_far_apart_the_sim_is() {
        let outcome = |p50, egress| Outcome {
            p50_over_bound: p50,
            registry_egress_ratio: egress,
            ..Default::default()
        };
        let close = CrossCheck::of("shoal sim".into(), &outcome(1.32, 1.0), &outcome(1.36, 1.0));
        assert!((close.p50_apart - 0.0303).abs() < 0.001, "{close:?}");
        assert!(close.agrees());
        let far = CrossCheck::of("shoal sim".into(), &outcome(3.3, 1.0), &outcome(1.8, 1.0));
        assert!(!far.agrees(), "{far:?}");
        let egress = CrossCheck::of("shoal sim".into(), &outcome(1.3, 1.9), &outcome(1.3, 1.0));
        assert!(!egress.agrees(), "registry egress counts too: {egress:?}");
        assert_eq!(close.answer_bytes_apart, None, "no answer bytes counted");
        let answers = |bytes| Outcome {
            supernode_answer_bytes: Some(bytes),
            ..outcome(1.3, 1.0)
        };
        let counted = CrossCheck::of("shoal sim".into(), &answers(1000), &answers(800));
        assert_eq!(counted.answer_bytes_apart, Some(-0.2));
        assert!(
            counted.agrees(),
            "answer bytes are not part of the agreement"
        );
    }

    #[test]
    fn rates_and_sizes() {
        assert_eq!(parse_rate("100mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("1gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("300MB/s"), Ok(300_000_000));
        assert_eq!(parse_rate("50Mbit"), Ok(6_250_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0mbit").is_err());
        assert!(
            parse_rate("1bit").is_err(),
            "an eighth of a byte per second"
        );
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("3GB"), Ok(3_000_000_000));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let t: Vec<f64> = (1..=100).map(f64::from).collect();
        let c = Completion::of(&t);
        assert_eq!((c.p50, c.p90, c.p99, c.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Completion::of(&[]).max, 0.0);
    }

    #[test]
    fn report_has_both_plots() {
        let dir = tempfile::tempdir().unwrap();
        let shoal = Outcome {
            node_completion_s: vec![1.0, 2.0, 3.0],
            registry_egress_bytes: 100,
            registry_egress_over_time: vec![(0.0, 0), (1.0, 100)],
            ..Default::default()
        }
        .finish(100, 1.0);
        let run = Run {
            mode: "sim",
            nodes: 3,
            image_bytes: 100,
            layers: 1,
            bandwidth_bytes_per_s: 100,
            lower_bound_s: 1.0,
            wall_s: 0.1,
            baselines: [("direct".to_owned(), shoal.clone())].into(),
            shoal,
            cross_check: None,
        };
        run.write_report(dir.path()).unwrap();
        let html = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
        assert_eq!(html.matches("<svg").count(), 2, "{html}");
        assert!(run.table().contains("| direct |"));
        assert!(!run.table().contains("On loopback"));
        let on_loopback = Run {
            mode: "loopback",
            ..run
        };
        assert!(
            on_loopback
                .table()
                .contains("1.00x the image with shoal, every node pulling directly 1.00x"),
            "{}",
            on_loopback.table()
        );
    }
}
