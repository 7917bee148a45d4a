"""The ONNX Runtime backend: the transformer exported once per model, optionally int8, then cached.

Inference only (training stays in torch). The transformer runs in ONNX Runtime; pooling, the MoE
head and normalisation stay the retriever's own torch modules, so a model computes the same
function whatever the backend (the head always in float32, see :mod:`sbmoe.inference.encoding`).

int8 is dynamic quantisation of the matrix products that have a constant weight (36 of MiniLM's
48: the attention's query-key and attention-value products stay float32), with uint8 weights
quantised per output channel. Measured on an AVX2-only AMD EPYC (2 cores), all-MiniLM-L6-v2: cosine
0.995 to float32 embeddings and 1.4x the throughput of sentence-transformers' float32 encode; the
default settings of ``quantize_dynamic`` (every MatMul, per-tensor weights) gave cosine 0.937.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sbmoe.core.errors import UsageError
from sbmoe.core.io import cache_root
from sbmoe.core.runtime import onnxruntime_available

if TYPE_CHECKING:
    from sbmoe.model.retriever import Retriever

logger = logging.getLogger(__name__)
_EXPORT_LOCK = threading.Lock()

ONNX_PRECISIONS = ("fp32", "int8")
# Bumped when the export or quantisation changes what a cached model computes.
EXPORT_VERSION = 1
MODEL_FILE = "model.onnx"


def default_model_dir() -> Path:
    """Where exported models are kept: ``$SBMOE_CACHE_DIR/onnx`` (default ``~/.cache/sbmoe/onnx``)."""
    return cache_root("onnx")


class OnnxEncoder:
    """The retriever's encoder stages with the transformer running in ONNX Runtime.

    Args:
        retriever: The model (its transformer is exported; its pooling module is used as it is).
        precision: ``fp32`` or ``int8``.
        model_dir: Cache of exported models, one folder per backbone fingerprint and precision.
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
    """

    def __init__(
        self,
        retriever: Retriever,
        precision: str,
        model_dir: str | os.PathLike | None = None,
        threads: int | None = None,
    ) -> None:
        if precision not in ONNX_PRECISIONS:
            raise UsageError(f"the onnx backend runs fp32 or int8, not {precision!r}")
        if retriever.device.type != "cpu":
            raise UsageError(f"the onnx backend runs on the CPU; the model is on {retriever.device}")
        if not onnxruntime_available():
            raise UsageError("the onnx backend needs onnxruntime and onnx: pip install onnxruntime onnx")
        import onnxruntime

        self.retriever = retriever
        self.precision = precision
        self.path = export_transformer(retriever, precision, model_dir)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.pooling = retriever.encoder_stages()[-1]

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pooled embeddings of one tokenised batch, as the torch encoder stages return them."""
        feed = {name: batch[name].cpu().numpy().astype(np.int64) for name in self.input_names}
        (hidden,) = self.session.run(None, feed)
        features = {
            "token_embeddings": torch.from_numpy(hidden),
            "attention_mask": batch["attention_mask"].cpu(),
        }
        return self.pooling(features)


def export_transformer(
    retriever: Retriever, precision: str, model_dir: str | os.PathLike | None = None
) -> Path:
    """The ONNX file of ``retriever``'s transformer at ``precision``, exported once and then reused.

    The folder name carries the transformer's weight fingerprint, so a fine-tuned model gets its
    own export. The folder appears whole or not at all (built beside it, then renamed), so an
    interrupted export leaves nothing under its name, and processes exporting at once agree.
    """
    fingerprint = retriever.transformer_fingerprint()
    folder = Path(model_dir or default_model_dir()) / f"{fingerprint[:32]}-{precision}-v{EXPORT_VERSION}"
    path = folder / MODEL_FILE
    if path.exists():
        return path
    # Tracing one module from two threads at once (a service's worker and a caller) corrupts
    # the export: one export at a time per process; other processes agree by the rename below.
    with _EXPORT_LOCK:
        if path.exists():
            return path
        started = time.perf_counter()
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_exports(folder)
        # The pid in the name tells a later run whether the export in progress still has an owner.
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp", dir=folder.parent)
        )
        try:
            _export_fp32(retriever, tmp / "fp32.onnx")
            if precision == "int8":
                _quantize_int8(tmp / "fp32.onnx", tmp / MODEL_FILE)
                (tmp / "fp32.onnx").unlink()
            else:
                (tmp / "fp32.onnx").rename(tmp / MODEL_FILE)
            # First writer wins: renaming onto a finished export fails, and that export is the same model.
            with contextlib.suppress(OSError):
                os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            raise UsageError(f"could not write the ONNX export to {folder}")
        logger.info(
            "exported the transformer to ONNX (%s) in %.1f s: %s",
            precision,
            time.perf_counter() - started,
            path,
        )
        return path


def _remove_dead_exports(folder: Path) -> None:
    """Remove temporaries of earlier exports of ``folder`` whose process is gone (killed mid-export)."""
    for stale in folder.parent.glob(f".{folder.name}.*.*.tmp"):
        pid = stale.name[len(folder.name) + 2 :].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class _LastHiddenState(torch.nn.Module):
    """The transformer as a function of token tensors only (what the ONNX graph takes)."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs, strict=True))).last_hidden_state


def _export_fp32(retriever: Retriever, target: Path) -> None:
    transformer = retriever.encoder_stages()[0]
    model = transformer.auto_model
    example = retriever.tokenizer(["an example passage", "another"], padding=True, return_tensors="pt")
    input_names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in example]
    axes = {name: {0: "batch", 1: "sequence"} for name in [*input_names, "last_hidden_state"]}
    # Eager attention exports as plain MatMul/Softmax, which ONNX Runtime fuses and quantises well.
    previous = model.config._attn_implementation
    was_training = model.training
    model.eval()
    try:
        model.config._attn_implementation = "eager"
        with torch.no_grad(), _quiet_export():
            torch.onnx.export(
                _LastHiddenState(model, input_names),
                tuple(example[name] for name in input_names),
                str(target),
                input_names=input_names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=17,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        model.config._attn_implementation = previous
        model.train(was_training)


def _quantize_int8(source: Path, target: Path) -> None:
    import onnx

    graph = onnx.load(str(source)).graph
    constants = {init.name for init in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    # Products of two activations (query x key, attention x value) lose the most in int8: keep them.
    activation_products = [
        node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] not in constants
    ]
    logging.disable(logging.WARNING)  # it advises (on the root logger) a pre-processing step we skip
    try:
        _quantize(source, target, activation_products)
    finally:
        logging.disable(logging.NOTSET)


def _quantize(source: Path, target: Path, excluded: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QUInt8,
        per_channel=True,
        reduce_range=False,
        nodes_to_exclude=excluded,
        extra_options={"MatMulConstBOnly": True},
    )


@contextlib.contextmanager
def _quiet_export() -> Any:
    """The legacy exporter warns about traced Python branches that are constant here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
