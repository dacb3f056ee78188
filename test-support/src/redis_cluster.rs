//! A Redis Cluster of the test's own: Debian's `redis-server` as 3 masters and 3 replicas on
//! free loopback ports, each with its own directory, joined by `redis-cli --cluster create`.
//! A test may kill a node (SIGKILL, as in a crash), watch its replica take over and start it
//! again, without touching the shared stack's Redis.
//!
//! In: nothing but the `redis-server` and `redis-cli` binaries. Out: seed URLs for a cluster
//! client, which master serves a hash tag, and kill/restart of single nodes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// How long a node may go unanswered before its replica is promoted. Short, so a failover
/// test is quick; long enough that a busy 2-core machine does not fail nodes over by itself.
const NODE_TIMEOUT_MS: u64 = 3000;

pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

struct Node {
    port: u16,
    /// The cluster bus port, chosen free like `port`: Redis's default (`port` + 10000) may be
    /// taken, or past 65535 for a high free port.
    bus: u16,
    child: Option<Child>,
}

/// `redis-cli -p port args...`, its output; panics when the tool cannot run.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli (Debian's redis-tools) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the node on `port` answers PING (it has started listening).
fn wait_answers(port: u16) {
    wait_until(&format!("redis node :{port} answers"), Duration::from_secs(20), || {
        cli(port, &["ping"]).trim() == "PONG"
    });
}

fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < deadline, "{what}: not true within {deadline:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl RedisCluster {
    /// A cluster of 6 nodes, planned and launched.
    pub fn start() -> Self {
        let mut cluster = Self::planned();
        cluster.launch();
        cluster
    }

    /// The cluster's ports and directory, with no node running yet: its [`Self::url`] is
    /// known before [`Self::launch`] starts it.
    pub fn planned() -> Self {
        let dir = std::env::temp_dir().join(format!("tollgate-redis-cluster-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        Self {
            dir,
            nodes: (0..6)
                .map(|_| Node {
                    port: free_port(),
                    bus: free_port(),
                    child: None,
                })
                .collect(),
        }
    }

    /// Starts the planned nodes and creates the cluster (3 masters, one replica each);
    /// returns once every node reports `cluster_state:ok` and every replica is in sync.
    pub fn launch(&mut self) {
        for i in 0..self.nodes.len() {
            self.spawn(i);
        }
        for node in &self.nodes {
            wait_answers(node.port);
        }
        let addrs: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create runs");
        assert!(
            created.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        self.wait_healthy();
        // A replica that has not finished its first sync cannot take over: a failover test
        // would wait for nothing.
        wait_until("3 replicas in sync with their masters", Duration::from_secs(60), || {
            let synced = self
                .nodes
                .iter()
                .filter(|n| cli(n.port, &["info", "replication"]).contains("master_link_status:up"))
                .count();
            synced == 3
        });
    }

    fn spawn(&mut self, i: usize) {
        let (port, bus) = (self.nodes[i].port, self.nodes[i].bus);
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).expect("node directory");
        let log = std::fs::File::create(dir.join("redis.log")).expect("node log");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
            .args(["--cluster-port", &bus.to_string()])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server) starts");
        self.nodes[i].child = Some(child);
    }

    /// Waits until every running node sees the cluster whole: all slots served.
    pub fn wait_healthy(&self) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let port = node.port;
            wait_until(
                &format!("redis node :{port} sees cluster_state:ok"),
                Duration::from_secs(60),
                || {
                    let info = cli(port, &["cluster", "info"]);
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                },
            );
        }
    }

    /// Seed URLs for a cluster client, comma-separated (the limiter's `redis_url`).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the master serving the slot of hash tag `tag` (the text inside braces), as
    /// a running node sees it.
    pub fn master_of(&self, tag: &str) -> u16 {
        self.serving(tag)
            .unwrap_or_else(|| panic!("no healthy master serves {{{tag}}}"))
    }

    /// The healthy master serving `tag`'s slot, if one does (none while a failover is under way).
    fn serving(&self, tag: &str) -> Option<u16> {
        let asking = self.running_port();
        let slot: u16 = cli(asking, &["cluster", "keyslot", tag])
            .trim()
            .parse()
            .expect("a slot");
        // `CLUSTER NODES` lines: id addr:port@bus flags master ping pong epoch state slots...
        for line in cli(asking, &["cluster", "nodes"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((a, b)) => a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b),
                None => range.parse::<u16>() == Ok(slot),
            });
            if serves {
                let port = fields[1].split('@').next().and_then(|a| a.rsplit(':').next());
                return port.and_then(|p| p.parse().ok());
            }
        }
        None
    }

    /// SIGKILL of the node on `port`: it dies as in a crash, with whatever it had not sent to
    /// its replica.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
        }
    }

    /// Starts the node on `port` again with its cluster file: it rejoins (as a replica when
    /// its replica took over).
    pub fn restart(&mut self, port: u16) {
        let i = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of this cluster");
        assert!(self.nodes[i].child.is_none(), "node :{port} is running");
        self.spawn(i);
        wait_answers(port);
    }

    /// Waits until a master other than `port` serves `tag` (the failover happened).
    pub fn wait_failover(&self, tag: &str, port: u16) -> u16 {
        let start = Instant::now();
        loop {
            match self.serving(tag) {
                Some(promoted) if promoted != port => return promoted,
                _ => {}
            }
            let asking = self.running_port();
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no replica took over {{{tag}}} from :{port} within 60 s; the cluster as :{asking} sees it:\n{}\n{}",
                cli(asking, &["cluster", "nodes"]),
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A node that is running, to ask about the cluster.
    fn running_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a running node")
            .port
    }

    /// The last lines of every running node's log, for a failure message.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let log =
                std::fs::read_to_string(self.dir.join(node.port.to_string()).join("redis.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!(
                ":{}\n{}\n",
                node.port,
                lines[lines.len().saturating_sub(8)..].join("\n")
            ));
        }
        out
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
