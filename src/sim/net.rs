//! The flow-level network model of `shoal sim`.
//!
//! Every host (node, seed, registry) has an upload and a download capacity in bytes per
//! second. A flow moves a number of bytes from one host to another. Time advances in
//! steps; during a step each flow runs at `min(upload / flows out of the sender, download
//! / flows into the receiver)`, the fair share at each end. Capacity a flow cannot use at
//! its tighter end is not handed to the others (a known simplification: it makes the model
//! slightly pessimistic when ends are unevenly loaded).

/// A host in the model.
pub type Host = u32;

#[derive(Debug)]
struct Flow<T> {
    from: Host,
    to: Host,
    left: f64,
    tag: T,
}

/// A finished flow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Done<T> {
    pub from: Host,
    pub to: Host,
    pub tag: T,
}

#[derive(Debug)]
pub struct Net<T> {
    up: Vec<f64>,
    down: Vec<f64>,
    out: Vec<u32>,
    inc: Vec<u32>,
    flows: Vec<Flow<T>>,
}

impl<T: Copy> Net<T> {
    /// A network of hosts with these (upload, download) capacities.
    pub fn new(caps: impl IntoIterator<Item = (f64, f64)>) -> Self {
        let (up, down): (Vec<f64>, Vec<f64>) = caps.into_iter().unzip();
        let n = up.len();
        Self {
            up,
            down,
            out: vec![0; n],
            inc: vec![0; n],
            flows: Vec::new(),
        }
    }

    pub fn start(&mut self, from: Host, to: Host, bytes: u64, tag: T) {
        self.out[from as usize] += 1;
        self.inc[to as usize] += 1;
        self.flows.push(Flow {
            from,
            to,
            left: bytes as f64,
            tag,
        });
    }

    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    pub fn is_idle(&self) -> bool {
        self.flows.is_empty()
    }

    /// Ends every flow from or to `host` (it left); returns them.
    pub fn cut(&mut self, host: Host) -> Vec<Done<T>> {
        let mut cut = Vec::new();
        let mut i = 0;
        while i < self.flows.len() {
            let f = &self.flows[i];
            if f.from == host || f.to == host {
                cut.push(self.remove(i));
            } else {
                i += 1;
            }
        }
        cut
    }

    fn remove(&mut self, i: usize) -> Done<T> {
        let f = self.flows.swap_remove(i);
        self.out[f.from as usize] -= 1;
        self.inc[f.to as usize] -= 1;
        Done {
            from: f.from,
            to: f.to,
            tag: f.tag,
        }
    }

    /// Advances `dt` seconds; pushes finished flows to `done` and returns the bytes moved
    /// out of each host in `watch` (summed).
    pub fn step(&mut self, dt: f64, watch: Host, done: &mut Vec<Done<T>>) -> f64 {
        let mut watched = 0.0;
        for f in &mut self.flows {
            let (from, to) = (f.from as usize, f.to as usize);
            let rate =
                (self.up[from] / self.out[from] as f64).min(self.down[to] / self.inc[to] as f64);
            let moved = (rate * dt).min(f.left);
            f.left -= moved;
            if f.from == watch {
                watched += moved;
            }
        }
        let mut i = 0;
        while i < self.flows.len() {
            if self.flows[i].left <= 1e-3 {
                done.push(self.remove(i));
            } else {
                i += 1;
            }
        }
        watched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(net: &mut Net<u32>, dt: f64) -> Vec<(f64, u32)> {
        let mut t = 0.0;
        let mut finished = Vec::new();
        let mut done = Vec::new();
        while !net.is_idle() && t < 1e4 {
            net.step(dt, u32::MAX, &mut done);
            t += dt;
            finished.extend(done.drain(..).map(|d| (t, d.tag)));
        }
        finished
    }

    #[test]
    fn one_flow_runs_at_the_tighter_end() {
        let mut net = Net::new([(100.0, 100.0), (100.0, 50.0)]);
        net.start(0, 1, 100, 7);
        let done = run(&mut net, 0.01);
        assert_eq!(done.len(), 1);
        assert!((done[0].0 - 2.0).abs() < 0.02, "{done:?}");
    }

    #[test]
    fn flows_share_an_upload_fairly() {
        // One sender, four receivers: each gets a quarter of the upload.
        let mut net = Net::new([(100.0, 100.0); 5]);
        for to in 1..5 {
            net.start(0, to, 100, to);
        }
        let done = run(&mut net, 0.01);
        assert_eq!(done.len(), 4);
        assert!(done.iter().all(|(t, _)| (t - 4.0).abs() < 0.02), "{done:?}");
    }

    #[test]
    fn a_host_that_leaves_cuts_its_flows() {
        let mut net = Net::new([(100.0, 100.0); 3]);
        net.start(0, 1, 100, 1);
        net.start(2, 1, 100, 2);
        let cut = net.cut(0);
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].tag, 1);
        // The remaining flow now has the receiver's download to itself.
        let done = run(&mut net, 0.01);
        assert!((done[0].0 - 1.0).abs() < 0.02, "{done:?}");
    }
}
