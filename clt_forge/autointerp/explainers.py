"""Explainers: the language models that write feature explanations and judge detection questions.

An `Explainer` answers chat prompts (prompts.py) in two ways:
- `explain(messages_batch)`: the raw text answer to each prompt (callers pass it through
  `prompts.clean_explanation`);
- `judge(questions)`: for each yes/no question, a probability-like score in [0, 1] that the
  answer is yes (scoring.py counts > 0.5 as yes).

`describe(evidence)` gives each feature's candidate explanations (cleaned); labels.py keeps the
best acceptable one. The LLM kinds build them from `explain` on prompts.explanation_messages: the
first answer as `temperature` says, `candidates - 1` more sampled at `sample_temperature`.

Kinds, one registered class each (`EXPLAINERS`, keyed by `explainer.kind`; a new backend is one
class decorated with `@EXPLAINERS.register("name")`, built from the ExplainerConfig, plus
conf/explainer/<name>.yaml with `kind: name`; `kind: none` means no explainer):
- local: a Hugging Face model from conf/model (default: the embedded SmolLM2-135M-Instruct),
  offline. Explanations are greedy generations. A 135M model cannot answer yes/no questions: on
  10 hand-made (explanation, firing text, silent text) triples, P(yes) from the yes/no logits put
  the firing text first in only 2-5 of 10 (chance), whatever the prompt form (zero- or few-shot,
  chat or plain text). So a detection question is judged by pointwise mutual information instead:
  how much more likely the model finds the text after "Here is a sentence about <explanation>:"
  than after a neutral "Here is a sentence:" (the text's token log-probabilities summed, in nats).
  P(yes) = sigmoid(gain - PMI_MARGIN). On 48 hand-made items (20 firing, 28 silent, short
  sentences and 30-token windows) this ranked firing above silent with AUC 0.94, and the 2-nat
  margin gave balanced accuracy 0.86. Prompts that are not detection questions fall back to the
  yes/no logits.
- tokens (tokens.py): no LLM; the label is read off the evidence (dominant activating tokens,
  the preceding token, the decoder's promoted tokens). Its judge is another kind (explainer.judge,
  default local).
- openai: any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp's server, ...), with bounded
  concurrency and retries with exponential back-off.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any, NamedTuple
from urllib.parse import urlparse

from clt_forge.autointerp import literal as _literal  # noqa: F401  (registers tokens and literal)
from clt_forge.autointerp.base import EXPLAINERS, NO_EXPLAINER, Explainer, Messages
from clt_forge.autointerp.prompts import split_detection_question
from clt_forge.config.schema import ExplainerConfig
from clt_forge.errors import CLTError
from clt_forge.threads import torch_threads

__all__ = [
    "EXPLAINERS",
    "NO_EXPLAINER",
    "PMI_MARGIN",
    "Explainer",
    "LocalExplainer",
    "OpenAIExplainer",
    "make_explainer",
    "validate_kinds",
]

YES_WORDS = ("yes", "Yes", "YES", "true", "True")
NO_WORDS = ("no", "No", "NO", "false", "False")
PMI_MARGIN = 2.0  # nats of log-likelihood gain at which the local judge says P(yes) = 0.5
PMI_PREFIX = "Here is a sentence about {explanation}:\n"
PMI_BASELINE = "Here is a sentence:\n"
MAX_JUDGED_TOKENS = 128  # longer texts are cut (the local judge's cost grows with them)


def make_explainer(cfg: ExplainerConfig) -> Explainer | None:
    """The explainer `cfg` describes; None for kind none (statistics only)."""
    validate_kinds(cfg)
    if cfg.kind == NO_EXPLAINER:
        return None
    return EXPLAINERS.lookup(cfg.kind)(cfg)


def validate_kinds(cfg: ExplainerConfig) -> None:
    """Fail now (a ConfigError naming the key and the allowed values) on an unknown explainer.kind
    or explainer.judge: `clt autointerp` calls this before its pass, not after."""
    if cfg.kind != NO_EXPLAINER:
        EXPLAINERS.lookup(cfg.kind)
    if cfg.judge is not None and cfg.kind != NO_EXPLAINER:
        if cfg.judge in (NO_EXPLAINER, "tokens"):
            raise CLTError(f"explainer.judge={cfg.judge}: a judge must be a language model (local, openai, ...).")
        EXPLAINERS.lookup(cfg.judge)


# ---- local -------------------------------------------------------------------------------------


@EXPLAINERS.register("local")
class LocalExplainer(Explainer):
    """A local Hugging Face causal LM (the model config named `cfg.model`), run with torch.

    `threads` sets torch's intra-op threads during each call (restored afterwards); None leaves
    them as they are. Prompts are processed `batch_size` at a time (left-padded for generation)."""

    def __init__(self, cfg: ExplainerConfig, threads: int | None = None, batch_size: int = 8) -> None:
        import torch

        from clt_forge.models.gguf import load_hf
        from clt_forge.models.loading import model_config

        self.cfg = cfg
        self.threads = threads
        self.batch_size = max(1, batch_size)
        model_cfg = model_config(cfg.model)
        with self._threads():
            model, tokenizer = load_hf(model_cfg)
        self.device = torch.device(model_cfg.device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer  # our own instance (load_hf builds a fresh one): safe to configure
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._baselines: dict[str, float] = {}  # text -> log P(text | PMI_BASELINE)
        self.yes_ids = self._single_tokens(YES_WORDS)
        self.no_ids = self._single_tokens(NO_WORDS)

    def _single_tokens(self, words: Sequence[str]) -> list[int]:
        ids = {tuple(self.tokenizer.encode(form, add_special_tokens=False)) for w in words for form in (w, " " + w)}
        return sorted(i[0] for i in ids if len(i) == 1)

    def _threads(self) -> AbstractContextManager[None]:
        return torch_threads(self.threads)

    def _chat(self, messages: Messages) -> str:
        return str(self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))

    def explain(self, messages_batch: Sequence[Messages]) -> list[str]:
        return [one for (one,) in self._generate(messages_batch, self.cfg.temperature, 1)]

    def sample(self, messages_batch: Sequence[Messages], n: int) -> list[list[str]]:
        if n <= 0:
            return [[] for _ in messages_batch]
        return self._generate(messages_batch, max(self.cfg.sample_temperature, 1e-3), n)

    def _generate(self, messages_batch: Sequence[Messages], temperature: float, n: int) -> list[list[str]]:
        import torch

        answers: list[list[str]] = []
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "num_return_sequences": n}
            if temperature > 0
            else {"do_sample": False}
        )
        with self._threads(), torch.inference_mode():
            for start in range(0, len(messages_batch), self.batch_size):
                prompts = [self._chat(m) for m in messages_batch[start : start + self.batch_size]]
                encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                encoded = encoded.to(self.device)
                output = self.model.generate(
                    **encoded,
                    max_new_tokens=self.cfg.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
                new = output[:, encoded["input_ids"].shape[1] :]
                texts = [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
                per = len(texts) // len(prompts)  # generate() returns each prompt's sequences together
                answers += [texts[i * per : (i + 1) * per] for i in range(len(prompts))]
        return answers

    def judge(self, questions: Sequence[Messages]) -> list[float]:
        scores: list[float] = [0.0] * len(questions)
        parsed = [(i, split_detection_question(q)) for i, q in enumerate(questions)]
        detection = [(i, parts) for i, parts in parsed if parts is not None]
        other = [i for i, parts in parsed if parts is None]
        with self._threads():
            for start in range(0, len(detection), self.batch_size):
                chunk = detection[start : start + self.batch_size]
                gains = self._pmi([parts for _, parts in chunk])
                for (i, _), gain in zip(chunk, gains, strict=True):
                    scores[i] = _sigmoid(gain - PMI_MARGIN)
            for start in range(0, len(other), self.batch_size):
                chunk_ids = other[start : start + self.batch_size]
                for i, score in zip(chunk_ids, self._yes_no([questions[i] for i in chunk_ids]), strict=True):
                    scores[i] = score
        return scores

    def pmi(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """For each (explanation, text): log P(text | about explanation) - log P(text | neutral), in nats."""
        with self._threads():
            return [
                g
                for start in range(0, len(pairs), self.batch_size)
                for g in self._pmi(pairs[start : start + self.batch_size])
            ]

    def _pmi(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        import torch

        encode = self.tokenizer.encode
        baseline = encode(PMI_BASELINE, add_special_tokens=False)
        rows: list[tuple[list[int], int]] = []  # token ids, where the text starts
        new_texts = list(dict.fromkeys(t for _, t in pairs if t not in self._baselines))
        for explanation, text in pairs:
            text_ids = encode(text, add_special_tokens=False)[:MAX_JUDGED_TOKENS]
            prefix = encode(PMI_PREFIX.format(explanation=explanation), add_special_tokens=False)
            rows.append((prefix + text_ids, len(prefix)))
        for text in new_texts:  # each text's neutral log-likelihood is computed once, then cached
            rows.append((baseline + encode(text, add_special_tokens=False)[:MAX_JUDGED_TOKENS], len(baseline)))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(rows):  # right padding: every text starts where its prefix ends
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        logprobs = logits.float().log_softmax(-1).cpu()
        totals = []
        for row, (ids, start) in enumerate(rows):
            targets = input_ids[row, start : len(ids)]
            totals.append(float(logprobs[row, start - 1 : len(ids) - 1].gather(-1, targets[:, None]).sum()))
        if len(self._baselines) > 20_000:
            self._baselines.clear()
        self._baselines.update(zip(new_texts, totals[len(pairs) :], strict=True))
        return [totals[k] - self._baselines[text] for k, (_, text) in enumerate(pairs)]

    def _yes_no(self, questions: Sequence[Messages]) -> list[float]:
        import torch

        prompts = [self._chat(q) for q in questions]
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            logits = self.model(**encoded).logits[:, -1, :].float().log_softmax(-1).cpu()
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return [float(p) for p in torch.sigmoid(yes - no)]

    def close(self) -> None:
        self.__dict__.pop("model", None)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ---- OpenAI-compatible endpoint ----------------------------------------------------------------

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
RETRY_STATUS = {408, 409, 429}  # and every 5xx
MAX_BACKOFF_S = 30.0


@EXPLAINERS.register("openai")
class OpenAIExplainer(Explainer):
    """Chat completions from an OpenAI-compatible endpoint at `cfg.base_url`.

    At most `cfg.concurrency` requests are in flight; each request is tried `cfg.retries` times,
    waiting `backoff_s`, 2 x `backoff_s`, ... between attempts, on connection errors, time-outs,
    HTTP 408 / 409 / 429 and 5xx (other statuses, such as 401 or 404, fail at once).

    Servers differ; the explainer adapts, and `protocol` says what was used (printed on close).
    Responses: whole JSON ("json"), or, once the server answers a plain request with an event stream
    (`transformers serve` 4.57 always streams), streamed from then on ("stream"). Detection questions:
    P(yes) from the first answer token's top log-probabilities ("logprobs": vLLM, OpenAI, llama.cpp),
    else from the answer's first word, yes 1, no 0, neither 0.5 ("text"); a server that refuses the
    logprobs parameters (HTTP 400 / 422) or sends none (`transformers serve`) is asked without them
    from then on."""

    def __init__(self, cfg: ExplainerConfig, backoff_s: float = 1.0) -> None:
        import openai

        self.cfg = cfg
        self.backoff_s = backoff_s
        key = os.environ.get(cfg.api_key_env)
        if not key:
            if not _is_local(cfg.base_url):
                raise CLTError(
                    f"explainer.kind=openai with base_url={cfg.base_url or 'https://api.openai.com/v1'} needs an API key "
                    f"in the environment variable {cfg.api_key_env} (explainer.api_key_env), which is not set."
                )
            key = "not-needed"  # a local server: most ignore the key, the client insists on one
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0)
        self.base_url = str(self.client.base_url).rstrip("/")
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.concurrency), thread_name_prefix="explainer")
        self._logprobs = True  # ask for logprobs in judge() until the server refuses or ignores them
        self._no_logprobs = ""  # why not, once so
        self._stream = False  # stream every request, once the server has answered a plain one with a stream
        self._judged = {"logprobs": 0, "text": 0}
        self._closed = False
        self._lock = threading.Lock()

    @property
    def protocol(self) -> dict[str, Any]:
        """How this endpoint was spoken to: responses "json" or "stream"; detection questions judged
        from log-probabilities or from the answer's text (and why not logprobs)."""
        with self._lock:
            stream, judged, why = self._stream, dict(self._judged), self._no_logprobs or None
        return {"responses": "stream" if stream else "json", "judged_by": judged, "no_logprobs": why}

    def explain(self, messages_batch: Sequence[Messages]) -> list[str]:
        return list(self.pool.map(lambda m: self._complete(m, self.cfg.max_new_tokens).text, messages_batch))

    def sample(self, messages_batch: Sequence[Messages], n: int) -> list[list[str]]:
        """`n` more requests per prompt at sample_temperature (the `n` parameter is not universal)."""
        temperature = self.cfg.sample_temperature
        jobs = [m for m in messages_batch for _ in range(n)]
        texts = list(
            self.pool.map(lambda m: self._complete(m, self.cfg.max_new_tokens, temperature=temperature).text, jobs)
        )
        return [texts[i * n : (i + 1) * n] for i in range(len(messages_batch))]

    def judge(self, questions: Sequence[Messages]) -> list[float]:
        return list(self.pool.map(self._judge_one, questions))

    def _judge_one(self, question: Messages) -> float:
        with self._lock:
            logprobs = self._logprobs
        reply = None
        if logprobs:
            try:
                reply = self._complete(question, 2, logprobs=True)
                if reply.logprobs is None and reply.text:  # an answer without them: the server ignores them
                    self._stop_logprobs("the server sent none")
            except _Refused as err:
                self._stop_logprobs(f"the server refused them: {err}")
        if reply is None:
            reply = self._complete(question, 2)
        score = _yes_from_logprobs(reply.logprobs)
        with self._lock:
            self._judged["text" if score is None else "logprobs"] += 1
        return _yes_from_text(reply.text) if score is None else score

    def _stop_logprobs(self, why: str) -> None:
        with self._lock:
            self._logprobs = False
            self._no_logprobs = self._no_logprobs or why

    def _complete(
        self, messages: Messages, max_tokens: int, logprobs: bool = False, temperature: float | None = None
    ) -> _Reply:
        import openai

        request: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": list(messages),
            "temperature": self.cfg.temperature if temperature is None else temperature,
            "max_tokens": max_tokens,
            "timeout": self.cfg.timeout_s,
        }
        if logprobs:
            request |= {"logprobs": True, "top_logprobs": 5}
        attempts = max(1, self.cfg.retries)
        for attempt in range(attempts):
            try:
                if not self._stream:
                    response = self.client.chat.completions.create(**request)
                    if hasattr(response, "choices"):
                        return _Reply.whole(response)
                    with self._lock:  # an event stream came back as text: stream from now on
                        self._stream = True
                return _Reply.joined(self.client.chat.completions.create(**request, stream=True))
            except openai.APIStatusError as err:
                if logprobs and err.status_code in (400, 422):
                    raise _Refused(f"HTTP {err.status_code}") from err
                if err.status_code not in RETRY_STATUS and err.status_code < 500:
                    raise self._failure(f"HTTP {err.status_code}: {err.message}", 1) from err
                last: Exception = err
            except openai.APIConnectionError as err:  # also time-outs
                last = err
            except openai.APIError as err:  # an error event inside a stream
                raise self._failure(f"{type(err).__name__}: {err}", 1) from err
            if attempt + 1 < attempts:
                time.sleep(min(self.backoff_s * 2**attempt, MAX_BACKOFF_S))
        raise self._failure(f"{type(last).__name__}: {last}", attempts) from last

    def _failure(self, why: str, attempts: int) -> CLTError:
        tries = f"after {attempts} attempts" if attempts > 1 else "and is not retried"
        return CLTError(
            f"explainer endpoint explainer.base_url={self.base_url} (model {self.cfg.model}): the request failed {tries} "
            f"({why.strip()}). Check that the server is up and the model name and key are right."
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
        used = self.protocol
        if not self._closed and (self._stream or any(used["judged_by"].values())):
            why = f" (no logprobs: {used['no_logprobs']})" if used["no_logprobs"] else ""
            print(
                f"explainer endpoint {self.base_url}: {used['responses']} responses; questions judged by logprobs "
                f"{used['judged_by']['logprobs']}, by the answer's text {used['judged_by']['text']}{why}."
            )
        self._closed = True


class _Reply(NamedTuple):
    """One answer: its text, and its tokens' log-probabilities (None when the server sent none)."""

    text: str
    logprobs: list[Any] | None

    @classmethod
    def whole(cls, response: Any) -> _Reply:
        choice = response.choices[0]
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        return cls(str(choice.message.content or "").strip(), list(content) if content else None)

    @classmethod
    def joined(cls, chunks: Any) -> _Reply:
        """The deltas of a streamed answer joined (closing the stream)."""
        text: list[str] = []
        logprobs: list[Any] = []
        with chunks:
            for choice in (chunk.choices[0] for chunk in chunks if chunk.choices):
                text.append(choice.delta.content or "")
                logprobs += getattr(getattr(choice, "logprobs", None), "content", None) or []
        return cls("".join(text).strip(), logprobs or None)


class _Refused(Exception):
    """The endpoint rejected a request because of its logprobs parameters."""


def _is_local(base_url: str | None) -> bool:
    return base_url is not None and urlparse(base_url).hostname in LOCAL_HOSTS


def _yes_from_logprobs(logprobs: Sequence[Any] | None) -> float | None:
    """P(yes) from the first answer token's top log-probabilities (None if there are none, or they
    hold neither yes nor no)."""
    if not logprobs:
        return None
    yes = no = 0.0
    for candidate in logprobs[0].top_logprobs or []:
        word = candidate.token.strip().lower()
        if word in ("yes", "true"):
            yes += math.exp(candidate.logprob)
        elif word in ("no", "false"):
            no += math.exp(candidate.logprob)
    return yes / (yes + no) if yes + no > 0 else None


def _yes_from_text(answer: str) -> float:
    """1.0 for an answer starting with yes/true, 0.0 for no/false, 0.5 when it is neither."""
    words = answer.strip().strip("\"'*`").split(maxsplit=1)
    word = words[0].strip(".,!:;").lower() if words else ""
    if word in ("yes", "true"):
        return 1.0
    if word in ("no", "false"):
        return 0.0
    return 0.5
