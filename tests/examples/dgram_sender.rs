//! A process for checkpoint tests: connects one unix datagram socket to the
//! socket at the path it is given and sends a counter through it, one number
//! every 100 ms, for ever. Its socket's peer is outside the container (CRIU's
//! external unix socket).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn main() {
    let path = std::env::args().nth(1).expect("usage: dgram_sender SOCKET");
    let socket = UnixDatagram::unbound().expect("socket");
    socket.connect(&path).expect("connect");
    println!("connected");
    for i in 1u64.. {
        // A full receiver (or one gone for a moment) loses a number, nothing more.
        let _ = socket.send(i.to_string().as_bytes());
        std::thread::sleep(Duration::from_millis(100));
    }
}
