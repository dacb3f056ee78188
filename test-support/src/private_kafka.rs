//! A Kafka broker of the test's own: the real broker from the native stack's jars, on free
//! loopback ports with its own data directory, that a test may kill and restart without
//! disturbing the shared stack or other tests.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::free_port;

pub struct PrivateKafka {
    pub brokers: String,
    dir: PathBuf,
    child: Option<Child>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn libs() -> PathBuf {
    let stack = std::env::var("TOLLGATE_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join(".stack"));
    let libs = stack.join("kafka").join("libs");
    assert!(
        libs.is_dir(),
        "no Kafka jars at {}: {}",
        libs.display(),
        crate::START_HINT
    );
    libs
}

fn java(log4j: &str) -> Command {
    let java = std::env::var("JAVA_HOME")
        .map(|h| format!("{h}/bin/java"))
        .unwrap_or_else(|_| "java".to_owned());
    let mut command = Command::new(java);
    command
        .arg("-Xmx384m")
        .arg("-XX:TieredStopAtLevel=1")
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            repo().join("scripts/kafka").join(log4j).display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", libs().display()));
    command
}

impl PrivateKafka {
    /// Formats and starts a one-node KRaft broker; returns once it answers metadata requests.
    pub fn start() -> Self {
        let (port, controller) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(crate::unique("tollgate-kafka"));
        std::fs::create_dir_all(dir.join("data")).expect("data dir");
        let template =
            std::fs::read_to_string(repo().join("scripts/kafka/server.properties.in")).expect("broker template");
        let properties = template
            .replace("@BROKER_PORT@", &port.to_string())
            .replace("@CONTROLLER_PORT@", &controller.to_string())
            .replace("@DATA_DIR@", &dir.join("data").display().to_string());
        std::fs::write(dir.join("server.properties"), properties).expect("write properties");
        let cluster = java("tools-log4j2.xml")
            .args(["kafka.tools.StorageTool", "random-uuid"])
            .output()
            .expect("run java");
        let cluster = String::from_utf8_lossy(&cluster.stdout).trim().to_owned();
        let formatted = java("tools-log4j2.xml")
            .args([
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "--cluster-id",
                &cluster,
                "--config",
            ])
            .arg(dir.join("server.properties"))
            .stdout(Stdio::null())
            .status()
            .expect("format storage");
        assert!(formatted.success(), "formatting the private broker's storage failed");
        let mut kafka = Self {
            brokers: format!("127.0.0.1:{port}"),
            dir,
            child: None,
        };
        kafka.restart();
        kafka
    }

    /// Starts the broker again on the same data (after [`PrivateKafka::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let log = std::fs::File::create(self.dir.join("broker.log")).expect("log file");
        let child = java("log4j2.xml")
            .arg(format!("-Dkafka.logs.dir={}", self.dir.display()))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start broker");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "private broker not ready in 90 s; see {}",
                self.dir.join("broker.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL: the broker dies as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn answers(&self) -> bool {
        if TcpStream::connect_timeout(&self.brokers.parse().expect("addr"), Duration::from_millis(200)).is_err() {
            return false;
        }
        let consumer: BaseConsumer = match ClientConfig::new().set("bootstrap.servers", &self.brokers).create() {
            Ok(c) => c,
            Err(_) => return false,
        };
        consumer
            .fetch_metadata(None, Duration::from_secs(2))
            .is_ok_and(|m| !m.brokers().is_empty())
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
