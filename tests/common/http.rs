//! The raw HTTP/1.1 client: requests written exactly as a test gives them, responses, connections.

use super::*;

/// One HTTP/1.1 request, written to the wire exactly as given: `Host` is added first unless the
/// test set one, `Content-Length` is added only when `auto_length` is on (the default) and the test
/// set none.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub auto_length: bool,
}

impl Request {
    pub fn new(method: &str, target: &str) -> Request {
        Request {
            method: method.to_string(),
            target: target.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            auto_length: true,
        }
    }

    /// `BITS_POST <target>` with `BITS-Packet-Type: <packet>`.
    pub fn bits(packet: &str, target: &str) -> Request {
        Request::new("BITS_POST", target).header("BITS-Packet-Type", packet)
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Removes every header called `name` (any case).
    pub fn without(mut self, name: &str) -> Request {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    pub fn body(mut self, body: &[u8]) -> Request {
        self.body = body.to_vec();
        self
    }

    /// Sends no `Content-Length` unless the test adds one itself.
    pub fn no_auto_length(mut self) -> Request {
        self.auto_length = false;
        self
    }

    fn has(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The request head (request line and headers, ending with the blank line).
    pub fn head_bytes(&self, host: SocketAddr) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        if !self.has("host") {
            out.push_str(&format!("Host: {host}\r\n"));
        }
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if self.auto_length && !self.has("content-length") {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    pub fn to_bytes(&self, host: SocketAddr) -> Vec<u8> {
        let mut out = self.head_bytes(host);
        out.extend_from_slice(&self.body);
        out
    }
}

pub fn create_request(url_path: &str) -> Request {
    Request::bits("Create-Session", url_path).header("BITS-Supported-Protocols", GUID)
}

pub fn content_range(start: u64, len: usize, total: u64) -> String {
    format!("bytes {start}-{}/{total}", start + len as u64 - 1)
}

pub fn fragment_request(id: &str, path: &str, start: u64, bytes: &[u8], total: u64) -> Request {
    Request::bits("Fragment", path)
        .header("BITS-Session-Id", id)
        .header("Content-Range", &content_range(start, bytes.len(), total))
        .body(bytes)
}

/// The fragment of a zero-byte upload: `Content-Range: bytes */0`, no body.
pub fn empty_fragment_request(id: &str, path: &str) -> Request {
    Request::bits("Fragment", path)
        .header("BITS-Session-Id", id)
        .header("Content-Range", "bytes */0")
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(300)]);
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

impl Response {
    /// The first header called `name`, compared without case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header called `name`.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `BITS-Received-Content-Range` as a number.
    pub fn received(&self) -> Option<u64> {
        self.header("BITS-Received-Content-Range").map(|v| {
            v.trim()
                .parse()
                .expect("BITS-Received-Content-Range is a number")
        })
    }

    pub fn error_code(&self) -> Option<&str> {
        self.header("BITS-Error-Code")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// One TCP connection; several requests may be sent on it in turn (keep-alive).
pub struct Conn {
    pub stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        assert!(addr.ip().is_loopback(), "tests only talk to 127.0.0.1");
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = stream.set_nodelay(true);
        Conn {
            stream,
            peer: addr,
            buf: Vec::new(),
        }
    }

    /// A connection from the local address `from` (any of 127.0.0.0/8 is loopback on Linux),
    /// so that a test can be several clients.
    pub fn open_from(from: std::net::IpAddr, addr: SocketAddr) -> Conn {
        assert!(
            addr.ip().is_loopback() && from.is_loopback(),
            "tests only talk on loopback"
        );
        use socket2::{Domain, Socket, Type};
        let socket =
            Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("creating a socket");
        socket
            .bind(&SocketAddr::new(from, 0).into())
            .unwrap_or_else(|e| panic!("binding to {from}: {e}"));
        socket
            .connect_timeout(&addr.into(), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to {addr} from {from}: {e}"));
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = stream.set_nodelay(true);
        Conn {
            stream,
            peer: addr,
            buf: Vec::new(),
        }
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    /// Writes `req` and reads its response.
    pub fn send(&mut self, req: &Request) -> io::Result<Response> {
        self.write_raw(&req.to_bytes(self.peer))?;
        self.read_response(req.method.eq_ignore_ascii_case("HEAD"))
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes the request head and only the first `n` bytes of its body.
    pub fn write_partial(&mut self, req: &Request, n: usize) -> io::Result<()> {
        let mut bytes = req.head_bytes(self.peer);
        bytes.extend_from_slice(&req.body[..n.min(req.body.len())]);
        self.write_raw(&bytes)
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        if self.buf.len() > MAX_RESPONSE {
            return Err(io::Error::other("response too large"));
        }
        Ok(n)
    }

    /// Reads one response (head, then a body framed by Content-Length, chunked coding or EOF).
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        let (status, headers, head_len) = loop {
            let mut hdrs = [httparse::EMPTY_HEADER; 128];
            let mut resp = httparse::Response::new(&mut hdrs);
            match resp
                .parse(&self.buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                httparse::Status::Complete(n) => {
                    let status = resp.code.unwrap_or(0);
                    let headers: Vec<(String, String)> = owned_headers(resp.headers);
                    break (status, headers, n);
                }
                httparse::Status::Partial => {
                    if self.fill()? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "connection closed before a full response head ({} bytes read)",
                                self.buf.len()
                            ),
                        ));
                    }
                }
            }
        };
        self.buf.drain(..head_len);
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let no_body = head_request || status / 100 == 1 || status == 204 || status == 304;
        let body = if no_body {
            Vec::new()
        } else if find("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            self.read_chunked()?
        } else if let Some(len) = find("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
                }
            }
            self.buf.drain(..len).collect()
        } else {
            while self.fill()? > 0 {}
            std::mem::take(&mut self.buf)
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        for _ in 0..1_000_000 {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk size"));
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            self.buf.drain(..line_end + 2);
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk size"))?;
            while self.buf.len() < size + 2 {
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk"));
                }
            }
            if size == 0 {
                // No trailers are expected; skip the final CRLF.
                self.buf.drain(..2);
                return Ok(body);
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
        Err(io::Error::other("too many chunks"))
    }

    /// Waits up to `limit` for the server to close the connection; true if it did (EOF or reset).
    /// Any response bytes that arrive first are returned through `seen`.
    pub fn wait_closed(&mut self, limit: Duration, seen: &mut Vec<u8>) -> bool {
        let deadline = Instant::now() + limit;
        seen.append(&mut self.buf);
        let mut chunk = [0u8; 4096];
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(10))))
                .unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
        false
    }
}
