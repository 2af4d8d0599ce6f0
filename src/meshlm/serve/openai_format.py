"""Engine tokens -> OpenAI's response objects and stream chunks, for completions and chat.

One formatter per HTTP request: `add` collects tokens for a plain response, `chunks` turns
each token into stream chunks as it comes. Both report `usage` (prompt tokens counted once
per prompt, completion tokens over every choice) and every choice's `finish_reason`.
"""

from __future__ import annotations

from meshlm.serve.engine_bridge import Token
from meshlm.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Delta,
    TopLogprob,
    new_id,
    now,
    usage,
)


class Formatter:
    def __init__(self, state, body, prompt_tokens: int, choices: int, prefix: str):
        self.tokenizer = state.tokenizer
        self.model = state.model_name
        self.id, self.created = new_id(prefix), now()
        self.include_usage = body.include_usage
        self.prompt_tokens = prompt_tokens
        self.texts = [""] * choices
        self.finish: list[str | None] = [None] * choices
        self.completion_tokens = [0] * choices
        self.logprobs: list[list] = [[] for _ in range(choices)]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _record(self, t: Token) -> None:
        self.texts[t.choice] += t.text
        if t.finish_reason is not None:
            self.finish[t.choice] = t.finish_reason
            self.completion_tokens[t.choice] = t.completion_tokens

    def add(self, t: Token) -> None:
        self._record(t)
        if t.logprobs is not None and t.token_id is not None:
            self.logprobs[t.choice].append((t.token_id, t.logprobs))

    def usage(self):
        return usage(self.prompt_tokens, sum(self.completion_tokens))

    def opening_chunks(self) -> list[dict]:
        return []


class CompletionFormatter(Formatter):
    def __init__(self, state, body, prompt_tokens: list[int], echo: list[str]):
        super().__init__(state, body, sum(prompt_tokens), len(prompt_tokens) * body.n, "cmpl")
        self.n, self.echo = body.n, echo
        self.want_logprobs = body.logprobs is not None
        self.offsets = [len(echo[c // body.n]) for c in range(len(self.texts))]

    def _logprobs(self, entries: list, start: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        offset = start
        for token_id, (lp, top) in entries:
            text = self._token_text(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp)
            alternatives: dict[str, float] = {}
            for i, v in top:  # best first; tokens with the same text (partial characters) keep the best
                alternatives.setdefault(self._token_text(i), v)
            out.top_logprobs.append(alternatives or None)
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def response(self) -> dict:
        choices = [
            CompletionChoice(
                index=c,
                text=self.echo[c // self.n] + text,
                logprobs=self._logprobs(self.logprobs[c], self.offsets[c]) if self.want_logprobs else None,
                finish_reason=self.finish[c],
            )
            for c, text in enumerate(self.texts)
        ]
        r = CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage())
        return r.model_dump()

    def _chunk(self, choice: CompletionChoice) -> dict:
        r = CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])
        return r.model_dump(exclude={"usage"} if not self.include_usage else set())

    def opening_chunks(self) -> list[dict]:
        return [
            self._chunk(CompletionChoice(index=c, text=self.echo[c // self.n]))
            for c in range(len(self.texts))
            if self.echo[c // self.n]
        ]

    def chunks(self, t: Token) -> list[dict]:
        self._record(t)
        logprobs = None
        if self.want_logprobs and t.logprobs is not None and t.token_id is not None:
            logprobs = self._logprobs([(t.token_id, t.logprobs)], self.offsets[t.choice])
            self.offsets[t.choice] += len(logprobs.tokens[0])
        if not t.text and logprobs is None and t.finish_reason is None:
            return []
        return [
            self._chunk(CompletionChoice(index=t.choice, text=t.text, logprobs=logprobs, finish_reason=t.finish_reason))
        ]

    def usage_chunk(self) -> dict:
        r = CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())
        return r.model_dump()


class ChatFormatter(Formatter):
    def __init__(self, state, body, prompt_tokens: int):
        super().__init__(state, body, prompt_tokens, body.n, "chatcmpl")
        self.want_logprobs = body.logprobs

    def _entry(self, token_id: int, lp: float, top: list) -> ChatTokenLogprob:
        text = self._token_text(token_id)
        alternatives = []
        for i, v in top:
            alt = self._token_text(i)
            alternatives.append(TopLogprob(token=alt, logprob=v, bytes=list(alt.encode())))
        return ChatTokenLogprob(token=text, logprob=lp, bytes=list(text.encode()), top_logprobs=alternatives)

    def response(self) -> dict:
        choices = [
            ChatChoice(
                index=c,
                message=AssistantMessage(content=text),
                logprobs=ChatLogprobs(content=[self._entry(i, lp, top) for i, (lp, top) in self.logprobs[c]])
                if self.want_logprobs
                else None,
                finish_reason=self.finish[c],
            )
            for c, text in enumerate(self.texts)
        ]
        r = ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        )
        return r.model_dump()

    def _chunk(self, choice: ChatChunkChoice) -> dict:
        r = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        return r.model_dump(exclude={"usage"} if not self.include_usage else set())

    def opening_chunks(self) -> list[dict]:
        return [
            self._chunk(ChatChunkChoice(index=c, delta=Delta(role="assistant", content="")))
            for c in range(len(self.texts))
        ]

    def chunks(self, t: Token) -> list[dict]:
        self._record(t)
        logprobs = None
        if self.want_logprobs and t.logprobs is not None and t.token_id is not None:
            logprobs = ChatLogprobs(content=[self._entry(t.token_id, *t.logprobs)])
        out = []
        if t.text or logprobs is not None:
            out.append(self._chunk(ChatChunkChoice(index=t.choice, delta=Delta(content=t.text), logprobs=logprobs)))
        if t.finish_reason is not None:
            out.append(self._chunk(ChatChunkChoice(index=t.choice, delta=Delta(), finish_reason=t.finish_reason)))
        return out

    def usage_chunk(self) -> dict:
        r = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())
        return r.model_dump()
