//! One client's bytes never reach another client.
//!
//! Regression: replies built in the loop's shared output buffer for a client
//! whose write then failed (it had reset the connection) stayed in the buffer
//! and went out to the next client driven. Found by the soak run.
mod common;
use common::*;
use std::io::Write;
use std::time::Duration;

#[test]
fn replies_of_a_reset_client_never_reach_the_next_client() {
    let server = Server::start_n(1, &[]);
    let payload: Vec<u8> = (0..300)
        .flat_map(|i| format!("SECRET-A line {i}\n").into_bytes())
        .collect();
    for attempt in 0..5000u64 {
        let mut a = server.connect(0);
        a.write_all(&payload).unwrap();
        // Vary the moment of the reset so that it sometimes lands between
        // the server's read of the lines and its write of the replies.
        std::thread::sleep(Duration::from_micros((attempt % 25) * 20));
        socket2::SockRef::from(&a)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(a); // RST while the server may be writing its replies
        let mut b = server.connect(0);
        b.write_all(b"hello\n").unwrap();
        let got = read_exact_n(&mut b, 6);
        assert_eq!(
            got,
            b"olleh\n",
            "attempt {attempt}: client B received {:?}",
            String::from_utf8_lossy(&got)
        );
    }
}
