#!/usr/bin/env python3
"""Fixtures for clasp's DPO on a vision-language model (tests/dpo_parity.rs): TRL's DPOTrainer with a Llava.

    cargo build --release
    PYTHONPATH=/tmp/torchpy python3 scripts/gen_dpo_vlm_fixtures.py

1. `clasp assemble` joins tests/fixtures/vlm/vision and SmolLM2-135M-Instruct (seed 0), as the
   tests' `common::assembled` does; transformers loads it as LlavaForConditionalGeneration with
   its LlavaProcessor.
2. DPOTrainer with a LoRA config (rank 2, alpha 4, the language model's v_proj) on four
   conversational pairs about two Flickr8k photos (the same user turn, so no prompt is padded);
   the adapter is then drawn N(0, 0.05²) from torch's generator seeded 2, rounded to bfloat16,
   and saved in PEFT's layout as tests/fixtures/dpo/vlm/adapter/. The reference is the model
   with its adapter disabled. TRL's vision collator builds one batch (the processor expands the
   image token, left-pads prompts, right-pads completions).
3. For the sigmoid and ipo losses (beta 0.1), `compute_loss` on that batch and its backward.

Writes tests/fixtures/dpo/vlm/prefs.jsonl (the pairs, photos by path relative to the file),
trl.json (each pair's prompt and completion ids as TRL's batch holds them, per loss the loss and
TRL's logged rewards and log-probabilities) and grads.safetensors (per loss, the adapter's
gradients on layers 0, 14 and 29, and the global norm; and the batch's pixel_values).
"""

import json
import os
import subprocess
import tempfile

import datasets.fingerprint
import torch
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from trl import DPOConfig, DPOTrainer
from datasets import Dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "dpo", "vlm")
IMAGES = os.path.join(ROOT, "..", "shared", "data", "flickr8k", "images")
PAIRS = [
    ("2090545563_a4e66ec76b.jpg", "A dog runs on the grass.", "A cat sleeps on a couch."),
    ("3393035454_2d2370ffd4.jpg", "Children play on a beach.", "Children play with a bus."),
    ("2090545563_a4e66ec76b.jpg", "A brown dog in a field.", "A brown horse in a field."),
    ("3393035454_2d2370ffd4.jpg", "Two kids in the sand.", "Two kids on skis near a truck."),
]
LAYERS = [0, 14, 29]


def main():
    # As in gen_dpo_fixtures.py: datasets' fingerprint pickling fails with these versions.
    counter = iter(range(10**9))
    datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: f"{next(counter):016x}")
    clasp = os.path.join(ROOT, "target/release/clasp")
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "prefs.jsonl"), "w") as fh:
        for img, c, r in PAIRS:
            fh.write(json.dumps({
                "prompt": [{"role": "user", "content": [{"type": "image"},
                                                        {"type": "text", "text": "Describe the image."}]}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
                "images": [os.path.relpath(os.path.join(IMAGES, img), OUT)],
            }) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        vlm = os.path.join(tmp, "vlm")
        subprocess.run([clasp, "assemble", "--vision", os.path.join(ROOT, "tests/fixtures/vlm/vision"),
                        "--llm", gguf, "-o", vlm], check=True)
        model = LlavaForConditionalGeneration.from_pretrained(vlm, dtype=torch.float32)
        proc = LlavaProcessor.from_pretrained(vlm)
        rows = [{"images": [Image.open(os.path.join(IMAGES, img)).convert("RGB")],
                 "prompt": [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": "Describe the image."}]}],
                 "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}]} for img, c, r in PAIRS]
        args = DPOConfig(output_dir=os.path.join(tmp, "out"), beta=0.1, loss_type=["sigmoid"],
                         report_to=[], per_device_train_batch_size=len(rows), use_cpu=True,
                         bf16=False, max_length=None)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=proc,
                             peft_config=LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                    target_modules=r".*language_model.*\.v_proj"))
        pm = trainer.model
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(torch.bfloat16).float())
        adapter = os.path.join(OUT, "adapter")
        pm.save_pretrained(adapter)
        w = os.path.join(adapter, "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(w).items()}, w)
        os.remove(os.path.join(adapter, "README.md"))
        batch = trainer.data_collator([dict(r) for r in rows])
        n = len(rows)
        ids = []
        for i in range(2 * n):
            keep = batch["attention_mask"][i].bool()
            row = batch["input_ids"][i][keep].tolist()
            comp = batch["completion_mask"][i][keep].bool().tolist()
            start = comp.index(True)
            ids.append((row[:start], row[start:]))
        out = {"ids": [{"prompt": ids[i][0], "chosen": ids[i][1], "rejected": ids[n + i][1]}
                       for i in range(n)], "losses": {}}
        # The pixels the processor made, so the test compares the DPO on the same input
        # (JPEG decoders and resizing differ in the last bits; tests/vlm.rs bounds that).
        grads = {"pixel_values": batch["pixel_values"][:n].contiguous()}
        pm.train()
        for loss_type in ["sigmoid", "ipo"]:
            trainer.loss_types = [loss_type]
            trainer.loss_weights = [1.0]
            trainer._metrics["train"].clear()
            pm.zero_grad()
            loss = trainer.compute_loss(pm, dict(batch))
            loss.backward()
            m = {k: v[-1] for k, v in trainer._metrics["train"].items()
                 if k.startswith("rewards/") or k.startswith("logps/")}
            out["losses"][loss_type] = {"loss": loss.item(), **m}
            sq = 0.0
            for name, p in pm.named_parameters():
                if p.grad is None:
                    continue
                sq += float((p.grad.double() ** 2).sum())
                if any(f"layers.{l}." in name for l in LAYERS):
                    grads[f"{loss_type}/{name.replace('.default', '')}"] = p.grad.detach().clone().contiguous()
            grads[f"{loss_type}/norm"] = torch.tensor([sq ** 0.5], dtype=torch.float64)
    with open(os.path.join(OUT, "trl.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    save_file(grads, os.path.join(OUT, "grads.safetensors"))
    print(json.dumps(out["losses"], indent=1))
    print(sorted(grads)[:3])


if __name__ == "__main__":
    main()
