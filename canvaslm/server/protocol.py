"""OpenAI-compatible request bodies (pydantic, strict types) and the error body, for /v1/completions and
/v1/chat/completions.

Fields follow the OpenAI API; the diffusion extensions (what the openai client's `extra_body` sends)
sit at the top level of the body: `max_denoising_steps`, `entropy_bound`, `confidence_threshold`,
`max_time`, `sampler`, `stream_drafts`, `ignore_eos`, and vLLM's `top_k`, `min_p` and `repetition_penalty`. Unknown
fields are ignored, as OpenAI-compatible servers usually do; known fields with a wrong type or an
out-of-range value are a 400 naming the field. Tools: a forced call (`tool_choice` naming a function, or
"required" with one tool) is generated under the function's parameter schema (server/tools.py); "auto"
needs a parser for the model's own call syntax, which this server does not have, and is refused by name.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, field_validator, model_validator

from ..sampling.json_schema import closed_objects
from ..tokenizer import TEMPLATE_RESERVED, tool_arguments_as_objects

# encode_chat arguments that chat_template_kwargs may not set: each has its own request field
GUIDED = ("guided_json", "guided_choice", "guided_regex", "guided_grammar")  # vLLM's names for constrained output
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # OpenAI's; the first two: no thinking
MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI
INT64 = 2**63 - 1


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class _Strict(BaseModel):
    """Strict types; unknown fields ignored (as OpenAI-compatible servers do); a null for a field with a default
    that takes no null is that default (the `openai` client sends null for an option given as None)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        if isinstance(data, dict) and None in data.values():
            fields = cls.model_fields
            data = {k: v for k, v in data.items() if not (
                v is None and k in fields and not fields[k].is_required() and not _takes_none(fields[k].annotation))}
        return data


def _takes_none(annotation) -> bool:
    import typing

    return annotation is None or annotation is type(None) or type(None) in typing.get_args(annotation) or \
        annotation is Any


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (what replaced its guided_* fields in v0.12): one of json (a JSON schema),
    regex, choice, grammar or json_object. Unknown keys are refused, so a constraint is never dropped unseen."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, max_length=4096)
    choice: list[str] | None = None
    grammar: str | None = Field(None, max_length=65536)
    json_object: bool | None = None
    disable_fallback: bool = False  # accepted: there is one backend, and no fallback
    disable_additional_properties: bool = False  # objects that do not say otherwise get no properties of their own
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        for key in ("whitespace_pattern", "structural_tag"):
            if getattr(self, key) is not None:
                return f"structured_outputs.{key}", f"structured_outputs.{key} is not supported"
        if self.disable_any_whitespace:
            return ("structured_outputs.disable_any_whitespace", "structured_outputs.disable_any_whitespace is not "
                    "supported (JSON outputs may hold whitespace between tokens)")
        return None


# structured_outputs keys -> the guided_* field each one fills
STRUCTURED = {"json_schema": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
              "grammar": "guided_grammar"}


class _Common(_Strict):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=INT64, description="cap on generated tokens")
    temperature: float | None = Field(
        None, ge=0, le=10, description="scales the denoising temperature schedule; 0 is near-greedy")
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64, description="makes the request reproducible on its "
                             "own; choice i of n uses seed + i; a negative seed (vLLM takes int64) is taken mod 2**63")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text is cut before the first")
    # set by the Ollama and llama-server routes, never from a body: their num_predict / n_predict -1 runs an
    # unconstrained output to EOS or the end of the context even where the server has a default length
    _fill_context: bool = PrivateAttr(False)

    @field_validator("seed")
    @classmethod
    def _seed_mod(cls, v):
        return v % 2**63 if v is not None and v < 0 else v

    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=512)
    response_format: ResponseFormat | None = None
    top_p: float | None = Field(None, ge=0, le=1, description="sample each canvas position from its nucleus")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="minus this x each time a token is "
                                            "already in the output so far (sampling/penalties.py)")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="minus this once a token is already "
                                           "in the output so far")
    logit_bias: dict[str, float] | None = None
    # --- diffusion extensions (extra_body) ---
    max_denoising_steps: int | None = Field(None, ge=1, le=4096, description="denoising steps per canvas (cap)")
    entropy_bound: float | None = Field(None, gt=0, le=1e6, description="entropy-bound sampler's bound")
    confidence_threshold: float | None = Field(None, gt=0, le=1e6, description="adaptive stop: mean entropy below this")
    sampler: Literal["entropy_bound"] | None = Field(None, description="only 'entropy_bound' for now")
    top_k: int | None = Field(None, ge=-1, le=INT64, description="vLLM's: sample each canvas position from its "
                              "k most likely tokens (-1 or 0: all)")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM's: drop tokens under min_p times the "
                                "position's most likely token's probability (0: none)")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100, description="vLLM's: prompt and output-so-far "
                                             "tokens' logits shrink by this factor (1: off)")
    max_time: float | None = Field(None, gt=0, le=86400, description="latency budget: seconds of denoising (prompt "
                                   "encoding not counted), then the canvas in progress is committed as it stands and "
                                   "is the last")
    stream_drafts: bool = Field(False, description="with stream=true: draft events (argmax canvas) between commits")
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1,
                          description="vLLM's: lower is served first; waits stay bounded (scheduler aging)")
    min_tokens: int = Field(0, ge=0, le=INT64, description="vLLM's: no EOS or stop_token_ids before this many tokens")
    thinking_token_budget: int | None = Field(None, ge=0, le=INT64, description="vLLM's: at most this many tokens in "
                                              "the reply's thought channel, then it is closed and the answer follows")
    include_stop_str_in_output: bool = Field(False, description="vLLM's: keep the stop string that ended the text")
    skip_special_tokens: bool = Field(True, description="vLLM's: leave special tokens out of the text")
    truncate_prompt_tokens: int | None = Field(None, ge=1, le=INT64,
                                               description="vLLM's: keep only the last N tokens of each prompt")
    ignore_eos: bool = Field(False, description="generate max_tokens whatever the model says (benchmarks)")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="vLLM's: each prompt token's log-prob and "
                                        "rank under the encoder's causal pass, with this many alternatives")
    stop_token_ids: list[int] | None = Field(None, max_length=64,
                                             description="more token ids that end the output (vLLM's name)")
    bad_words: list[str] | None = Field(None, max_length=256, description="vLLM's: words never written; each must be "
                                        "one token as it is spelled alone or after a space")
    # vLLM's fields this engine cannot honour: refused by name when set, rather than dropped unseen
    allowed_token_ids: list[int] | None = Field(None, max_length=1 << 20)
    use_beam_search: bool = False
    guided_choice: list[str] | None = Field(None, description="the output is exactly one of these strings")
    guided_json: dict[str, Any] | str | None = Field(
        None, description="a JSON schema (object or JSON text): response_format json_schema, vLLM's name")
    guided_regex: str | None = Field(None, max_length=4096,
                                     description="the output is a whole match of this regular expression")
    guided_grammar: str | None = Field(None, max_length=65536,
                                       description="the output is in this GBNF grammar's language (root rule)")
    pins: dict[str, str | list[int]] | None = Field(
        None, max_length=256, description="canvas control: {output token offset: text or token ids} placed "
        "there whatever the model says; the output runs at least to the end of the last pin")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's (v0.12+): json, regex, choice, "
                                                         "grammar or json_object; fills the guided_* field it names")
    _renamed: dict = PrivateAttr(default_factory=dict)  # guided_* field -> the structured_outputs key that set it
    _closed: bool = PrivateAttr(default=False)  # structured_outputs.disable_additional_properties

    @model_validator(mode="after")
    def _structured(self):
        so = self.structured_outputs
        if so is None:
            return self
        for key, guided in STRUCTURED.items():
            value = getattr(so, key)
            if value is not None:
                if getattr(self, guided, None) is not None:
                    raise ValueError(f"structured_outputs.{key.removesuffix('_schema')} and {guided} both constrain "
                                     "the output; send one")
                setattr(self, guided, value)
                self._renamed[guided] = f"structured_outputs.{key.removesuffix('_schema')}"
        self._closed = bool(so.disable_additional_properties)
        if so.json_object:
            if self.response_format is not None and self.response_format.type != "text":
                raise ValueError("structured_outputs.json_object and response_format both constrain the output; "
                                 "send one")
            self.response_format = ResponseFormat(type="json_object")
            self._renamed["response_format"] = "structured_outputs.json_object"
        return self

    def field_name(self, name: str) -> str:
        """How the request named the constraint field `name` (structured_outputs.json for guided_json, ...)."""
        return self._renamed.get(name, name)

    def as_named(self, message: str) -> str:
        """`message` with every constraint field it names named as the request named it."""
        for ours, theirs in self._renamed.items():
            message = re.sub(rf"(?<![\w.]){re.escape(ours)}(?![\w])", theirs, message)
        return message

    def json_schema_of(self, schema: dict) -> dict:
        """A guided_json schema as the constraint takes it: closed where structured_outputs asked for
        disable_additional_properties (vLLM's rule, json_schema.closed_objects)."""
        return closed_objects(schema) if self._closed else schema

    def constraint_fields(self) -> list[str]:
        """The output constraints this body sets, in the order errors name them: vLLM's guided_* fields,
        then response_format (other than text)."""
        given = [n for n in GUIDED if getattr(self, n, None) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if self.pins:
            given.append("pins")
        return given

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for an OpenAI feature set to a value this engine cannot honour."""
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            return "stop", f"at most {MAX_STOP} stop strings are allowed, got {len(self.stop)}"
        if self.stream_drafts and not self.stream:
            return "stream_drafts", "stream_drafts needs stream=true"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream=true"
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs is not available with stream=true"
        if self.allowed_token_ids:
            return "allowed_token_ids", ("allowed_token_ids is not supported: use guided_choice, guided_regex or "
                                         "logit_bias (e.g. -100 on the tokens to avoid)")
        if self.use_beam_search:
            return "use_beam_search", "use_beam_search is not supported (a diffusion model draws whole canvases)"
        if self.structured_outputs is not None:
            return self.structured_outputs.unsupported()
        return None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="text, token ids, or a batch of either (each prompt gets n choices)")
    max_tokens: int | None = Field(None, ge=0, le=INT64, description="cap on generated tokens (0: only with echo)")
    echo: bool = Field(False, description="the prompt comes back before the completion (with its logprobs)")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probs of each token and this many "
                                 "alternatives, under the encoder's causal pass (server/scored.py)")
    suffix: str | None = Field(None, max_length=1 << 16, description="insert mode: the text the output must lead into")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="generate this many per prompt and return the "
                                "n most likely under the encoder (server/scored.py)")

    def ranked(self) -> bool:
        """Whether more completions are generated than returned (best_of > n)."""
        return self.best_of is not None and self.best_of > self.n

    def scored(self) -> bool:
        """Whether the reply carries echo / logprobs (server/scored.py)."""
        return self.echo or self.logprobs is not None

    def unsupported(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens=0 needs echo=true (the prompt is scored, nothing is generated)"
        if self.echo and self.stream and (self.logprobs is not None or self.max_tokens == 0):
            return "stream", "echo with logprobs or max_tokens=0 is not available with stream=true (each alone is)"
        if (self.scored() or self.prompt_logprobs is not None) and self.suffix:
            return "suffix", "echo, logprobs and prompt_logprobs cannot be combined with suffix"
        if self.suffix and self.stream_drafts:
            return "stream_drafts", "stream_drafts is not available with suffix (candidates are compared at the end)"
        if self.suffix and self.min_tokens:
            return "min_tokens", "min_tokens cannot be combined with suffix (the suffix ends with a pinned EOS)"
        if self.suffix and self.ignore_eos:
            return "ignore_eos", "ignore_eos cannot be combined with suffix (the suffix ends with a pinned EOS)"
        if self.best_of is not None and self.best_of < self.n:
            return "best_of", f"best_of={self.best_of} must be at least n={self.n}"
        if self.best_of not in (None, self.n) and (self.stream or self.suffix or self.scored()):
            return "best_of", "best_of cannot be combined with stream, suffix, echo or logprobs"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1, max_length=1 << 26, description="a data: URL, an http(s) URL, base64, or a "
                     "file path under --allowed-local-media-path")
    detail: Literal["auto", "low", "high"] | None = None  # "low": the smallest image budget (70 soft tokens)


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1 << 20, description="the arguments as a JSON text")


class ToolCall(_Strict):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = Field(None, max_length=1 << 16)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)  # an assistant turn's calls
    tool_call_id: str | None = Field(None, max_length=256)  # a tool turn: the call it answers
    # an assistant turn's thought (vLLM's names and transformers'): the template sees it as reasoning_content
    reasoning_content: str | None = None
    reasoning: str | None = None
    thinking: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64, description="alias of max_tokens")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = Field(None, description="log-probs of the reply's tokens (server/scored.py)")
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = Field(True, description="vLLM's: open the assistant's turn after the messages")
    continue_final_message: bool = Field(False, description="vLLM's: go on with the last (assistant) message")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM's: more variables for the template")
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="vLLM's: the image processor's "
                                                       "settings for this request's images, e.g. max_soft_tokens")
    include_reasoning: bool = Field(True, description="vLLM's: false leaves the thought out of the reply (it is "
                                    "still kept out of the content)")
    reasoning_effort: Literal[REASONING_EFFORTS] | None = Field(
        None, description="OpenAI's: thinking mode (the template's enable_thinking) off for none / minimal, on "
        "otherwise, unless chat_template_kwargs sets enable_thinking")

    def unsupported(self) -> tuple[str, str] | None:
        from .tools import tool_choice_problem

        problem = tool_choice_problem(self)
        if problem is not None:
            return problem
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            return "max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one"
        clash = sorted(TEMPLATE_RESERVED & set(self.chat_template_kwargs or {}))
        if clash:
            return "chat_template_kwargs", f"chat_template_kwargs may not set {clash[0]}; use the request field"
        return super().unsupported()

    def template_kwargs(self) -> dict:
        """Keyword arguments of `encode_chat` beyond messages and tools."""
        extra = self.chat_template_kwargs or {}
        effort = {} if self.reasoning_effort is None else \
            {"enable_thinking": self.reasoning_effort not in ("none", "minimal")}
        return {**effort, **{k: v for k, v in extra.items() if k not in TEMPLATE_RESERVED},
                "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message}

    def message_dicts(self, image_placeholder: str = "<|image|>") -> list[dict]:
        """The messages as chat templates take them (transformers' convention): content as text or a list of
        parts (an image part holds `image_placeholder`, the image token's text; Tokenizer joins the parts for a
        template that takes a string), and tool call arguments as objects where the JSON text parses to one."""
        out = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):  # parts as Tokenizer takes them: it joins them, or keeps them for a
                # template that loops over parts (as LLM.chat's messages reach it: both render alike)
                content = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else
                           {"type": "image", "text": image_placeholder} for p in content]
            msg = {"role": m.role, "content": content if content is not None else ""}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": c.function.arguments}} for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            for key in ("reasoning_content", "reasoning", "thinking"):  # Tokenizer.encode_chat merges the names
                if getattr(m, key) is not None:
                    msg[key] = getattr(m, key)
            out.append(msg)
        return tool_arguments_as_objects(out)

    def image_parts(self) -> list["ImageURL"]:
        """The messages' image parts (url, detail), in prompt order."""
        return [p.image_url for m in self.messages if isinstance(m.content, list)
                for p in m.content if isinstance(p, ImagePart)]

    def tool_dicts(self) -> list[dict] | None:
        """The tool declarations for the chat template; None when there are none, or when tool_choice="none"
        asks for plain text (then they are left out of the prompt, so the model is not drawn to call one)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


# ---------------------------------------------------------------- the Responses API (/v1/responses)


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: str


class InputImage(_Strict):
    """An image part: `image_url` a data URL or an http(s) URL (a `file_id` alone is refused: there is no
    file store); it becomes the chat route's image part."""

    type: Literal["input_image"]
    image_url: str | None = Field(None, max_length=1 << 26)
    file_id: str | None = Field(None, max_length=256)
    detail: Literal["auto", "low", "high", "original"] | None = None  # "low": the smallest image budget


InputContent = Annotated[InputText | InputImage, Field(discriminator="type")]


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputContent]


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1 << 20)


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[InputContent] = Field(max_length=1 << 24)  # text, or parts as a message's content


class ReasoningItem(BaseModel):
    """A reasoning item sent back as input (what a client got in an earlier output): dropped, as the chat
    template leaves earlier thoughts out."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]


def _item_type(item):
    """An input item's `type` (a message may leave it out, as the openai client's EasyInputMessage does)."""
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")


# discriminated by `type`: an unknown type is named with the ones taken, not as the last member's mismatch
InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type)]

REASONING_SUMMARIES = ("auto", "concise", "detailed")
ENCRYPTED_INCLUDE = "reasoning.encrypted_content"


class ResponsesTool(FunctionDef):
    """A function tool as the Responses API declares it (flat: the function's fields beside `type`)."""

    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data):
        if isinstance(data, dict) and data.get("type") != "function":
            raise ValueError(f"type {data.get('type')!r} is a built-in tool; this server runs function tools only "
                             "({'type': 'function', 'name': ..., 'parameters': {...}})")
        return data


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


class TextFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None


LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ResponsesRequest(_Strict):
    """POST /v1/responses: the Responses API, served by translating it to a chat completion; responses
    are kept in memory for `previous_response_id` (server/responses.py)."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[InputItem] = Field(
        description="text (one user message) or a list of items: messages, function calls and their outputs")
    instructions: str | None = Field(None, max_length=1 << 20, description="a system message put first")
    max_output_tokens: int | None = Field(None, ge=1, le=INT64)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool = False
    text: TextConfig | None = None
    tools: list[ResponsesTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=512)
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = Field(None, max_length=16)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="auto: drop the oldest turns until the prompt leaves room for the reply")
    # OpenAI fields this server cannot honour, declared only to refuse them by name (`unsupported`): ignored,
    # the reply would lose the context or instructions they carry, or claim to run in the background
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    # diffusion extensions and vLLM's, as on the other routes (`extra_body` in the openai client)
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)  # negative: taken mod 2**63, as on the other routes
    max_denoising_steps: int | None = Field(None, ge=1, le=4096)
    entropy_bound: float | None = Field(None, gt=0, le=1e6)
    confidence_threshold: float | None = Field(None, gt=0, le=1e6)
    top_k: int | None = Field(None, ge=-1, le=INT64)
    min_p: float | None = Field(None, ge=0, le=1)
    logit_bias: dict[str, float] | None = None
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    min_tokens: int = Field(0, ge=0, le=INT64)
    thinking_token_budget: int | None = Field(None, ge=0, le=INT64)

    _seed_mod = field_validator("seed")(_Common._seed_mod.__func__)

    def unsupported(self) -> tuple[str, str] | None:
        if self.conversation is not None:
            return "conversation", "conversation is not supported: this server keeps no conversation objects; " \
                                   "continue a stored response with previous_response_id, or send the earlier " \
                                   "turns in input"
        if self.prompt is not None:
            return "prompt", "prompt (a stored prompt template) is not supported: this server keeps no prompt " \
                             "templates; send the text as instructions and input"
        if self.background:
            return "background", "background: true is not supported: a response runs while its request waits " \
                                 "(no queue to poll or cancel); leave background out, and use stream: true to " \
                                 "follow a long reply"
        r = self.reasoning or {}
        unknown = sorted(set(r) - {"effort", "summary", "generate_summary"})
        if unknown:
            return "reasoning", f"reasoning keys {unknown} are not supported (effort, summary)"
        if r.get("effort") not in (None, *REASONING_EFFORTS):
            return "reasoning", f"reasoning.effort {r['effort']!r}: expected one of {list(REASONING_EFFORTS)}"
        for key in ("summary", "generate_summary"):
            if r.get(key) not in (None, *REASONING_SUMMARIES):
                return "reasoning", f"reasoning.{key} {r[key]!r}: expected one of {list(REASONING_SUMMARIES)}"
        other = [x for x in self.include or () if x not in (LOGPROBS_INCLUDE, ENCRYPTED_INCLUDE)]
        if other:
            return "include", f"include values {other} are not supported (only {LOGPROBS_INCLUDE!r} and " \
                              f"{ENCRYPTED_INCLUDE!r})"
        return None


    def wants_logprobs(self) -> bool:
        """The output text's log-probs: asked with include or with top_logprobs."""
        return LOGPROBS_INCLUDE in (self.include or ()) or self.top_logprobs is not None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a text prompt, or chat messages rendered with the chat template (and tools)."""

    model: str | None = Field(None, max_length=256)
    prompt: str | None = Field(None, max_length=1 << 24)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096)
    tools: list[Tool] | None = Field(None, max_length=128)
    add_special_tokens: bool = True  # for a text prompt (e.g. BOS), as /v1/completions adds them
    add_generation_prompt: bool = True  # for messages, as /v1/chat/completions renders them
    continue_final_message: bool = False  # for messages: as on /v1/chat/completions
    chat_template_kwargs: dict[str, Any] | None = None  # for messages: as on /v1/chat/completions
    mm_processor_kwargs: dict[str, Any] | None = None  # for messages with images: as on /v1/chat/completions
    content: str | None = Field(None, max_length=1 << 24)  # llama-server's /tokenize: the text, and
    add_special: bool | None = None  # whether to add BOS (its default: no)
    return_token_strs: bool = False  # vLLM's: also each token as the tokenizer's vocabulary spells it
    with_pieces: bool = False  # llama-server's: `tokens` as [{id, piece}], piece the token's text (or bytes)


class DetokenizeRequest(_Strict):
    model: str | None = Field(None, max_length=256)
    tokens: list[int] = Field(max_length=1 << 24)


class LoadLoRARequest(_Strict):
    """vLLM's /v1/load_lora_adapter (served with --enable-lora-updates)."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRARequest(_Strict):
    """vLLM's /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=256)


class EmbeddingRequest(_Strict):
    """OpenAI's /v1/embeddings: texts or token id lists in, one vector each out."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1, le=INT64,
                                               description="vLLM's: keep only the last N tokens of each input")
