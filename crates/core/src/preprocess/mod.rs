//! Input preprocessing: images (decode, orient, resize, crop, normalise) and
//! text (tokenize, pad, truncate).

pub mod anyres;
pub mod augment;
pub mod clip_bpe;
pub mod image;
pub mod pipeline;
pub mod prompts;
pub mod resample;
pub mod sentencepiece;
pub mod text;

pub use self::image::{
    decode_image, load_image, ImageProcessor, ImageProcessorConfig, Pixels, ResizeTo,
};
pub use self::text::{TextTokenizer, TokenBatch};
