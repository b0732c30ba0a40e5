//! Video input through FFmpeg: what a file holds (`ffprobe`), and frames
//! sampled in time (`ffmpeg`), decoded to RGB with their exact timestamps.
//!
//! The `ffmpeg` and `ffprobe` programs are found on `PATH` (or at
//! `CLASP_FFMPEG` / `CLASP_FFPROBE`). A Rust binding to FFmpeg's libraries
//! would tie the build to one FFmpeg version's headers and need its -dev
//! packages at build time; the programs read every container and codec the
//! installed FFmpeg reads (MP4/H.264, WebM/VP9, MKV, MOV, ...), and a
//! machine without them still builds and runs everything else. Rotation
//! metadata is honoured (FFmpeg's autorotate): frames come upright, with the
//! probe's width and height swapped for a quarter turn.
//!
//! Every failure names the file and the cause: FFmpeg missing, a file that
//! is not a video, an empty video, or a truncated one whose frames end
//! before a requested time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use image::RgbImage;
use serde::Serialize;

use crate::{Error, Result};

/// What a video file holds (its first video stream), as shown upright.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VideoInfo {
    pub path: PathBuf,
    /// Seconds.
    pub duration: f64,
    pub width: u32,
    pub height: u32,
    /// Frames per second (the stream's average).
    pub fps: f64,
    /// Degrees the stored frames are turned to be shown upright.
    pub rotation: i32,
    pub codec: String,
}

/// How frames are picked in time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// `n` frames, uniformly: the centres of `n` equal spans of the video.
    Count(usize),
    /// One frame every `1 / fps` seconds, from the start.
    Fps(f64),
}

/// One decoded frame and when it is shown (seconds from the start).
#[derive(Debug, Clone)]
pub struct Frame {
    pub time: f64,
    pub image: RgbImage,
}

fn program(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A program that would not start: FFmpeg missing (named, with the line
/// that installs it), or another error reading `path`.
fn missing_or_io(path: &Path, e: std::io::Error, what: &str) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::Report(format!(
            "{}: reading video needs FFmpeg's `{what}`, which is not installed (apt install ffmpeg; or set CLASP_FFMPEG and CLASP_FFPROBE)",
            path.display()
        ))
    } else {
        Error::io(path, e)
    }
}

fn run(path: &Path, cmd: &mut Command, what: &str) -> Result<std::process::Output> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| missing_or_io(path, e, what))
}

fn stderr_reason(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| format!("exit status {}", out.status))
}

fn ratio(s: &str) -> Option<f64> {
    match s.split_once('/') {
        Some((a, b)) => {
            let (a, b) = (a.parse::<f64>().ok()?, b.parse::<f64>().ok()?);
            (b != 0.0).then_some(a / b)
        }
        None => s.parse().ok(),
    }
}

/// The video's first video stream.
/// The containers clasp treats as video (indexing, captioning).
pub fn is_video(path: &Path) -> bool {
    const EXTS: &[&str] = &["mp4", "m4v", "mov", "mkv", "webm", "avi"];
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

pub fn probe(path: &Path) -> Result<VideoInfo> {
    if !path.is_file() {
        return Err(Error::Report(format!("{}: no such file", path.display())));
    }
    let out = run(
        path,
        Command::new(program("CLASP_FFPROBE", "ffprobe"))
            .args(["-v", "error", "-select_streams", "v:0", "-print_format", "json"])
            .args(["-show_entries", "stream=codec_name,width,height,avg_frame_rate,r_frame_rate,duration:stream_side_data=rotation:format=duration"])
            .arg(path),
        "ffprobe",
    )?;
    let bad =
        |why: String| Error::Report(format!("{}: not a readable video: {why}", path.display()));
    if !out.status.success() {
        return Err(bad(stderr_reason(&out)));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| bad(format!("ffprobe's output: {e}")))?;
    let s = v["streams"]
        .get(0)
        .ok_or_else(|| bad("it has no video stream".into()))?;
    let num = |x: &serde_json::Value| x.as_str().and_then(|t| t.parse::<f64>().ok());
    let duration = num(&s["duration"])
        .or_else(|| num(&v["format"]["duration"]))
        .unwrap_or(0.0);
    let fps = s["avg_frame_rate"]
        .as_str()
        .and_then(ratio)
        .filter(|f| *f > 0.0)
        .or_else(|| s["r_frame_rate"].as_str().and_then(ratio))
        .unwrap_or(0.0);
    let rotation = s["side_data_list"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| d["rotation"].as_i64())
        .unwrap_or(0) as i32;
    let (w, h) = (
        s["width"].as_u64().unwrap_or(0) as u32,
        s["height"].as_u64().unwrap_or(0) as u32,
    );
    if w == 0 || h == 0 || duration <= 0.0 {
        return Err(Error::Report(format!(
            "{}: an empty video (no frames to show)",
            path.display()
        )));
    }
    let quarter = rotation.rem_euclid(180) == 90;
    Ok(VideoInfo {
        path: path.to_path_buf(),
        duration,
        width: if quarter { h } else { w },
        height: if quarter { w } else { h },
        fps,
        rotation,
        codec: s["codec_name"].as_str().unwrap_or("?").to_string(),
    })
}

/// The times (seconds) `sampling` picks in a video of `duration` seconds.
pub fn sample_times(duration: f64, sampling: Sampling) -> Vec<f64> {
    match sampling {
        Sampling::Count(n) => (0..n)
            .map(|i| (i as f64 + 0.5) * duration / n as f64)
            .collect(),
        Sampling::Fps(f) if f > 0.0 => (0..)
            .map(|i| i as f64 / f)
            .take_while(|t| *t < duration)
            .collect(),
        Sampling::Fps(_) => Vec::new(),
    }
}

/// The timestamps FFmpeg's `showinfo` filter logged, in order.
fn shown_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("showinfo") && l.contains("pts_time:"))
        .filter_map(|l| {
            l.split("pts_time:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .collect()
}

/// The first frame whose timestamp is at or after `time` (FFmpeg's accurate
/// seek), decoded upright, with its own timestamp.
pub fn frame_at(info: &VideoInfo, time: f64) -> Result<Frame> {
    let path = &info.path;
    let out = run(
        path,
        Command::new(program("CLASP_FFMPEG", "ffmpeg"))
            .args(["-v", "info", "-nostats", "-copyts", "-ss"])
            .arg(format!("{time:.6}"))
            .arg("-i")
            .arg(path)
            .args([
                "-frames:v",
                "1",
                "-vf",
                "showinfo",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-",
            ]),
        "ffmpeg",
    )?;
    if !out.status.success() {
        return Err(Error::Report(format!(
            "{}: could not decode a frame at {time:.3} s: {}",
            path.display(),
            stderr_reason(&out)
        )));
    }
    let (w, h) = (info.width as usize, info.height as usize);
    if out.stdout.len() != w * h * 3 {
        return Err(Error::Report(format!(
            "{}: no frame at {time:.3} s (the video is {:.3} s long by its header; truncated?)",
            path.display(),
            info.duration
        )));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let shown = shown_times(&err).first().copied().unwrap_or(time);
    let image = RgbImage::from_raw(info.width, info.height, out.stdout)
        .expect("checked: width × height × 3 bytes");
    Ok(Frame { time: shown, image })
}

/// One frame every `1 / fps` seconds (the first at or after each multiple
/// of it, as [`frame_at`] picks), decoded upright in one FFmpeg pass and
/// handed to `each` as it comes, so memory holds one frame at a time
/// whatever the video's length (and FFmpeg decodes the next while `each`
/// works). Returns the frames' timestamps, in order. An error from `each`
/// stops FFmpeg and is returned.
pub fn each_frame_at_rate(
    info: &VideoInfo,
    fps: f64,
    mut each: impl FnMut(RgbImage) -> Result<()>,
) -> Result<Vec<f64>> {
    use std::io::Read;
    let path = &info.path;
    if fps.is_nan() || fps <= 0.0 {
        return Err(Error::Report(format!(
            "{}: a frame rate must be above 0, not {fps}",
            path.display()
        )));
    }
    let mut child = Command::new(program("CLASP_FFMPEG", "ffmpeg"))
        .args(["-v", "info", "-nostats", "-copyts", "-i"])
        .arg(path)
        .args(["-an", "-vf"])
        .arg(format!("select='gte(t\\,selected_n/{fps})',showinfo"))
        .args([
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| missing_or_io(path, e, "ffmpeg"))?;
    let mut stderr = child.stderr.take().expect("piped");
    let log = std::thread::spawn(move || {
        let mut t = String::new();
        let _ = stderr.read_to_string(&mut t);
        t
    });
    let mut stdout = child.stdout.take().expect("piped");
    let size = info.width as usize * info.height as usize * 3;
    let (mut frames, mut partial) = (0usize, 0usize);
    let mut failed = None;
    loop {
        let mut buf = vec![0u8; size];
        let mut got = 0;
        while got < size {
            match stdout.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(Error::io(path, e));
                    break;
                }
            }
        }
        if got < size || failed.is_some() {
            partial = got;
            break;
        }
        let image = RgbImage::from_raw(info.width, info.height, buf)
            .expect("width × height × 3 bytes read");
        if let Err(e) = each(image) {
            failed = Some(e);
            break;
        }
        frames += 1;
    }
    if failed.is_some() {
        let _ = child.kill();
    }
    drop(stdout);
    let status = child.wait().map_err(|e| Error::io(path, e))?;
    let err = log.join().unwrap_or_default();
    if let Some(e) = failed {
        return Err(e);
    }
    if !status.success() {
        let out = std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: err.into_bytes(),
        };
        return Err(Error::Report(format!(
            "{}: could not decode its frames: {}",
            path.display(),
            stderr_reason(&out)
        )));
    }
    let times = shown_times(&err);
    let end = times.last().copied().unwrap_or(0.0) + 1.0 / fps;
    if frames > 0 && end < info.duration - 0.25 {
        return Err(Error::Report(format!(
            "{}: its frames end at {:.3} s, but the video is {:.3} s long by its header \
             (truncated?)",
            path.display(),
            times.last().copied().unwrap_or(0.0),
            info.duration
        )));
    }
    if partial != 0 || times.len() != frames || frames == 0 {
        return Err(Error::Report(format!(
            "{}: FFmpeg gave {frames} whole frames of {}x{} (and {partial} bytes) for {} \
             timestamps (truncated?)",
            path.display(),
            info.width,
            info.height,
            times.len()
        )));
    }
    Ok(times)
}

/// [`each_frame_at_rate`]'s frames, all in memory (for short videos).
pub fn frames_at_rate(info: &VideoInfo, fps: f64) -> Result<Vec<Frame>> {
    let mut images = Vec::new();
    let times = each_frame_at_rate(info, fps, |im| {
        images.push(im);
        Ok(())
    })?;
    Ok(images
        .into_iter()
        .zip(times)
        .map(|(image, time)| Frame { time, image })
        .collect())
}

/// The frames `sampling` picks, in time order.
pub fn frames(path: &Path, sampling: Sampling) -> Result<(VideoInfo, Vec<Frame>)> {
    let info = probe(path)?;
    let frames = sample_times(info.duration, sampling)
        .into_iter()
        .map(|t| frame_at(&info, t))
        .collect::<Result<Vec<_>>>()?;
    Ok((info, frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_times() {
        assert_eq!(sample_times(4.0, Sampling::Count(4)), [0.5, 1.5, 2.5, 3.5]);
        assert_eq!(
            sample_times(1.0, Sampling::Fps(4.0)),
            [0.0, 0.25, 0.5, 0.75]
        );
        assert!(sample_times(1.0, Sampling::Fps(0.0)).is_empty());
        assert_eq!(
            ratio("30000/1001").map(|f| (f * 1000.0).round()),
            Some(29970.0)
        );
    }
}
