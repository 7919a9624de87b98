"""What structured output costs: the same chat request through `qwen serve` (in process, the default
model, the weights `qwen serve` loads on this machine) as free text, with response_format json_object
and with a json_schema, alternated for a few rounds; greedy, a fixed number of tokens each.

    python benchmarks/structured_output.py [--rounds 3] [--tokens 200] [--json out.json]

Prints decode tok/s (tokens over the request's wall time) per round and the median per format.
"""

import argparse
import json
import statistics
import time

PROMPT = ("Describe ten European cities as a JSON object with a field per city, each with country, "
          "population and three sights.")
SCHEMA = {"type": "object", "additionalProperties": {
    "type": "object", "required": ["country", "population", "sights"],
    "properties": {"country": {"type": "string"}, "population": {"type": "integer"},
                   "sights": {"type": "array", "items": {"type": "string"}}}}}
FORMATS = {"text": None, "json_object": {"type": "json_object"},
           "json_schema": {"type": "json_schema", "json_schema": {"name": "cities", "schema": SCHEMA}}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import openai

    import qwenlm
    from qwenlm.serve import ServerOptions, create_app, serve_in_thread

    model, tok = qwenlm.load(quantize="auto")
    app = create_app(model, tok, ServerOptions(served_model_name="qwen", max_model_len=2048, max_num_seqs=2))
    rates: dict[str, list[float]] = {k: [] for k in FORMATS}
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        msgs = [{"role": "user", "content": PROMPT}]
        client.chat.completions.create(model="qwen", messages=msgs, max_tokens=8)  # warm-up
        for _ in range(args.rounds):
            for name, fmt in FORMATS.items():
                extra = {} if fmt is None else {"response_format": fmt}
                t = time.perf_counter()
                r = client.chat.completions.create(model="qwen", messages=msgs, temperature=0,
                                                   max_tokens=args.tokens, **extra)
                dt = time.perf_counter() - t
                if r.usage.completion_tokens != args.tokens:
                    raise SystemExit(f"{name}: the reply ended after {r.usage.completion_tokens} tokens; "
                                     "ask for fewer --tokens")
                if fmt is not None:  # what it wrote so far must be a prefix of a valid value: check it starts so
                    assert r.choices[0].message.content.lstrip().startswith("{"), r.choices[0].message.content
                rates[name].append(args.tokens / dt)
    for name, v in rates.items():
        print(f"{name:12s} " + " / ".join(f"{x:.1f}" for x in v) + f"   median {statistics.median(v):.1f} tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "tok_per_s": rates}, f, indent=1)


if __name__ == "__main__":
    main()
