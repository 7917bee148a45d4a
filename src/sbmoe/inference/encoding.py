"""Encode texts with a retriever: length-sorted batches, inference mode, bf16 backbone, float32 head.

The one encode path: the backbone (up to pooling) at the configured precision, optionally cached on
disk, then the MoE head and normalisation in float32 (:func:`apply_head_stages`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from sbmoe.config.jobs import EncodeConfig, JobOptions
from sbmoe.core.errors import UsageError
from sbmoe.core.runtime import InferencePlan, autocast, resolve_inference, resolve_one_text_inference

if TYPE_CHECKING:
    from sbmoe.inference.cache import EmbeddingCache
    from sbmoe.model.retriever import Retriever

logger = logging.getLogger(__name__)


def tokenize(retriever: Retriever, texts: Sequence[str], kind: str) -> dict[str, torch.Tensor]:
    """Tokenise one batch, padded to its longest text and truncated at the limit for ``kind``."""
    batch = retriever.tokenizer(
        retriever.prepare_texts(texts),
        padding=True,
        truncation=True,
        max_length=retriever.max_length(kind),
        return_tensors="pt",
    )
    return {key: value.to(retriever.device) for key, value in batch.items()}


def length_sorted_batches(
    retriever: Retriever, texts: Sequence[str], kind: str, batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield (positions, padded batch) with texts grouped by token length, longest first.

    Sorting by length keeps padding (wasted compute) small; longest first surfaces an
    out-of-memory error at once instead of at the end.
    """
    encodings = retriever.tokenizer(
        retriever.prepare_texts(texts),
        truncation=True,
        max_length=retriever.max_length(kind),
        add_special_tokens=True,
    )
    lengths = np.fromiter((len(ids) for ids in encodings["input_ids"]), dtype=np.int64, count=len(texts))
    order = np.argsort(-lengths, kind="stable")
    pinned = retriever.device.type == "cuda"
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        features = [{key: encodings[key][i] for key in encodings} for i in positions]
        batch = retriever.tokenizer.pad(features, padding=True, return_tensors="pt")
        if pinned:  # page-locked, so the copy below runs while the GPU still works on earlier batches
            batch = {key: value.pin_memory() for key, value in batch.items()}
        yield (
            positions,
            {key: tensor.to(retriever.device, non_blocking=pinned) for key, tensor in batch.items()},
        )


# Texts encoded (and cached) at a time when a cache is given: the same chunks for every job.
CACHE_CHUNK_SIZE = 4096


def run_stages(stages: Sequence[torch.nn.Module], features: dict, kind: str | None = None) -> dict:
    """Pass a feature dict through pipeline stages; ``kind`` (query/document) goes to stages that ask.

    A stage asks by naming ``task`` in its ``forward_kwargs`` (sentence-transformers' convention,
    e.g. a query-side head: :class:`~sbmoe.model.head.Head`).
    """
    for stage in stages:
        if kind is not None and "task" in getattr(stage, "forward_kwargs", ()):
            features = stage(features, task=kind)
        else:
            features = stage(features)
    return features


def encode_texts(
    retriever: Retriever,
    texts: Sequence[str],
    kind: str = "document",
    config: EncodeConfig | None = None,
    *,
    options: JobOptions | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Encode ``texts`` into a float32 array (len(texts), d), in the input order.

    The backbone runs up to pooling (:func:`encode_pooled`); the stages after pooling (MoE head,
    normalisation) then always run in float32 through :func:`apply_head_stages`, so the embeddings
    are the same whether the pooled ones come from the backbone or from the cache.

    Args:
        retriever: The model.
        texts: Queries or documents (documents as "title text").
        kind: ``query`` or ``document``: selects the token limit.
        config: Batch size, backend and precision (defaults: :class:`~sbmoe.config.jobs.EncodeConfig`).
        options: A progress bar, and a cache of pooled embeddings to reuse (or store): only the
            head then runs on a hit (default: neither).
        chunk_size: With a cache, encode and store ``chunk_size`` texts at a time (default
            :data:`CACHE_CHUNK_SIZE`), so an interrupted call resumes where it stopped and every job
            (training, evaluation, indexing) finds what another stored.
    """
    pooled = _pooled_embeddings(retriever, texts, kind, config, options, chunk_size)
    return apply_head_stages(retriever, pooled, kind) if len(pooled) else pooled


def encode_pooled(
    retriever: Retriever,
    texts: Sequence[str],
    kind: str = "document",
    config: EncodeConfig | None = None,
    *,
    options: JobOptions | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """The pooled embeddings of ``texts`` (the input of the MoE head), float32 (len(texts), d), in order.

    The backbone runs on ``config.backend`` at ``config.precision`` (resolved by
    :func:`~sbmoe.core.runtime.resolve_inference`; bf16: on bf16 copies of its weights). Encoding
    runs where ``retriever`` is; ``config.device`` is where callers load it. Arguments as
    :func:`encode_texts`'s.
    """
    pooled = _pooled_embeddings(retriever, texts, kind, config, options, chunk_size)
    # A cache hit is a read-only memory map of the entry: hand out a copy.
    return np.array(pooled, dtype=np.float32) if isinstance(pooled, np.memmap) else pooled


def _pooled_embeddings(
    retriever: Retriever,
    texts: Sequence[str],
    kind: str,
    config: EncodeConfig | None,
    options: JobOptions | None,
    chunk_size: int | None,
) -> np.ndarray:
    """The pooled embeddings of ``texts``, a read-only memory map where they come whole from the cache."""
    config = config or EncodeConfig()
    show_progress, cache = (options.show_progress, options.cache) if options is not None else (False, None)
    if kind not in ("query", "document"):
        raise UsageError(f"kind must be 'query' or 'document', got {kind!r}")
    if not texts:
        dim = retriever.model.get_embedding_dimension()
        return np.zeros((0, dim), dtype=np.float32)
    plan = resolve_inference(config.backend, config.precision, retriever.device)
    if cache is not None and chunk_size is None:
        chunk_size = CACHE_CHUNK_SIZE  # every job stores (and finds) a corpus in the same chunks
    whole = None
    if cache is not None and chunk_size and len(texts) > chunk_size:
        # The same texts encoded whole before (e.g. for head-only training) serve a chunked call too.
        whole = cache.get(cache.key(retriever, texts, kind, plan.key), len(texts))
    if whole is not None:
        return whole
    if cache is not None and chunk_size and len(texts) > chunk_size:
        # Each chunk is its own cache entry: an interrupted encoding resumes at the unfinished chunk.
        starts = range(0, len(texts), chunk_size)
        return np.concatenate(
            [
                _pooled(retriever, texts[i : i + chunk_size], kind, config, plan, show_progress, cache)
                for i in starts
            ]
        )
    return _pooled(retriever, texts, kind, config, plan, show_progress, cache)


def _pooled(
    retriever: Retriever,
    texts: Sequence[str],
    kind: str,
    config: EncodeConfig,
    plan: InferencePlan,
    show_progress: bool,
    cache: EmbeddingCache | None,
) -> np.ndarray:
    """The pooled embeddings of ``texts``, from ``cache`` when it holds them (then stored there)."""
    key = cache.key(retriever, texts, kind, plan.key) if cache is not None else None
    pooled = cache.get(key, len(texts)) if cache is not None else None
    if pooled is None:
        pooled = _run_batches(retriever, texts, kind, config.encode_batch_size, plan, show_progress)
        if cache is not None:
            cache.put(key, pooled)
    return pooled


def _run_batches(
    retriever: Retriever,
    texts: Sequence[str],
    kind: str,
    batch_size: int,
    plan: InferencePlan,
    show_progress: bool,
) -> np.ndarray:
    """The pooled embeddings of ``texts`` (the backbone's output), float32, in input order.

    On a GPU nothing waits for a batch's result: embeddings stay on the device and come back
    :data:`_ROWS_PER_COPY` rows at a time, so the next batch is padded and queued while the GPU
    computes (a copy to the host after every batch would stall the GPU while Python pads).
    """
    output: np.ndarray | None = None
    pending: list[tuple[np.ndarray, torch.Tensor]] = []

    def copy_back() -> None:
        nonlocal output
        embeddings = torch.cat([rows for _, rows in pending]).float().cpu().numpy()
        if output is None:
            output = np.empty((len(texts), embeddings.shape[1]), dtype=np.float32)
        output[np.concatenate([positions for positions, _ in pending])] = embeddings
        bar.update(len(embeddings))
        pending.clear()

    on_gpu = retriever.device.type == "cuda"
    bar = tqdm(total=len(texts), desc=f"encode {kind}s", unit="text", disable=not show_progress)
    try:
        with torch.inference_mode(), eval_mode(retriever.model), autocast(plan.precision, retriever.device):
            run = _encoder_runner(retriever, plan)
            for positions, batch in length_sorted_batches(retriever, texts, kind, batch_size):
                pending.append((positions, run(batch)["sentence_embedding"]))
                if not on_gpu or sum(len(positions) for positions, _ in pending) >= _ROWS_PER_COPY:
                    copy_back()
            if pending:
                copy_back()
    finally:
        bar.close()
    assert output is not None
    return output


# Embeddings a GPU keeps before they are copied to the host together (16k x 1024 float32: 64 MiB).
_ROWS_PER_COPY = 16384


def encoder_runner(
    retriever: Retriever, config: EncodeConfig | None = None, threads: int | None = None
) -> Callable[[dict], dict]:
    """The backbone up to pooling, set up once for ``config``'s backend and precision.

    For a caller that runs the backbone on its own batches many times (a benchmark): an ONNX Runtime
    session or bf16 weight copies are then made once instead of at every call (:class:`TextEncoder`
    keeps one too). Valid while the model's weights do not change. ``threads``: as
    :class:`TextEncoder`'s.
    """
    config = config or EncodeConfig()
    plan = resolve_inference(config.backend, config.precision, retriever.device)
    with torch.inference_mode():
        return _encoder_runner(retriever, plan, threads)


class EncodedText(NamedTuple):
    """One text through the model: the backbone's pooled embedding (the head's input) and the final
    embedding, float32 ``(1, d)``; for a query through an MoE head, its top-1 expert and the gate's
    probabilities (else ``None``)."""

    pooled: np.ndarray
    embedding: np.ndarray
    expert: int | None = None
    gate: list[float] | None = None


class TextEncoder:
    """Encodes one text per forward pass, at its own length, set up once: what a server calls per text.

    A text's embedding then never depends on what else is encoded: the pass that makes it has the
    same input shape, hence the same kernels and the same rounding, whether it ran alone or between
    other requests' texts, at every precision and backend (bf16 matrix kernels on AMX, and int8's
    per-batch activation scales, change a text's embedding with the batch it is padded into). The
    backend (an ONNX Runtime session or bf16 weight copies, see :func:`encoder_runner`), the stages
    and the token limits are set up at construction; a call runs the tokenizer, the backbone and
    the head (in float32, as :func:`apply_head_stages`), nothing else. Threads may call at once:
    their forward passes run side by side, torch's each on the threads its caller set, ONNX
    Runtime's on its session's ``threads`` (give each thread its own :meth:`twin` to keep them apart).

    ``auto`` numerics are those for one text at a time
    (:func:`~sbmoe.core.runtime.resolve_one_text_inference`: ONNX Runtime float32 on a CPU, torch
    where the model cannot be exported).

    Args:
        retriever: The model; valid while its weights do not change.
        config: Backend and precision (the batch size does not apply).
        threads: Threads of one forward pass under the onnx backend (default: torch's thread count
            here); torch passes run on the threads their caller set (``torch.set_num_threads``).
    """

    def __init__(
        self, retriever: Retriever, config: EncodeConfig | None = None, threads: int | None = None
    ) -> None:
        config = config or EncodeConfig()
        self.retriever = retriever
        self.threads = threads
        self.plan = resolve_one_text_inference(config.backend, config.precision, retriever.device)
        with torch.inference_mode():
            try:
                self._backbone = _encoder_runner(retriever, self.plan, threads)
            except Exception as error:
                if (config.backend, config.precision, self.plan.backend) != ("auto", "auto", "onnx"):
                    raise
                # Only auto's own choice gives way: a model ONNX cannot export (or a cache it cannot
                # write) leaves the encoding to torch.
                logger.warning(
                    "could not set up ONNX Runtime for this model (%s: %s): encoding with torch",
                    type(error).__name__,
                    error,
                )
                logger.debug("why ONNX Runtime could not be set up", exc_info=True)
                self.plan = resolve_inference(config.backend, config.precision, retriever.device)
                self._backbone = _encoder_runner(retriever, self.plan, threads)
        self._head = retriever.head_stages()
        # A fast tokenizer sets its truncation and padding at each call: one thread at a time.
        self._tokenizing = threading.Lock()

    def twin(self) -> TextEncoder:
        """An encoder of the same model, numerics and threads for another thread that encodes at once.

        Under onnx it gets a session of its own: a session's thread pool serves every pass run on
        it, so threads sharing one would share its threads. Tokenising stays one thread at a time
        across the two (they share the tokenizer).
        """
        twin = copy.copy(self)
        if self.plan.backend == "onnx":
            with torch.inference_mode():
                twin._backbone = _encoder_runner(self.retriever, self.plan, self.threads)
        return twin

    def __call__(self, text: str, kind: str) -> EncodedText:
        """``text`` encoded alone; its routing read from this very pass (see :class:`EncodedText`)."""
        retriever = self.retriever
        with torch.inference_mode(), eval_mode(retriever.model):
            with self._tokenizing:
                batch = tokenize(retriever, [text], kind)
            with autocast(self.plan.precision, retriever.device):
                pooled = self._backbone(batch)["sentence_embedding"].float()
            features = run_stages(self._head, {"sentence_embedding": pooled.to(retriever.device)}, kind)
        embedding = features["sentence_embedding"].float().cpu().numpy()
        if "router_logits" not in features:
            return EncodedText(pooled.cpu().numpy(), embedding)
        gate = torch.softmax(features["router_logits"].float(), dim=-1)[0]
        return EncodedText(pooled.cpu().numpy(), embedding, int(features["expert_index"][0]), gate.tolist())


def _encoder_runner(
    retriever: Retriever, plan: InferencePlan, threads: int | None = None
) -> Callable[[dict], dict]:
    """The stages up to pooling as one function, run by the plan's backend at its precision.

    Under bf16 the torch stages run as copies with bf16 weights, in eval mode: autocast alone
    converts every weight matrix to bf16 again at every call; converting once per encoding spares
    that (and keeps layer norms and activations in bf16 too). Copies, not bf16 weights swapped into
    the model at each call, so that threads can encode at once and the model's own float32
    weights (training) are never touched. The onnx backend runs the exported transformer (see
    :mod:`sbmoe.inference.onnx_backend`) on ``threads`` threads (default: torch's thread count).
    """
    if plan.backend == "onnx":
        from sbmoe.inference.onnx_backend import OnnxEncoder

        return OnnxEncoder(retriever, plan.precision, threads=threads)
    stages = retriever.encoder_stages()
    if plan.precision != "bf16":
        return functools.partial(run_stages, stages)
    return functools.partial(run_stages, [_bf16_copy(stage) for stage in stages])


def _bf16_copy(stage: torch.nn.Module) -> torch.nn.Module:
    """``stage`` in eval mode with bf16 copies of its floating-point weights and buffers.

    Made once per state of the weights and kept beside the stage: converting MiniLM's weights takes
    tens of milliseconds, more than encoding a query. A step of training changes every tensor's
    version (in-place updates), a load replaces their storage, so either makes a new copy.
    """
    tensors = list(itertools.chain(stage.parameters(), stage.buffers()))
    state = tuple((id(tensor), tensor.data_ptr(), tensor._version) for tensor in tensors)
    with _BF16_COPIES_LOCK:
        kept = _BF16_COPIES.get(stage)
    if kept is not None and kept[0] == state:
        return kept[1]
    # The deep copy finds the bf16 tensors ready (no float32 copy) and shares what is no tensor
    # or module (a tokenizer, a config).
    ready: dict[int, object] = {}
    for tensor in tensors:
        converted = tensor.detach().to(torch.bfloat16) if tensor.is_floating_point() else tensor
        is_parameter = isinstance(tensor, torch.nn.Parameter)
        ready[id(tensor)] = torch.nn.Parameter(converted, requires_grad=False) if is_parameter else converted
    for module in stage.modules():
        for value in vars(module).values():
            if not isinstance(value, (torch.Tensor, torch.nn.Module, dict, list, tuple)):
                ready.setdefault(id(value), value)
    converted_stage = copy.deepcopy(stage, ready).eval()
    with _BF16_COPIES_LOCK:
        _BF16_COPIES[stage] = (state, converted_stage)
    return converted_stage


_BF16_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_BF16_COPIES_LOCK = threading.Lock()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, its own mode restored after.

    Free when the model is in eval mode already (a server encoding one query at a time): switching
    walks every submodule: milliseconds for MiniLM on 2 cores, as long as encoding a short query.
    Threads encoding with one model at once (a service's worker and a caller) share one switch: the
    first to enter switches, the last to leave restores; otherwise one could restore training mode
    (dropout, gate noise) in the middle of another's encoding.
    """
    with _EVAL_LOCK:
        entry = _EVAL_USERS.get(id(model))
        if entry is None:
            switch = any(module.training for module in model.modules())
            entry = _EVAL_USERS[id(model)] = [0, model.training, switch]
            if switch:
                model.eval()
        entry[0] += 1
    try:
        yield
    finally:
        with _EVAL_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _EVAL_USERS[id(model)]
                if entry[2]:
                    model.train(entry[1])


_EVAL_LOCK = threading.Lock()
_EVAL_USERS: dict[int, list] = {}  # id(model) -> [threads inside, its own mode, switched]


@contextlib.contextmanager
def expert_pooling(retriever: Retriever, rule: str | None) -> Iterator[None]:
    """Let the MoE head combine its experts by ``rule`` inside the block, then restore its own.

    ``None`` (or a model without a head) changes nothing. :meth:`Retriever.fingerprint` inside the
    block identifies the embeddings made under ``rule``.
    """
    head = retriever.head
    if head is None or rule is None:
        yield
        return
    previous = head.expert_pooling
    head.expert_pooling = rule
    try:
        yield
    finally:
        head.expert_pooling = previous


def apply_head_stages(
    retriever: Retriever, pooled: np.ndarray, kind: str, *, rule: str | None = None, batch_size: int = 4096
) -> np.ndarray:
    """Apply the stages after pooling (MoE head, normalisation) to pooled embeddings, in float32.

    The one place the head runs at inference. Float32 whatever the backbone's precision: the head
    is tiny, and this keeps the result independent of that precision and of the cache. Also lets
    one backbone pass serve several inference rules (``rule``: e.g. ``top1`` and ``all``).
    ``kind`` (``query`` or ``document``) matters to a query-side head, which leaves documents as
    they are.
    """
    stages = retriever.head_stages()
    chunks = []
    with torch.inference_mode(), eval_mode(retriever.model), expert_pooling(retriever, rule):
        for start in range(0, len(pooled), batch_size):
            x = torch.from_numpy(np.array(pooled[start : start + batch_size], dtype=np.float32))
            features = run_stages(stages, {"sentence_embedding": x.to(retriever.device)}, kind)
            chunks.append(features["sentence_embedding"].float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.asarray(pooled, dtype=np.float32)
