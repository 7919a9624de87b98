"""Memory and time of loading a 16-bit checkpoint into CPU layers (BENCHMARKS.md: "Loading a 16-bit
checkpoint into 4- and 8-bit CPU layers").

    python benchmarks/load_memory.py [--dir /tmp/qwen-1.8b-shape] [--quantize int8,int4] [--rounds 2]
    python benchmarks/load_memory.py --gguf [--dir /tmp/qwen-1.8b-gguf] [--quantize gguf,int8]

Writes (once) a random bf16 checkpoint of Qwen-1.8B's shape in Qwen2 names (hidden 2048, 24 layers,
MLP 5504, vocabulary 151,936; 3.5 GB), then loads it in a fresh process per run and reports the load
time, the peak resident memory (which counts the checkpoint's memory-mapped pages that the load read)
and the anonymous resident memory after the load (what the model holds of its own).

`--gguf`: instead, a GGUF file of the same shape with random blocks in a K-quant file's types (Q5_0
layers, Q8_0 down projections, a Q4_K table, a Q6_K head; 1.5 GB), converted lean (as the cache
converts any file whose fp32 checkpoint would pass 4 GiB), loaded the same way.
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


_BLOCK = {"Q5_0": (32, 22, [0]), "Q8_0": (32, 34, [0]), "Q4_K": (256, 144, [0, 2]), "Q6_K": (256, 210, [208])}


def write_gguf(path: str) -> str:
    """A random GGUF of the 1.8B shape (see the module doc), converted lean next to it; returns the
    lean checkpoint's directory."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    from qwenlm.tokenizer.vocab import byte_encoder
    from qwenlm.weights.convert import convert_gguf

    rng = np.random.default_rng(0)

    def blocks(kind: str, rows: int, width: int) -> np.ndarray:  # random codes, small finite scales
        per, size, scales = _BLOCK[kind]
        raw = rng.integers(0, 256, (rows, width // per, size), dtype=np.uint8)
        for at in scales:
            raw[..., at:at + 2] = (rng.random(raw.shape[:2]) * 0.002).astype(np.float16)[..., None].view(np.uint8)
        return raw.reshape(rows, -1)

    os.makedirs(path, exist_ok=True)
    src = os.path.join(path, "model.gguf")
    w = GGUFWriter(src, "qwen2")
    for add, value in ((w.add_block_count, LAYERS), (w.add_context_length, 8192), (w.add_embedding_length, H),
                       (w.add_feed_forward_length, MLP), (w.add_head_count, HEADS), (w.add_head_count_kv, HEADS),
                       (w.add_rope_freq_base, 1e6), (w.add_layer_norm_rms_eps, 1e-6)):
        add(value)
    enc = byte_encoder()
    w.add_tokenizer_model("gpt2")
    w.add_token_list([enc[b] for b in range(256)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    w.add_token_types([1] * 256 + [3, 3, 3])
    w.add_token_merges([])
    w.add_eos_token_id(258)

    def add(name: str, kind: str, rows: int, width: int) -> None:
        w.add_tensor(name, blocks(kind, rows, width), raw_dtype=GGMLQuantizationType[kind])

    add("token_embd.weight", "Q4_K", VOCAB, H)
    add("output.weight", "Q6_K", VOCAB, H)
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    for i in range(LAYERS):
        b = f"blk.{i}."
        for x in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(b + x + ".weight", "Q5_0", H, H)
        for x in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(b + x + ".bias", (rng.standard_normal(H) * 0.02).astype(np.float32))
        add(b + "ffn_gate.weight", "Q5_0", MLP, H)
        add(b + "ffn_up.weight", "Q5_0", MLP, H)
        add(b + "ffn_down.weight", "Q8_0", H, MLP)
        w.add_tensor(b + "attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(H, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return convert_gguf(src, os.path.join(path, "lean"), progress=False, lean=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", action="store_true", help="a lean GGUF checkpoint instead (see above)")
    ap.add_argument("--dir", help="default: /tmp/qwen-1.8b-shape, or /tmp/qwen-1.8b-gguf with --gguf")
    ap.add_argument("--quantize", help="default: int8,int4, or gguf,int8 with --gguf")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    path = args.dir or ("/tmp/qwen-1.8b-gguf" if args.gguf else "/tmp/qwen-1.8b-shape")
    model_dir = os.path.join(path, "lean") if args.gguf else path
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"writing a random {'GGUF' if args.gguf else 'bf16 checkpoint'} to {path} ...", file=sys.stderr)
        write_gguf(path) if args.gguf else write_checkpoint(path)
    for r in range(args.rounds):
        for q in (args.quantize or ("gguf,int8" if args.gguf else "int8,int4")).split(","):
            out = subprocess.run([sys.executable, "-c", PROBE, model_dir, q], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            print(json.dumps({"round": r + 1, "quantize": q, **json.loads(out.stdout)}), flush=True)


if __name__ == "__main__":
    main()
