//! Built-in class names and prompt templates for zero-shot classification.

/// CIFAR-10 classes, in the dataset's label order (also sorted folder order).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Chinese names of the CIFAR-10 classes, as Chinese-CLIP's zero-shot
/// benchmark (ELEVATER) labels them.
pub const CIFAR10_CLASSES_ZH: [&str; 10] = [
    "飞机", "汽车", "鸟", "猫", "鹿", "狗", "青蛙", "马", "船", "卡车",
];

/// openai/CLIP's 18 CIFAR-10 templates (`notebooks/Prompt_Engineering_for_ImageNet.ipynb`
/// and the CIFAR10 section of CLIP's prompts file).
pub const CIFAR_TEMPLATES_EN: [&str; 18] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
];

/// Chinese templates in the style of CLIP_benchmark's `cn` ImageNet set and
/// Chinese-CLIP's zero-shot prompts, covering the same variations as the
/// English CIFAR set (blur, black and white, contrast, quality, size).
pub const CIFAR_TEMPLATES_ZH: [&str; 12] = [
    "{}的照片。",
    "一张{}的照片。",
    "{}的模糊照片。",
    "{}的黑白照片。",
    "{}的低对比度照片。",
    "{}的高对比度照片。",
    "{}的糟糕照片。",
    "一张{}的好照片。",
    "小{}的照片。",
    "大{}的照片。",
    "一张关于{}的照片。",
    "{}的特写照片。",
];

/// The built-in templates: Chinese for Chinese models, else openai's English.
pub fn default_templates(chinese: bool) -> Vec<String> {
    let t: &[&str] = if chinese {
        &CIFAR_TEMPLATES_ZH
    } else {
        &CIFAR_TEMPLATES_EN
    };
    t.iter().map(|s| s.to_string()).collect()
}

/// Fills a template: `{}` or `{c}` stands for the class name.
pub fn fill(template: &str, class: &str) -> String {
    if template.contains("{c}") {
        template.replace("{c}", class)
    } else {
        template.replacen("{}", class, 1)
    }
}

/// Every template filled with every class, class by class.
pub fn class_prompts(classes: &[String], templates: &[String]) -> Vec<String> {
    classes
        .iter()
        .flat_map(|c| templates.iter().map(move |t| fill(t, c)))
        .collect()
}

/// Chinese names for class folders that are CIFAR-10 classes.
pub fn zh_name(class: &str) -> Option<&'static str> {
    CIFAR10_CLASSES
        .iter()
        .position(|c| *c == class)
        .map(|i| CIFAR10_CLASSES_ZH[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_both_placeholders() {
        assert_eq!(fill("a photo of a {}.", "cat"), "a photo of a cat.");
        assert_eq!(fill("{c}的照片。", "猫"), "猫的照片。");
        assert_eq!(zh_name("truck"), Some("卡车"));
        assert_eq!(zh_name("lion"), None);
    }
}
