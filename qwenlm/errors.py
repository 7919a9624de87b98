"""Errors a user can fix. The CLI prints these as one `error:` line instead of a traceback."""


class UserError(Exception):
    """A problem with what the user asked for (empty prompt, bad option value, ...)."""


class ContextLengthError(UserError, ValueError):
    """A prompt that leaves no room in the model's context window."""

    def __init__(self, prompt_tokens: int, limit: int):
        self.prompt_tokens, self.limit = prompt_tokens, limit
        super().__init__(f"the prompt is {prompt_tokens:,} tokens, and the model reads at most {limit:,} "
                         f"(prompt and reply together): shorten it")
