"""The HTTP surface: three BentoML services composed with ``bentoml.depends``.

    make serve                                   # builds missing artifacts, then serves on :3000
    GLOWING_ARTIFACTS=artifacts bentoml serve    # from the repository root (bentofile.yaml)

``ScorerService`` (glowing-scorer) and ``GeneratorService`` (glowing-generator) each hold one model
behind a batchable method: concurrent requests merge into one model call (``max_batch_size``,
``max_latency_ms`` from the settings).
``Glowing`` is the API: ``/score``, ``/generate``, ``/reviews`` and ``/info`` (GET or POST);
BentoML adds ``/livez``, ``/readyz`` (200 once every model is loaded and warmed up) and
``/metrics``. The decorator values below are read from the settings when this module is
imported; everything else is read when a service starts.
"""

import asyncio
import logging
import secrets
from contextlib import aclosing
from typing import AsyncGenerator, AsyncIterator

import bentoml

from glowing import artifacts as A
from service import auth, batching, bentoml_compat, loading, metrics, schemas, store, streaming
from service import openai_protocol as oai
from service.admission import Admission
from service.bentoml_compat import RUNNER_CONNECTION, api, gpu_resources, retrying
from service.disconnect import CancelOnDisconnect
from service.errors import ApiError, Envelope, from_exception
from service.openapi import Docs
from service.reviews import PRIOR_RATE, Accepted, Pipeline, collect_reviews
from service.settings import Settings, get_settings

log = logging.getLogger("bentoml.glowing")
bentoml_compat.apply()
SETTINGS = get_settings()
REQUESTS = schemas.request_models(SETTINGS)
ScoreRequest, GenerateRequest, ReviewsRequest, InfoRequest = (REQUESTS.score, REQUESTS.generate, REQUESTS.reviews,
                                                              REQUESTS.info)
CompletionRequest = oai.completion_request(SETTINGS)
Sampling = GenerateRequest | ReviewsRequest  # what the generation helpers below read of a request
API = {"/score": ScoreRequest, "/generate": GenerateRequest, "/reviews": ReviewsRequest, "/info": InfoRequest,
       "/v1/completions": CompletionRequest, "/v1/models": oai.ModelsRequest}  # path -> its request model
GET_PATHS = frozenset({"/info", "/v1/models"})  # also served on GET
GPU = gpu_resources(SETTINGS.device)  # half a GPU each: both model services on the one device (bentoml_compat)
PROGRESS = 8  # /reviews candidates report their token count this often (for the tokens of cancelled ones)


@bentoml.service(name="glowing-scorer", workers=SETTINGS.scorer_workers, resources=GPU,
                 traffic={"timeout": SETTINGS.timeout}, runner_connection=RUNNER_CONNECTION)
class ScorerService:
    packed_models = store.declared(SETTINGS)  # GLOWING_MODEL_TAG: `bentoml build` packs it

    def __init__(self) -> None:
        self.settings = store.resolve(get_settings())
        self.model = loading.load(A.CLASSIFIER, self.settings)
        self.metrics = metrics.get()
        self.queue = None  # the zero-wait queue, made on the first request (it needs the event loop)
        loading.freeze_heap(self.metrics.gc_pauses.labels(service="glowing-scorer").observe)

    @bentoml.api
    async def score(self, texts: list[str]) -> list[float]:
        """GLOWING_BATCHING=engine: zero-wait batching across requests (no batching window)."""
        loop = asyncio.get_running_loop()
        if self.queue is None or self.queue[0] is not loop:  # one per event loop (tests run several)
            self.queue = (loop, loading.score_queue(self.model, self.settings, self.metrics))
        return await self.queue[1].score(texts)

    @bentoml.api(**batching.decorator(SETTINGS.scorer_max_batch_size, SETTINGS.scorer_max_latency_ms))
    def score_batch(self, texts: list[str]) -> list[float]:
        """GLOWING_BATCHING=adaptive: BentoML's adaptive batching."""
        self.metrics.batch_size.labels(model=A.CLASSIFIER).observe(len(texts))
        return self.model.score(texts)

    @bentoml.api
    def describe(self) -> dict:
        return loading.describe(A.CLASSIFIER, self.model, self.settings)


@bentoml.service(name="glowing-generator", workers=SETTINGS.generator_workers, resources=GPU,
                 traffic={"timeout": SETTINGS.timeout}, runner_connection=RUNNER_CONNECTION)
class GeneratorService:
    packed_models = store.declared(SETTINGS)

    def __init__(self) -> None:
        self.settings = store.resolve(get_settings())
        self.model = loading.load(A.GENERATOR, self.settings)
        self.metrics = metrics.get()
        self.engine = loading.engine(self.model, self.settings, metrics.EngineMetrics(self.metrics)) \
            if self.settings.batching == "engine" else None
        self.bridge = None  # the engine's asyncio side, made on the first request (it needs the event loop)
        loading.freeze_heap(self.metrics.gc_pauses.labels(service="glowing-generator").observe)

    @bentoml.api
    async def stream(self, item: schemas.GenerationItem, deltas: bool = True,
                     progress: int = 0) -> AsyncGenerator[str, None]:
        """GLOWING_BATCHING=engine: the item's rows through the engine, streamed as text-delta lines
        (service/streaming.py); ``deltas`` false: each row's text once, when it ends (and its token
        count every ``progress`` tokens). Row ``i`` is sampled with ``derive_seed(item.seed, item.first_row + i)``."""
        from glowing.runtime.engine import AsyncEngine, GenerationError, QueueFull

        if self.engine is None:
            raise bentoml.exceptions.BentoMLException("GLOWING_BATCHING=adaptive: no engine here")
        if self.bridge is None or self.bridge.loop is not asyncio.get_running_loop():  # one per event loop
            self.bridge = AsyncEngine(self.engine)
        rows = [row.settings for row in batching.expand([item])]
        lines = streaming.engine_lines(self.bridge, self.model.codec.tokenizer, item.prompt, rows, deltas,
                                       progress)
        async with aclosing(lines):
            try:
                async for line in lines:
                    yield line
            except QueueFull as err:  # before the first line: BentoML answers it as a 503
                raise bentoml.exceptions.ServiceUnavailable(str(err)) from None
            except GenerationError as err:  # after the stream started: an error line
                yield streaming.error_line(str(err))

    @bentoml.api(**batching.decorator(SETTINGS.generator_max_batch_size, SETTINGS.generator_max_latency_ms))
    def generate(self, items: list[schemas.GenerationItem]) -> list[list[str]]:
        """GLOWING_BATCHING=adaptive: per item, its ``n`` continuations (prompt excluded)."""
        self.metrics.batch_size.labels(model=A.GENERATOR).observe(len(items))
        return batching.generate_batch(items, self.model.generate, self.settings.generator_max_rows,
                                       on_call=self.metrics.generator_call_rows.observe)

    @bentoml.api
    def describe(self) -> dict:
        return loading.describe(A.GENERATOR, self.model, self.settings)


@bentoml.service(name="glowing", workers=SETTINGS.api_workers,
                 traffic={"timeout": SETTINGS.timeout + 10})  # our own timeout answers first, in the envelope
class Glowing:
    scorer = bentoml.depends(ScorerService)
    generator = bentoml.depends(GeneratorService)

    def __init__(self) -> None:
        self.settings = store.resolve(get_settings())
        self.manifest = loading.read_manifest(self.settings)
        self.metrics = metrics.get()
        self._tokenizer = None  # the generator's, for usage.prompt_tokens (/v1/completions)
        self._acceptance: dict[float, float] = {}  # min_positive (to 0.1) -> recent acceptance rate (/reviews)
        self._coalesce = None  # calls to the scorer, coalesced (made on the first, in the event loop)
        loading.freeze_heap(self.metrics.gc_pauses.labels(service="glowing").observe)

    @bentoml.on_deployment
    def preflight() -> None:
        """Runs once in the `bentoml serve` process before any worker starts: missing or corrupt
        artifacts stop the server with a message, instead of workers restarting in a loop."""
        try:
            loading.preflight(store.resolve(get_settings()))
        except loading.StartupError as err:
            raise SystemExit(f"glowing: cannot start: {err}") from None

    @api("/score", ScoreRequest)
    async def score(self, request: ScoreRequest) -> schemas.ScoreResponse:
        """P(positive) and a label for each text, in order."""
        return await self._answer(self._score(request.texts))

    @api("/generate", GenerateRequest)
    async def generate(self, request: GenerateRequest) -> schemas.GenerateResponse:
        """``n`` reviews that start with the prompt, each scored. ``"stream": true`` answers Server-Sent
        Events: ``{"index", "delta"}`` as tokens are made, ``{"index", "text", "p_positive", "label",
        "finish_reason", "seed"}`` when a row ends, then ``[DONE]``."""
        if request.stream:
            return await self._stream(request)
        return await self._answer(self._generate(request))

    @api("/reviews", ReviewsRequest)
    async def reviews(self, request: ReviewsRequest) -> schemas.ReviewsResponse:
        """Up to ``n`` reviews with p_positive >= min_positive: the first passing candidates in candidate
        order, within a budget of ``max_candidates``; ``complete`` is false when the budget ran out first.
        ``"stream": true`` answers Server-Sent Events: each accepted review once its place is settled, then
        ``{"complete", "seed", "stats", "scores"}`` (``scores``: ``{"candidate", "p_positive"}`` per scored
        candidate, accepted or not, for the playground's chart; null with GLOWING_REVIEWS=rounds), then ``[DONE]``."""
        if request.stream:
            return await self._sse(self._review_events(request, _seed(request), scores=True))
        return await self._answer(self._reviews(request))

    @api("/v1/completions", CompletionRequest)
    async def completions(self, request: CompletionRequest) -> oai.Completion:
        """OpenAI-compatible completions (service/openai_protocol.py): each choice scored (``p_positive``);
        with the extension ``min_positive`` the choices are the accepted reviews of a /reviews request.
        ``"stream": true`` answers completion chunks as Server-Sent Events, then ``[DONE]``."""
        if request.model != oai.MODEL_ID:
            return ApiError(404, f"model: no model {request.model!r} here; GET /v1/models lists "
                                 f"{oai.MODEL_ID!r}", param="model", code="model_not_found").response()
        if request.user:
            log.debug("completion for user %r", request.user)
        seed, cid, created = _seed(request), oai.new_id(), oai.now()
        if request.stream:
            return await self._sse(self._completion_chunks(request, seed, cid, created))
        return await self._answer(self._completion(request, seed, cid, created))

    @api("/v1/models", oai.ModelsRequest)
    async def list_models(self, request: oai.ModelsRequest) -> oai.ModelList:
        """The served generator, OpenAI-style (also served on GET /v1/models)."""
        return await self._answer(self._models())

    @api("/info", InfoRequest)
    async def info(self, request: InfoRequest) -> schemas.InfoResponse:
        """Model versions, backend, active execution providers, batching, limits, evaluation metrics
        (also served on GET /info)."""
        return await self._answer(self._info())

    # ---- plain helpers: an @bentoml.api method calling another on self would deadlock --------

    async def _answer(self, work):
        try:
            return await asyncio.wait_for(work, self.settings.timeout)
        except Exception as err:  # the client gets the envelope; the log gets the traceback
            return from_exception(err).response()

    @property
    def _engine(self) -> bool:
        return self.settings.batching == "engine"

    async def _scores(self, texts: list[str]) -> list[float]:
        call = self.scorer.to_async.score if self._engine else self.scorer.to_async.score_batch
        scores = await retrying(call, texts)
        if len(scores) != len(texts):
            raise RuntimeError(f"the scorer answered {len(scores)} scores for {len(texts)} texts")
        return scores

    async def _continuations(self, request: Sampling, n: int, seed: int) -> list[str]:
        item = request.generation_item(n, seed)
        if self._engine:
            texts = [""] * n
            async with aclosing(self._row_events(item)) as steps:
                async for step in steps:
                    if isinstance(step, dict):
                        raise streaming.GeneratorFailed(step.get("error", "the generator failed"))
                    for index, delta, *_ in step:
                        texts[index] += delta
            return [request.prompt + t for t in texts]
        [continuations] = await retrying(self.generator.to_async.generate, [item])
        return [request.prompt + c for c in continuations]

    def _row_events(self, item: schemas.GenerationItem, deltas: bool = False, progress: int = 0) -> AsyncIterator[list]:
        return streaming.read_lines(self.generator.to_async.stream(item=item, deltas=deltas, progress=progress))

    async def _events(self, request: Sampling, seed: int, deltas: bool) -> AsyncIterator[dict]:
        """The request's rows as streaming events (service/streaming.py ``scored_rows``); ``deltas``:
        token by token, else one delta per row when it ends. Without the engine, the rows come all
        at once when the batch is done: one delta each, then the scores."""
        n = request.n
        if self._engine:
            rows = self._row_events(request.generation_item(n, seed), deltas)
            events = streaming.scored_rows(rows, request.prompt, n, self._scoring)
            async with aclosing(events):
                async for event in events:
                    yield event
            return
        texts = await self._continuations(request, n, seed)
        for i, text in enumerate(texts):
            yield {"index": i, "delta": text[len(request.prompt):]}
        for i, (text, p) in enumerate(zip(texts, await self._scores(texts))):
            yield {"index": i, "text": text, "p_positive": p, "finish_reason": None}

    async def _coalesced_scores(self, texts: list[str]) -> list[float]:
        loop = asyncio.get_running_loop()
        if self._coalesce is None or self._coalesce[0] is not loop:  # one per event loop (tests run several)
            self._coalesce = (loop, batching.Coalesce(self._scores, self.settings.scorer_max_batch_size, depth=2))
        return await self._coalesce[1](texts)

    @property
    def _scoring(self):
        """How /score and /generate reach the scorer: with the engine, coalesced (what arrives while a
        call is under way goes in the next one); GLOWING_BATCHING=adaptive, one call per request (the
        request-level path kept for comparison). /reviews always coalesces."""
        return self._coalesced_scores if self._engine else self._scores

    async def _score(self, texts: list[str]) -> schemas.ScoreResponse:
        scores = await self._scoring(texts)
        return schemas.ScoreResponse(results=[schemas.Score(label=schemas.label(p), p_positive=p) for p in scores])

    async def _generate(self, request: GenerateRequest) -> schemas.GenerateResponse:
        seed = _seed(request)  # nobody waits for a row before the last: one scoring call for all of them
        texts = await self._continuations(request, request.n, seed)
        scores = await self._scoring(texts)
        return schemas.GenerateResponse(seed=seed, reviews=[_review(t, p) for t, p in zip(texts, scores)])

    async def _stream(self, request: GenerateRequest):
        seed = _seed(request)

        async def events() -> AsyncIterator[dict]:
            async with aclosing(self._events(request, seed, deltas=True)) as rows:
                async for event in rows:
                    if "text" in event:
                        event = {k: v for k, v in event.items() if k != "tokens"}
                        event |= {"label": schemas.label(event["p_positive"]), "seed": seed}
                    yield event

        return await self._sse(events())

    async def _sse(self, events: AsyncIterator[dict]):
        """Server-Sent Events. The first event is awaited before answering, so that an overloaded
        generator or a bad request still gets its HTTP status; later errors are an error event."""
        from starlette.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout

        async def next_event() -> dict | None:
            try:  # in this task (not wait_for's): a cancellation reaches the generator's own frame
                async with asyncio.timeout_at(deadline):
                    return await anext(events)
            except StopAsyncIteration:
                return None

        try:
            first = await next_event()
        except Exception as err:
            await events.aclose()
            return from_exception(err).response()

        async def body() -> AsyncIterator[str]:
            event = first
            try:
                while event is not None:
                    yield streaming.sse(event)
                    event = await next_event()
                yield streaming.DONE
            except Exception as err:  # the status is sent already: an error event ends the stream
                yield streaming.sse(from_exception(err).body())
            finally:
                await events.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _reviews(self, request: ReviewsRequest) -> schemas.ReviewsResponse:
        seed = _seed(request)
        reviews, final = [], None
        async with aclosing(self._review_events(request, seed)) as events:
            async for event in events:
                if "text" in event:
                    reviews.append(_review(event["text"], event["p_positive"]))
                else:
                    final = event
        return schemas.ReviewsResponse(reviews=reviews, complete=final["complete"], seed=seed,
                                       stats=schemas.ReviewsStats(**final["stats"]))

    async def _review_events(self, request: ReviewsRequest, seed: int, stop: list[str] = (),
                             scores: bool = False) -> AsyncIterator[dict]:
        """/reviews as events: ``{"index", "candidate", "text", "p_positive", "label"}`` per accepted
        review in answer order, then ``{"complete", "seed", "stats"}`` (GLOWING_REVIEWS, service/reviews.py)."""
        if self.settings.reviews == "rounds":
            out = await self._rounds(request, seed)
            for i, (text, p) in enumerate(out.reviews):
                yield {"index": i, "candidate": None, "text": text, "p_positive": p, "label": schemas.label(p)}
        else:
            bucket = round(request.min_positive, 1)
            pipeline = Pipeline(self._candidates(request, seed, stop), self._coalesced_scores, n=request.n,
                                min_positive=request.min_positive, max_candidates=request.max_candidates,
                                cap=self.settings.reviews_round_size, prior=self._acceptance.get(bucket, PRIOR_RATE))
            async with aclosing(pipeline.run()) as steps:
                async for step in steps:
                    if isinstance(step, Accepted):
                        yield {"index": step.place, "candidate": step.candidate, "text": step.text,
                               "p_positive": step.p_positive, "label": schemas.label(step.p_positive),
                               "finish_reason": step.finish_reason}
            out = pipeline.out
            if out.scored:  # what this server has seen at this threshold sizes the next request's first wave
                seen = out.passed / out.scored
                self._acceptance[bucket] = 0.8 * self._acceptance.get(bucket, seen) + 0.2 * seen
        self.metrics.reviews_candidates.observe(out.candidates)
        self.metrics.reviews_acceptance.observe(out.acceptance_rate)
        self.metrics.generated_total.inc(out.candidates)
        self.metrics.accepted_total.inc(out.accepted)
        stats = schemas.ReviewsStats(candidates=out.candidates, accepted=out.accepted, rounds=out.rounds,
                                     acceptance_rate=out.acceptance_rate, elapsed_ms=round(out.elapsed_s * 1e3, 1),
                                     tokens=out.tokens, cancelled=out.cancelled, wasted_tokens=out.wasted_tokens)
        final = {"complete": out.complete, "seed": seed, "stats": stats.model_dump()}
        if scores:
            final["scores"] = out.scores
        yield final

    def _candidates(self, request: ReviewsRequest, seed: int, stop: list[str] = ()):
        """The pipeline's ``rows``: candidate ``i`` is row ``i`` of the request's candidates, sampled with
        ``derive_seed(derive_seed(seed, "candidates"), i)`` whatever wave it travels in; a candidate is
        cut before the first of the ``stop`` strings it contains (then scored)."""
        base = batching.derive_seed(seed, "candidates")
        prompt = request.prompt

        async def rows(first: int, count: int) -> AsyncIterator[tuple[int, str | None, int]]:
            item = request.generation_item(count, base, first_row=first)
            if not self._engine:
                [continuations] = await retrying(self.generator.to_async.generate, [item])
                for i, text in enumerate(continuations):
                    text, reason = _cut(text, stop, None)
                    yield first + i, prompt + text, 0, reason  # the adaptive path does not count tokens
                return
            texts = [""] * count
            async with aclosing(self._row_events(item, progress=PROGRESS)) as steps:
                async for step in steps:
                    if isinstance(step, dict):
                        raise streaming.GeneratorFailed(step.get("error", "the generator failed"))
                    for index, delta, reason, tokens in step:
                        if reason == "error":
                            raise streaming.GeneratorFailed("the generator failed a candidate")
                        texts[index] += delta
                        if reason is None:
                            yield first + index, None, tokens
                        else:
                            text, reason = _cut(texts[index], stop, reason)
                            yield first + index, prompt + text, tokens, reason

        return rows

    async def _rounds(self, request: ReviewsRequest, seed: int):
        """GLOWING_REVIEWS=rounds: the previous way; tokens counted from the generator's lines."""
        tokens: dict[str, int] = {}
        total = 0

        async def generate(count: int, round_seed: int) -> list[str]:
            nonlocal total
            if not self._engine:
                return await self._continuations(request, count, round_seed)
            texts, counts = [""] * count, [0] * count
            async with aclosing(self._row_events(request.generation_item(count, round_seed))) as steps:
                async for step in steps:
                    if isinstance(step, dict):
                        raise streaming.GeneratorFailed(step.get("error", "the generator failed"))
                    for index, delta, _, n_tokens in step:
                        texts[index] += delta
                        counts[index] = n_tokens
            texts = [request.prompt + t for t in texts]
            total += sum(counts)
            tokens.update(zip(texts, counts))
            return texts

        out = await collect_reviews(generate, self._scores, n=request.n, min_positive=request.min_positive,
                                    max_candidates=request.max_candidates, seed=seed,
                                    round_cap=self.settings.reviews_round_size)
        out.tokens = total
        out.wasted_tokens = total - sum(tokens.get(t, 0) for t, _ in out.reviews)
        return out

    # ---- the OpenAI-compatible API -----------------------------------------------------------------

    async def _choices(self, request: CompletionRequest, seed: int) -> AsyncIterator[dict]:
        """Choice pieces ``{"index", "text"}`` (a delta) and, when a choice ends, ``{"index", "text",
        "finish_reason", "p_positive", "tokens"}``; with min_positive, per prompt at the end
        ``{"prompt": k, "reviews": {complete, seed, stats}}``. Prompts one after the other."""
        n, stop = request.n, request.stops()
        for k, prompt in enumerate(request.prompts()):
            inner, pseed = request.internal(prompt, self.settings, REQUESTS), oai.prompt_seed(seed, k)
            if request.min_positive is not None:
                async with aclosing(self._review_events(inner, pseed, stop)) as events:
                    async for e in events:
                        if "text" in e:
                            yield {"index": k * n + e["index"], "text": e["text"][len(prompt):],
                                   "finish_reason": e["finish_reason"], "p_positive": e["p_positive"]}
                        else:
                            yield {"prompt": k, "reviews": e}
                continue
            cutters = [oai.StopCutter(stop) for _ in range(n)]
            async with aclosing(self._events(inner, pseed, deltas=request.stream)) as events:
                async for e in events:
                    cut = cutters[e["index"]]
                    if "delta" in e:
                        if text := cut.feed(e["delta"]):
                            yield {"index": k * n + e["index"], "text": text}
                        continue
                    rest, p = cut.finish(), e["p_positive"]
                    if cut.stopped:  # the score is of what the client gets
                        [p] = await self._scoring([prompt + cut.text])
                    yield {"index": k * n + e["index"], "text": rest, "p_positive": p, "tokens": e.get("tokens", 0),
                           "finish_reason": "stop" if cut.stopped else e["finish_reason"]}

    async def _completion_chunks(self, request: CompletionRequest, seed: int, cid: str,
                                 created: int) -> AsyncIterator[dict]:
        async with aclosing(self._choices(request, seed)) as pieces:
            async for piece in pieces:
                if "index" in piece:
                    choice = {"text": piece["text"], "index": piece["index"], "logprobs": None,
                              "finish_reason": piece.get("finish_reason")}
                    if "p_positive" in piece:
                        choice["p_positive"] = piece["p_positive"]
                    yield oai.chunk(cid, created, seed, [choice])

    async def _completion(self, request: CompletionRequest, seed: int, cid: str, created: int) -> oai.Completion:
        choices: dict[int, dict] = {}
        reviews, tokens = {}, 0
        async with aclosing(self._choices(request, seed)) as pieces:
            async for piece in pieces:
                if "reviews" in piece:
                    reviews[str(piece["prompt"])] = piece["reviews"]
                    tokens += piece["reviews"]["stats"]["tokens"]
                    continue
                choice = choices.setdefault(piece["index"], {"text": "", "index": piece["index"],
                                                              "finish_reason": None})
                choice["text"] += piece["text"]
                if "p_positive" in piece:
                    choice |= {"finish_reason": piece["finish_reason"], "p_positive": piece["p_positive"]}
                    tokens += piece.get("tokens", 0)
        prompt_tokens = sum(map(self._prompt_tokens, request.prompts())) * (1 if reviews else request.n)
        return oai.Completion(id=cid, created=created, model=oai.MODEL_ID, system_fingerprint=f"seed-{seed}",
                              choices=[oai.Choice(**choices[i]) for i in sorted(choices)],
                              usage=oai.Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens,
                                              total_tokens=prompt_tokens + tokens),
                              reviews=reviews)

    def _prompt_tokens(self, prompt: str) -> int:
        """The prompt's length in the generator's tokens (its tokenizer.json, read once; 0 without one)."""
        if self._tokenizer is None:
            from pathlib import Path

            path = Path(loading.model_dir(A.GENERATOR, self.settings)) / "tokenizer.json"
            try:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception:
                log.warning("no tokenizer at %s: usage.prompt_tokens will read 0", path)
                self._tokenizer = False
        return len(self._tokenizer.encode(prompt).ids) if self._tokenizer else 0

    async def _models(self) -> oai.ModelList:
        generator = await self.generator.to_async.describe()
        from pathlib import Path

        created = int((Path(self.settings.artifacts) / A.MANIFEST).stat().st_mtime)
        return oai.ModelList(data=[oai.Model(id=oai.MODEL_ID, created=created, version=generator.get("version"))])

    async def _info(self) -> schemas.InfoResponse:
        classifier, generator = await asyncio.gather(self.scorer.to_async.describe(),
                                                     self.generator.to_async.describe())
        s = self.settings
        return schemas.InfoResponse(
            service={"name": "glowing", "backend": s.backend, "device": s.device, "bentoml": bentoml.__version__,
                     "preset": self.manifest.get("preset"), "artifacts": str(s.artifacts),
                     "model_tag": s.model_tag},
            models={A.CLASSIFIER: classifier, A.GENERATOR: generator},
            batching=batching_info(s),
            limits=limits(s), metrics=A.flatten(self.manifest.get("metrics", {})))


def batching_info(s: Settings) -> dict:
    if s.batching == "engine":
        return {"mode": "engine",
                A.CLASSIFIER: {"max_batch_size": s.scorer_max_batch_size, "max_batch_tokens": s.scorer_max_batch_tokens,
                               "wait_ms": 0, "workers": s.scorer_workers},
                A.GENERATOR: {"max_rows": s.engine_max_rows, "max_step_tokens": s.engine_max_step_tokens,
                              "max_waiting": s.engine_max_waiting, "max_waiting_steps": s.engine_max_waiting_steps,
                              "workers": s.generator_workers}}
    return {"mode": "adaptive",
            A.CLASSIFIER: {"max_batch_size": s.scorer_max_batch_size, "max_latency_ms": s.scorer_max_latency_ms,
                           "workers": s.scorer_workers},
            A.GENERATOR: {"max_batch_size": s.generator_max_batch_size, "max_latency_ms": s.generator_max_latency_ms,
                          "max_rows_per_call": s.generator_max_rows, "workers": s.generator_workers}}


def limits(s: Settings) -> dict:
    return {name: getattr(s, name) for name in ("max_texts", "max_text_chars", "max_prompt_chars", "max_n",
                                                  "max_new_tokens", "max_candidates", "reviews", "reviews_round_size",
                                                  "max_concurrency", "timeout")} | {"max_body_bytes": s.body_limit()}


def _seed(request: Sampling | CompletionRequest) -> int:
    """The request's seed, or one drawn for it (the answer returns it)."""
    return request.seed if request.seed is not None else secrets.randbelow(schemas.SEED_MAX + 1)


def _cut(text: str, stop, reason: str | None) -> tuple[str, str | None]:
    """``text`` before the first of the ``stop`` strings it contains (finish reason stop)."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], "stop") if hits else (text, reason)


def _review(text: str, p: float) -> schemas.Review:
    return schemas.Review(text=text, p_positive=p, label=schemas.label(p))


# A client that leaves cancels its work, in every service (service/disconnect.py); outermost, so that
# it sees the body admission reads. Then, outermost first: the error envelope on every response, admission
# (the API key, method, concurrency, body size and validation), the documents (/docs.json, /, /playground).
for _service in (Glowing, ScorerService, GeneratorService):
    _service.add_asgi_middleware(CancelOnDisconnect)
Glowing.add_asgi_middleware(Envelope, paths=frozenset(API))
Glowing.add_asgi_middleware(Admission, models=API, get_paths=GET_PATHS, max_concurrency=SETTINGS.max_concurrency,
                            max_body_bytes=SETTINGS.body_limit(), api_key=auth.key_bytes(SETTINGS.api_key))
Glowing.add_asgi_middleware(Docs, models=API, get_paths=GET_PATHS, api_key=auth.key_bytes(SETTINGS.api_key))
