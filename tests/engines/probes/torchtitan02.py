"""Parse a torchtitan 0.2 TOML job file with torchtitan 0.2's own ConfigManager (which
rejects unknown keys); print what it parsed as JSON.

Usage: python torchtitan02.py TOML      (torchtitan 0.2.2 first on PYTHONPATH)
       python torchtitan02.py --flavors (the architecture of each llama3 flavor)
"""

import dataclasses
import json
import sys

import torchtitan

assert torchtitan.__file__ and "titan02" in torchtitan.__file__, torchtitan.__file__

if sys.argv[1] == "--flavors":
    from torchtitan.models.llama3 import llama3_args

    def ffn(a) -> int:  # torchtitan 0.2's FeedForward width (models/llama3/model/model.py)
        hidden = int(a.ffn_dim_multiplier * int(2 * 4 * a.dim / 3))
        return a.multiple_of * -(-hidden // a.multiple_of)

    print(json.dumps({name: {"layers": a.n_layers, "dim": a.dim, "heads": a.n_heads,
                             "kv_heads": a.n_kv_heads or a.n_heads, "vocab": a.vocab_size,
                             "ffn": ffn(a), "rope_theta": a.rope_theta, "tied": False,
                             "rope_scaling_factor": a.rope_scaling_args.scaling_factor}
                      for name, a in llama3_args.items() if not name.startswith("debugmodel")
                      and "_" not in name}))
    sys.exit(0)

from torchtitan.config.manager import ConfigManager  # noqa: E402

config = ConfigManager().parse_args(["--job.config_file", sys.argv[1]])
print(json.dumps({section: dataclasses.asdict(getattr(config, section))
                  for section in ("model", "training", "parallelism", "activation_checkpoint",
                                  "compile", "quantize")}, default=str))
