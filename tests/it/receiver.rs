//! A local webhook endpoint that records what it receives and answers as scripted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// How to answer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// A status with this body.
    StatusBody(u16, &'static [u8]),
    /// Never answer (the sender must cut it at its timeout).
    Hang,
    /// Hold the request unanswered until [`Receiver::release_held`], then answer 200.
    Hold,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Answers for the next requests, in order; then `default`.
    script: Vec<Reply>,
    default: Option<Reply>,
    /// Requests received and not answered yet, and the most there ever were at once.
    open: usize,
    max_open: usize,
    /// The requests being held ([`Reply::Hold`]).
    held: Vec<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_on("127.0.0.1:0").await
    }

    /// Listens on a given address (to bring an endpoint "back up" on the same port).
    pub async fn start_on(addr: &str) -> Receiver {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut r = BufReader::new(r);
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let mut headers = HashMap::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    let len: usize = headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let (reply, release) = {
                        let mut s = st.lock().unwrap();
                        s.received.push(Received {
                            path,
                            headers,
                            body,
                            at: Instant::now(),
                        });
                        s.open += 1;
                        s.max_open = s.max_open.max(s.open);
                        let reply = if s.script.is_empty() {
                            s.default.unwrap_or(Reply::Status(200))
                        } else {
                            s.script.remove(0)
                        };
                        let release = (reply == Reply::Hold).then(|| {
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            s.held.push(tx);
                            rx
                        });
                        (reply, release)
                    };
                    if let Some(release) = release {
                        let _ = release.await;
                    }
                    if reply != Reply::Hang {
                        // Counted as answered before the answer leaves, so a client can never
                        // see its answer while the request still counts as open.
                        st.lock().unwrap().open -= 1;
                    }
                    match reply {
                        Reply::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
                        Reply::Hold => {
                            let _ = w
                                .write_all(
                                    b"HTTP/1.1 200 X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                                )
                                .await;
                        }
                        Reply::Status(code) => {
                            let resp = format!(
                                "HTTP/1.1 {code} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                            );
                            let _ = w.write_all(resp.as_bytes()).await;
                        }
                        Reply::StatusBody(code, body) => {
                            let head = format!(
                                "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = w.write_all(head.as_bytes()).await;
                            let _ = w.write_all(body).await;
                        }
                    }
                });
            }
        });
        Receiver { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers the next requests with these replies, in order.
    pub fn script(&self, replies: &[Reply]) {
        self.state.lock().unwrap().script.extend_from_slice(replies);
    }

    pub fn set_default(&self, reply: Reply) {
        self.state.lock().unwrap().default = Some(reply);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Answers (200) every request held so far.
    pub fn release_held(&self) {
        for tx in self.state.lock().unwrap().held.drain(..) {
            let _ = tx.send(());
        }
    }

    /// The most requests that were ever open (received, not answered) at once.
    pub fn max_open(&self) -> usize {
        self.state.lock().unwrap().max_open
    }
}
