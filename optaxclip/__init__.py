"""optaxclip: every gradient-clipping method as an Optax ``GradientTransformation``.

Robust float32 norms that never overflow to a wrong answer, fixed-threshold and adaptive
clippers (AutoClip, ZClip, AdaGC, SPAM, quantile tracking), per-example (DP-SGD style)
clipping, guards against non-finite updates and loss spikes, and a :class:`ClipStats` record
of what every clipper did, readable with :func:`stats`. Every method is exact on sharded
updates: under ``jit`` with ``NamedSharding``, or inside ``shard_map``/``pmap`` with
``axis_name=`` or ``partition_specs=``.
"""

from optaxclip._adaptive import (
    AutoClipState,
    QuantileClipState,
    ZClipState,
    autoclip,
    quantile_clip,
    zclip,
)
from optaxclip._compose import PerLayerState, per_layer
from optaxclip._fixed import (
    ClipByBlockRmsState,
    ClipByGlobalNormState,
    ClipByLeafNormState,
    ClipByValueState,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_leaf_norm,
    clip_by_value,
)
from optaxclip._groups import ClipByGroupNormState, clip_by_group_norm
from optaxclip._guards import (
    ErrorIfNonfiniteState,
    SkipNonfiniteState,
    SkipSpikesState,
    ZeroNonfiniteState,
    error_if_nonfinite,
    skip_nonfinite,
    skip_spikes,
    zero_nonfinite,
)
from optaxclip._monitor import MonitorState, monitor
from optaxclip._numerics import global_norm, leaf_norms
from optaxclip._perexample import PerExampleClipState, per_example_clip
from optaxclip._pertensor import AdaGCState, SpikeAwareClipState, adagc, spike_aware_clip
from optaxclip._stats import ClipStats, stats
from optaxclip._unitwise import AdaptiveGradClipState, adaptive_grad_clip

__version__ = "0.1.0"

__all__ = [
    "AdaGCState",
    "AdaptiveGradClipState",
    "AutoClipState",
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipByGroupNormState",
    "ClipByLeafNormState",
    "ClipByValueState",
    "ClipStats",
    "ErrorIfNonfiniteState",
    "MonitorState",
    "PerExampleClipState",
    "PerLayerState",
    "QuantileClipState",
    "SkipNonfiniteState",
    "SkipSpikesState",
    "SpikeAwareClipState",
    "ZClipState",
    "ZeroNonfiniteState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_group_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "error_if_nonfinite",
    "global_norm",
    "leaf_norms",
    "monitor",
    "per_example_clip",
    "per_layer",
    "quantile_clip",
    "skip_nonfinite",
    "skip_spikes",
    "spike_aware_clip",
    "stats",
    "zclip",
    "zero_nonfinite",
]
