//! `clasp eval frechet`: the Fréchet distance between two image sets on a
//! pretrained image tower's pooled features (FID's formula; not FID, whose
//! Inception weights clasp does not have).

use super::*;
use clasp::eval::vq::Perceptual;

#[derive(Args, Debug)]
pub struct FrechetArgs {
    /// The reference images: a folder, or a file listing image paths.
    #[arg(long)]
    pub real: PathBuf,
    /// The images to compare with them (a folder or a list), e.g. `clasp draw --prompts-from`'s.
    #[arg(long)]
    pub generated: PathBuf,
    /// A pretrained CNN file (torchvision's MobileNetV2 or a ResNet, EfficientNet-Lite) whose
    /// pooled features are compared, with its own ImageNet preprocessing.
    #[arg(long)]
    pub tower: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The readable images of `src` (the others named on stderr) and their features.
fn features(tower: &Perceptual, src: &Path) -> Result<(Vec<Vec<f32>>, usize)> {
    let paths = clasp::encoder::image_inputs_from(src)?;
    let mut images = Vec::with_capacity(paths.len());
    let mut failed = 0;
    for p in &paths {
        match clasp::preprocess::image::load_image(p) {
            Ok(img) => images.push(img),
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    Ok((tower.features(&images)?, failed))
}

pub(super) fn frechet_cmd(a: FrechetArgs) -> Result<ExitCode> {
    let tower = Perceptual::load(&a.tower)?;
    let (real, bad_real) = features(&tower, &a.real)?;
    let (generated, bad_gen) = features(&tower, &a.generated)?;
    let fd = clasp::eval::frechet::frechet_distance(&real, &generated)
        .with_context(|| format!("{} against {}", a.generated.display(), a.real.display()))?;
    let dim = real.first().map_or(0, Vec::len);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "frechet_distance": fd, "real": real.len(), "generated": generated.len(),
                "unreadable": bad_real + bad_gen, "tower": a.tower.display().to_string(),
                "features": dim,
            }))?
        );
    } else {
        println!(
            "Fréchet distance {fd:.3} between {} real and {} generated images, on {}'s {dim} pooled features",
            real.len(),
            generated.len(),
            a.tower.display()
        );
    }
    Ok(if bad_real + bad_gen == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
