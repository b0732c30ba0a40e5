"""The fixture weights that both sides compute, for models too large to commit
(open_clip's RN50 and ConvNeXt-B, BLIP-2's Q-Former): tests/common/mod.rs's
`formula` restates this."""
import torch


def formula(name, shape):
    """Deterministic weights: a sine over the flat index, phase from the
    name, scaled by kind so that activations stay of order one."""
    import math
    n = 1
    for d in shape:
        n *= d
    h = sum(name.encode()) % 997
    s = torch.sin(torch.arange(n, dtype=torch.float64) * 0.61803398875 + h * 0.1)
    if name.endswith("running_var"):
        v = 1 + 0.25 * (1 + s)
    elif name.endswith("running_mean"):
        v = 0.1 * s
    elif name == "logit_scale":
        v = torch.full((n,), math.log(1 / 0.07), dtype=torch.float64)
    else:
        v = _scaled(name, shape, n, s, "embedding" in name)
    return v.float().reshape(shape)


def _scaled(name, shape, n, s, embedding):
    """The scale rule both formulas share: norms' weights 1 +- 0.1, biases and
    embeddings +- 0.1, matrices +- sqrt(3 / fan_in)."""
    import math
    if len(shape) == 1 and name.endswith(".weight"):
        return 1 + 0.1 * s
    if len(shape) <= 1 or embedding:
        return 0.1 * s
    return s * math.sqrt(3.0 / (n // shape[0]))


def uniform(name, n):
    """n values uniform in [-1, 1), from splitmix64 over the flat index
    seeded by the name: integer arithmetic, so exact on both sides, and full
    rank (the sine of `formula` makes every matrix rank 2, which leaves a
    deep model's outputs nearly constant)."""
    import numpy as np
    h = np.uint64(sum(name.encode()) % 997)
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + h * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return torch.from_numpy(2.0 * u - 1.0)


def hashed(name, shape):
    """`formula`'s scales over `uniform`'s values (query tokens scale as embeddings)."""
    n = 1
    for d in shape:
        n *= d
    v = _scaled(name, shape, n, uniform(name, n), "embedding" in name or name.endswith("query_tokens"))
    return v.float().reshape(shape)
