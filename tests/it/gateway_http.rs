//! The HTTP gateway connector's transport, against real local HTTP servers that answer byte for
//! byte as each test scripts them ([`Server`]): what a hand-written or newly wired HTTP client
//! could get wrong. Chunked bodies, an answer over the body limit, connections the server closes
//! between calls, a connection that dies while a charge is being sent (unknown, never sent
//! twice), a server that never answers, connection refused, https with a certificate we do not
//! trust and with one we do. `gateway.rs` runs the whole pipeline against a full provider.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_pay::config::{GatewayKind, GatewaySettings, Secret, Settings};
use async_pay::domain::Currency;
use async_pay::gateway::http::HttpGateway;
use async_pay::gateway::{Answer, ChargeRequest, Gateway};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

use crate::helpers::eventually;

/// What the server does with one request (the n-th request it reads, over all connections).
#[derive(Clone)]
enum Reply {
    /// Writes this answer (in a few pieces) and reads the next request on the connection.
    Send(Vec<u8>),
    /// Writes this answer, then closes the connection (FIN) and waits for the client to close its
    /// end ([`Server::closed_by_both`] counts it).
    SendThenClose(Vec<u8>),
    /// Writes this (nothing, or part of an answer) and then never another byte, holding the
    /// connection open.
    SendThenHang(Vec<u8>),
    /// Resets the connection (RST) after reading the request's head, before its body.
    Reset,
}

/// A request as the server read it.
#[derive(Debug, Clone)]
struct Seen {
    connection: usize,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    connections: usize,
    closed_by_both: usize,
}

/// What the server answers the n-th request (counted from 0 over all connections), read up to
/// its head.
type Script = Arc<dyn Fn(usize, &Seen) -> Reply + Send + Sync>;

/// A local HTTP/1.1 server (https with a TLS acceptor), answering as scripted. Stops with the
/// test's runtime.
struct Server {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Server {
    /// Answers the n-th request with `replies[n]`, and every later one with the last.
    async fn start(replies: Vec<Reply>) -> Server {
        Self::start_with(in_order(replies), None).await
    }

    async fn start_with(script: Script, tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tcp.set_nodelay(true).unwrap();
                let connection = {
                    let mut s = st.lock().unwrap();
                    s.connections += 1;
                    s.connections - 1
                };
                let (st, script, tls) = (st.clone(), script.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve(tcp, connection, &st, &script).await,
                        // A handshake the client refuses ends here, before any request.
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve(stream, connection, &st, &script).await;
                            }
                        }
                    }
                });
            }
        });
        Server { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    fn closed_by_both(&self) -> usize {
        self.state.lock().unwrap().closed_by_both
    }
}

/// A connection the server can reset.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&self) -> &TcpStream;
}

impl Connection for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Connection for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

fn in_order(replies: Vec<Reply>) -> Script {
    Arc::new(move |n, _| replies[n.min(replies.len() - 1)].clone())
}

async fn serve(
    mut conn: impl Connection,
    connection: usize,
    state: &Mutex<State>,
    script: &Script,
) {
    let mut buf = Vec::new();
    loop {
        // The head.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let (method, path) = (
            first.next().unwrap_or_default().to_string(),
            first.next().unwrap_or_default().to_string(),
        );
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut seen = Seen {
            connection,
            method,
            path,
            headers,
            body: Vec::new(),
        };
        let n = state.lock().unwrap().seen.len();
        let reply = script(n, &seen);
        if let Reply::Reset = reply {
            state.lock().unwrap().seen.push(seen);
            conn.tcp().set_zero_linger().unwrap();
            return;
        }
        // The body (the client sends Content-Length bodies only).
        let length: usize = seen
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        seen.body = buf.drain(..length).collect();
        state.lock().unwrap().seen.push(seen);
        match reply {
            Reply::Send(answer) => {
                // In pieces, so that the client sees an answer arrive in several reads.
                for piece in answer.chunks(answer.len().div_ceil(3).max(1)) {
                    if conn.write_all(piece).await.is_err() || conn.flush().await.is_err() {
                        return;
                    }
                }
            }
            Reply::SendThenClose(answer) => {
                let _ = conn.write_all(&answer).await;
                let _ = conn.shutdown().await;
                // The client closing its end: it read our close and dropped the connection.
                let mut rest = Vec::new();
                let _ = conn.read_to_end(&mut rest).await;
                state.lock().unwrap().closed_by_both += 1;
                return;
            }
            Reply::SendThenHang(bytes) => {
                let _ = conn.write_all(&bytes).await;
                let _ = conn.flush().await;
                std::future::pending::<()>().await;
            }
            Reply::Reset => unreachable!(),
        }
    }
}

/// An answer with a Content-Length body.
fn answer(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} Scripted\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An answer with a chunked body, these parts as its chunks (with an extension), and a trailer.
fn chunked(status: u16, parts: &[&str]) -> Vec<u8> {
    let mut s = format!(
        "HTTP/1.1 {status} Scripted\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    for p in parts {
        s.push_str(&format!("{:x};piece=1\r\n{p}\r\n", p.len()));
    }
    s.push_str("0\r\nx-checksum: none\r\n\r\n");
    s.into_bytes()
}

fn succeeded(charge_id: &str) -> String {
    format!(r#"{{"status": "succeeded", "charge_id": "{charge_id}"}}"#)
}

fn settings(url: &str, timeout: Duration) -> GatewaySettings {
    let mut g = Settings::load_from(None, Vec::new()).unwrap().gateway;
    g.kind = GatewayKind::Http;
    g.url = url.to_string();
    g.timeout = timeout;
    g.api_key = Secret::new("test-key");
    g
}

fn gateway(url: &str) -> HttpGateway {
    HttpGateway::new(&settings(url, Duration::from_secs(10))).unwrap()
}

fn charge_request() -> ChargeRequest {
    let id = Uuid::now_v7();
    ChargeRequest {
        payment_id: id,
        merchant: "shop-1".into(),
        amount: rust_decimal::Decimal::new(10050, 2),
        currency: Currency::Rub,
        description: None,
        metadata: serde_json::json!({"order": "1"}),
        idempotency_key: ChargeRequest::key_for(id),
    }
}

/// A call must end by itself (the connector bounds it with gateway.timeout); this only keeps a
/// broken connector from hanging the test run.
async fn ends<T>(call: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the call did not end: it is not bounded by gateway.timeout")
}

fn assert_unknown(a: &Answer, what: &str) -> String {
    match a {
        Answer::Unknown { reason } => reason.clone(),
        other => panic!("{what}: expected an unknown outcome, got {other:?}"),
    }
}

/// Connections are kept alive and reused. One goes back to the pool a moment after its answer
/// was read (hyper-util's idle task), so a call made at once may still open another: this asks
/// (a few ms apart) until a call goes out on a connection used before, and returns its answer.
async fn until_a_call_reuses_a_connection(
    server: &Server,
    call: impl AsyncFn() -> Answer,
) -> Answer {
    eventually(
        Duration::from_secs(10),
        "a call on a kept-alive connection",
        || async {
            let before = server.connections();
            let a = ends(call()).await;
            (server.connections() == before).then_some(a)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_answers_are_read_and_the_connection_is_kept_alive() {
    let declined = [
        r#"{"status": "declined", "decline_code": "insufficient_funds", "#,
        r#""message": "Not enough"}"#,
    ];
    let server = Server::start(vec![
        Reply::Send(chunked(
            200,
            &[
                r#"{"status": "succ"#,
                r#"eeded", "charge_id""#,
                r#": "ch_1"}"#,
            ],
        )),
        Reply::Send(chunked(200, &declined)),
    ])
    .await;
    let g = gateway(&server.url());
    let r = charge_request();
    let a = ends(g.charge(&r)).await;
    assert_eq!(
        a,
        Answer::Succeeded {
            charge_id: "ch_1".into()
        }
    );
    let want = Answer::Declined {
        code: "insufficient_funds".into(),
        message: "Not enough".into(),
    };
    assert_eq!(ends(g.status(r.payment_id)).await, want);
    // A chunked answer leaves the connection ready for the next one: read to its very end.
    let a = until_a_call_reuses_a_connection(&server, async || g.status(r.payment_id).await).await;
    assert_eq!(a, want);
    // The contract's requests.
    let seen = server.seen();
    let post = &seen[0];
    assert_eq!(
        (post.method.as_str(), post.path.as_str()),
        ("POST", "/v1/charges")
    );
    assert_eq!(post.header("authorization"), Some("Bearer test-key"));
    assert_eq!(
        post.header("idempotency-key"),
        Some(r.payment_id.to_string().as_str())
    );
    assert_eq!(post.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(body["payment_id"], r.payment_id.to_string());
    assert_eq!(body["amount"], "100.50");
    let get = &seen[1];
    assert_eq!(
        (get.method.as_str(), get.path.as_str()),
        ("GET", format!("/v1/charges/{}", r.payment_id).as_str())
    );
    assert_eq!(get.header("authorization"), Some("Bearer test-key"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_over_the_body_limit_is_unknown_and_the_next_call_works() {
    // Valid JSON either way: the padding is whitespace. 64 KiB is the limit.
    let padded = |size: usize| {
        let ok = succeeded("ch_big");
        format!("{ok}{}", " ".repeat(size - ok.len()))
    };
    let under = padded(64 * 1024);
    let over = padded(64 * 1024 + 1);
    let over_parts: Vec<&str> = vec![&over[..30_000], &over[30_000..60_000], &over[60_000..]];
    let server = Server::start(vec![
        Reply::Send(answer(200, &under)),
        Reply::Send(answer(200, &over)),
        Reply::Send(chunked(200, &over_parts)),
        Reply::Send(answer(200, &succeeded("ch_after"))),
    ])
    .await;
    let g = gateway(&server.url());
    let a = ends(g.charge(&charge_request())).await;
    assert_eq!(
        a,
        Answer::Succeeded {
            charge_id: "ch_big".into()
        },
        "an answer of exactly the limit is read"
    );
    for what in ["Content-Length", "chunked"] {
        let a = ends(g.charge(&charge_request())).await;
        assert_unknown(&a, &format!("a {what} answer over the limit"));
    }
    let a = ends(g.charge(&charge_request())).await;
    assert_eq!(
        a,
        Answer::Succeeded {
            charge_id: "ch_after".into()
        }
    );
    assert_eq!(server.seen().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_server_closed_between_calls_is_not_used_again() {
    let mut closing = answer(200, &succeeded("ch_1"));
    let close_header = b"HTTP/1.1 200 Scripted\r\nconnection: close\r\n";
    closing.splice(
        ..b"HTTP/1.1 200 Scripted\r\n".len(),
        close_header.iter().copied(),
    );
    let server = Server::start(vec![
        // Kept alive as far as the answer says; the server closes the idle connection after it.
        Reply::SendThenClose(answer(200, &succeeded("ch_1"))),
        // `Connection: close`: the client must not send another request on it.
        Reply::SendThenClose(closing),
        Reply::Send(answer(200, &succeeded("ch_3"))),
    ])
    .await;
    let g = gateway(&server.url());
    for (n, want) in [(1, "ch_1"), (2, "ch_1"), (3, "ch_3")] {
        let a = ends(g.charge(&charge_request())).await;
        assert_eq!(
            a,
            Answer::Succeeded {
                charge_id: want.into()
            },
            "call {n}"
        );
        if n < 3 {
            // The client closes its end of a connection the server closed (none is left
            // half-open), and only then is the next call made.
            eventually(
                Duration::from_secs(10),
                "the client closes its end",
                || async { (server.closed_by_both() == n).then_some(()) },
            )
            .await;
        }
    }
    let connections: Vec<usize> = server.seen().iter().map(|s| s.connection).collect();
    assert_eq!(
        connections,
        [0, 1, 2],
        "one request per connection, none sent twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_charge_whose_connection_dies_while_it_is_sent_is_unknown_and_sent_once() {
    // Charges whose key is in `reset` die after their head reached the provider, before their
    // body did: the provider may have acted on them. Everything else is answered.
    let reset: Arc<Mutex<Vec<String>>> = Arc::default();
    let keys = reset.clone();
    let script: Script = Arc::new(move |_, seen| {
        let key = seen
            .header("idempotency-key")
            .unwrap_or_default()
            .to_string();
        if keys.lock().unwrap().contains(&key) {
            Reply::Reset
        } else if seen.method == "GET" {
            Reply::Send(answer(404, ""))
        } else {
            Reply::Send(answer(200, &succeeded("ch_ok")))
        }
    });
    let server = Server::start_with(script, None).await;
    let g = gateway(&server.url());
    let dies = async || {
        let r = charge_request();
        reset.lock().unwrap().push(r.idempotency_key.clone());
        let a = ends(g.charge(&r)).await;
        assert_unknown(&a, "a charge whose connection died while it was sent");
        r.idempotency_key
    };
    // On a new connection (the pool is empty).
    dies().await;
    // On a kept-alive one: a charge that succeeds first, until the dying one goes out on its
    // connection.
    eventually(
        Duration::from_secs(10),
        "a charge dying on a reused connection",
        || async {
            assert!(matches!(
                ends(g.charge(&charge_request())).await,
                Answer::Succeeded { .. }
            ));
            let key = dies().await;
            let seen = server.seen();
            let on = seen
                .iter()
                .position(|s| s.header("idempotency-key") == Some(&key))?;
            seen[..on]
                .iter()
                .any(|s| s.connection == seen[on].connection)
                .then_some(())
        },
    )
    .await;
    // The dead connections are not used again: the next calls work.
    assert!(matches!(
        ends(g.charge(&charge_request())).await,
        Answer::Succeeded { .. }
    ));
    assert_eq!(ends(g.status(Uuid::now_v7())).await, Answer::NotFound);
    // Each charge that died reached the provider once, never again on another connection.
    let seen = server.seen();
    for key in reset.lock().unwrap().iter() {
        let sent = seen
            .iter()
            .filter(|s| s.header("idempotency-key") == Some(key.as_str()))
            .count();
        assert_eq!(sent, 1, "the charge with key {key} was sent {sent} times");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_is_unknown_after_the_timeout() {
    let server = Server::start(vec![
        // Reads the request, says nothing.
        Reply::SendThenHang(Vec::new()),
        // Says the status and part of the body, then nothing.
        Reply::SendThenHang(
            b"HTTP/1.1 200 Scripted\r\ncontent-length: 60\r\n\r\n{\"status\": \"succ".to_vec(),
        ),
    ])
    .await;
    let g = HttpGateway::new(&settings(&server.url(), Duration::from_millis(500))).unwrap();
    let reason = assert_unknown(&ends(g.charge(&charge_request())).await, "no answer");
    assert_eq!(reason, "no answer within gateway.timeout");
    assert_unknown(
        &ends(g.charge(&charge_request())).await,
        "an answer cut short",
    );
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_refused_is_unknown_never_not_found() {
    // A port nothing listens on.
    let g = gateway(&format!("http://127.0.0.1:{}", crate::helpers::free_port()));
    let r = charge_request();
    let reason = assert_unknown(&ends(g.charge(&r)).await, "charge, connection refused");
    assert!(reason.contains("refused"), "{reason}");
    // "Never received" must come from the provider: a status question nobody answered is unknown.
    assert_unknown(
        &ends(g.status(r.payment_id)).await,
        "status, connection refused",
    );
}

/// A TLS acceptor with the test certificate (`tls/`, signed by the test CA).
fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/tls");
    let chain = vec![CertificateDer::from_pem_file(format!("{dir}/server.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn test_ca() -> rustls::RootCertStore {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/tls");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(format!("{dir}/ca.pem")).unwrap())
        .unwrap();
    roots
}

#[tokio::test(flavor = "multi_thread")]
async fn https_to_a_certificate_we_do_not_trust_is_refused_before_any_request() {
    let ok = vec![Reply::Send(answer(200, &succeeded("ch_1")))];
    let server = Server::start_with(in_order(ok), Some(tls_acceptor())).await;
    // The public web PKI does not know the test CA.
    let g = gateway(&format!("https://localhost:{}", server.addr.port()));
    let reason = assert_unknown(&ends(g.charge(&charge_request())).await, "untrusted");
    assert!(reason.contains("certificate"), "{reason}");
    assert!(
        server.seen().is_empty(),
        "a request went to an untrusted server"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn https_to_a_trusted_certificate_works_and_keeps_the_connection() {
    let replies = vec![
        Reply::Send(answer(200, &succeeded("ch_1"))),
        Reply::Send(chunked(200, &[&succeeded("ch_2")])),
    ];
    let server = Server::start_with(in_order(replies), Some(tls_acceptor())).await;
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{}", server.addr.port());
        let g =
            HttpGateway::with_roots(&settings(&url, Duration::from_secs(10)), test_ca()).unwrap();
        let a = ends(g.charge(&charge_request())).await;
        let ch_1 = Answer::Succeeded {
            charge_id: "ch_1".into(),
        };
        assert_eq!(a, ch_1, "{host}");
        let a =
            until_a_call_reuses_a_connection(&server, async || g.charge(&charge_request()).await)
                .await;
        assert_eq!(
            a,
            Answer::Succeeded {
                charge_id: "ch_2".into()
            },
            "{host}"
        );
        server.state.lock().unwrap().seen.clear();
    }
}
