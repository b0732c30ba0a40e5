//! Video through FFmpeg (scripts/test.sh installs it): the containers users
//! have, frames sampled by count and by rate with their exact timestamps, a
//! quarter-turned video shown upright, and an error naming the file and the
//! cause for a missing, empty, truncated or non-video file. The videos are
//! made here by FFmpeg from solid colours in a known order, so every frame's
//! content is known.

use std::path::{Path, PathBuf};
use std::process::Command;

use clasp::video::{frame_at, frames, frames_at_rate, probe, Sampling};

/// A 3 s, 10 fps, 64×48 video: red for a second, then blue, then green.
fn make(dir: &Path, name: &str, codec: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-v", "error", "-y"]);
    for c in ["red", "blue", "green"] {
        cmd.args([
            "-f",
            "lavfi",
            "-i",
            &format!("color=c={c}:s=64x48:r=10:d=1"),
        ]);
    }
    let st = cmd
        .args(["-filter_complex", "[0][1][2]concat=n=3:v=1"])
        .args(codec)
        .arg(&out)
        .status()
        .expect("ffmpeg runs (scripts/test.sh installs it)");
    assert!(st.success());
    out
}

/// The mean (r, g, b) of a frame.
fn mean(img: &image::RgbImage) -> [f64; 3] {
    let mut s = [0f64; 3];
    for p in img.pixels() {
        for k in 0..3 {
            s[k] += p[k] as f64;
        }
    }
    let n = (img.width() * img.height()) as f64;
    s.map(|v| v / n)
}

fn dominant(img: &image::RgbImage) -> usize {
    let m = mean(img);
    (0..3).max_by(|&a, &b| m[a].total_cmp(&m[b])).unwrap()
}

#[test]
fn containers_sampling_timestamps_and_rotation() {
    let d = tempfile::tempdir().unwrap();
    let h264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p"];
    for (name, codec) in [
        ("v.mp4", &h264[..]),
        ("v.mov", &h264[..]),
        ("v.mkv", &h264[..]),
        ("v.webm", &["-c:v", "libvpx-vp9", "-b:v", "200k"][..]),
    ] {
        let p = make(d.path(), name, codec);
        let (info, fr) = frames(&p, Sampling::Count(3)).unwrap();
        assert!((info.duration - 3.0).abs() < 0.05, "{name}: {info:?}");
        assert!(
            (info.fps - 10.0).abs() < 1e-6 && (info.width, info.height) == (64, 48),
            "{name}"
        );
        // Spans' centres 0.5, 1.5, 2.5 s: frames stamped exactly there,
        // showing red, blue, green (channels 0, 2, 1).
        let times: Vec<f64> = fr.iter().map(|f| f.time).collect();
        for (t, want) in times.iter().zip([0.5, 1.5, 2.5]) {
            assert!((t - want).abs() < 1e-3, "{name}: {times:?}");
        }
        let colours: Vec<usize> = fr.iter().map(|f| dominant(&f.image)).collect();
        assert_eq!(colours, [0, 2, 1], "{name}");
    }
    let mp4 = d.path().join("v.mp4");
    let (_, fr) = frames(&mp4, Sampling::Fps(2.0)).unwrap();
    let times: Vec<f64> = fr.iter().map(|f| f.time).collect();
    assert_eq!(times.len(), 6);
    for (t, want) in times.iter().zip([0.0, 0.5, 1.0, 1.5, 2.0, 2.5]) {
        assert!((t - want).abs() < 1e-3, "{times:?}");
    }
    // A time between frames gets the next frame, stamped with its own time.
    let f = frame_at(&probe(&mp4).unwrap(), 1.03).unwrap();
    assert!(
        (f.time - 1.1).abs() < 1e-3 && dominant(&f.image) == 2,
        "{}",
        f.time
    );

    // Stored sideways with rotation metadata: shown upright, 48×64.
    let rot = d.path().join("rot.mp4");
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(&mp4)
        .args(["-c", "copy", "-metadata:s:v:0", "rotate=90"])
        .arg(&rot)
        .status()
        .unwrap();
    assert!(st.success());
    let (info, fr) = frames(&rot, Sampling::Count(1)).unwrap();
    assert_eq!((info.width, info.height, info.rotation.abs()), (48, 64, 90));
    assert_eq!(fr[0].image.dimensions(), (48, 64));
}

#[test]
fn bad_videos_are_named_with_their_cause() {
    let d = tempfile::tempdir().unwrap();
    let err = |p: &Path| {
        probe(p)
            .and_then(|i| frame_at(&i, 2.5).map(|_| ()))
            .unwrap_err()
            .to_string()
    };
    let missing = d.path().join("missing.mp4");
    assert!(err(&missing).contains("missing.mp4: no such file"));
    let text = d.path().join("notes.mp4");
    std::fs::write(&text, "these are notes, not a video").unwrap();
    let e = err(&text);
    assert!(
        e.contains("notes.mp4") && e.contains("not a readable video"),
        "{e}"
    );
    let empty = d.path().join("empty.webm");
    std::fs::write(&empty, b"").unwrap();
    let e = err(&empty);
    assert!(
        e.contains("empty.webm") && e.contains("not a readable video"),
        "{e}"
    );
    // Cut short: an MP4 without its index, and a WebM whose frames end early.
    let whole = make(
        d.path(),
        "whole.mp4",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let bytes = std::fs::read(&whole).unwrap();
    let cut = d.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let e = err(&cut);
    assert!(e.contains("cut.mp4"), "{e}");
    let webm = make(
        d.path(),
        "whole.webm",
        &["-c:v", "libvpx-vp9", "-b:v", "200k"],
    );
    let bytes = std::fs::read(&webm).unwrap();
    let cut = d.path().join("cut.webm");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&cut);
    assert!(e.contains("cut.webm"), "{e}");
    // The one-pass sampling (what indexing runs) names them too.
    for p in [&text, &empty, d.path().join("cut.mp4").as_path(), &cut] {
        let e = probe(p)
            .and_then(|i| frames_at_rate(&i, 2.0).map(|_| ()))
            .unwrap_err()
            .to_string();
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(e.contains(name), "{e}");
    }
}

/// The one-pass sampling by rate picks the frames that seeking picks: the
/// same timestamps and the same pixels, in every container.
#[test]
fn one_pass_sampling_equals_seeking_frame_by_frame() {
    let d = tempfile::tempdir().unwrap();
    for (name, codec) in [
        ("v.mp4", &["-c:v", "libx264", "-pix_fmt", "yuv420p"][..]),
        ("v.webm", &["-c:v", "libvpx-vp9", "-b:v", "200k"][..]),
    ] {
        let v = make(d.path(), name, codec);
        let info = probe(&v).unwrap();
        let fast = frames_at_rate(&info, 4.0).unwrap();
        let (_, slow) = frames(&v, Sampling::Fps(4.0)).unwrap();
        assert_eq!(fast.len(), slow.len(), "{name}");
        assert_eq!(fast.len(), 12, "{name}");
        for (a, b) in fast.iter().zip(&slow) {
            assert!(
                (a.time - b.time).abs() < 1e-6,
                "{name}: {} vs {}",
                a.time,
                b.time
            );
            assert_eq!(a.image, b.image, "{name} at {}", a.time);
        }
    }
}

/// `clasp embed --video`: each frame's vector is what `clasp embed --image`
/// gives a PNG of that frame (cut by FFmpeg itself), the mean is their
/// normalised mean, and a file that is not a video is named while the rest
/// are embedded.
#[test]
fn embed_video_frames_equal_the_image_path() {
    let d = tempfile::tempdir().unwrap();
    let v = make(
        d.path(),
        "v.mp4",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let bad = d.path().join("bad.mp4");
    std::fs::write(&bad, "not a video").unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core/tiny-clip");
    let out = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args([
            "embed",
            "-m",
            model.to_str().unwrap(),
            "--frames",
            "3",
            "--video",
        ])
        .arg(&v)
        .arg("--video")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad.mp4") && err.contains("not a readable video"),
        "{err}"
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    let vecs = |x: &serde_json::Value| -> Vec<f32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let frames = rows[0]["frames"].as_array().unwrap();
    let mut sum = vec![0f32; vecs(&frames[0]["embedding"]).len()];
    for f in frames {
        let t = f["time"].as_f64().unwrap();
        let png = d.path().join(format!("f{t}.png"));
        let st = Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-ss", &t.to_string(), "-i"])
            .arg(&v)
            .args(["-frames:v", "1"])
            .arg(&png)
            .status()
            .unwrap();
        assert!(st.success());
        let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
            .args(["embed", "-m", model.to_str().unwrap(), "--image"])
            .arg(&png)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let line: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap())
                .unwrap();
        let want = vecs(&line["embedding"]);
        let got = vecs(&f["embedding"]);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "frame at {t}: {worst}");
        for (s, x) in sum.iter_mut().zip(&got) {
            *s += x;
        }
    }
    let n = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
    for (m, s) in vecs(&rows[0]["mean"]).iter().zip(&sum) {
        assert!((m - s / n).abs() < 1e-5);
    }
}
