"""SamplingParams: how one request samples and when it stops (vLLM's names)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's structured outputs, in its newer shape: one of a JSON schema (dict or JSON text),
    a regex, a list of choices, a grammar (GBNF), or json_object (any JSON object).
    SamplingParams maps it onto guided_json / guided_regex / guided_choice / guided_grammar."""

    json: dict | str | None = field(default=None, hash=False)
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))

    def guided_fields(self) -> dict:
        fields = {"guided_json": {"type": "object"} if self.json_object else self.json,
                  "guided_regex": self.regex, "guided_choice": self.choice, "guided_grammar": self.grammar}
        if self.json_object and self.json is not None:
            raise ValueError("StructuredOutputsParams: give json or json_object, not both")
        return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): all tokens
    min_p: float = 0.0
    seed: int | None = None  # per-request reproducible sampling
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    max_tokens: int | None = 16  # None: up to max_model_len
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one is always added)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token after the first (and its own)
    # OpenAI's logit_bias: {token_id: bias in [-100, 100]}, added to the logits before sampling.
    logit_bias: dict[int, float] | None = field(default=None, hash=False)
    allowed_token_ids: tuple[int, ...] | None = None  # sample only among these (vLLM's extension)
    # vLLM's bad_words: never generate these words. The engine sets bad_words_token_ids to each
    # word's tokens, as the tokenizer spells it alone and after a space.
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # a stop string that ends the text stays in it
    # Structured output by choice (vLLM's guided_choice): the completion is one of these strings.
    guided_choice: tuple[str, ...] | None = None
    # guided_choice as token ids, set by the engine from its tokenizer (each string's own tokens).
    choice_token_ids: tuple[tuple[int, ...], ...] | None = None
    # Structured output by pattern (vLLM's guided_regex / guided_json): the whole completion
    # matches the regex / is JSON the schema (a dict or its JSON text) allows.
    guided_regex: str | None = None
    guided_json: dict | str | None = field(default=None, hash=False)
    guided_grammar: str | None = None  # a GBNF grammar (driver/guided/grammar.py) the completion matches
    # The regex the completion must match (guided_regex, or guided_json's or guided_grammar's),
    # set by the engine.
    structured_regex: str | None = None
    structured_outputs: StructuredOutputsParams | None = field(default=None, hash=False)  # vLLM's newer shape
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens
    detokenize: bool = True  # False: token ids only (benchmarks); stop strings need text
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Accept lists / a single string as vLLM does, but store tuples (hashable, frozen).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "bad_words", tuple(self.bad_words or ()))
        if self.structured_outputs is not None:
            for name, value in self.structured_outputs.guided_fields().items():
                if getattr(self, name) is not None:
                    raise ValueError(f"SamplingParams: give structured_outputs or {name}, not both")
                object.__setattr__(self, name, value)
        if self.guided_choice is not None:
            object.__setattr__(self, "guided_choice", tuple(self.guided_choice))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if self.logit_bias is not None:  # JSON keys are strings: {"50256": -100}
            try:
                bias = {int(t): float(b) for t, b in dict(self.logit_bias).items()}
            except (TypeError, ValueError):
                raise ValueError(f"SamplingParams.logit_bias must map token ids to numbers, "
                                 f"got {self.logit_bias!r}") from None
            object.__setattr__(self, "logit_bias", bias or None)
        self._validate()

    def _validate(self) -> None:
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", self.temperature >= 0.0, "must be >= 0 (0 means greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and (self.top_k >= 1 or self.top_k in (-1, 0)),
             "must be -1 (disabled) or an integer >= 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be > 0"),
            ("min_tokens", isinstance(self.min_tokens, int) and self.min_tokens >= 0, "must be >= 0"),
            ("max_tokens", self.max_tokens is None or (isinstance(self.max_tokens, int)
                                                      and self.max_tokens >= 1), "must be >= 1"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int)
                                                  and 0 <= self.logprobs <= 20), "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                                and 0 <= self.prompt_logprobs <= 20),
             "must be in [0, 20]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("guided_choice", self.guided_choice is None or (
                self.guided_choice and all(isinstance(c, str) and c for c in self.guided_choice)),
             "must be a non-empty list of non-empty strings"),
            ("guided_regex", self.guided_regex is None or isinstance(self.guided_regex, str), "must be a string"),
            ("guided_grammar", self.guided_grammar is None or isinstance(self.guided_grammar, str),
             "must be a string (a GBNF grammar)"),
            ("guided_json", self.guided_json is None or isinstance(self.guided_json, (dict, str, bool)),
             "must be a JSON schema (an object, or its JSON text)"),
            ("truncate_prompt_tokens", self.truncate_prompt_tokens is None or (
                isinstance(self.truncate_prompt_tokens, int) and self.truncate_prompt_tokens >= 1), "must be >= 1"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("bad_words", all(isinstance(w, str) and w.strip() for w in self.bad_words), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative token ids"),
            ("logit_bias", self.logit_bias is None or all(t >= 0 and -100.0 <= b <= 100.0
                                                         for t, b in self.logit_bias.items()),
             "must map non-negative token ids to biases in [-100, 100]"),
            ("allowed_token_ids", self.allowed_token_ids is None or (
                self.allowed_token_ids and all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)),
             "must be a non-empty list of non-negative token ids"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")
        guided = [n for n in ("guided_choice", "guided_regex", "guided_json", "guided_grammar")
                  if getattr(self, n) is not None]
        if len(guided) > 1:
            raise ValueError(f"SamplingParams: give at most one of {guided}")
        if self.stop and not self.detokenize:
            raise ValueError("SamplingParams.stop needs detokenize=True (stop strings match text)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens ({self.min_tokens}) must be <= "
                             f"max_tokens ({self.max_tokens})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_token_ids_in_vocab(params: SamplingParams, vocab_size: int) -> None:
    """The token ids params name (beyond the stop ids, which may be anything) exist in the vocab."""
    for name in ("logit_bias", "allowed_token_ids"):
        ids = getattr(params, name) or ()
        if any(t >= vocab_size for t in ids):
            raise ValueError(f"SamplingParams.{name} has token ids past the vocabulary; they must be "
                             f"in [0, {vocab_size})")


@dataclass(frozen=True)
class PoolingParams:
    """An embedding request (vLLM's name): the model's final hidden state of the prompt's last
    token (after the final norm; last-token pooling, as e5-mistral and gte-Qwen2 embed),
    L2-normalized unless normalize=False. The prompt is computed; nothing is generated."""

    normalize: bool = True
