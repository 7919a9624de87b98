"""Request bodies of the OpenAI API subset that `qwen serve` implements (pydantic, so the OpenAPI
schema and the 400 errors come from one place). Unknown fields are accepted and ignored, as
OpenAI clients send many; fields we cannot honour are refused with a clear message."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: str
    text: Optional[str] = None


class FunctionCall(_Lenient):
    name: str
    arguments: Union[str, dict[str, Any]] = ""


class ToolCallIn(_Lenient):
    id: Optional[str] = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[FunctionCall] = None


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=16)
    seed: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict[str, Any]] = None
    # vLLM's names for the same (one of them, or response_format, per request)
    guided_json: Union[dict[str, Any], str, None] = Field(None, description="a JSON schema the reply is held to")
    guided_regex: Optional[str] = Field(None, description="a regular expression the reply is held to")
    guided_choice: Optional[list[str]] = Field(None, description="the reply is exactly one of these")
    user: Optional[str] = None
    ignore_eos: bool = Field(False, description="keep generating past end-of-text tokens (benchmarks; as vLLM)")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    max_length: Optional[int] = Field(None, ge=1, description="the original's: prompt + completion tokens")
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    functions: Optional[list[FunctionDef]] = None
    function_call: Union[Literal["none", "auto"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = Field(None, description="false: at most one tool call per reply")
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0, description="0 with echo: the prompt's log-probabilities alone")
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
