//! Videos in the index. A video is embedded in segments of a few seconds:
//! its frames sampled at a fixed rate in one FFmpeg pass, each segment the
//! mean of its frames' unit vectors (CLIP4Clip's mean pooling), normalised.
//!
//! Each segment is a row of its own in the files table. Its path is the
//! video's with a W3C media-fragment suffix (`clip.mp4#t=12.000,16.000`,
//! the form browsers play from), and its content hash is the video's hash
//! with the time range. Vectors thus stay content-addressed (a copy of a
//! video shares them), and both stores search segments as they search
//! photos, with no schema of their own. The video's own row holds the
//! mean of all its frames, so a whole video can match too.

use std::path::Path;

use super::catalog::Hash;
use crate::{Embedder, Error, Result};
use clasp_core::video;

/// How videos are cut for the index.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VideoOptions {
    /// The length of a segment, in seconds.
    pub segment_seconds: f64,
    /// Frames sampled per second.
    pub fps: f64,
}

impl Default for VideoOptions {
    fn default() -> Self {
        Self {
            segment_seconds: 4.0,
            fps: 1.0,
        }
    }
}

impl VideoOptions {
    pub fn check(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !ok(self.segment_seconds) || !ok(self.fps) {
            return Err(Error::Report(format!(
                "video segments of {} s at {} frames a second: both must be above 0",
                self.segment_seconds, self.fps
            )));
        }
        Ok(())
    }
}

pub use clasp_core::video::is_video;

const FRAGMENT: &str = "#t=";

/// The stored path of a video's segment.
pub fn segment_path(video: &str, start: f64, end: f64) -> String {
    format!("{video}{FRAGMENT}{start:.3},{end:.3}")
}

/// A stored segment path as (video path, start, end); `None` for any
/// other path.
pub fn parse_segment(path: &str) -> Option<(&str, f64, f64)> {
    let (video, range) = path.rsplit_once(FRAGMENT)?;
    let (a, b) = range.split_once(',')?;
    Some((video, a.parse().ok()?, b.parse().ok()?))
}

/// The content hash of a segment: the video's content and the range.
pub fn segment_hash(video: &Hash, start: f64, end: f64) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"clasp video segment\0");
    h.update(video);
    h.update(format!("{start:.3},{end:.3}").as_bytes());
    *h.finalize().as_bytes()
}

/// `00:12` (or `1:02:03` past an hour), for people.
pub fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

/// One segment's time range and vector.
#[derive(Clone, Debug)]
pub struct Segment {
    pub start: f64,
    pub end: f64,
    pub vector: Vec<f32>,
}

/// A video's vectors: the whole video's and its segments', in time order.
#[derive(Clone, Debug)]
pub struct VideoVectors {
    pub mean: Vec<f32>,
    pub segments: Vec<Segment>,
}

fn unit_mean<'a>(rows: impl Iterator<Item = &'a Vec<f32>>, dim: usize) -> Vec<f32> {
    let mut m = vec![0f32; dim];
    for r in rows {
        for (a, b) in m.iter_mut().zip(r) {
            *a += b;
        }
    }
    let n = m.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    m.iter_mut().for_each(|v| *v /= n);
    m
}

/// Groups frame vectors (`times` in seconds) into segments of `seconds`
/// within a video of `duration`: segment k is [k·s, min((k+1)·s,
/// duration)], present when a frame falls in it.
pub fn segments(times: &[f64], rows: &[Vec<f32>], seconds: f64, duration: f64) -> Vec<Segment> {
    let dim = rows.first().map_or(0, Vec::len);
    let mut out: Vec<Segment> = Vec::new();
    let mut i = 0;
    while i < times.len() {
        let k = (times[i] / seconds).floor().max(0.0);
        let mut j = i;
        while j < times.len() && (times[j] / seconds).floor().max(0.0) == k {
            j += 1;
        }
        let start = k * seconds;
        out.push(Segment {
            start,
            end: ((k + 1.0) * seconds).min(duration.max(start)),
            vector: unit_mean(rows[i..j].iter(), dim),
        });
        i = j;
    }
    out
}

/// Frames of a video held at once for the encoder, whatever the batch
/// size: a 4K frame is 25 MB.
const MAX_FRAME_BATCH: usize = 16;

/// Embeds the video at `path`: frames at `opts.fps`, streamed from FFmpeg
/// and embedded `batch` (at most 16) at a time ([`crate::Encoder::embed_video`]),
/// so memory holds a batch of frames and the vectors, however long the
/// video.
pub fn embed(
    encoder: &dyn Embedder,
    path: &Path,
    opts: &VideoOptions,
    batch: usize,
) -> Result<VideoVectors> {
    let e = encoder.dual("indexing a video")?.embed_video(
        path,
        video::Sampling::Fps(opts.fps),
        batch.clamp(1, MAX_FRAME_BATCH),
    )?;
    Ok(VideoVectors {
        segments: segments(&e.times, &e.frames, opts.segment_seconds, e.info.duration),
        mean: e.mean,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_paths_round_trip_and_ranges_group_frames() {
        let p = segment_path("/v/a#b.mp4", 12.0, 16.0);
        assert_eq!(p, "/v/a#b.mp4#t=12.000,16.000");
        assert_eq!(parse_segment(&p), Some(("/v/a#b.mp4", 12.0, 16.0)));
        assert_eq!(parse_segment("/v/photo.jpg"), None);
        assert_ne!(
            segment_hash(&[1; 32], 0.0, 4.0),
            segment_hash(&[1; 32], 4.0, 8.0)
        );
        assert_eq!(clock(16.4), "00:16");
        assert_eq!(clock(3723.0), "1:02:03");
        // Frames at 0..9 s in 4-second segments of a 9.5-second video.
        let times: Vec<f64> = (0..10).map(|t| t as f64).collect();
        let rows: Vec<Vec<f32>> = (0..10)
            .map(|t| {
                if t < 4 {
                    vec![1.0, 0.0]
                } else {
                    vec![0.0, 2.0]
                }
            })
            .collect();
        let s = segments(&times, &rows, 4.0, 9.5);
        let ranges: Vec<(f64, f64)> = s.iter().map(|x| (x.start, x.end)).collect();
        assert_eq!(ranges, [(0.0, 4.0), (4.0, 8.0), (8.0, 9.5)]);
        assert_eq!(s[0].vector, [1.0, 0.0]);
        assert_eq!(s[1].vector, [0.0, 1.0]);
    }
}
