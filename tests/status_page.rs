mod common;
use common::browser::{Browser, Page};
use common::*;

// SPEC §8 in a real browser: Debian's headless chromium, driven over the
// DevTools protocol on a pipe (tests/common/browser.rs), opens the status
// page of the real binary. The page must show a connection this test holds
// open, with its client port and state, and follow it live, in the same
// page, as the test sends lines; at a desktop and at a phone's width.
// Screenshots go where the test output says.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

fn launch() -> Option<Browser> {
    let b = Browser::launch();
    if b.is_none() {
        eprintln!(
            "*** SKIPPED: chromium is not installed (scripts/test.sh installs it: apt-get install chromium); the status page was not rendered"
        );
    }
    b
}

fn screenshot(b: &mut Browser, page: &Page, name: &str) {
    let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    b.screenshot(page, &png).unwrap();
    println!("screenshot: {}", png.display());
}

/// The JavaScript expression for the table row of the client at `port`.
fn row(port: u16) -> String {
    format!("document.querySelector('#conns tr[data-client=\"127.0.0.1:{port}\"]')")
}

#[test]
fn the_status_page_shows_a_held_connection_and_follows_it_live() {
    let Some(mut b) = launch() else { return };
    let server = Server::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--workers",
            "2",
        ],
        1,
    );
    let mut c = server.connect(0);
    c.write_all(b"hello\n").unwrap();
    assert_eq!(read_exact_n(&mut c, 6), b"olleh\n");
    let port = c.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{}/", server.metrics_port());
    let page = b.open(&url, 1280, 900, false).unwrap();
    let row = row(port);

    // The connection, with its state, listener and the one line so far.
    let state = b
        .wait_for(
            &page,
            &format!("{row} && {row}.dataset.lines === '1' && {row}.dataset.state"),
            WAIT,
        )
        .unwrap();
    assert_eq!(state, "reading");
    let cells = b.eval(&page, &format!("{row}.innerText")).unwrap();
    let cells = cells.as_str().unwrap();
    let listener = format!("127.0.0.1:{}", server.port());
    assert!(cells.contains(&format!("127.0.0.1:{port}")), "{cells}");
    assert!(
        cells.contains(&listener) && cells.contains("reading"),
        "{cells}"
    );
    // The header, the listeners and the workers.
    let pid = b
        .eval(&page, "document.getElementById('pid').textContent")
        .unwrap();
    assert_eq!(pid, server.pid().to_string());
    let listed = b
        .eval(
            &page,
            &format!("!!document.querySelector('#listeners tr[data-listener=\"{listener}\"]')"),
        )
        .unwrap();
    assert_eq!(listed, true);
    let workers = b
        .eval(&page, "document.querySelectorAll('#workers tr').length")
        .unwrap();
    assert_eq!(workers, 2);

    // The same page follows the connection: a mark set now must survive.
    b.eval(&page, "window.sameDocument = true").unwrap();
    let polls = b.eval(&page, "+document.body.dataset.polls").unwrap();
    c.write_all(b"ab\nab\nab\nab\nab\n").unwrap();
    assert_eq!(read_exact_n(&mut c, 15), b"ba\n".repeat(5));
    b.wait_for(
        &page,
        &format!("{row} && {row}.dataset.lines === '6'"),
        WAIT,
    )
    .unwrap();
    assert_eq!(b.eval(&page, "window.sameDocument === true").unwrap(), true);
    let later = b.eval(&page, "+document.body.dataset.polls").unwrap();
    assert!(later.as_u64() > polls.as_u64(), "{polls} -> {later}");
    let total = b
        .eval(&page, "document.getElementById('lines-total').textContent")
        .unwrap();
    assert_eq!(total, "6");
    assert_eq!(
        b.eval(&page, "document.getElementById('live').className")
            .unwrap(),
        "ok"
    );
    screenshot(&mut b, &page, "status-page.png");

    // At a phone's width: readable without scrolling sideways, the row there.
    let phone = b.open(&url, 390, 844, true).unwrap();
    b.wait_for(
        &phone,
        &format!("{row} && {row}.dataset.state === 'reading'"),
        WAIT,
    )
    .unwrap();
    let overflow = b
        .eval(
            &phone,
            "document.documentElement.scrollWidth - document.documentElement.clientWidth",
        )
        .unwrap();
    assert_eq!(overflow, 0, "the page scrolls sideways on a phone");
    screenshot(&mut b, &phone, "status-page-phone.png");

    // Closed: the row goes away.
    drop(c);
    b.wait_for(&page, &format!("!{row}"), WAIT).unwrap();
}
