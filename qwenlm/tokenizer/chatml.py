"""ChatML prompts, token-identical to the original `make_context`, and reply extraction.

Owns: the prompt layout (system, newest-first history trimming by `max_window_size`), the stop
words of each chat format, and turning generated ids back into a reply. Role names and contents
are encoded with special tokens disabled, so user text can never become a control token.
"""

from __future__ import annotations

History = list[tuple[str, str]]

BAD_CHAT_FORMAT = (
    "This model's generation_config says chat_format='raw': it looks like a pretrained (base) "
    "model, not a chat model. Use a -Chat/-Instruct checkpoint for chat(), or call "
    "generate()/`qwen generate --raw` for plain text completion."
)


def make_context(tokenizer, query: str, history: History | None = None, system: str = "",
                 max_window_size: int = 6144, chat_format: str = "chatml") -> tuple[str, list[int]]:
    """Return `(raw_text, context_tokens)` for one chat turn, exactly as the original builds it.

    History turns are kept newest first while the total stays under `max_window_size`; the first
    turn that does not fit is dropped together with everything older. The query is always kept.
    """
    history = history or []
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise ValueError(f"unknown chat_format {chat_format!r} (expected 'chatml' or 'raw')")
    start, end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    nl = tokenizer.encode("\n")

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        ids = (tokenizer.encode(role, allowed_special=set()) + nl
               + tokenizer.encode(content, allowed_special=set()))
        return f"{role}\n{content}", ids

    sys_text, sys_ids = turn("system", system)
    system_tokens = start + sys_ids + end
    raw_text, context = "", []
    for q, r in reversed(history):
        q_text, q_ids = turn("user", q)
        r_text, r_ids = turn("assistant", r)
        nxt = nl + start + q_ids + end + nl + start + r_ids + end
        nxt_text = f"\n<|im_start|>{q_text}<|im_end|>\n<|im_start|>{r_text}<|im_end|>"
        if len(system_tokens) + len(nxt) + len(context) >= max_window_size:
            break
        context = nxt + context
        raw_text = nxt_text + raw_text
    q_text, q_ids = turn("user", query)
    tokens = (system_tokens + context + nl + start + q_ids + end + nl + start
              + tokenizer.encode("assistant") + nl)
    raw_text = (f"<|im_start|>{sys_text}<|im_end|>{raw_text}\n<|im_start|>{q_text}<|im_end|>\n"
                f"<|im_start|>assistant\n")
    return raw_text, tokens


def stop_words_ids(tokenizer, chat_format: str) -> list[list[int]]:
    """Token sequences that end a reply: `<|im_end|>`/`<|im_start|>` for chatml, "Human:" for raw."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise ValueError(f"unknown chat_format {chat_format!r}")


def reply_ids(generated: list[int], stop_ids: set[int]) -> list[int]:
    """The reply part of generated ids: everything before the first stop/control token.

    Unlike the original `_decode_chatml`, nothing is dropped when generation ran out of tokens.
    """
    for i, t in enumerate(generated):
        if t in stop_ids:
            return generated[:i]
    return generated
