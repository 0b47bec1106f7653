//! The flow-level network model of `shoal sim`.
//!
//! Every host (node, seed, registry) has an upload and a download capacity in bytes per
//! second. A flow moves a number of bytes from one host to another. Time advances in
//! steps; in each step the flows' rates are set by progressive filling toward max-min
//! fairness: every flow gets the fair share of the tighter of its two ends, then what is
//! left at hosts whose flows were held back elsewhere is shared again among the flows
//! that can still grow ([`FILL_ROUNDS`] rounds; the first alone would leave capacity
//! unused wherever the two ends of a host's flows are unevenly loaded).
//!
//! Traffic that is not a flow (a supernode's answers) can hold part of a host's upload
//! for a step ([`Net::hold`]); the flows share what is left.

/// A host in the model.
pub type Host = u32;

/// Rounds of progressive filling per step.
pub const FILL_ROUNDS: usize = 3;

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
    /// Bytes the flow's rate would still have moved in the step it finished in (0 for a
    /// flow cut short): a stream that goes on with the next piece, such as a registry
    /// response, has sent that much of it by the end of the step.
    pub spare: f64,
}

#[derive(Debug)]
pub struct Net<T> {
    up: Vec<f64>,
    down: Vec<f64>,
    out: Vec<u32>,
    inc: Vec<u32>,
    flows: Vec<Flow<T>>,
    /// Upload held for the next step by traffic outside the flows: (host, bytes per second).
    held: Vec<(Host, f64)>,
    // Scratch space of `rates`, kept between steps.
    rate: Vec<f64>,
    grow: Vec<f64>,
    open: Vec<u32>,
    rem_up: Vec<f64>,
    rem_down: Vec<f64>,
    n_up: Vec<u32>,
    n_down: Vec<u32>,
}

impl<T: Copy> Net<T> {
    /// A network of hosts with these (upload, download) capacities.
    pub fn new(caps: impl IntoIterator<Item = (f64, f64)>) -> Self {
        let (up, down): (Vec<f64>, Vec<f64>) = caps.into_iter().unzip();
        let n = up.len();
        let rem_up = up.clone();
        Self {
            up,
            down,
            out: vec![0; n],
            inc: vec![0; n],
            flows: Vec::new(),
            held: Vec::new(),
            rate: Vec::new(),
            grow: Vec::new(),
            open: Vec::new(),
            rem_up,
            rem_down: vec![0.0; n],
            n_up: vec![0; n],
            n_down: vec![0; n],
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

    /// Bytes per second `host` sent in the last step.
    pub fn sending(&self, host: Host) -> f64 {
        self.up[host as usize] - self.rem_up[host as usize]
    }

    /// Holds `rate` bytes per second of `host`'s upload (at most all of it) for the next
    /// step: the flows from `host` share what is left.
    pub fn hold(&mut self, host: Host, rate: f64) {
        self.held
            .push((host, rate.clamp(0.0, self.up[host as usize])));
    }

    /// `host`'s upload capacity in bytes per second.
    pub fn upload(&self, host: Host) -> f64 {
        self.up[host as usize]
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
            spare: 0.0,
        }
    }

    /// Sets every flow's rate (bytes per second) by progressive filling.
    fn rates(&mut self) {
        let n = self.flows.len();
        self.rate.clear();
        self.rate.resize(n, 0.0);
        // The flows that can still grow, in order (after the first round, about a fifth).
        self.open.clear();
        self.open.extend(0..n as u32);
        self.rem_up.copy_from_slice(&self.up);
        for (host, rate) in self.held.drain(..) {
            self.rem_up[host as usize] -= rate;
        }
        self.rem_down.copy_from_slice(&self.down);
        self.n_up.copy_from_slice(&self.out);
        self.n_down.copy_from_slice(&self.inc);
        for round in 0..FILL_ROUNDS {
            let mut any = false;
            self.grow.clear();
            for &i in &self.open {
                let f = &self.flows[i as usize];
                let (from, to) = (f.from as usize, f.to as usize);
                let g = (self.rem_up[from] / f64::from(self.n_up[from]))
                    .min(self.rem_down[to] / f64::from(self.n_down[to]));
                self.grow.push(g);
                any |= g > 0.0;
            }
            if !any {
                break;
            }
            for (&i, &g) in self.open.iter().zip(&self.grow) {
                if g > 0.0 {
                    let f = &self.flows[i as usize];
                    self.rate[i as usize] += g;
                    self.rem_up[f.from as usize] -= g;
                    self.rem_down[f.to as usize] -= g;
                }
            }
            if round + 1 == FILL_ROUNDS {
                break;
            }
            // A flow stays open while both of its ends have capacity left; the open flows
            // share what is left in the next round.
            self.n_up.fill(0);
            self.n_down.fill(0);
            let (flows, up, down) = (&self.flows, &self.up, &self.down);
            let (rem_up, rem_down) = (&self.rem_up, &self.rem_down);
            let (n_up, n_down) = (&mut self.n_up, &mut self.n_down);
            self.open.retain(|&i| {
                let f = &flows[i as usize];
                let (from, to) = (f.from as usize, f.to as usize);
                let open =
                    rem_up[from] > 1e-9 * up[from] && rem_down[to] > 1e-9 * down[to].min(1e18);
                if open {
                    n_up[from] += 1;
                    n_down[to] += 1;
                }
                open
            });
        }
    }

    /// Advances `dt` seconds; pushes finished flows to `done` and returns the bytes moved
    /// out of host `watch`.
    pub fn step(&mut self, dt: f64, watch: Host, done: &mut Vec<Done<T>>) -> f64 {
        self.rates();
        let mut watched = 0.0;
        // What each flow's rate could have moved beyond what it had left (kept in `grow`,
        // index for index with `flows` while finished flows are taken out).
        self.grow.clear();
        for (f, rate) in self.flows.iter_mut().zip(&self.rate) {
            let moved = (rate * dt).min(f.left);
            f.left -= moved;
            self.grow.push(rate * dt - moved);
            if f.from == watch {
                watched += moved;
            }
        }
        let mut i = 0;
        while i < self.flows.len() {
            if self.flows[i].left <= 1e-3 {
                let mut d = self.remove(i);
                d.spare = self.grow.swap_remove(i);
                done.push(d);
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
    fn capacity_held_back_at_one_end_goes_to_the_other_flows() {
        // Host 0 uploads to 1 and 2; host 1 also downloads from 3. Host 1's download
        // (100) is shared: 50 from 0, 50 from 3. Host 0 has 50 left, which goes to 2.
        let mut net = Net::new([(100.0, 100.0); 4]);
        net.start(0, 1, 1000, 1);
        net.start(0, 2, 1000, 2);
        net.start(3, 1, 1000, 3);
        net.rates();
        assert_eq!(net.rate, vec![50.0, 50.0, 50.0], "first round: fair shares");
        let mut net = Net::new([
            (100.0, 100.0),
            (100.0, 60.0),
            (100.0, 100.0),
            (100.0, 100.0),
        ]);
        net.start(0, 1, 1000, 1);
        net.start(0, 2, 1000, 2);
        net.start(3, 1, 1000, 3);
        net.rates();
        // Host 1 takes 30 + 30; host 0's remaining 70 goes to the flow into 2.
        assert!((net.rate[0] - 30.0).abs() < 1e-6, "{:?}", net.rate);
        assert!((net.rate[1] - 70.0).abs() < 1e-6, "{:?}", net.rate);
        assert!((net.rate[2] - 30.0).abs() < 1e-6, "{:?}", net.rate);
    }

    #[test]
    fn a_flow_that_ends_inside_a_step_tells_what_its_rate_had_left() {
        // 100 bytes at 100 bytes a second in steps of 0.3 s: 90 bytes in three steps, the
        // last 10 in the fourth, which had room for 30.
        let mut net = Net::new([(100.0, 100.0); 2]);
        net.start(0, 1, 100, 7);
        let mut done = Vec::new();
        for _ in 0..3 {
            net.step(0.3, 0, &mut done);
        }
        assert!(done.is_empty());
        let moved = net.step(0.3, 0, &mut done);
        assert!((moved - 10.0).abs() < 1e-6, "{moved}");
        assert_eq!(done.len(), 1);
        assert!((done[0].spare - 20.0).abs() < 1e-6, "{done:?}");
        // A flow cut short has nothing left over.
        net.start(0, 1, 100, 8);
        net.step(0.3, 0, &mut done);
        assert_eq!(net.cut(1)[0].spare, 0.0);
    }

    #[test]
    fn held_upload_is_taken_from_the_flows_for_one_step() {
        let mut net = Net::new([(100.0, 100.0); 3]);
        net.start(0, 1, 1000, 1);
        net.start(0, 2, 1000, 2);
        net.hold(0, 60.0);
        net.rates();
        assert_eq!(
            net.rate,
            vec![20.0, 20.0],
            "the flows share what is not held"
        );
        assert_eq!(net.sending(0), 100.0, "held traffic is sent too");
        net.rates();
        assert_eq!(net.rate, vec![50.0, 50.0], "a hold lasts one step");
        net.hold(0, 500.0);
        net.rates();
        assert_eq!(net.rate, vec![0.0, 0.0], "at most the whole upload is held");
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
