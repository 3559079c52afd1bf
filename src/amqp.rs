//! Connecting to RabbitMQ so that an attempt given up on leaves nothing behind.
//!
//! lapin drives each connection's socket from a thread of its own, started as soon as the
//! TCP (and TLS) stream is open. If the connect future is dropped before the AMQP handshake
//! ends (a timeout, a shutdown), nothing tells that thread to stop: against a server that
//! accepts the connection and never answers, every abandoned attempt would keep a thread
//! and a socket until the server hangs up. An [`Attempt`] opens the stream itself and keeps
//! a handle on the socket; dropped before [`Attempt::keep`], it shuts the socket down, and
//! the thread ends with it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lapin::Error> {
//! use std::time::Duration;
//! let attempt = outbox::amqp::Attempt::new(Duration::from_secs(30));
//! let connecting = attempt.connect("amqp://localhost:5672/%2f", "my-service", Default::default());
//! match tokio::time::timeout(Duration::from_secs(30), connecting).await {
//!     Ok(connection) => {
//!         let connection = connection?;
//!         attempt.keep(); // lapin owns the socket from here on
//!         # drop(connection);
//!     }
//!     Err(_) => {} // `attempt` goes out of scope: its socket is shut down
//! }
//! # Ok(()) }
//! ```

use std::{
    net::{Shutdown, TcpStream as StdTcpStream, ToSocketAddrs},
    sync::{Arc, Mutex},
    time::Duration,
};

use lapin::{
    tcp::{OwnedTLSConfig, TcpStream},
    uri::{AMQPScheme, AMQPUri},
    Connection, ConnectionProperties,
};

/// One connection attempt: shuts its socket down when dropped, unless kept.
#[derive(Debug)]
pub struct Attempt {
    socket: Arc<Mutex<Socket>>,
    tcp_timeout: Duration,
}

#[derive(Debug, Default)]
enum Socket {
    /// The TCP connection is not open yet.
    #[default]
    Opening,
    /// Open; this handle shuts it down if the attempt is given up.
    Open(StdTcpStream),
    /// Given up on (or kept): a socket opened from now on is shut at once.
    Done,
}

impl Attempt {
    /// A new attempt; opening the TCP connection may take up to `tcp_timeout` for each
    /// address the host resolves to (unless the URL's `connection_timeout` says otherwise).
    pub fn new(tcp_timeout: Duration) -> Self {
        Self {
            socket: Arc::default(),
            tcp_timeout,
        }
    }

    /// Connects to the broker at `url` (`amqp://` or `amqps://`, with `tls` for the latter),
    /// naming the connection `name`, on the current tokio runtime. Bound it with a timeout:
    /// the future itself waits as long as the broker does.
    // The connector's error type is lapin's (`HandshakeResult`), large or not.
    #[allow(clippy::result_large_err)]
    pub async fn connect(
        &self,
        url: &str,
        name: &str,
        tls: OwnedTLSConfig,
    ) -> Result<Connection, lapin::Error> {
        let uri: AMQPUri = url
            .parse()
            .map_err(|e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let socket = self.socket.clone();
        let tcp_timeout = uri
            .query
            .connection_timeout
            .map(Duration::from_millis)
            .unwrap_or(self.tcp_timeout);
        let properties = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio)
            .with_connection_name(name.into());
        Connection::connector(
            uri,
            Box::new(move |uri| {
                let given_up = || {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the connection attempt was given up",
                    )
                };
                if matches!(*socket.lock().expect("lock poisoned"), Socket::Done) {
                    return Err(given_up().into());
                }
                let stream = TcpStream::from_std(open_tcp(
                    &uri.authority.host,
                    uri.authority.port,
                    tcp_timeout,
                )?)?;
                let handle = stream.try_clone()?;
                {
                    let mut socket = socket.lock().expect("lock poisoned");
                    if matches!(*socket, Socket::Done) {
                        let _ = handle.shutdown(Shutdown::Both);
                        return Err(given_up().into());
                    }
                    *socket = Socket::Open(handle);
                }
                let stream = match uri.scheme {
                    AMQPScheme::AMQP => stream,
                    AMQPScheme::AMQPS => stream.into_tls(&uri.authority.host, tls.as_ref())?,
                };
                stream.set_nonblocking(true)?;
                Ok(stream)
            }),
            properties,
        )
        .await
    }

    /// The attempt succeeded: from now on the connection owns its socket (dropping or
    /// closing the [`Connection`] ends it).
    pub fn keep(self) {
        *self.socket.lock().expect("lock poisoned") = Socket::Done;
    }

    /// The attempt succeeded, and the connection's owner may be dropped midway (a task
    /// aborted): the guard shuts the socket down when it is dropped, at once, before lapin
    /// sends anything on its way out, so the broker sees the connection end as if the
    /// process had died. Drop it before the connection's consumers (bind it after them).
    ///
    /// A dropped lapin consumer sends `basic.cancel`, and its channel and connection close
    /// only after that: in between, a single-active-consumer queue makes the next consumer
    /// active and hands it the next messages before it requeues the ones the dropped
    /// consumer still held, out of order. When the connection ends instead, RabbitMQ
    /// requeues them as it removes the consumer.
    pub fn shut_on_drop(self) -> ShutOnDrop {
        ShutOnDrop { _attempt: self }
    }
}

/// Shuts a connection's socket down when dropped; see [`Attempt::shut_on_drop`].
#[derive(Debug)]
pub struct ShutOnDrop {
    // Held for its `Drop`, which shuts the socket.
    _attempt: Attempt,
}

/// A TCP connection to `host:port`, trying each address it resolves to within `timeout`.
fn open_tcp(host: &str, port: u16, timeout: Duration) -> std::io::Result<StdTcpStream> {
    let mut last = None;
    for address in (host, port).to_socket_addrs()? {
        match StdTcpStream::connect_timeout(&address, timeout) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let mut socket = self.socket.lock().expect("lock poisoned");
        if let Socket::Open(stream) = std::mem::take(&mut *socket) {
            // Wakes lapin's socket thread (it reads end-of-stream) and any TLS handshake
            // blocked on a read, so both end.
            let _ = stream.shutdown(Shutdown::Both);
        }
        *socket = Socket::Done;
    }
}
