import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is imported: without a GPU its kernels can only run interpreted
    # (tests/test_triton_kernels.py; the product itself routes nothing to them on a CPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import v1_config, v1_state_dict, write_checkpoint


@pytest.fixture(scope="session")
def default_dir() -> str:
    """The converted offline default model (built on first use: ~30 s)."""
    from qwenlm.hub import default_model_dir

    return default_model_dir(progress=False)


@pytest.fixture(scope="session")
def qwen2_tokenizer(default_dir):
    from qwenlm import QwenTokenizer

    return QwenTokenizer.from_pretrained(default_dir)


@pytest.fixture(scope="session")
def v1_tokenizer_dir(tmp_path_factory, qwen2_tokenizer) -> str:
    """A Qwen v1 `qwen.tiktoken`: the 151,643 BPE ranks that Qwen2 shares with Qwen v1."""
    from qwenlm.tokenizer.vocab import write_tiktoken_file

    d = tmp_path_factory.mktemp("qwen_v1_tok")
    ranks = {b: i for b, i in qwen2_tokenizer.mergeable_ranks.items() if i < 151643}
    write_tiktoken_file(ranks, str(d / "qwen.tiktoken"))
    return str(d)


@pytest.fixture(scope="session")
def v1_tokenizer(v1_tokenizer_dir):
    from qwenlm import QwenTokenizer

    return QwenTokenizer.from_pretrained(v1_tokenizer_dir)


@pytest.fixture(scope="session")
def v1_chat_dir(tmp_path_factory, v1_tokenizer_dir) -> str:
    """A tiny random Qwen v1 chat checkpoint with the real v1 tokenizer and vocabulary size."""
    d = str(tmp_path_factory.mktemp("qwen_v1_chat"))
    cfg = v1_config(vocab=151936, hidden=32, layers=2, heads=2, mlp=48)
    gen = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
           "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}
    write_checkpoint(d, cfg, v1_state_dict(cfg, seed=3), gen)
    shutil.copy(os.path.join(v1_tokenizer_dir, "qwen.tiktoken"), d)
    return d


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


# the tiny v1 chat model and a server of it, for each serving test module that asks for them
@pytest.fixture(scope="module")
def model_tok(v1_chat_dir):
    from qwenlm import load

    return load(v1_chat_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def server(model_tok):
    from helpers import running_server
    from qwenlm.serve import ServerOptions, create_app

    model, tok = model_tok
    app = create_app(model, tok, ServerOptions(served_model_name="tiny", max_model_len=256, max_num_seqs=4))
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
