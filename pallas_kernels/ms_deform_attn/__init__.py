"""Multi-scale deformable attention sampling core (Zhu et al., arXiv 2010.04159, eq. 3)."""

from pallas_kernels.ms_deform_attn.api import DTYPES, IMPLEMENTATIONS, ms_deform_attn
from pallas_kernels.ms_deform_attn.errors import (
    ImplementationUnavailableError,
    KernelLimitError,
    MSDAInputError,
    PallasGpuFallbackWarning,
    PallasGpuUnavailableError,
    UnsupportedDtypeError,
)
from pallas_kernels.ms_deform_attn.pallas_gpu import ms_deform_attn_pallas_gpu
from pallas_kernels.ms_deform_attn.pallas_tpu import ms_deform_attn_pallas_tpu
from pallas_kernels.ms_deform_attn.reference import ms_deform_attn_reference
from pallas_kernels.ms_deform_attn.xla import ms_deform_attn_xla

__all__ = [
    "DTYPES",
    "IMPLEMENTATIONS",
    "ImplementationUnavailableError",
    "KernelLimitError",
    "MSDAInputError",
    "PallasGpuFallbackWarning",
    "PallasGpuUnavailableError",
    "UnsupportedDtypeError",
    "ms_deform_attn",
    "ms_deform_attn_pallas_gpu",
    "ms_deform_attn_pallas_tpu",
    "ms_deform_attn_reference",
    "ms_deform_attn_xla",
]
