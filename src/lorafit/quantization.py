"""int8 ONNX graphs: ONNX Runtime's dynamic or static (calibrated, QDQ) quantisation of an exported graph.

Both store the weights of every MatMul/Gemm as int8, one scale per output channel, and the embedding
tables as int8. The weights use 7 of the 8 bits (ONNX Runtime's `reduce_range`): on x86 CPUs without VNNI
(AVX2-only ones such as AMD Zen 3) ORT's uint8 x int8 products add pairs of products in 16-bit registers,
which saturate with full-range weights (ORT's quantisation docs); an exported graph is run on whatever CPU
the user deploys to, so every export takes the range that is exact everywhere. Found on a Zen 3 host, where
the tests' tiny model agreed with the float one on 14 of 15 texts with full-range weights, 15 of 15 with
reduce_range.

The two kinds differ in how the activations the MatMul/Gemm layers read are scaled:

    int8         dynamic: each MatMul quantises its input at run time with the range of the batch in
                 hand, so a text's scores move a little with its batch-mates (the other texts, and the
                 padding to the longest of them): about 1e-2 in the logits of the tests' tiny model
    int8-static  static: the input scales are fixed at export, from calibration batches -- a seeded
                 sample of the run's training texts, padded per batch as prediction pads them -- and
                 stored in the graph as QuantizeLinear/DequantizeLinear pairs (QDQ format); a text
                 scores the same alone or in any batch

Calibration method: MinMax. On 6 tiny runs (the tests' random 2-layer encoders; LoRA and full
fine-tuning; 455 texts each), top-1 agreement with the float model was 98.53% with MinMax, 98.50%
with Percentile and 98.57% with Entropy (MatMul/Gemm quantised): within one text per run. ONNX
Runtime's histogram methods (Percentile, Entropy) also need every calibration batch to have one shape
(onnxruntime#18792), so they could not see batches padded as prediction pads them. Quantised: MatMul,
Gemm and Gather (the embeddings) only -- 96.59% on the tiny runs when every op ONNX Runtime can quantise
was, the attention mask's additive -3.4e38 included -- and their outputs stay float (the logits among
them). The embeddings cost little agreement (tiny runs 98.39% with, 98.53% without; the Banking77 LoRA
run's validation 99.20% with, 99.00% without) and keep the file as small as dynamic's (23.1 MiB
against 57.2 MiB without). Dynamic kept 99.19% on the tiny runs and 99.40% on Banking77: static gives
up a little agreement for scores that do not depend on the batch.
"""

from __future__ import annotations

import random
from pathlib import Path

from . import batching

__all__ = ["KINDS", "CALIBRATION_TEXTS", "CALIBRATION_METHOD", "calibration_sample", "dynamic", "static"]

#: `lorafit export --quantize` choices: dynamic (the default int8) and static (calibrated).
KINDS = ("int8", "int8-static")

#: Training texts a static export calibrates on (all of them where the run has fewer).
CALIBRATION_TEXTS = 256
CALIBRATION_METHOD = "MinMax"

_OPS = ["MatMul", "Gemm", "Gather"]
_WEIGHTS = ("MatMul/Gemm weights int8 in 7 bits (reduce_range, no 16-bit saturation on CPUs without VNNI), one scale "
            "per output channel; embedding tables 8-bit, one scale each")


def calibration_sample(texts: list[str], seed: int, size: int = CALIBRATION_TEXTS) -> list[str]:
    """`size` of `texts`, drawn with `seed`, in their order; all of them where there are no more."""
    if len(texts) <= size:
        return list(texts)
    return [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), size))]


def dynamic(graph: Path, out: Path) -> dict:
    """Quantise the float graph at `graph` into `out` (dynamic); returns what export.json records of it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per_channel: one scale per output column. On Banking77 it raised top-1 agreement with the
    # float model from 98.3% to 99.5% (validation; test 98.8% -> 99.5%).
    quantize_dynamic(str(graph), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    return {"kind": "dynamic", "format": "integer ops", "weights": _WEIGHTS,
            "activations": "uint8, scaled per batch at run time (scores depend a little on batch-mates)"}


class _CalibrationBatches:
    """ONNX Runtime's CalibrationDataReader protocol (`get_next`: one batch's feeds, None at the end):
    the texts length-sorted into batches and padded per batch, as `inference.batched_logits` does."""

    def __init__(self, token_ids: list[list[int]], pad_id: int, batch_size: int, max_tokens: int | None):
        lengths = [len(t) for t in token_ids]
        batches = batching.sorted_batches(lengths, batch_size, max_tokens)
        self._batches = batching.iterate(token_ids, batches, pad_id)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        _, input_ids, attention_mask = batch  # (B, T) each
        return {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}


def static(graph: Path, out: Path, token_ids: list[list[int]], pad_id: int, batch_size: int,
           max_tokens: int | None) -> dict:
    """Quantise the float graph at `graph` into `out` (static, QDQ), its activation scales calibrated on
    `token_ids` (the calibration texts, tokenised); returns what export.json records of it."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not token_ids:
        raise ValueError("static quantisation needs calibration texts")
    quantize_static(
        str(graph), str(out), _CalibrationBatches(token_ids, pad_id, batch_size, max_tokens),
        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHOD), op_types_to_quantize=_OPS,
        extra_options={"OpTypesToExcludeOutputQuantization": _OPS},
    )
    return {"kind": "static", "format": "QDQ", "weights": _WEIGHTS,
            "activations": "uint8 inputs of MatMul/Gemm, one fixed scale per tensor (calibrated)",
            "calibration": {"texts": len(token_ids), "method": CALIBRATION_METHOD}}
