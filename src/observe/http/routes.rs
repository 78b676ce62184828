//! What each request on the `--metrics` address is answered with: a pure
//! function of the method, the path and the query ([`route`]), and the
//! fixed parts of each answer (status, headers). The same for the origin
//! form (`/metrics`) and the absolute form (`http://host/metrics`): hyper
//! gives both as one URI whose path is `/metrics`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};

/// The status page, compiled into the binary (no external assets).
pub const PAGE: &str = include_str!("status.html");

/// The page's Content-Security-Policy: its own inline script and style, and
/// requests to its own origin only.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The most rows `/api/connections` answers with when no `limit` is given.
pub const DEFAULT_LIMIT: usize = 10_000;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /`: the status page.
    Page,
    /// `GET /metrics`: the Prometheus exposition.
    Metrics,
    /// `GET /api`: the eXpServer dashboard's object.
    Api,
    /// `GET /api/history`: the last minutes of totals, for the page's charts.
    History,
    /// `GET /api/connections`: at most `limit` connections, oldest first.
    Connections {
        /// Rows to answer with.
        limit: usize,
    },
    /// `OPTIONS /api…`: a CORS preflight.
    Preflight,
    /// A known path with a method it does not take; `Allow` lists those it does.
    NotAllowed {
        /// The `Allow` header.
        allow: &'static str,
    },
    /// A query this path cannot take (400).
    BadQuery,
    /// Anything else (404).
    NotFound,
}

/// Routes a request (`query` without its `?`).
pub fn route(method: &Method, path: &str, query: Option<&str>) -> Route {
    let api = matches!(path, "/api" | "/api/history" | "/api/connections");
    if !api && !matches!(path, "/" | "/metrics") {
        return Route::NotFound;
    }
    if *method == Method::OPTIONS && api {
        return Route::Preflight;
    }
    if *method != Method::GET && *method != Method::HEAD {
        let allow = if api {
            "GET, HEAD, OPTIONS"
        } else {
            "GET, HEAD"
        };
        return Route::NotAllowed { allow };
    }
    match path {
        "/" => Route::Page,
        "/metrics" => Route::Metrics,
        "/api" => Route::Api,
        "/api/history" => Route::History,
        _ => match limit(query) {
            Some(limit) => Route::Connections { limit },
            None => Route::BadQuery,
        },
    }
}

/// `limit=N` in a query (other parameters are ignored); `None` if it is
/// not a number.
fn limit(query: Option<&str>) -> Option<usize> {
    let Some(q) = query else {
        return Some(DEFAULT_LIMIT);
    };
    match q.split('&').find_map(|kv| kv.strip_prefix("limit=")) {
        None => Some(DEFAULT_LIMIT),
        Some(n) => n.parse().ok(),
    }
}

/// Whether answers on `path` carry the CORS headers (the JSON API, which
/// the eXpServer dashboard reads from another origin).
pub fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// A response with `body` and its content type.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A short plain-text answer.
pub fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

/// A JSON answer.
pub fn json(body: String) -> Response<Full<Bytes>> {
    respond(StatusCode::OK, "application/json", Bytes::from(body))
}

/// The status page.
pub fn page() -> Response<Full<Bytes>> {
    let mut r = respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(PAGE.as_bytes()),
    );
    let h = r.headers_mut();
    // Revalidated, never stale after an upgrade of the binary.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    r
}

/// The answers that need nothing from the server: a preflight, 404, 405,
/// 400. `None` for the routes that do.
pub fn fixed(route: Route) -> Option<Response<Full<Bytes>>> {
    Some(match route {
        Route::Preflight => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, HEAD"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            // Chrome's private network access preflight (a page on another
            // origin reading a loopback or LAN address).
            h.insert(
                "access-control-allow-private-network",
                HeaderValue::from_static("true"),
            );
            r
        }
        Route::NotAllowed { allow } => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            r
        }
        Route::BadQuery => text(
            StatusCode::BAD_REQUEST,
            "bad query: limit must be a number\n",
        ),
        Route::NotFound => text(
            StatusCode::NOT_FOUND,
            "not found; try / (the status page), /metrics, /api or /api/connections\n",
        ),
        Route::Page => page(),
        Route::Metrics | Route::Api | Route::History | Route::Connections { .. } => return None,
    })
}

/// Adds the CORS header to an answer on the API.
pub fn allow_any_origin(r: &mut Response<Full<Bytes>>) {
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_and_head_alike() {
        for m in [Method::GET, Method::HEAD] {
            assert_eq!(route(&m, "/", None), Route::Page);
            assert_eq!(route(&m, "/metrics", None), Route::Metrics);
            assert_eq!(route(&m, "/metrics", Some("x=1")), Route::Metrics);
            assert_eq!(route(&m, "/api", None), Route::Api);
            assert_eq!(route(&m, "/api/history", None), Route::History);
            assert_eq!(
                route(&m, "/api/connections", None),
                Route::Connections {
                    limit: DEFAULT_LIMIT
                }
            );
        }
    }

    #[test]
    fn limits() {
        let c = |q| route(&Method::GET, "/api/connections", Some(q));
        assert_eq!(c("limit=5"), Route::Connections { limit: 5 });
        assert_eq!(c("a=b&limit=0"), Route::Connections { limit: 0 });
        assert_eq!(
            c("a=b"),
            Route::Connections {
                limit: DEFAULT_LIMIT
            }
        );
        assert_eq!(c("limit=x"), Route::BadQuery);
        assert_eq!(c("limit=-1"), Route::BadQuery);
    }

    #[test]
    fn other_methods_and_paths() {
        assert_eq!(route(&Method::OPTIONS, "/api", None), Route::Preflight);
        assert_eq!(
            route(&Method::OPTIONS, "/api/connections", None),
            Route::Preflight
        );
        assert_eq!(
            route(&Method::OPTIONS, "/metrics", None),
            Route::NotAllowed { allow: "GET, HEAD" }
        );
        assert_eq!(
            route(&Method::POST, "/api", None),
            Route::NotAllowed {
                allow: "GET, HEAD, OPTIONS"
            }
        );
        assert_eq!(
            route(&Method::DELETE, "/", None),
            Route::NotAllowed { allow: "GET, HEAD" }
        );
        for p in ["/nope", "/metrics/", "/api/", "/index.html", "*"] {
            assert_eq!(route(&Method::GET, p, None), Route::NotFound, "{p}");
            assert_eq!(route(&Method::POST, p, None), Route::NotFound, "{p}");
        }
        assert!(is_api("/api") && is_api("/api/connections") && !is_api("/apix"));
    }

    #[test]
    fn fixed_answers() {
        let r = fixed(Route::Preflight).unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_METHODS],
            "GET, HEAD"
        );
        let r = fixed(Route::NotAllowed { allow: "GET, HEAD" }).unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(
            fixed(Route::NotFound).unwrap().status(),
            StatusCode::NOT_FOUND
        );
        let page = fixed(Route::Page).unwrap();
        assert_eq!(page.headers()[header::CONTENT_SECURITY_POLICY], PAGE_CSP);
        assert!(fixed(Route::Api).is_none());
    }

    #[test]
    fn the_page_is_self_contained() {
        assert!(PAGE.starts_with("<!doctype html>"));
        // No external asset: nothing is fetched but the page's own API.
        for needle in ["http://", "https://", "//cdn", "@import", "<link", "src="] {
            assert!(!PAGE.contains(needle), "the page names {needle}");
        }
    }
}
