//! Without FFmpeg (its programs pointed at a path that does not exist), a
//! video gets an error that names the file and says what to install. Its own
//! test binary: the setting is process-wide.

#[test]
fn a_missing_ffmpeg_is_named_with_its_install() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("clip.mp4");
    std::fs::write(&p, b"not read").unwrap();
    std::env::set_var("CLASP_FFPROBE", d.path().join("no-ffprobe"));
    let e = clasp::video::probe(&p).unwrap_err().to_string();
    assert!(
        e.contains("clip.mp4") && e.contains("apt install ffmpeg"),
        "{e}"
    );
}
