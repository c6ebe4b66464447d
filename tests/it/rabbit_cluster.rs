//! A RabbitMQ cluster of the test's own: `rabbitmq-server` processes on free loopback ports, with
//! their own data directories, a fresh Erlang cookie and a private epmd, joined with
//! `join_cluster`. It never touches the machine's broker (`rabbit@localhost` on 5672, epmd on
//! 4369); see ../shared/RABBITMQ-CLUSTER.md for what had to be bypassed and why:
//!
//! - `RABBITMQ_CONF_ENV_FILE` names a file that does not exist (the system one sets NODENAME),
//! - each node has its own `RABBITMQ_CONFIG_FILE` (the system one binds 5672),
//! - the scripts in /usr/lib/rabbitmq/bin are called directly (the /usr/sbin wrappers switch to
//!   the rabbitmq user),
//! - `HOME` is the cluster's directory (so the cookie is its own) and `ERL_EPMD_PORT` a free port
//!   (an epmd of its own, which the system's never sees).
//!
//! Every process is a child of the test: `Drop` kills the nodes and epmd (also when the test
//! panics) and removes the directory, keeping the node logs of a failed run. Should the test
//! process itself be killed, `setpriv --pdeathsig KILL` takes the nodes and epmd with it; it fires
//! when the *thread* that spawned them ends, so nodes are started only from the test's own thread
//! (never from `spawn_blocking`).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::helpers::{eventually, free_port};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// Erlang's net tick time of the test's nodes, in seconds: a node that stops answering (hung,
/// not dead) is given up by the others after about this long (RabbitMQ's default, 60 s, means a
/// 70 s stall of every queue it leads). The relay's `amqp.confirm_timeout` must stay below it.
pub const NET_TICKTIME_SECS: u64 = 10;

pub struct Node {
    pub name: String,
    pub amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// SIGSTOPped: it would not answer a command either.
    hung: bool,
}

pub struct Cluster {
    dir: PathBuf,
    epmd_port: u16,
    epmd: Child,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `size` nodes at once and joins the others to the first. Blocks (tens of seconds).
    pub fn start(size: usize) -> Cluster {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let dir = std::env::temp_dir().join(format!("async-pay-cluster-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        // The Erlang cookie: $HOME/.erlang.cookie, readable by its owner only.
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();

        let epmd_port = free_port();
        let epmd = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "epmd", "-address", "127.0.0.1"])
            .args(["-port", &epmd_port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmd (erlang-base) and setpriv (util-linux) are installed");
        let mut cluster = Cluster {
            dir,
            epmd_port,
            epmd,
            nodes: Vec::new(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", epmd_port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "epmd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        for n in 1..=size {
            let node_dir = cluster.dir.join(format!("n{n}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let amqp_port = free_port();
            std::fs::write(
                node_dir.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.local = 127.0.0.1:{amqp_port}\n\
                     net_ticktime = {NET_TICKTIME_SECS}\n\
                     # A node that was hung (SIGSTOP) comes back as a partition; autoheal restarts\n\
                     # the losing side. (`ignore`, the default, leaves the cluster split.)\n\
                     cluster_partition_handling = autoheal\n"
                ),
            )
            .unwrap();
            std::fs::write(node_dir.join("advanced.config"), "[].\n").unwrap();
            cluster.nodes.push(Node {
                name: format!("ap{tag}n{n}@localhost"),
                amqp_port,
                dist_port: free_port(),
                dir: node_dir,
                child: None,
                hung: false,
            });
        }
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_booted(i);
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..size {
            cluster.ctl(i, &["stop_app"]);
            cluster.ctl(i, &["join_cluster", &first]);
            cluster.ctl(i, &["start_app"]);
        }
        cluster
    }

    /// The AMQP URL of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", n.amqp_port))
            .collect()
    }

    /// The environment every RabbitMQ command of this cluster runs with, and nothing else.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("HOME", &self.dir)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("no-such-file"))
            .stdin(Stdio::null());
        c
    }

    /// Starts node `i` (again). Its PID is the Erlang VM's: RUNNING_UNDER_SYSTEMD makes the
    /// script `exec` the VM instead of supervising it from a shell (the official image does the
    /// same).
    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let log = std::fs::File::create(node.dir.join("stdout.log")).unwrap();
        let mut c = self.command("setpriv");
        c.args(["--pdeathsig", "KILL", SERVER])
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                node.dir.join("advanced.config"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", node.dir.join("pid"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.nodes[i].child = Some(c.spawn().unwrap());
    }

    /// Waits until node `i` runs RabbitMQ (about 5 s a node here).
    fn wait_booted(&mut self, i: usize) {
        let pid = self.pid(i).to_string();
        self.ctl(i, &["wait", "--pid", &pid, "--timeout", "120"]);
    }

    fn pid(&self, i: usize) -> u32 {
        self.nodes[i].child.as_ref().expect("the node runs").id()
    }

    /// `rabbitmqctl -n <node i> ARGS`; panics unless it exits 0.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        let out = self.try_ctl(i, args);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {} failed: {}{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `rabbitmqctl -n <node i> ARGS`, killed if it takes more than 150 s (`wait` takes up to
    /// 120 s; everything else a second or two).
    fn try_ctl(&self, i: usize, args: &[&str]) -> Output {
        self.command("timeout")
            .args(["-k", "5", "150", CTL, "-q", "-n", &self.nodes[i].name])
            .args(args)
            .output()
            .unwrap()
    }

    /// Asks the first node that runs and answers (a restarted one may not yet).
    fn query(&self, args: &[&str]) -> Option<String> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].child.is_some() && !self.nodes[*i].hung)
            .map(|i| self.try_ctl(i, args))
            .find(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `list_queues` with `columns`: the other columns of `queue`'s line.
    fn queue_info(&self, queue: &str, columns: &[&str]) -> Option<Vec<String>> {
        let mut args = vec!["list_queues", "--no-table-headers", "name"];
        args.extend(columns);
        let out = self.query(&args)?;
        let line = out.lines().find(|l| l.split('\t').next() == Some(queue))?;
        Some(line.split('\t').skip(1).map(str::to_string).collect())
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name.trim())
    }

    /// The node that leads `queue` (a quorum queue).
    pub fn leader(&self, queue: &str) -> Option<usize> {
        self.index_of(&self.queue_info(queue, &["leader"])?[0])
    }

    /// The nodes `queue` has a replica on, and those of them online.
    pub fn replicas(&self, queue: &str) -> Option<(Vec<usize>, Vec<usize>)> {
        let info = self.queue_info(queue, &["members", "online"])?;
        let nodes = |field: &str| -> Vec<usize> {
            field
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter_map(|s| self.index_of(s))
                .collect()
        };
        Some((nodes(&info[0]), nodes(&info[1])))
    }

    /// Messages in `queue`.
    pub fn depth(&self, queue: &str) -> Option<u64> {
        self.queue_info(queue, &["messages"])?[0]
            .trim()
            .parse()
            .ok()
    }

    /// How many AMQP connections whose properties mention `text` (`async-pay consume`) each node
    /// holds.
    pub fn connections(&self, text: &str) -> Option<Vec<usize>> {
        let out = self.query(&[
            "list_connections",
            "--no-table-headers",
            "port",
            "client_properties",
        ])?;
        let mut per_node = vec![0; self.nodes.len()];
        for line in out.lines().filter(|l| l.contains(text)) {
            let port: Option<u16> = line.split('\t').next().and_then(|p| p.trim().parse().ok());
            if let Some(i) = self.nodes.iter().position(|n| Some(n.amqp_port) == port) {
                per_node[i] += 1;
            }
        }
        Some(per_node)
    }

    /// SIGKILL: the node dies at once, mid-whatever.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed node again and waits until it runs (it rejoins the cluster by itself).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_booted(i);
    }

    /// SIGSTOP (`false`) or SIGCONT (`true`): a hung node keeps its sockets open and says nothing.
    pub fn set_running(&mut self, i: usize, running: bool) {
        self.nodes[i].hung = !running;
        let signal = if running { "-CONT" } else { "-STOP" };
        let ok = Command::new("kill")
            .args([signal, &self.pid(i).to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {}", self.nodes[i].name);
    }

    /// Waits until every node runs and sees all the others, there is no partition, and every
    /// one of `queues` has a replica online on every node.
    pub async fn wait_whole(&self, queues: &[&str], limit: Duration) {
        let n = self.nodes.len();
        eventually(limit, "the cluster to be whole again", || async {
            let nodes_whole = (0..n).all(|i| {
                let out = self.try_ctl(i, &["cluster_status", "--formatter", "json"]);
                let status: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                out.status.success()
                    && status["running_nodes"].as_array().map(Vec::len) == Some(n)
                    && status["partitions"]
                        .as_object()
                        .is_none_or(serde_json::Map::is_empty)
            });
            let queues_whole = queues.iter().all(|q| {
                self.replicas(q)
                    .is_some_and(|(_, online)| online.len() == n)
            });
            (nodes_whole && queues_whole).then_some(())
        })
        .await;
    }
}

impl Drop for Cluster {
    /// Kills every node and epmd; removes the directory, but keeps the node logs of a failed run.
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
        let _ = self.epmd.kill();
        let _ = self.epmd.wait();
        if std::thread::panicking() {
            for node in &self.nodes {
                let _ = std::fs::remove_dir_all(node.dir.join("mnesia"));
            }
            eprintln!("logs of the RabbitMQ nodes: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
