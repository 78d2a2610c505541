"""XLA:CPU setting this project applies at import (docs/BENCHMARKS.md).

jaxlib 0.10's XLA:CPU fuses gathers feeding a reduction into YNNPACK "library
fusions"; for the deformable-attention sampling (a gather of 48 taps reduced with
their weights) that fusion ran 2-6x slower than XLA's own loop fusion, and the whole
train step ~25% slower, while matmuls and convolutions ran at the same rate without
it. So, unless the user already chose a value in XLA_FLAGS or sets
MTACLIP_KEEP_XLA_CPU_FUSION=1, `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK
fusions) is appended to XLA_FLAGS before jax creates its CPU client. Only for the
jaxlib versions where the flag was measured (an unknown flag aborts XLA); it has no
effect on GPU or TPU.
"""

import importlib.metadata
import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
MEASURED_JAXLIB = ("0.10.",)


def apply() -> bool:
  """Appends FLAG to XLA_FLAGS when appropriate; returns whether it did."""
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("MTACLIP_KEEP_XLA_CPU_FUSION") or "ynn_fusion_type" in flags:
    return False
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  if not version.startswith(MEASURED_JAXLIB):
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True
