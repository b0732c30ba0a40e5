#!/usr/bin/env python3
"""Fixtures for clasp's reward model (tests/reward_parity.rs): TRL's RewardTrainer on one batch.

    pip install --target /tmp/torchpy torch transformers peft trl datasets gguf accelerate
    PYTHONPATH=/tmp/torchpy python3 scripts/gen_reward_fixtures.py

1. transformers loads SmolLM2-135M-Instruct from the GGUF of scripts/get-smollm2.sh (f32) as a
   LlamaForSequenceClassification with one label (a new `score` head, no bias).
2. RewardTrainer with a LoRA config (task SEQ_CLS, rank 2, alpha 4, v_proj, `score` trained
   whole as PEFT's modules_to_save): the adapter's A and B and the score head are then drawn
   N(0, 0.05²) from torch's generator seeded 1 and rounded to bfloat16, and saved in PEFT's
   layout as tests/fixtures/reward/adapter/ (bf16).
3. The trainer tokenizes tests/fixtures/dpo/prefs.jsonl (prompt + chosen, prompt + rejected,
   whole conversations) and collates one batch of its four pairs; `compute_loss` (the
   Bradley-Terry loss −log σ(r_c − r_r), averaged) runs on it and is backpropagated.

Writes tests/fixtures/reward/trl.json: the chosen and rejected ids per pair, the rewards, the loss
and the metrics TRL logs (accuracy, margin, min/mean/max reward); and
tests/fixtures/reward/grads.safetensors: the gradient of the score head, of the adapter on layers
0, 14 and 29, and the global gradient norm.
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
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "reward")
PREFS = os.path.join(ROOT, "tests", "fixtures", "dpo", "prefs.jsonl")
LAYERS = [0, 14, 29]


def main():
    # As in gen_dpo_fixtures.py: datasets' fingerprint pickling fails with these versions.
    counter = iter(range(10**9))
    datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: f"{next(counter):016x}")
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    hf = tempfile.mkdtemp()
    lm.config.quantization_config = None
    lm.hf_quantizer = None
    lm.save_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1, dtype=torch.float32)
    rows = [json.loads(l) for l in open(PREFS)]
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(output_dir=tmp, report_to=[], per_device_train_batch_size=len(rows),
                            use_cpu=True, bf16=False, dataset_num_proc=None,
                            center_rewards_coefficient=None)
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tok,
                                peft_config=LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                       target_modules=["v_proj"],
                                                       lora_dropout=0.0))
        pm = trainer.model
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(torch.bfloat16).float())
        adapter = os.path.join(OUT, "adapter")
        pm.save_pretrained(adapter)
        w = os.path.join(adapter, "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(w).items()}, w)
        os.remove(os.path.join(adapter, "README.md"))
        ds = trainer.train_dataset
        batch = trainer.data_collator([ds[i] for i in range(len(rows))])
        pm.train()
        pm.zero_grad()
        loss = trainer.compute_loss(pm, dict(batch))
        loss.backward()
        with torch.no_grad():
            rewards = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        n = len(rows)
        out = {
            "ids": [{"chosen": ds[i]["chosen_ids"], "rejected": ds[i]["rejected_ids"]}
                    for i in range(n)],
            "pad_token_id": tok.pad_token_id,
            "rewards": {"chosen": rewards[:n].tolist(), "rejected": rewards[n:].tolist()},
            "loss": loss.item(),
            "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"},
        }
        grads, sq = {}, 0.0
        for name, p in pm.named_parameters():
            if p.grad is None:
                continue
            sq += float((p.grad.double() ** 2).sum())
            key = name.replace(".default", "").replace(".modules_to_save", "")
            if "score" in name or any(f"layers.{l}." in name for l in LAYERS):
                grads[key] = p.grad.detach().clone().contiguous()
        grads["norm"] = torch.tensor([sq ** 0.5], dtype=torch.float64)
    with open(os.path.join(OUT, "trl.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    save_file(grads, os.path.join(OUT, "grads.safetensors"))
    print(json.dumps({k: out[k] for k in ("rewards", "loss", "metrics", "pad_token_id")}, indent=1))
    print(sorted(grads)[:6], sorted(load_file(w))[:4])


if __name__ == "__main__":
    main()
