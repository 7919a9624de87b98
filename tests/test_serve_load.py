"""Load on loopback: 32 concurrent streaming clients, several greedy requests each, against a
4-bit model on the fused CPU path (per-row arithmetic). Every output must equal the same request
served alone: nothing lost, mixed or changed by the batching, and no errors."""

import asyncio
import os
import shutil

import openai
import pytest

from helpers import running_server, v1_config, v1_state_dict, write_checkpoint
from qwenlm import load
from qwenlm.quant import q4
from qwenlm.serve import ServerOptions, create_app

pytestmark = pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= q4._cpu_flags(), reason="needs AVX2/FMA/F16C")

CLIENTS, PER_CLIENT, TOKENS = 32, 3, 24


@pytest.fixture(scope="module")
def app(tmp_path_factory, v1_tokenizer_dir):
    d = str(tmp_path_factory.mktemp("load_model"))
    cfg = v1_config(vocab=151936, hidden=64, layers=2, heads=4, mlp=64)
    write_checkpoint(d, cfg, v1_state_dict(cfg, seed=9), {"chat_format": "chatml", "eos_token_id": 151643,
                                                           "do_sample": True, "top_p": 0.8, "repetition_penalty": 1.1})
    shutil.copy(os.path.join(v1_tokenizer_dir, "qwen.tiktoken"), d)
    model, tok = load(d, dtype="float32", device="cpu", quantize="int4")
    # (no prefix cache: a request that reuses another's keys/values is not computed as it is alone, up
    # to float rounding, and this test is about what batching does)
    return create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=512, max_num_seqs=CLIENTS,
                                                max_queue=4 * CLIENTS, prefix_cache=False))


def _messages(k):
    return [{"role": "user", "content": f"Request number {k}: tell me something about the number {k * 7}."}]


async def _stream(client, k):
    s = await client.chat.completions.create(model="tiny", messages=_messages(k), temperature=0, max_tokens=TOKENS,
                                             stream=True)
    text, finish = "", None
    async for ch in s:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    return text, finish


def test_concurrent_streams_equal_solo(app):
    assert app.state.server.engine._packs, "the fused per-row path must be in use"
    with running_server(app) as url:
        async def main():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
            solo = {}
            for k in range(CLIENTS * PER_CLIENT):  # one at a time
                solo[k] = await _stream(client, k)

            async def user(c):
                return [(k, await _stream(client, k)) for k in range(c * PER_CLIENT, (c + 1) * PER_CLIENT)]
            crowd = await asyncio.gather(*(user(c) for c in range(CLIENTS)))
            await client.close()
            return solo, dict(x for batch in crowd for x in batch)

        solo, crowd = asyncio.run(main())
    eng = app.state.server.engine
    assert len(crowd) == CLIENTS * PER_CLIENT
    assert all(solo[k][1] in ("stop", "length") for k in solo)
    assert len({solo[k][0] for k in solo}) > CLIENTS  # different requests give different texts
    different = [k for k in solo if solo[k] != crowd[k]]
    assert not different, f"{len(different)} outputs changed under load, e.g. {different[:3]}"
    assert eng.stats["finished_error"] == 0 and eng.stats["finished_abort"] == 0
    assert eng.running == 0 and eng.queue_length == 0
    assert eng.stats["max_batch"] >= CLIENTS // 2  # the crowd really was decoded together
