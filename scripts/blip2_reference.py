"""BLIP-2's stage-1 losses in torch, written from LAVIS's `Blip2Qformer.forward`
(its image_id path) on transformers' Blip2ForImageTextRetrieval modules: the
reference that scripts/gen_blip2_fixtures.py's fixtures and bench/qformer.py's
timings use.
"""
import math

import torch
import torch.nn.functional as F


def itc_itm(model, image_embeds, image_ids, ids, mask, temp, generator):
    """ITC (max over queries / temp, targets 0.9 * same-photo share + 0.1 / B) and ITM
    (hard negatives drawn from the masked ITC softmax); returns the two losses and a dict
    of the negatives' weights, the drawn indices and the ITM logits."""
    bs = ids.shape[0]
    query_tokens = model.query_tokens.expand(bs, -1, -1)
    q_out = model.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds).last_hidden_state
    image_feats = F.normalize(model.vision_projection(q_out), dim=-1)  # [B, N, D]
    t_out = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0,
                          attention_mask=mask).last_hidden_state
    text_feat = F.normalize(model.text_projection(t_out[:, 0, :]), dim=-1)  # [B, D]
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1)  # [B, B, N]
    sim_i2t = sim_q2t.max(-1)[0] / temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(2)
    sim_t2i = sim_t2q.max(-1)[0] / temp
    pos = torch.eq(image_ids.view(-1, 1), image_ids.view(1, -1)).float()
    targets = 0.9 * pos / pos.sum(1, keepdim=True) + 0.1 / bs
    loss_itc = (-torch.sum(F.log_softmax(sim_i2t, dim=1) * targets, dim=1).mean()
                - torch.sum(F.log_softmax(sim_t2i, dim=1) * targets, dim=1).mean()) / 2
    with torch.no_grad():
        same = torch.eq(image_ids.view(-1, 1), image_ids.view(1, -1))
        weights_t2i = F.softmax(sim_t2i.masked_fill(same, -10000), dim=1)
        weights_i2t = F.softmax(sim_i2t.masked_fill(same, -10000), dim=1)
    neg_image = torch.stack([torch.multinomial(weights_t2i[b], 1, generator=generator)[0] for b in range(bs)])
    neg_text = torch.stack([torch.multinomial(weights_i2t[b], 1, generator=generator)[0] for b in range(bs)])
    ids_all = torch.cat([ids, ids, ids[neg_text]], 0)
    mask_all = torch.cat([mask, mask, mask[neg_text]], 0)
    images_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], 0)
    q_itm = model.query_tokens.expand(ids_all.shape[0], -1, -1)
    att = torch.cat([torch.ones(q_itm.shape[:-1], dtype=torch.long), mask_all], 1)
    out = model.qformer(query_embeds=model.embeddings(input_ids=ids_all, query_embeds=q_itm),
                        query_length=q_itm.shape[1], attention_mask=att,
                        encoder_hidden_states=images_all).last_hidden_state
    logits = model.itm_head(out[:, :q_itm.shape[1], :]).mean(1)
    labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
    loss_itm = F.cross_entropy(logits, labels)
    return loss_itc, loss_itm, {"weights_t2i": weights_t2i, "weights_i2t": weights_i2t,
                                "neg_image": neg_image, "neg_text": neg_text, "logits": logits}


def decoder_inputs(ids, bos, pad):
    """LAVIS's ITG inputs: the caption with its first token replaced by [DEC], and the
    labels with padding ignored."""
    dec = ids.clone()
    dec[:, 0] = bos
    return dec, dec.masked_fill(dec == pad, -100)


def itg_loss(model, head, image, dec, mask, labels):
    """ITG as LAVIS computes it: the queries' pass caches each layer's query keys and
    values; the caption reads them and itself causally; BERT's LM head (`head`: the
    cls.predictions.* tensors, the word embeddings tied); next-token cross-entropy with
    label smoothing 0.1. Returns the loss and the logits."""
    qc = model.config.qformer_config
    H, V = qc.hidden_size, qc.vocab_size
    B, L = dec.shape
    qf = model.qformer
    nh = qc.num_attention_heads
    dh = H // nh
    act = F.gelu

    def split(t):
        return t.view(t.shape[0], t.shape[1], nh, dh).transpose(1, 2)

    def attend(block, x, enc=None, cache=None, add=None):
        a = block.attention
        src = x if enc is None else enc
        q, k, v = split(a.query(x)), split(a.key(src)), split(a.value(src))
        own = (k, v)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if add is not None:
            s = s + add
        ctx = (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], H)
        return block.output.LayerNorm(block.output.dense(ctx) + x), own

    # The queries' pass, caching each layer's query keys and values.
    x = qf.layernorm(model.query_tokens.expand(B, -1, -1))
    N = x.shape[1]
    caches = []
    for layer in qf.encoder.layer:
        x, kv = attend(layer.attention, x)
        caches.append(kv)
        if layer.has_cross_attention:
            x, _ = attend(layer.crossattention, x, enc=image)
        x = layer.output_query.LayerNorm(layer.output_query.dense(act(layer.intermediate_query.dense(x))) + x)
    # The text pass: the cached queries, then the caption causally.
    causal = torch.tril(torch.ones(L, L))
    allowed = torch.cat([torch.ones(B, L, N), causal.expand(B, L, L) * mask[:, None, :]], dim=2)
    add = ((1.0 - allowed) * -10000.0)[:, None, :, :]
    t = qf.layernorm(model.embeddings(input_ids=dec))
    for layer, kv in zip(qf.encoder.layer, caches):
        t, _ = attend(layer.attention, t, cache=kv, add=add)
        t = layer.output.LayerNorm(layer.output.dense(act(layer.intermediate.dense(t))) + t)
    p = "cls.predictions."
    z = F.gelu(F.linear(t, head[p + "transform.dense.weight"], head[p + "transform.dense.bias"]))
    z = F.layer_norm(z, (H,), head[p + "transform.LayerNorm.weight"], head[p + "transform.LayerNorm.bias"],
                     qc.layer_norm_eps)
    logits = z @ model.embeddings.word_embeddings.weight.T + head[p + "bias"]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100,
                           label_smoothing=0.1)
    return loss, logits
