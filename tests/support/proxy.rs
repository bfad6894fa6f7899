//! A TCP proxy that stands between the daemon and a shared service
//! (PostgreSQL, RabbitMQ) and fails on request, so one test can have an
//! outage of its own while every other test keeps using the real server.
//!
//! ```text
//! daemon ──▶ 127.0.0.1:<ephemeral> (FaultProxy) ──▶ target (the real server)
//! ```
//!
//! Three faults, each a model of something that happens in production:
//! - [`FaultProxy::cut`]: every live connection is closed at once (a server
//!   that crashed, a NAT or firewall that dropped its state);
//! - [`FaultProxy::refuse`]: new connections are accepted and closed at once,
//!   as by a host whose server process is down;
//! - [`FaultProxy::freeze`]: sockets stay open but nothing is forwarded either
//!   way, as with a server stopped by SIGSTOP or a dead link behind a
//!   router: bytes already sent wait, nothing comes back, and a close by the
//!   server is not passed on until the thaw. Only timeouts and heartbeats can
//!   tell.
//! - [`FaultProxy::freeze_responses`]: the same for the server's direction
//!   only: requests arrive and are acted on, the answers (a broker's publisher
//!   confirms) are held back, as when a link fails after the request went out.
//!
//! Threads: one acceptor, and two pumps per connection (one per direction),
//! all named and all joined when the proxy is dropped. No thread polls: the
//! acceptor blocks in `accept` (the drop wakes it with a connection of its
//! own), pumps block in `read` (a cut or the drop shuts their sockets down)
//! or on a condvar while frozen.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

/// A running proxy; dropping it closes every connection and joins its threads.
pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// State shared by the handle, the acceptor and the pumps.
struct Shared {
    target: SocketAddr,
    state: Mutex<State>,
    /// Signalled when `frozen` or `stopping` changes, or a link is cut.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    refusing: bool,
    /// Client to server.
    frozen_requests: bool,
    /// Server to client.
    frozen_responses: bool,
    stopping: bool,
    /// Live connections, to be shut down by a cut.
    links: Vec<Link>,
    /// Every pump thread started, joined on drop.
    pumps: Vec<JoinHandle<()>>,
    next_link: u64,
}

/// Both sockets of one proxied connection.
struct Link {
    id: u64,
    client: TcpStream,
    server: TcpStream,
}

impl Link {
    fn shut_down(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let address = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            target,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let acceptor = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("proxy-accept-{}", address.port()))
                .spawn(move || accept_loop(&listener, &shared))
                .expect("spawn the proxy's acceptor")
        };
        FaultProxy {
            address,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where clients connect instead of the target.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Closes every live connection, both ways. New connections are still
    /// forwarded unless [`refuse`](Self::refuse) is on.
    pub fn cut(&self) {
        let mut state = self.shared.lock();
        for link in state.links.drain(..) {
            link.shut_down();
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    /// While on, new connections are accepted and closed at once.
    pub fn refuse(&self, refusing: bool) {
        self.shared.lock().refusing = refusing;
    }

    /// While on, nothing is forwarded in either direction; connections stay
    /// open, and what was held back flows on when it is turned off.
    pub fn freeze(&self, frozen: bool) {
        let mut state = self.shared.lock();
        state.frozen_requests = frozen;
        state.frozen_responses = frozen;
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Like [`freeze`](Self::freeze), for what the server sends only.
    pub fn freeze_responses(&self, frozen: bool) {
        self.shared.lock().frozen_responses = frozen;
        self.shared.changed.notify_all();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stopping = true;
            for link in state.links.drain(..) {
                link.shut_down();
            }
        }
        self.shared.changed.notify_all();
        // Wakes the acceptor out of `accept`; it sees `stopping` and returns.
        let _ = TcpStream::connect(self.address);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let pumps = std::mem::take(&mut self.shared.lock().pumps);
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        let Ok(client) = client else {
            continue; // a client that gave up before we accepted it
        };
        {
            let state = shared.lock();
            if state.stopping {
                return;
            }
            if state.refusing {
                continue; // dropped: the client sees its connection closed
            }
        }
        // The real server being down is passed on the same way.
        let Ok(server) = TcpStream::connect(shared.target) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let mut state = shared.lock();
        if state.stopping {
            return;
        }
        let id = state.next_link;
        state.next_link += 1;
        let clones = (|| {
            Some((
                Link {
                    id,
                    client: client.try_clone().ok()?,
                    server: server.try_clone().ok()?,
                },
                client.try_clone().ok()?,
                server.try_clone().ok()?,
            ))
        })();
        let Some((link, client_reader, server_reader)) = clones else {
            continue;
        };
        state.links.push(link);
        for (direction, from, to) in [
            (Direction::Requests, client_reader, server),
            (Direction::Responses, server_reader, client),
        ] {
            let shared = shared.clone();
            let pump = thread::Builder::new()
                .name(format!("proxy-{id}-{direction:?}"))
                .spawn(move || pump(&shared, id, direction, from, to))
                .expect("spawn a proxy pump");
            state.pumps.push(pump);
        }
    }
}

/// Which way a pump copies.
#[derive(Debug, Clone, Copy)]
enum Direction {
    Requests,
    Responses,
}

/// Copies `from` to `to` until `from` ends or fails, holding data back while
/// its direction is frozen; then closes the whole link, so the other
/// direction ends too.
fn pump(shared: &Shared, id: u64, direction: Direction, mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        // While frozen, nothing is read either: a close by either side is
        // noticed, and passed on, only after the thaw.
        if !wait_while_frozen(shared, id, direction) {
            break;
        }
        let count = match from.read(&mut buffer) {
            Ok(count @ 1..) => count,
            Ok(0) | Err(_) => {
                // A close that arrives while frozen is passed on at the thaw.
                wait_while_frozen(shared, id, direction);
                break;
            }
        };
        if !wait_while_frozen(shared, id, direction) || to.write_all(&buffer[..count]).is_err() {
            break;
        }
    }
    let mut state = shared.lock();
    if let Some(position) = state.links.iter().position(|link| link.id == id) {
        state.links.swap_remove(position).shut_down();
    }
}

/// Blocks while `direction` is frozen; false when the link was cut or the
/// proxy is stopping meanwhile.
fn wait_while_frozen(shared: &Shared, id: u64, direction: Direction) -> bool {
    let mut state = shared.lock();
    loop {
        let live = state.links.iter().any(|link| link.id == id);
        if state.stopping || !live {
            return false;
        }
        let frozen = match direction {
            Direction::Requests => state.frozen_requests,
            Direction::Responses => state.frozen_responses,
        };
        if !frozen {
            return true;
        }
        state = shared.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
    }
}
