"""Parse a torchtitan 0.3 command line (`--module M --config C ...overrides`) with
torchtitan's own ConfigManager; print what it parsed as JSON.

Usage: python torchtitan03.py JOB_DIR ARG...   (JOB_DIR holds the --module file)
       python torchtitan03.py --flavors          (the architecture of each llama3 flavor)
"""

import dataclasses
import json
import sys


def architecture(model) -> dict:
    layer = model.layers[0]
    attention, rope = layer.attention, layer.attention.rope
    return {
        "layers": len(model.layers), "dim": model.dim, "vocab": model.vocab_size,
        "tied": model.enable_weight_tying, "heads": attention.n_heads,
        "kv_heads": attention.n_kv_heads or attention.n_heads,
        "ffn": layer.feed_forward.w1.out_features, "rope_theta": rope.theta,
        "rope_scaling_factor": rope.scaling_factor if rope.scaling == "llama" else None,
    }


if sys.argv[1] == "--flavors":
    from torchtitan.models.llama3 import llama3_configs

    print(json.dumps({name: architecture(make(attn_backend="flex"))
                      for name, make in llama3_configs.items() if name != "debugmodel"}))
    sys.exit(0)

sys.path.insert(0, sys.argv[1])

from torchtitan.config import ConfigManager  # noqa: E402

config = ConfigManager().parse_args(sys.argv[2:])
ac = config.activation_checkpoint
print(json.dumps({
    "parallelism": dataclasses.asdict(config.parallelism),
    "training": dataclasses.asdict(config.training),
    "compile": dataclasses.asdict(config.compile),
    "activation_checkpoint": None if ac is None else type(ac).__qualname__.split(".")[0],
    "model": {"flavor": config.model_spec.flavor, **architecture(config.model_spec.model)},
}, default=str))
