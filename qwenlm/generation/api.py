"""`chat()` / `chat_stream()` / `generate()` with the original's signatures, running on the engine
(`qwenlm/engine`). The nn.Module only forwards to these (see `GenerationMixin`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..tokenizer.chatml import BAD_CHAT_FORMAT, History, make_context, reply_ids
from .config import GenerationConfig
from .generate import StopChecker, split_on_stop, prompts_from_tensor, stream_text
from .grammar import grammars_for, requested_schema

DEFAULT_SYSTEM = "You are a helpful assistant."


def _config(model, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    cfg = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    if (kwargs.get("num_beams") or 1) != 1:
        raise ValueError(BEAMS.format(kwargs["num_beams"]))
    if kwargs.get("logits_processor"):
        raise ValueError("logits_processor is not supported by qwenlm: its settings are temperature, top_p, top_k, "
                         "repetition_penalty, presence/frequency_penalty, logit_bias, stop_words_ids and stop")
    kwargs = {k: v for k, v in kwargs.items() if k not in _IGNORED}
    return cfg.update(**kwargs)


# transformers `generate` arguments that have no meaning here
_IGNORED = {"return_dict_in_generate", "output_scores", "output_logits", "logits_processor", "streamer", "use_cache",
            "token_type_ids", "position_ids", "num_beams", "early_stopping"}
BEAMS = ("beam search (num_beams={}) is not supported by qwenlm: greedy or sampled decoding only (the original "
         "Qwen chat samples)")


def _chat_setup(model, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs):
    response_format = kwargs.pop("response_format", None)
    cfg = _config(model, generation_config, kwargs)
    if cfg.chat_format != "chatml":
        raise ValueError(BAD_CHAT_FORMAT)
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, not {type(query).__name__}")
    raw_text, context = make_context(tokenizer, query, history=history, system=system,
                                     max_window_size=cfg.max_window_size, chat_format="chatml")
    # the caller's list is copied, never extended (the original mutated it)
    cfg.stop_words_ids = list(cfg.stop_words_ids or []) + list(stop_words_ids or [])
    control = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    held, schema = requested_schema(response_format)  # (OpenAI's response_format: json_object / json_schema)
    constraint = grammars_for(tokenizer, model.config.vocab_size, tokenizer.im_end_id).json(schema) if held else None
    return cfg, context, control, constraint


def chat(model, tokenizer, query: str, history: History | None = None,
         system: str = DEFAULT_SYSTEM, stop_words_ids: list[list[int]] | None = None,
         generation_config: GenerationConfig | None = None, **kwargs: Any) -> tuple[str, History]:
    """One chat turn: returns `(response, history + [(query, response)])`; history is copied."""
    if "stream" in kwargs:
        raise ValueError("chat(stream=...) is not supported: use model.chat_stream(...) instead")
    cfg, context, control, constraint = _chat_setup(model, tokenizer, query, history, system, stop_words_ids,
                                                    generation_config, kwargs)
    stop = StopChecker(cfg, control, tokenizer)
    new = _engine(model).generate([context], cfg, stop, vocab_limit=tokenizer.id_limit,
                                  constraints=None if constraint is None else [constraint])[0]
    text = tokenizer.decode(reply_ids(new, set(control) | set(cfg.eos_ids())), errors="replace")
    response = split_on_stop(text, [x for x in (cfg.stop or []) if x], final=True)[1].strip()
    history = copy.deepcopy(history) if history else []
    history.append((query, response))
    return response, history


def chat_stream(model, tokenizer, query: str, history: History | None = None,
                system: str = DEFAULT_SYSTEM, stop_words_ids: list[list[int]] | None = None,
                generation_config: GenerationConfig | None = None, **kwargs: Any) -> Iterator[str]:
    """Yield the cumulative response text, like the original; history is neither copied nor
    appended (the caller appends)."""
    cfg, context, control, constraint = _chat_setup(model, tokenizer, query, history, system, stop_words_ids,
                                                    generation_config, kwargs)
    text = ""
    for delta in stream_text(model, tokenizer, context, cfg, control, constraint=constraint):
        text += delta
        yield text


def _engine(model):
    from ..engine import get_engine  # the engine imports the models, which import this module

    return get_engine(model)


def hf_generate(model, input_ids, attention_mask=None, generation_config: GenerationConfig | None = None,
                stop_words_ids: list[list[int]] | None = None, tokenizer=None, **kwargs: Any) -> torch.Tensor:
    """transformers-style `generate`: (B, T) prompt -> (B, T + new) with pad after a row ends.
    Rows are re-padded on the left (the prompt part keeps the input's width)."""
    max_length = kwargs.pop("max_length", None)
    streamer = kwargs.pop("streamer", None)
    as_dict = kwargs.pop("return_dict_in_generate", False)
    for name in ("output_scores", "output_logits"):
        if kwargs.pop(name, False):
            raise ValueError(f"{name}=True is not supported by qwenlm's generate: for the log-probabilities of "
                             "tokens, run model(ids).logits over the sequences (or ask qwen serve for logprobs)")
    prompts = prompts_from_tensor(input_ids, attention_mask)
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"a streamer takes one prompt at a time, and {len(prompts)} were given")
    width = max(len(p) for p in prompts)
    if max_length is not None and kwargs.get("max_new_tokens") is None:  # transformers: prompt + new tokens
        if not isinstance(max_length, int) or max_length <= width:
            raise ValueError(f"max_length ({max_length!r}) counts the prompt too, and the prompt is {width} "
                             "tokens: pass a larger max_length, or max_new_tokens")
        kwargs["max_new_tokens"] = max_length - width
    cfg = _config(model, generation_config, kwargs)
    if stop_words_ids:
        cfg.stop_words_ids = list(cfg.stop_words_ids or []) + list(stop_words_ids)
    stop = StopChecker(cfg, (), tokenizer)
    limit = tokenizer.id_limit if tokenizer is not None else None
    if streamer is None:
        rows = _engine(model).generate(prompts, cfg, stop, vocab_limit=limit)
    else:  # transformers' streamer protocol: the prompt, then each new token as it comes, then end()
        streamer.put(torch.tensor([prompts[0]]))
        rows = [[]]
        for (tok,) in _engine(model).generate_steps(prompts, cfg, stop, vocab_limit=limit):
            if tok is not None:
                rows[0].append(tok)
                streamer.put(torch.tensor([tok]))
        streamer.end()
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    new_w = max(len(r) for r in rows)
    out = torch.full((len(prompts), width + new_w), pad, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        out[i, width - len(p):width] = torch.tensor(p)
        if r:
            out[i, width:width + len(r)] = torch.tensor(r)
    device = input_ids.device if isinstance(input_ids, torch.Tensor) else model.device
    return GenerateOutput(sequences=out.to(device)) if as_dict else out.to(device)


@dataclass
class GenerateOutput:
    """What transformers' generate returns with return_dict_in_generate=True (the sequences; no
    per-step scores)."""

    sequences: torch.Tensor
    scores: None = None
    logits: None = None
    past_key_values: None = None

    def __getitem__(self, key):  # transformers' ModelOutput is also read as a mapping
        if key in ("sequences", 0):
            return self.sequences
        raise KeyError(key)


class GenerationMixin:
    """The original's methods on the model object, forwarding to the functions above."""

    generation_config: GenerationConfig

    def chat(self, tokenizer, query: str, history: History | None = None,
             system: str = DEFAULT_SYSTEM, **kwargs: Any) -> tuple[str, History]:
        return chat(self, tokenizer, query, history, system, **kwargs)

    def chat_stream(self, tokenizer, query: str, history: History | None = None,
                    system: str = DEFAULT_SYSTEM, **kwargs: Any) -> Iterator[str]:
        return chat_stream(self, tokenizer, query, history, system, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, **kwargs: Any) -> torch.Tensor:
        if input_ids is None:
            input_ids = kwargs.pop("inputs")
        return hf_generate(self, input_ids, attention_mask, **kwargs)
