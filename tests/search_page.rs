//! The search page of `clasp serve --store S`, in a real browser: Debian's
//! headless `chromium`, driven through `chromedriver` over the W3C WebDriver
//! protocol (plain HTTP and JSON, so no client library). Skipped, with the
//! reason and the install line printed, where chromium is not installed:
//! `apt install chromium chromium-driver`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

mod common;
use common::Server;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn core() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core")
}

/// A headless chromium session through chromedriver; both end on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    /// None, with the reason printed, when chromium or chromedriver is
    /// missing.
    fn start() -> Option<Self> {
        let found = |bin: &str| {
            Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !found("chromium") || !found("chromedriver") {
            eprintln!(
                "SKIPPED: the search page's browser test needs chromium and chromedriver \
                 (apt install chromium chromium-driver)"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let t = Instant::now();
        while ureq::get(&format!("{base}/status")).call().is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"]}}}});
        b.session = b.call("POST", "/session", caps)["sessionId"]
            .as_str()
            .unwrap()
            .to_string();
        Some(b)
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let r = match method {
            "GET" => ureq::get(&url).call(),
            "DELETE" => ureq::delete(&url).call(),
            _ => ureq::post(&url).send_json(body),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                panic!(
                    "webdriver {method} {path}: {code} {}",
                    r.into_string().unwrap()
                )
            }
            Err(e) => panic!("webdriver {method} {path}: {e}"),
        };
        let v: Value = resp.into_json().unwrap();
        v["value"].clone()
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        );
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/click"), json!({}));
    }

    fn script(&self, js: &str) -> Value {
        self.call("POST", "/execute/sync", json!({"script": js, "args": []}))
    }

    /// Polls `js` until it returns something other than null or false.
    fn wait(&self, what: &str, js: &str) -> Value {
        let t = Instant::now();
        loop {
            let v = self.script(js);
            if !v.is_null() && v != json!(false) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Photos (with a sidecar caption for one) indexed by `model` into a new
/// store; the server on it.
fn indexed_server(dir: &Path, model: &Path, files: &[&str]) -> (Server, PathBuf) {
    let photos = dir.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for f in files {
        std::fs::copy(core().join("images").join(f), photos.join(f)).unwrap();
    }
    std::fs::write(photos.join("rgb.txt"), "a red square on white").unwrap();
    let store = dir.join("s.sqlite");
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args([
            "index",
            photos.to_str().unwrap(),
            "-m",
            model.to_str().unwrap(),
        ])
        .args(["--store", store.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let server = Server::start(&[
        "serve",
        "-m",
        model.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    (server, photos.canonicalize().unwrap())
}

/// The hits the page shows: (path, score text) in order.
const SHOWN: &str = "return [...document.querySelectorAll('.hit')].map(f => \
    [f.dataset.path, f.querySelector('.score').textContent.split(' ')[0]]);";

/// A text query finds every photo, in the API's order with its scores, each
/// with a loaded thumbnail; the threshold slider hides what scores below it;
/// a click shows the full image with its caption; an image chosen as the
/// query finds itself first; and the page makes no external request.
#[test]
fn the_search_page_searches_filters_shows_and_queries_by_image_in_chromium() {
    let Some(b) = Browser::start() else { return };
    let d = tempfile::tempdir().unwrap();
    let files = [
        "rgb.png",
        "gray.png",
        "palette.png",
        "cmyk.jpg",
        "exif6.jpg",
    ];
    let (s, photos) = indexed_server(d.path(), &core().join("tiny-clip"), &files);
    let html = ureq::get(&format!("{}/", s.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "the page refers to something outside the server"
    );

    b.open(&format!("{}/", s.base));
    b.type_into("#q", "a red square\u{E007}");
    let shown = b.wait(
        "the grid",
        &format!("const h = (() => {{ {SHOWN} }})(); return h.length > 0 && h;"),
    );
    let (_, api, _) = s.post("/v1/search", &json!({"query": "a red square", "k": 48}));
    let api = api["data"].as_array().unwrap();
    assert_eq!(api.len(), files.len(), "{api:?}");
    assert_eq!(shown.as_array().unwrap().len(), files.len(), "{shown}");
    for (row, hit) in shown.as_array().unwrap().iter().zip(api) {
        assert_eq!(row[0], hit["path"]);
        assert_eq!(
            row[1].as_str().unwrap(),
            format!("{:.3}", hit["score"].as_f64().unwrap())
        );
    }
    let sizes = b.wait(
        "thumbnails",
        "const i = [...document.querySelectorAll('.hit img')]; \
         return i.every(x => x.complete && x.naturalWidth > 0) && i.map(x => [x.naturalWidth, x.naturalHeight]);",
    );
    for wh in sizes.as_array().unwrap() {
        let (w, h) = (wh[0].as_u64().unwrap(), wh[1].as_u64().unwrap());
        assert!(w.max(h) <= 256 && w.min(h) > 0, "thumbnail {w}x{h}");
    }

    // The slider at the third score keeps the three best.
    let third = api[2]["score"].as_f64().unwrap();
    let kept = b.script(&format!(
        "const t = document.getElementById('threshold'); t.value = {third}; \
         t.dispatchEvent(new Event('input')); \
         return [document.querySelectorAll('.hit').length, document.getElementById('count').textContent];"
    ));
    let want = api
        .iter()
        .filter(|h| h["score"].as_f64().unwrap() >= third)
        .count();
    assert_eq!(kept[0], want, "{kept}");
    assert_eq!(kept[1], format!("{want} of {} shown", files.len()));

    // A click on the captioned photo opens it with its caption.
    b.script(
        "const t = document.getElementById('threshold'); t.value = t.min; \
         t.dispatchEvent(new Event('input')); return true;",
    );
    let rgb = photos.join("rgb.png").display().to_string();
    b.click(&format!(".hit[data-path='{rgb}']"));
    let view = b.wait(
        "the viewer",
        "const f = document.getElementById('full'); \
         return !document.getElementById('viewer').hidden && f.complete && f.naturalWidth > 0 && \
         [document.getElementById('caption').textContent, f.naturalWidth];",
    );
    assert_eq!(view[0], "a red square on white");
    b.script("document.getElementById('viewer').click(); return true;");

    // The query is in the URL: a fresh page at it searches again.
    let url = b.script("return location.href;");
    let url = url.as_str().unwrap().to_string();
    assert!(url.ends_with("/?q=a+red+square"), "{url}");
    b.open(&url);
    let again = b.wait(
        "the linked search",
        &format!("const h = (() => {{ {SHOWN} }})(); return h.length > 0 && h;"),
    );
    assert_eq!(again, shown);

    // "More like this" on a hit: its stored path is the query (in the URL
    // too), and the API answers the same for it as for its bytes.
    b.click(&format!(".hit[data-path='{rgb}']"));
    b.wait(
        "the viewer",
        "return !document.getElementById('viewer').hidden;",
    );
    b.click("#more");
    let more = b.wait(
        "more like this",
        &format!(
            "const h = (() => {{ {SHOWN} }})(); return h.length > 0 && location.search.includes('image=') && h;"
        ),
    );
    let (_, by_path, _) = s.post(
        "/v1/search",
        &json!({"query": "a red square", "image_path": rgb, "k": 48}),
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&rgb).unwrap());
    let (_, by_bytes, _) = s.post(
        "/v1/search",
        &json!({"query": "a red square", "image": b64, "k": 48}),
    );
    assert_eq!(by_path["data"], by_bytes["data"]);
    let paths: Vec<&Value> = by_path["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["path"])
        .collect();
    let got: Vec<&Value> = more.as_array().unwrap().iter().map(|r| &r[0]).collect();
    assert_eq!(got, paths);
    let (status, err, _) = s.post("/v1/search", &json!({"image_path": "/etc/passwd"}));
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("image_path")),
        "{err}"
    );
    b.script("document.getElementById('clear').click(); return true;");

    // An image as the query (the file input the drop zone also feeds).
    b.script("document.getElementById('q').value = ''; return true;");
    let gray = photos.join("gray.png").display().to_string();
    b.type_into("#file", &gray);
    let first = b.wait(
        "the image query",
        &format!(
            "const h = (() => {{ {SHOWN} }})(); return h.length > 0 && h[0][0] === {} && h[0];",
            json!(gray)
        ),
    );
    assert_eq!(first[0], json!(gray));

    // Thumbnails only for indexed files.
    for p in ["/etc/passwd", &photos.join("rgb.txt").display().to_string()] {
        let url = format!("{}/v1/thumbnail?path={}", s.base, p.replace('/', "%2F"));
        match ureq::get(&url).call() {
            Err(ureq::Error::Status(404, _)) => {}
            other => panic!("{p}: {:?}", other.map(|r| r.status())),
        }
    }
}

/// With the Chinese model the page takes a Chinese query and shows results.
#[test]
fn the_search_page_works_in_chinese_with_a_chinese_model() {
    let Some(b) = Browser::start() else { return };
    let d = tempfile::tempdir().unwrap();
    let files = ["rgb.png", "gray.png", "palette.png"];
    let (s, _) = indexed_server(d.path(), &core().join("tiny-chinese-clip"), &files);
    b.open(&format!("{}/", s.base));
    b.type_into("#q", "一只红色的方块\u{E007}");
    let shown = b.wait(
        "the grid",
        &format!("const h = (() => {{ {SHOWN} }})(); return h.length > 0 && h;"),
    );
    let (_, api, _) = s.post("/v1/search", &json!({"query": "一只红色的方块", "k": 48}));
    let paths: Vec<&Value> = api["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["path"])
        .collect();
    let got: Vec<&Value> = shown.as_array().unwrap().iter().map(|r| &r[0]).collect();
    assert_eq!(got, paths);
    let status = b.script("return document.getElementById('status').textContent;");
    assert_eq!(status, "", "no error shown");
}

/// A video in the store: its segments show in the grid as `clip.webm @
/// 00:04–00:08` with their frame as the thumbnail, and a click opens the
/// player on the served video, from the segment's start.
#[test]
fn the_search_page_shows_video_segments_and_plays_from_their_start() {
    let Some(b) = Browser::start() else { return };
    let d = tempfile::tempdir().unwrap();
    let (s, photos) = indexed_server(d.path(), &core().join("tiny-clip"), &["rgb.png"]);
    // Red for 4 s, then blue for 4 s (VP9 in WebM, which chromium plays).
    let video = photos.join("clip.webm");
    let st = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "color=c=red:s=64x48:r=5:d=4",
        ])
        .args(["-f", "lavfi", "-i", "color=c=blue:s=64x48:r=5:d=4"])
        .args([
            "-filter_complex",
            "[0][1]concat=n=2:v=1",
            "-c:v",
            "libvpx-vp9",
        ])
        .arg(&video)
        .status()
        .expect("ffmpeg runs (scripts/test.sh installs it)");
    assert!(st.success());
    // The server's store is indexed again, now with the video.
    let store = d.path().join("s.sqlite");
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["index", photos.to_str().unwrap(), "-m"])
        .arg(core().join("tiny-clip"))
        .args(["--store", store.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    b.open(&format!("{}/?q=blue", s.base));
    let labels = b.wait(
        "the video's segments",
        "const c = [...document.querySelectorAll('.hit .score')].map(x => x.textContent); \
         return c.some(t => t.includes('clip.webm @ 00:04–00:08')) && c;",
    );
    assert!(
        labels.to_string().contains("clip.webm @ 00:00–00:04"),
        "{labels}"
    );
    let thumb = b.wait(
        "the segment's frame",
        "const f = [...document.querySelectorAll('.hit')].find(x => \
           x.querySelector('.score').textContent.includes('@ 00:04')); \
         const i = f.querySelector('img'); \
         return i.complete && i.naturalWidth > 0 && [i.src, i.naturalWidth];",
    );
    assert!(thumb[0].as_str().unwrap().contains("&t=6.000"), "{thumb}");
    b.script(
        "[...document.querySelectorAll('.hit')].find(x => \
           x.querySelector('.score').textContent.includes('@ 00:04')).click(); return 0;",
    );
    let played = b.wait(
        "the player at the segment",
        "const p = document.getElementById('player'); \
         return !p.hidden && p.readyState >= 1 && [p.currentSrc, p.currentTime, \
           document.getElementById('full').hidden, document.getElementById('more').hidden];",
    );
    assert!(
        played[0].as_str().unwrap().contains("/v1/video?path=")
            && played[0].as_str().unwrap().contains("#t=4,8"),
        "{played}"
    );
    assert!(played[1].as_f64().unwrap() >= 4.0, "{played}");
    assert_eq!(
        (&played[2], &played[3]),
        (&Value::Bool(true), &Value::Bool(true))
    );
}
