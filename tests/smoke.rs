mod common;
use common::*;

#[test]
fn reverses_a_line_on_an_ephemeral_port() {
    let server = Server::start_n(1, &[]);
    assert_eq!(roundtrip_half_close(server.port(), b"abc\n"), b"cba\n");
}
