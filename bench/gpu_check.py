"""GPU readiness check: train all-MiniLM-L6-v2 + an SB-MoE head for a few steps, encode 100k passages.

Prints the device, the precision ``auto`` picks, training steps/s and pairs/s, encoding passages/s
against sentence-transformers' ``encode`` of the same passages on the same device (same batch size,
same token limit, its fp16 where sbmoe's auto picks bf16, else the same precision), GPU utilisation
while training and while encoding (``nvidia-smi``, sampled every 0.1 s), search queries/s and peak
GPU memory, and ends with ``OK`` (exit code 0) when every check holds:
the model and its inputs sit on the GPU, the loss is finite, training moves the weights, the
embeddings are finite unit vectors, and a passage finds itself first. Under 5 minutes on one GPU.

    python bench/gpu_check.py                 # the GPU check (100k passages, 20 steps of batch 64)
    python bench/gpu_check.py --device cpu    # the CPU-sized check (1k passages, 3 steps of batch 8)

Without a CUDA device it says so and runs the CPU-sized check, so it runs anywhere. Passages are
SciFact's (``$SBMOE_DATA_DIR/scifact``) repeated up to the count, else generated sentences.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import machine

from sbmoe.config.jobs import EncodeConfig, JobOptions
from sbmoe.config.presets import build_configs
from sbmoe.core.runtime import resolve_device, resolve_precision, seed_everything
from sbmoe.data.beir import load_collection, resolve_data
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.backbones import resolve_backbone
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.training.trainer import build_trainer

GPU_SIZES = {"passages": 100_000, "steps": 20, "batch_size": 64, "encode_batch_size": 512}
CPU_SIZES = {"passages": 1_000, "steps": 3, "batch_size": 8, "encode_batch_size": 64}


def passages_and_pairs(count: int) -> tuple[list[str], list[tuple[str, str]]]:
    """``count`` passages and (query, passage) training pairs from SciFact, or generated text."""
    try:
        collection = load_collection(resolve_data("scifact"), splits=[])
        texts = [doc.full_text for doc in collection.corpus.values()]
        print(f"passages: SciFact's {len(texts)} documents, repeated up to {count}")
    except Exception as error:  # no data here: the check does not depend on it
        print(f"passages: generated ({type(error).__name__}: SciFact not available)")
        rng = random.Random(0)
        words = [f"{a}{b}" for a in ("pro", "anti", "cyto", "neuro", "hepa", "myo") for b in "aeiou"]
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 200))) for _ in range(2000)]
    passages = [texts[i % len(texts)] for i in range(count)]
    # A "query" is the passage's first words: enough for a loss that must go down.
    pairs = [(" ".join(text.split()[:12]), text) for text in texts[: min(len(texts), 4000)]]
    return passages, pairs


def write_collection(directory: Path, pairs: list[tuple[str, str]]) -> Path:
    """A BEIR folder with one training pair per query."""
    (directory / "qrels").mkdir(parents=True)
    with open(directory / "corpus.jsonl", "w", encoding="utf-8") as corpus:
        for i, (_, text) in enumerate(pairs):
            corpus.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    with open(directory / "queries.jsonl", "w", encoding="utf-8") as queries:
        for i, (query, _) in enumerate(pairs):
            queries.write(json.dumps({"_id": f"q{i}", "text": query}) + "\n")
    rows = "".join(f"q{i}\td{i}\t1\n" for i in range(len(pairs)))
    (directory / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows, encoding="utf-8")
    return directory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuUtilisation:
    """Mean GPU utilisation (%) over a ``with`` block, from ``nvidia-smi`` sampled every 0.1 s."""

    def __init__(self, device: torch.device) -> None:
        self.index = device.index or 0
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        command = ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu"]
        command += ["--format=csv,noheader,nounits", "-lms", "100"]
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        except OSError:
            return
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))
            if self._stop.is_set():
                break
        process.terminate()

    def __enter__(self) -> GpuUtilisation:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def describe(self) -> str:
        if not self.samples:
            return "GPU utilisation: not measured (nvidia-smi gave no samples)"
        mean = sum(self.samples) / len(self.samples)
        return f"GPU utilisation: mean {mean:.0f}%, max {max(self.samples)}% over {len(self.samples)} samples"


def reference_encode(retriever: Retriever, passages: list[str], batch_size: int, precision: str) -> float:
    """Passages/s of sentence-transformers' own ``encode`` of the backbone, as a user would run it."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_backbone(retriever.config.backbone), device=str(retriever.device))
    model.max_seq_length = retriever.max_length("document")
    if precision == "bf16":
        model = model.half()  # sentence-transformers' documented way to run a GPU in 16 bits
    model.encode(passages[:batch_size], batch_size=batch_size)  # warm-up
    synchronize(retriever.device)
    started = time.perf_counter()
    model.encode(passages, batch_size=batch_size, convert_to_numpy=True)
    synchronize(retriever.device)
    return len(passages) / (time.perf_counter() - started)


def check(condition: bool, what: str) -> None:
    print(f"  [{'ok' if condition else 'FAILED'}] {what}")
    if not condition:
        raise SystemExit(f"gpu_check: {what} does not hold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cuda, cuda:N, cpu")
    parser.add_argument("--passages", type=int, help="passages to encode (default 100k on GPU, 1k on CPU)")
    parser.add_argument("--steps", type=int, help="training steps timed")
    args = parser.parse_args()
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    sizes = dict(GPU_SIZES if on_gpu else CPU_SIZES)
    sizes["passages"] = args.passages or sizes["passages"]
    sizes["steps"] = args.steps or sizes["steps"]
    print(f"machine: {machine()}")
    if on_gpu:
        print(f"device: {device} = {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    else:
        print(
            "device: cpu -- no CUDA device is visible to torch (or --device cpu): the GPU parts are "
            f"skipped and a CPU-sized check runs instead ({sizes})"
        )
    precision = resolve_precision("auto", device)
    print(f"precision auto -> {precision}; sizes: {sizes}")

    passages, pairs = passages_and_pairs(sizes["passages"])
    with tempfile.TemporaryDirectory() as scratch:
        collection = load_collection(write_collection(Path(scratch) / "data", pairs))
        model_config, train_config = build_configs(
            "default",
            {"backbone": "all-MiniLM-L6-v2", "num_experts": 6},
            {
                "max_steps": sizes["steps"] + 1,
                "batch_size": sizes["batch_size"],
                "checkpoint_steps": None,
                "encode_batch_size": sizes["encode_batch_size"],
            },
        )
        seed_everything(0)
        started = time.perf_counter()
        retriever = Retriever.from_config(model_config, device=device)
        print(f"model loaded in {time.perf_counter() - started:.1f} s: {retriever.describe()}")
        check(all(p.device == device for p in retriever.model.parameters()), f"every weight is on {device}")
        trainer = build_trainer(
            retriever, collection, train_config, Path(scratch) / "model", JobOptions(show_progress=False)
        )
        check(trainer.precision == precision, f"training runs in {precision}")
        batches = trainer.batches(0)
        before = {k: v.detach().clone() for k, v in retriever.head.state_dict().items()}
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        trainer.training_step(batches[0])  # warm-up: kernels, allocator
        synchronize(device)
        started = time.perf_counter()
        with GpuUtilisation(device) as training_use:
            losses = [trainer.training_step(batch)["loss"] for batch in batches[1 : sizes["steps"] + 1]]
            synchronize(device)
        seconds = time.perf_counter() - started
        steps = len(losses)
        print(
            f"training: {steps} steps of {sizes['batch_size']} pairs in {seconds:.2f} s = "
            f"{steps / seconds:.2f} steps/s, {steps * sizes['batch_size'] / seconds:.0f} pairs/s; "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
        check(all(math.isfinite(loss) for loss in losses), "the loss stays finite")
        moved = any(not torch.equal(v, retriever.head.state_dict()[k]) for k, v in before.items())
        check(moved, "training moves the head's weights")
        if on_gpu:
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"peak GPU memory while training: {peak:.2f} GiB; {training_use.describe()}")

    encode = EncodeConfig(encode_batch_size=sizes["encode_batch_size"])
    encode_texts(retriever, passages[: sizes["encode_batch_size"]], "document", encode)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    with GpuUtilisation(device) if on_gpu else contextlib.nullcontext() as encoding_use:
        embeddings = encode_texts(retriever, passages, "document", encode)
        synchronize(device)
    seconds = time.perf_counter() - started
    rate = len(passages) / seconds
    print(
        f"encoding: {len(passages)} passages in {seconds:.1f} s = {rate:.0f} passages/s "
        f"(batch {sizes['encode_batch_size']}, {precision}, max {retriever.max_length('document')} tokens)"
        + (f"; {encoding_use.describe()}" if on_gpu else "")
    )
    reference = reference_encode(retriever, passages, sizes["encode_batch_size"], precision)
    print(
        f"sentence-transformers encode of the same passages: {reference:.0f} passages/s; "
        f"sbmoe / sentence-transformers = {rate / reference:.2f}x"
    )
    check(bool(np.isfinite(embeddings).all()), "the embeddings are finite")
    norms = np.linalg.norm(embeddings, axis=1)
    check(bool(np.allclose(norms, 1.0, atol=1e-3)), "the embeddings are unit vectors (cosine model)")

    unique = min(len(passages), len(pairs))
    index = DenseIndex(embeddings[:unique], [f"d{i}" for i in range(unique)], retriever.fingerprint())
    queries = embeddings[: min(1000, unique)]
    started = time.perf_counter()
    run = index.search(queries, 10, query_ids=[f"d{i}" for i in range(len(queries))])
    seconds = time.perf_counter() - started
    qps = len(queries) / seconds
    print(f"exact search: {len(queries)} queries over {unique} passages: {qps:.0f} queries/s")
    found = np.mean([next(iter(hits)) == query for query, hits in run.items()])
    check(found >= 0.99, f"a passage finds itself first ({found:.3f} of them)")
    print("OK" + ("" if on_gpu else " (CPU-sized check; run on a machine with a GPU for the GPU check)"))


if __name__ == "__main__":
    sys.exit(main())
