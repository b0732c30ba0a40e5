#!/usr/bin/env python3
"""Fixtures for Emu3's VQ image tokenizer (`Emu3VQVAE`), made by transformers:

    PYTHONPATH=/tmp/torchpy python3 scripts/gen_emu3_vq_fixtures.py
    # writes tests/fixtures/emu3/vq/

  config.json       Emu3's real VQ config (BAAI/Emu3-VisionTokenizer, as
                    transformers' Emu3VQVAEConfig names it: a 32768-code
                    codebook of 4-d codes, channel multipliers 1,2,2,4, two
                    residual blocks a level, attention at the last level, 4x
                    temporal and 8x spatial downsampling) with the channels cut
                    from 256 to 32 (attention 128 wide instead of 1024), so
                    that the 4 copies of a frame the encoder sees run in a
                    test's time on 2 cores
  preprocessor_config.json
                    Emu3ImageProcessor with Emu3's [-1, 1] normalisation
                    (mean and std 0.5) and its spatial factor 8; the pixel
                    budget cut from 512^2..1024^2 to 96^2..128^2 for speed
  manifest.json     every state-dict key and its shape; the weights are
                    scripts/formula.py's `hashed`, except BatchNorm's running
                    variances, which are |hashed| + 0.5 (they must be positive),
                    and its `num_batches_tracked` counters, which are left out
  expected.safetensors
                    - pixels.{i}: the processor's pixel values of Flickr8k dev
                      photos 0 and 1 (each alone, so unpadded), as
                      image_sizes.{i} says
                    - codes.{i}: `Emu3VQVAE.encode`'s image tokens of each
                    - latents.{i}: the quantizer's input, [1, 4, h, w]
                    - margin.{i}: per position, the gap between the nearest and
                      the second-nearest code's squared distance (how far the
                      codes are from a tie)
                    - decoded.{i}: `Emu3VQVAE.decode` of those codes, pixels
                      before clamping
                    - video.pixels: 8 frames (dev photos 2 to 9, the processor's
                      padded batch), video.codes its 2 x h x w tokens and
                      video.decoded the 8 frames decoded back
"""
import json
import os
import sys

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Emu3VQVAE, Emu3VQVAEConfig
from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formula import hashed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/emu3/vq")
FLICKR = os.path.join(os.path.dirname(ROOT), "shared/data/flickr8k")
COCO_PHOTO = os.path.join(os.path.dirname(ROOT),
                          "shared/data/coco-mini-train/train2017/000000000790.jpg")


def weight(name, shape):
    v = hashed(name, shape)
    if name.endswith("running_var"):
        return v.abs() + 0.5
    if name.endswith("quantize.embedding.weight"):
        return 10 * v  # codes spread as wide as the latents, so no two are near a tie
    return v


def dev_photos(n):
    names = open(os.path.join(FLICKR, "Flickr_8k.devImages.txt")).read().split()
    return [os.path.join(FLICKR, "images", x) for x in names[:n]]


def resized(proc, image):
    """The processor's resize alone: the uint8 pixels (HWC) it normalises."""
    b = proc(image, do_rescale=False, do_normalize=False, return_tensors="pt")
    return b["pixel_values"][0].permute(1, 2, 0).round().to(torch.uint8).contiguous()


def latents(model, pixels):
    """The quantizer's input for images: [B, T', E, h, w]."""
    temporal = model.config.temporal_downsample_factor
    h = model.encoder(pixels.unsqueeze(1).repeat(1, temporal, 1, 1, 1))
    return model.quant_conv(h.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)


def margins(model, pixels):
    """The nearest-minus-second-nearest squared distance at each position."""
    with torch.no_grad():
        h = latents(model, pixels)
        flat = h.permute(0, 1, 3, 4, 2).reshape(-1, h.shape[2])
        e = model.quantize.embedding.weight
        d = (flat**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * flat @ e.T
        two = d.topk(2, dim=1, largest=False).values
        return (two[:, 1] - two[:, 0]).reshape(h.shape[0], h.shape[3], h.shape[4])


def main():
    os.makedirs(OUT, exist_ok=True)
    cfg = Emu3VQVAEConfig(codebook_size=32768, embed_dim=4, latent_channels=4, double_latent=False,
                          in_channels=3, out_channels=3, temporal_downsample_factor=4,
                          base_channels=32, channel_multiplier=[1, 2, 2, 4], num_res_blocks=2,
                          attn_resolutions=[3], hidden_size=128, num_attention_heads=1)
    model = Emu3VQVAE(cfg).eval()
    manifest = {k: list(t.shape) for k, t in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    model.load_state_dict({k: weight(k, s) for k, s in manifest.items()}, strict=False)
    cfg.save_pretrained(OUT)
    json.dump({"formula": "scripts/formula.py hashed; running_var: |hashed| + 0.5",
               "shapes": manifest}, open(os.path.join(OUT, "manifest.json"), "w"), indent=0)
    proc = Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=96 * 96,
                              max_pixels=128 * 128, spatial_factor=8)
    proc.save_pretrained(OUT)

    photos = [dev_photos(1)[0], COCO_PHOTO]
    out = {}
    with torch.no_grad():
        for i, path in enumerate(photos):
            image = Image.open(path)
            b = proc(image, return_tensors="pt")
            pixels, sizes = b["pixel_values"], b["image_sizes"]
            codes = model.encode(pixels, sizes).image_tokens[0]
            decoded = model.decode(codes.unsqueeze(0))[0]
            m = margins(model, pixels)[0]
            print(f"photo {i}: {image.size} -> {tuple(pixels.shape)} -> codes {tuple(codes.shape)}, "
                  f"min margin {m.min():.3g}, decoded range {decoded.min():.3f}..{decoded.max():.3f}")
            out[f"resized.{i}"] = resized(proc, image)
            out[f"pixels_sum.{i}"] = pixels[0].double().sum((1, 2))
            out[f"codes.{i}"] = codes.to(torch.int64).contiguous()
            out[f"margin.{i}"] = m.contiguous()
            out[f"latents.{i}"] = latents(model, pixels)[0].contiguous()
            out[f"decoded.{i}"] = decoded[:, ::4, ::4].contiguous()
            out[f"decoded_sum.{i}"] = decoded.double().sum((1, 2))
        small = Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=32 * 32,
                                   max_pixels=64 * 64, spatial_factor=8)
        frames = [Image.open(p) for p in dev_photos(10)[2:10]]
        video = small(frames, return_tensors="pt")["pixel_values"].unsqueeze(0)  # [1, 8, 3, H, W]
        hidden = model.encoder(video)
        conv = model.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        vcodes = model.quantize(conv)[0]  # [2, h, w]
        vdecoded = model.decode(vcodes.unsqueeze(0))[0]  # [8, 3, H, W]
        print(f"video: {tuple(video.shape)} -> codes {tuple(vcodes.shape)}, "
              f"decoded {tuple(vdecoded.shape)}")
        out["video.resized"] = torch.stack([resized(small, f) for f in frames])
        out["video.codes"] = vcodes.to(torch.int64).contiguous()
        out["video.decoded"] = vdecoded[:, :, ::4, ::4].contiguous()
        out["video.decoded_sum"] = vdecoded.double().sum((2, 3))
    save_file(out, os.path.join(OUT, "expected.safetensors"))


if __name__ == "__main__":
    main()
