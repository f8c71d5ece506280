"""Every numeric tolerance the tests use, stated once with the reason it holds on any x86-64 CPU.

torch (ATen) and ONNX Runtime (MLAS) pick their kernels by the processor (SSE/AVX2/AVX-512/AMX) and
by the batch's shape, and kernels sum dot products in different orders. Float32 addition is not
associative, so two correct computations of one number may differ in the last bits: by a few units
in the last place (ulp) of the largest magnitude summed. Tolerances are therefore derived from
float32's epsilon and the magnitude compared, never a bare 1e-6 on logits of magnitude ~4.
`.ci/run` runs the numeric modules under ATEN_CPU_CAPABILITY=default, avx2 and avx512 to prove it.
"""

from __future__ import annotations

import numpy as np
import torch

from stablemlp.export.parity import TOLERANCE

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7: float32's relative rounding step

# Probabilities (in [0, 1]) from two correct runs of one model: ONNX Runtime in the server against
# ONNX Runtime in the test (another batch shape may pick another MLAS kernel), or ONNX against
# torch. The export's parity proof promises 1e-5 on probabilities; every served-output check holds
# the server to that same promise. A real fault (a wrong weight, a skipped standardization, a
# row mixed up with another) moves probabilities by far more (> 1e-3 on these models).
PROBABILITY = TOLERANCE

# Logits compared between two torch computations of the same function (eval model vs BatchNorm
# folded into the Linears): folding rescales every weight (one rounding each) and each layer's
# sum is reassociated by the kernel, so every layer adds a few ulp of its output's magnitude.
# 64 ulp of the largest logit: measured at most 3.4 ulp over 20 seeded nets at each of the three
# kernel levels, while a real folding error (BatchNorm dropped or mis-scaled) moves logits by > 0.1.
LOGIT_ULPS = 64


def logit_tolerance(reference: torch.Tensor) -> float:
    """Absolute tolerance for logits of `reference`'s magnitude (at least that of 1.0)."""
    return LOGIT_ULPS * EPS32 * max(1.0, float(reference.abs().max()))


__all__ = ["EPS32", "LOGIT_ULPS", "PROBABILITY", "logit_tolerance"]
