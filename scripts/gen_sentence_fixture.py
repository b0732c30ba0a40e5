#!/usr/bin/env python3
"""Fixture for clasp's sentence-transformers text encoder (`model/sentence.rs`).

Takes the BERT text tower of tests/fixtures/core/tiny-dual-encoder (random
weights from transformers), saves it as a sentence-transformers model
(Transformer + mean Pooling + Normalize) in tests/fixtures/core/tiny-sentence-bert,
and writes sentence-transformers' own embeddings of a few captions to
expected.json beside it.

    python3 scripts/gen_sentence_fixture.py
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer, models
from transformers import BertConfig, BertModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "tests", "fixtures", "core", "tiny-dual-encoder")
OUT = os.path.join(ROOT, "tests", "fixtures", "core", "tiny-sentence-bert")
TEXTS = ["a dog runs on the grass", "two children play football in a park .", "狗"]


def main():
    cfg = json.load(open(os.path.join(SRC, "config.json")))["text_config"]
    bert = BertModel(BertConfig(**cfg), add_pooling_layer=True)
    weights = {k[len("text_model."):]: v for k, v in load_file(os.path.join(SRC, "model.safetensors")).items()
               if k.startswith("text_model.")}
    missing, unexpected = bert.load_state_dict(weights, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    tmp = OUT + ".bert"
    shutil.rmtree(tmp, ignore_errors=True)
    bert.save_pretrained(tmp, safe_serialization=True)
    for f in ["vocab.txt", "tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(SRC, f), tmp)
    word = models.Transformer(tmp, max_seq_length=32)
    st = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean"),
                                      models.Normalize()])
    shutil.rmtree(OUT, ignore_errors=True)
    st.save(OUT)
    shutil.rmtree(tmp)
    emb = SentenceTransformer(OUT).encode(TEXTS, convert_to_numpy=True)
    with torch.no_grad():
        assert abs(float((emb ** 2).sum(1).min()) - 1) < 1e-5
    json.dump({"texts": TEXTS, "embeddings": emb.tolist()}, open(os.path.join(OUT, "expected.json"), "w"))
    print("wrote", OUT, sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
