#!/usr/bin/env python3
"""Fixtures for clasp's DPO (tests/dpo_parity.rs): TRL's DPOTrainer on one batch of SmolLM2 with a LoRA adapter.

    pip install --target /tmp/torchpy torch transformers peft trl datasets gguf accelerate
    PYTHONPATH=/tmp/torchpy python3 scripts/gen_dpo_fixtures.py

1. transformers loads SmolLM2-135M-Instruct from the GGUF that scripts/get-smollm2.sh fetches
   (dequantized to f32, as clasp's f32 path does).
2. A LoRA adapter (rank 2, alpha 4, on every layer's v_proj) with weights drawn N(0, 0.05²) from
   torch's generator seeded 0 and rounded to bfloat16, so that the policy differs from the
   reference and both sides read the same numbers: saved in PEFT's layout as
   tests/fixtures/dpo/adapter/ (adapter_model.safetensors in bf16, adapter_config.json).
3. tests/fixtures/dpo/prefs.jsonl: four conversational preference pairs in TRL's format.
4. DPOTrainer (PEFT model, no ref_model: the reference is the model with its adapter disabled)
   tokenizes them and collates one batch of the four; for each loss type (sigmoid, hinge, ipo,
   robust with label_smoothing 0.1; beta 0.1) `compute_loss` runs on that batch and the loss
   is backpropagated.

Writes tests/fixtures/dpo/trl.json (TRL's prompt/chosen/rejected ids per pair; per loss type the
loss and the metrics TRL logs: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected; and the per-pair policy and reference log-probs)
and tests/fixtures/dpo/grads.safetensors (per loss type, the adapter's gradients on layers 0, 14
and 29, and the global gradient norm).
"""

import json
import os
import subprocess
import tempfile

import datasets.fingerprint
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "dpo")
PAIRS = [
    ("Describe the image.", "A brown dog runs across the grass.", "A cat sleeps on a red couch."),
    ("Describe the image.", "Two children play in the sand at the beach.",
     "Two children play in the snow with a dog and a frisbee."),
    ("What is the man holding?", "He is holding a surfboard.", "He is holding a cell phone and a laptop."),
    ("Is there a bus in the image?", "No, there is no bus.", "Yes."),
]
LOSSES = [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)]
LAYERS = [0, 14, 29]


def main():
    # datasets fingerprints each map by pickling it with dill, which fails on pyarrow's
    # MonthDayNano with the versions pip installs together here; the fingerprint only names
    # the cache, so a counter stands in for it.
    counter = iter(range(10**9))
    datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: f"{next(counter):016x}")
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # A model loaded from a GGUF keeps its quantization flag, which the Trainer refuses to
    # train; the dequantized f32 weights are saved and loaded back as a plain checkpoint.
    hf = tempfile.mkdtemp()
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.save_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    os.makedirs(OUT, exist_ok=True)
    rows = [{"prompt": [{"role": "user", "content": p}],
             "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]
    with open(os.path.join(OUT, "prefs.jsonl"), "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")

    out = {"losses": {}}
    grads = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, beta=0.1, loss_type=["sigmoid"], report_to=[],
                         per_device_train_batch_size=len(rows), use_cpu=True, bf16=False,
                         dataset_num_proc=None)
        # A new adapter (peft_config): the reference is the model with it disabled.
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok,
                             peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"],
                                                    lora_dropout=0.0))
        pm = trainer.model
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.05)
                            .to(torch.bfloat16).float())
        adapter = os.path.join(OUT, "adapter")
        pm.save_pretrained(adapter)
        w = os.path.join(adapter, "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(w).items()}, w)
        os.remove(os.path.join(adapter, "README.md"))
        ds = trainer.train_dataset
        out["ids"] = [{"prompt": ds[i]["prompt_ids"], "chosen": ds[i]["chosen_ids"],
                       "rejected": ds[i]["rejected_ids"]} for i in range(len(rows))]
        batch = trainer.data_collator([ds[i] for i in range(len(rows))])
        pm.train()
        for loss_type, smoothing in LOSSES:
            trainer.loss_types = [loss_type]
            trainer.loss_weights = [1.0]
            trainer.label_smoothing = smoothing
            trainer._metrics["train"].clear()
            pm.zero_grad()
            loss = trainer.compute_loss(pm, batch)
            loss.backward()
            m = {k: v[-1] for k, v in trainer._metrics["train"].items()
                 if k.startswith("rewards/") or k.startswith("logps/")}
            out["losses"][loss_type] = {"label_smoothing": smoothing, "loss": loss.item(), **m}
            sq = 0.0
            for n, p in pm.named_parameters():
                if p.grad is None:
                    continue
                sq += float((p.grad.double() ** 2).sum())
                for layer in LAYERS:
                    if f"layers.{layer}." in n:
                        key = n.replace(".default", "")
                        grads[f"{loss_type}/{key}"] = p.grad.detach().clone().contiguous()
            grads[f"{loss_type}/norm"] = torch.tensor([sq ** 0.5], dtype=torch.float64)
        # Per-pair log-probs, policy and reference, as TRL sums them.
        with torch.no_grad():
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

            def logps(m):
                logits = m(**kw).logits[:, :-1].float()
                lab = labels[:, 1:]
                lp = torch.log_softmax(logits, -1).gather(-1, lab.clamp(min=0).unsqueeze(-1))[..., 0]
                return (lp * (lab != -100)).sum(-1)

            pol = logps(pm)
            with pm.disable_adapter():
                ref = logps(pm)
        n = len(rows)
        out["policy"] = {"chosen": pol[:n].tolist(), "rejected": pol[n:].tolist()}
        out["reference"] = {"chosen": ref[:n].tolist(), "rejected": ref[n:].tolist()}
    with open(os.path.join(OUT, "trl.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    save_file(grads, os.path.join(OUT, "grads.safetensors"))
    print(json.dumps(out["losses"], indent=1))


if __name__ == "__main__":
    main()
