"""Memory and time of loading a 16-bit checkpoint into CPU layers (BENCHMARKS.md: "Loading a 16-bit
checkpoint into 4- and 8-bit CPU layers").

    python benchmarks/load_memory.py [--dir /tmp/qwen-1.8b-shape] [--quantize int8,int4] [--rounds 2]

Writes (once) a random bf16 checkpoint of Qwen-1.8B's shape in Qwen2 names (hidden 2048, 24 layers,
MLP 5504, vocabulary 151,936; 3.5 GB), then loads it in a fresh process per run and reports the load
time, the peak resident memory (which counts the checkpoint's memory-mapped pages that the load read)
and the anonymous resident memory after the load (what the model holds of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

H, LAYERS, MLP, VOCAB, HEADS = 2048, 24, 5504, 151936, 16

PROBE = """
import json, resource, sys, time
from qwenlm import load_model
t = time.perf_counter()
model = load_model(sys.argv[1], device="cpu", quantize=None if sys.argv[2] == "none" else sys.argv[2])  # (kept: measured below)
took = time.perf_counter() - t
anon = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon"))
print(json.dumps({"load_s": round(took, 2), "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "anon_gib": round(anon / 2**20, 2)}))
"""


def write_checkpoint(path: str) -> None:
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": H, "intermediate_size": MLP,
           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
           "vocab_size": VOCAB, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rand(VOCAB, H), "lm_head.weight": rand(VOCAB, H), "model.norm.weight": ones(H)}]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        layer = {p + "input_layernorm.weight": ones(H), p + "post_attention_layernorm.weight": ones(H),
                 p + "self_attn.o_proj.weight": rand(H, H), p + "mlp.gate_proj.weight": rand(MLP, H),
                 p + "mlp.up_proj.weight": rand(MLP, H), p + "mlp.down_proj.weight": rand(H, MLP)}
        for x in "qkv":
            layer[p + f"self_attn.{x}_proj.weight"] = rand(H, H)
            layer[p + f"self_attn.{x}_proj.bias"] = rand(H)
        shards.append(layer)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:  # last: marks the checkpoint complete
        json.dump(cfg, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/qwen-1.8b-shape")
    ap.add_argument("--quantize", default="int8,int4")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.dir, "config.json")):
        print(f"writing a random bf16 checkpoint to {args.dir} ...", file=sys.stderr)
        write_checkpoint(args.dir)
    for r in range(args.rounds):
        for q in args.quantize.split(","):
            out = subprocess.run([sys.executable, "-c", PROBE, args.dir, q], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            print(json.dumps({"round": r + 1, "quantize": q, **json.loads(out.stdout)}), flush=True)


if __name__ == "__main__":
    main()
