//! A scripted server application that records every request and answers what a test says.

use super::*;

/// A request the scripted backend received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the scripted backend does with a request (after reading all of it).
#[derive(Debug, Clone)]
pub enum Answer {
    /// Answers with this status, headers and body (and closes the connection).
    Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Holds the connection open without answering for this long, then closes it.
    Stall(Duration),
    /// Sends a 200 head promising a longer body than it sends, then stalls like `Stall`.
    HeadThenStall(Duration),
}

impl Answer {
    pub fn ok(body: &[u8]) -> Answer {
        Answer::status(200, body)
    }

    pub fn status(status: u16, body: &[u8]) -> Answer {
        Answer::Reply {
            status,
            headers: Vec::new(),
            body: body.to_vec(),
        }
    }

    pub fn with_header(self, name: &str, value: &str) -> Answer {
        match self {
            Answer::Reply {
                status,
                mut headers,
                body,
            } => {
                headers.push((name.to_string(), value.to_string()));
                Answer::Reply {
                    status,
                    headers,
                    body,
                }
            }
            other => other,
        }
    }
}

type Script = Box<dyn FnMut(usize, &Recorded) -> Answer + Send>;

/// A tiny HTTP/1.1 server on 127.0.0.1 that records every request and answers what the test's
/// script says (the script gets the request's index, counting from 0, and the request). One
/// thread per connection; every answer closes its connection.
pub struct Backend {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<Script>>,
    stop: Arc<AtomicBool>,
    /// Connections accepted (including ones that sent no complete request).
    connections: Arc<AtomicUsize>,
}

impl Backend {
    pub fn start(script: impl FnMut(usize, &Recorded) -> Answer + Send + 'static) -> Backend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), script)
    }

    /// Starts on a given address (to take over a port that refused connections before).
    pub fn start_on(
        addr: SocketAddr,
        script: impl FnMut(usize, &Recorded) -> Answer + Send + 'static,
    ) -> Backend {
        assert!(addr.ip().is_loopback(), "tests only listen on 127.0.0.1");
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("binding the scripted backend on {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Box::new(script)));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        {
            let (requests, script, stop, connections) = (
                requests.clone(),
                script.clone(),
                stop.clone(),
                connections.clone(),
            );
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (requests, script, stop) = (requests.clone(), script.clone(), stop.clone());
                    thread::spawn(move || serve_scripted(stream, &requests, &script, &stop));
                }
            });
        }
        Backend {
            addr,
            requests,
            script,
            stop,
            connections,
        }
    }

    /// `http://ADDR<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Replaces the script for the requests still to come.
    pub fn set_script(&self, script: impl FnMut(usize, &Recorded) -> Answer + Send + 'static) {
        *self.script.lock().unwrap() = Box::new(script);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve_scripted(
    mut stream: TcpStream,
    requests: &Mutex<Vec<Recorded>>,
    script: &Mutex<Script>,
    stop: &AtomicBool,
) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(rec) = read_request(&mut stream) else {
        return;
    };
    let answer = {
        let mut all = requests.lock().unwrap();
        all.push(rec.clone());
        let index = all.len() - 1;
        drop(all);
        (script.lock().unwrap())(index, &rec)
    };
    match answer {
        Answer::Reply {
            status,
            headers,
            body,
        } => {
            let mut out = format!("HTTP/1.1 {status} Scripted\r\n");
            for (n, v) in &headers {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
            out.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ));
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(&body);
            let _ = stream.write_all(&bytes);
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Lets the peer read the answer before the socket goes away.
            let mut sink = [0u8; 1024];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read(&mut sink);
        }
        Answer::HeadThenStall(d) => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial");
            let _ = stream.flush();
            let deadline = Instant::now() + d;
            while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
        }
        Answer::Stall(d) => {
            let deadline = Instant::now() + d;
            while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Reads one request: head, then a body framed by Content-Length or chunked coding.
fn read_request(stream: &mut TcpStream) -> io::Result<Recorded> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let fill = |stream: &mut TcpStream, buf: &mut Vec<u8>, chunk: &mut [u8]| -> io::Result<()> {
        let n = stream.read(chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(io::Error::other("request too large"));
        }
        Ok(())
    };
    let (method, target, headers, head_len) = loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut hdrs);
        match req
            .parse(&buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            httparse::Status::Complete(n) => {
                let headers: Vec<(String, String)> = owned_headers(req.headers);
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                    headers,
                    n,
                );
            }
            httparse::Status::Partial => fill(stream, &mut buf, &mut chunk)?,
        }
    };
    buf.drain(..head_len);
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body =
        if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            let mut body = Vec::new();
            let mut done = false;
            for _ in 0..1_000_000 {
                let Some(i) = buf.windows(2).position(|w| w == b"\r\n") else {
                    fill(stream, &mut buf, &mut chunk)?;
                    continue;
                };
                let line = String::from_utf8_lossy(&buf[..i]).into_owned();
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk size"))?;
                while buf.len() < i + 2 + size + 2 {
                    fill(stream, &mut buf, &mut chunk)?;
                }
                body.extend_from_slice(&buf[i + 2..i + 2 + size]);
                buf.drain(..i + 2 + size + 2);
                if size == 0 {
                    done = true;
                    break;
                }
            }
            if !done {
                return Err(io::Error::other("too many chunks"));
            }
            body
        } else {
            let len: usize = find("content-length")
                .map(|v| v.trim().parse().unwrap_or(0))
                .unwrap_or(0);
            while buf.len() < len {
                fill(stream, &mut buf, &mut chunk)?;
            }
            buf.truncate(len);
            buf
        };
    Ok(Recorded {
        method,
        target,
        headers,
        body,
    })
}

/// Parsed header lines as owned (name, value) pairs; values that are not UTF-8 are kept lossily.
pub fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}
