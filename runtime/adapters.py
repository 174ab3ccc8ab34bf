"""Model adapters: each supported transformer described as data, never as a code path.

An adapter says where a transformer keeps its blocks, how a block receives and returns its hidden states, whether
the pipeline runs classifier-free guidance as separate calls or as one batch, how tokens map to a
(frames, height, width) grid, and which attention modules a block holds. Hooks, the profiler and the planner read
these fields; adding a model means adding one `register_adapter(...)` entry below.

Lookup is by exact class first, then along the class's MRO, so subclasses of a supported transformer work.

Example:
    >>> from diffusers import WanTransformer3DModel
    >>> adapter = get_adapter(WanTransformer3DModel)
    >>> adapter.block_lists[0].attr
    'blocks'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from diffusers.utils.torch_utils import unwrap_module

from .errors import AdapterError
from .plan import ExpertFingerprint, ModelFingerprint

CfgMode = Literal["separate", "batched"]
AttentionKind = Literal["self", "cross", "joint"]


@dataclass(frozen=True)
class BlockList:
    """One `nn.ModuleList` of transformer blocks and how its blocks are called.

    `hidden_index` / `encoder_index` are the positions of the hidden state and encoder hidden state in a block's
    output tuple; `None` for `hidden_index` means the block returns the hidden state as a bare tensor, `None` for
    `encoder_index` means the block does not return encoder hidden states.
    """

    attr: str
    hidden_index: int | None = None
    encoder_index: int | None = None
    hidden_arg: tuple[str, int] = ("hidden_states", 0)
    encoder_arg: tuple[str, int] = ("encoder_hidden_states", 1)


@dataclass(frozen=True)
class AttentionModule:
    """An attention submodule of every block: its attribute name and what it attends over.

    For `joint` attention (text and video tokens in one sequence), `text_first` says whether the text tokens come
    before the video tokens in the attention call.
    """

    attr: str
    kind: AttentionKind
    text_first: bool = False


@dataclass(frozen=True)
class TokenGrid:
    """How a transformer's video tokens map to a (frames, height, width) grid.

    `layout` names the shape of the transformer's `hidden_states` input: `"BCFHW"`, `"BFCHW"`, or `"tokens"` for a
    pre-packed (batch, tokens, channels) input. A packed input's sizes come from its forward keywords, as
    `size_source` says: `"kwargs"`, the latent (frames, height, width) in the three keywords `size_kwargs` (divided
    by the patch sizes); `"ids"`, the token grid as the extent of each column of a (tokens, 3) position-id tensor
    named by `size_kwargs[0]` (Flux's `img_ids`); `"shapes"`, the token grid as the first (frames, height, width) of
    the first sample in the list of lists named by `size_kwargs[0]` (Qwen-Image's `img_shapes`). `patch_key` is the
    config key of the spatial patch size, or of a (t, h, w) tuple; `temporal_patch_key` the key of the temporal patch
    size (absent or `None` in the config means 1).
    """

    layout: Literal["BCFHW", "BFCHW", "tokens"]
    patch_key: str = "patch_size"
    temporal_patch_key: str | None = None
    size_kwargs: tuple[str, ...] = ("num_frames", "height", "width")
    size_source: Literal["kwargs", "ids", "shapes"] = "kwargs"


@dataclass(frozen=True)
class ModelAdapter:
    """Everything the hooks need to know about one transformer class.

    `span_breaks_key` names a config key listing the blocks after which the transformer itself adds to the hidden
    states between blocks (Wan VACE's control hints after each of its `vace_layers`); a cached span never runs past
    such a block, else a reused span would add the hint it cached and the transformer's new hint both.

    `call_order` names, in order, the CFG branches of the calls a pipeline makes within one step outside any cache
    context (Cosmos: `cond`, then `uncond` when guidance is on); empty when the pipeline names its calls or makes one
    call per step. Such a model's step comes from the pipeline's scheduler (`runtime/call_order.py`), so it is
    profiled and accelerated through its pipeline only.

    `config_packages` pairs a boolean config key with the package the transformer's forward needs when it is set:
    diffusers imports such packages only if installed, so without one the first call fails mid-run with a NameError
    (Cosmos's `concat_padding_mask`, set by every real checkpoint, resizes the mask with `torchvision`).
    """

    name: str
    block_lists: tuple[BlockList, ...]
    cfg_mode: CfgMode
    grid: TokenGrid
    attention: tuple[AttentionModule, ...]
    span_breaks_key: str | None = None
    call_order: tuple[str, ...] = ()
    config_packages: tuple[tuple[str, str], ...] = ()

    @property
    def self_attention(self) -> AttentionModule | None:
        """The block's self- or joint attention (the first non-cross attention module), None when it has none."""
        return next((a for a in self.attention if a.kind != "cross"), None)

    def check_packages(self, transformer: torch.nn.Module) -> None:
        """Refuse, in one line, a transformer whose config needs a package that is not installed."""
        for key, package in self.config_packages:
            if getattr(transformer.config, key, False) and importlib.util.find_spec(package) is None:
                raise AdapterError(
                    f"{type(transformer).__name__} with {key}=True needs the package '{package}', which is not "
                    f"installed (pip install {package})"
                )

    def span_breaks(self, transformer: torch.nn.Module) -> tuple[int, ...]:
        """Indices of the blocks a cached span must end at (see `span_breaks_key`), in execution order."""
        if self.span_breaks_key is None:
            return ()
        return tuple(sorted(int(b) for b in getattr(transformer.config, self.span_breaks_key)))

    def block_ids(self, transformer: torch.nn.Module) -> list[str]:
        """Fully qualified names of every block, in execution order (`blocks.0`, `blocks.1`, …)."""
        return [name for name, _, _ in self.iter_blocks(transformer)]

    def iter_blocks(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, BlockList]]:
        """(block id, block module, its block list description) for every block, in execution order."""
        found = []
        for spec in self.block_lists:
            blocks = getattr(transformer, spec.attr, None)
            if not isinstance(blocks, torch.nn.ModuleList):
                raise AdapterError(
                    f"{type(transformer).__name__} has no block list '{spec.attr}' although adapter '{self.name}' "
                    "expects one; the adapter does not match this diffusers version"
                )
            found.extend((f"{spec.attr}.{i}", block, spec) for i, block in enumerate(blocks))
        return found

    def token_grid(
        self, config: Any, hidden_states: torch.Tensor, forward_kwargs: dict[str, Any]
    ) -> tuple[int, int, int]:
        """The (frames, height, width) token grid of one transformer call, from its input and config."""
        if self.grid.size_source == "ids":
            ids = forward_kwargs[self.grid.size_kwargs[0]].reshape(-1, 3)
            frames, height, width = (ids.amax(0) - ids.amin(0) + 1).tolist()
            return int(frames), int(height), int(width)
        if self.grid.size_source == "shapes":
            frames, height, width = forward_kwargs[self.grid.size_kwargs[0]][0][0]
            return int(frames), int(height), int(width)
        spatial, temporal = _patch_sizes(self.grid, config)
        if self.grid.layout == "tokens":
            frames, height, width = (int(forward_kwargs[k]) for k in self.grid.size_kwargs)
        elif self.grid.layout == "BCFHW":
            frames, height, width = hidden_states.shape[2:5]
        else:
            frames = hidden_states.shape[1]
            height, width = hidden_states.shape[3:5]
        return -(-frames // temporal), height // spatial, width // spatial


def _patch_sizes(grid: TokenGrid, config: Any) -> tuple[int, int]:
    """(spatial, temporal) patch size from a transformer config, following the adapter's keys."""
    patch = config[grid.patch_key] if isinstance(config, dict) else getattr(config, grid.patch_key)
    if isinstance(patch, (list, tuple)):
        return int(patch[1]), int(patch[0])
    temporal = None
    if grid.temporal_patch_key is not None:
        temporal = (
            config.get(grid.temporal_patch_key)
            if isinstance(config, dict)
            else getattr(config, grid.temporal_patch_key, None)
        )
    return int(patch), int(temporal or 1)


_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(class_name: str, adapter: ModelAdapter) -> None:
    """Register `adapter` for the transformer class named `class_name` (the class's `__name__`)."""
    _REGISTRY[class_name] = adapter


def supported_classes() -> list[str]:
    """Names of the transformer classes that have an adapter."""
    return sorted(_REGISTRY)


def get_adapter(model_or_class: torch.nn.Module | type) -> ModelAdapter:
    """The adapter of a transformer (instance or class): exact class first, then the nearest base class."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    adapter = _find_adapter(cls)
    if adapter is not None:
        return adapter
    raise AdapterError(
        f"no adapter for transformer class {cls.__name__} (supported: {', '.join(supported_classes())}); describe "
        f"its blocks with dit_accel.runtime.register_adapter({cls.__name__!r}, ModelAdapter(...)) before loading it, "
        "see docs/adapters.md"
    )


def _find_adapter(cls: type) -> ModelAdapter | None:
    """The adapter registered for `cls` or its nearest base class, None when there is none."""
    return next((_REGISTRY[k.__name__] for k in cls.__mro__ if k.__name__ in _REGISTRY), None)


def config_hash(config: Any) -> str:
    """SHA-256 of a transformer's config as canonical JSON, ignoring private keys (`_name_or_path`, …)."""
    items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    text = json.dumps(items, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    """JSON fallback for config values (tuples are handled by json; this covers numpy/torch scalars and the rest)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


#: Pipeline attributes that hold a denoiser, in the order a multi-expert pipeline hands the steps to them: Wan 2.2
#: serves the high-noise steps with `transformer` and, from `boundary_ratio` of the timesteps on, `transformer_2`.
EXPERT_ATTRS = ("transformer", "transformer_2")


def find_transformer(pipe_or_transformer: Any) -> torch.nn.Module:
    """The denoiser of a pipeline (its first expert, normally `transformer`), or the argument itself when it is
    already a module.

    A two-expert pipeline (Wan 2.2) has a second denoiser, `transformer_2`, which shares the first one's blocks:
    `find_experts` returns both; profiling and `apply_plan` use every expert.

    A `torch.compile`d transformer is unwrapped to the module it compiles: hooks belong on that module (the
    compiled wrapper calls it), and adapters are registered for its class.
    """
    return find_experts(pipe_or_transformer)[0][1]


def find_experts(pipe_or_transformer: Any) -> list[tuple[str, torch.nn.Module]]:
    """(pipeline attribute, unwrapped module) of every denoiser a pipeline holds, in serving order; a transformer
    module alone is `[("transformer", module)]`.

    Experts must have the same block ids, since one plan schedules the blocks of whichever expert serves a step;
    anything else is refused in one line naming both. An expert whose config needs a missing package
    (`ModelAdapter.config_packages`) is refused in one line naming it, before anything runs.
    """
    experts = [
        (name, unwrap_module(module))
        for name in EXPERT_ATTRS
        if isinstance(module := getattr(pipe_or_transformer, name, None), torch.nn.Module)
    ]
    if not experts and isinstance(pipe_or_transformer, torch.nn.Module):
        experts = [("transformer", unwrap_module(pipe_or_transformer))]
    if not experts:
        raise AdapterError(
            "expected a diffusers pipeline with a .transformer or a transformer module, got "
            f"{type(pipe_or_transformer).__name__}"
        )
    for _, module in experts:
        adapter = _find_adapter(type(module))
        if adapter is not None:
            adapter.check_packages(module)
    _check_same_blocks(type(pipe_or_transformer).__name__, experts)
    return experts


def _check_same_blocks(owner: str, experts: list[tuple[str, torch.nn.Module]]) -> None:
    """Refuse experts whose block ids differ (one line naming both)."""
    if len(experts) < 2:
        return
    first_name, first = experts[0]
    first_ids = get_adapter(first).block_ids(first)
    for name, module in experts[1:]:
        ids = get_adapter(module).block_ids(module)
        if ids != first_ids:
            differ = next((i for i, (a, b) in enumerate(zip(first_ids, ids)) if a != b), min(len(ids), len(first_ids)))
            raise AdapterError(
                f"{owner}'s experts {first_name} and {name} have different blocks ({len(first_ids)} vs {len(ids)}, "
                f"first difference at position {differ}); one plan cannot schedule both"
            )


def fingerprint_pipeline(pipe_or_transformer: Any) -> ModelFingerprint:
    """The identity a plan records for a pipeline's denoisers: `fingerprint_model` of the first expert, with the
    class, config hash and weight sample of every further expert (`ModelFingerprint.experts`)."""
    (_, first), *others = find_experts(pipe_or_transformer)
    return replace(
        fingerprint_model(first),
        experts=tuple(
            ExpertFingerprint(name, type(module).__name__, config_hash(module.config), weights_sample(module))
            for name, module in others
        ),
    )


_WAN_LIKE = ModelAdapter(
    name="wan",
    block_lists=(BlockList("blocks"),),
    cfg_mode="separate",
    grid=TokenGrid(layout="BCFHW"),
    attention=(AttentionModule("attn1", "self"), AttentionModule("attn2", "cross")),
)
register_adapter("WanTransformer3DModel", _WAN_LIKE)
register_adapter("SkyReelsV2Transformer3DModel", ModelAdapter(**{**_WAN_LIKE.__dict__, "name": "skyreels_v2"}))
register_adapter(
    "CogVideoXTransformer3DModel",
    ModelAdapter(
        name="cogvideox",
        block_lists=(BlockList("transformer_blocks", hidden_index=0, encoder_index=1),),
        cfg_mode="batched",
        grid=TokenGrid(layout="BFCHW", temporal_patch_key="patch_size_t"),
        attention=(AttentionModule("attn1", "joint", text_first=True),),
    ),
)
register_adapter(
    "HunyuanVideoTransformer3DModel",
    ModelAdapter(
        name="hunyuan_video",
        block_lists=(
            BlockList("transformer_blocks", hidden_index=0, encoder_index=1),
            BlockList("single_transformer_blocks", hidden_index=0, encoder_index=1),
        ),
        cfg_mode="separate",
        grid=TokenGrid(layout="BCFHW", temporal_patch_key="patch_size_t"),
        attention=(AttentionModule("attn", "joint"),),
    ),
)
register_adapter(
    "LTXVideoTransformer3DModel",
    ModelAdapter(
        name="ltx_video",
        block_lists=(BlockList("transformer_blocks"),),
        cfg_mode="batched",
        grid=TokenGrid(layout="tokens", temporal_patch_key="patch_size_t"),
        attention=(AttentionModule("attn1", "self"), AttentionModule("attn2", "cross")),
    ),
)
register_adapter(
    "MochiTransformer3DModel",
    ModelAdapter(
        name="mochi",
        block_lists=(BlockList("transformer_blocks", hidden_index=0, encoder_index=1),),
        cfg_mode="batched",
        grid=TokenGrid(layout="BCFHW"),
        attention=(AttentionModule("attn1", "joint"),),
    ),
)

register_adapter(
    "WanVACETransformer3DModel",
    ModelAdapter(**{**_WAN_LIKE.__dict__, "name": "wan_vace", "span_breaks_key": "vace_layers"}),
)
# Flux and Qwen-Image blocks return (encoder, hidden); their attention puts the text tokens first.
_TEXT_FIRST_JOINT = (AttentionModule("attn", "joint", text_first=True),)
register_adapter(
    "FluxTransformer2DModel",
    ModelAdapter(
        name="flux",
        block_lists=(
            BlockList("transformer_blocks", hidden_index=1, encoder_index=0),
            BlockList("single_transformer_blocks", hidden_index=1, encoder_index=0),
        ),
        cfg_mode="separate",
        grid=TokenGrid(layout="tokens", size_kwargs=("img_ids",), size_source="ids"),
        attention=_TEXT_FIRST_JOINT,
    ),
)
register_adapter(
    "QwenImageTransformer2DModel",
    ModelAdapter(
        name="qwen_image",
        block_lists=(BlockList("transformer_blocks", hidden_index=1, encoder_index=0),),
        cfg_mode="separate",
        grid=TokenGrid(layout="tokens", size_kwargs=("img_shapes",), size_source="shapes"),
        attention=_TEXT_FIRST_JOINT,
    ),
)
register_adapter(
    "HunyuanVideo15Transformer3DModel",
    ModelAdapter(
        name="hunyuan_video15",
        block_lists=(BlockList("transformer_blocks", hidden_index=0, encoder_index=1),),
        cfg_mode="separate",
        grid=TokenGrid(layout="BCFHW", temporal_patch_key="patch_size_t"),
        attention=(AttentionModule("attn", "joint"),),
    ),
)
register_adapter(
    "LTX2VideoTransformer3DModel",
    ModelAdapter(
        name="ltx2",
        # Blocks return (video, audio): the audio stream is carried, cached and reused as the second state.
        block_lists=(
            BlockList("transformer_blocks", hidden_index=0, encoder_index=1, encoder_arg=("audio_hidden_states", 1)),
        ),
        cfg_mode="batched",
        grid=TokenGrid(layout="tokens", temporal_patch_key="patch_size_t"),
        attention=(AttentionModule("attn1", "self"), AttentionModule("attn2", "cross")),
    ),
)
_SELF_CROSS = (AttentionModule("attn1", "self"), AttentionModule("attn2", "cross"))
register_adapter(
    "SanaVideoTransformer3DModel",
    ModelAdapter(
        name="sana_video",
        block_lists=(BlockList("transformer_blocks"),),
        cfg_mode="batched",
        grid=TokenGrid(layout="BCFHW"),
        attention=_SELF_CROSS,
    ),
)
register_adapter(
    "CosmosTransformer3DModel",
    ModelAdapter(
        name="cosmos",
        block_lists=(BlockList("transformer_blocks"),),
        cfg_mode="separate",
        grid=TokenGrid(layout="BCFHW"),
        attention=_SELF_CROSS,
        call_order=("cond", "uncond"),
        config_packages=(("concat_padding_mask", "torchvision"),),
    ),
)


def fingerprint_model(transformer: torch.nn.Module) -> ModelFingerprint:
    """The identity a plan records for `transformer`: class name, config hash, ordered block ids and a weight
    sample."""
    adapter = get_adapter(transformer)
    return ModelFingerprint(
        type(transformer).__name__,
        config_hash(transformer.config),
        tuple(adapter.block_ids(transformer)),
        weights_sample(transformer),
    )


#: Values sampled from each weight matrix of the first and last block (`weights_sample`).
SAMPLES_PER_TENSOR = 4
#: Relative difference between sampled weights that counts as other weights: loading a float32 checkpoint in
#: bfloat16 or float16 moves a value by at most 2⁻⁸ of itself (2⁻⁸ + 2⁻¹¹ through float16 then bfloat16).
WEIGHTS_RTOL = 2.0**-7
#: Absolute slack for values float16 stores as subnormals (spacing 2⁻²⁴).
WEIGHTS_ATOL = 1e-7


class WeightsMismatchWarning(UserWarning):
    """A plan is applied to a model whose weights differ from those it was fitted on (same architecture)."""


def weights_sample(transformer: torch.nn.Module) -> tuple[float, ...] | None:
    """`SAMPLES_PER_TENSOR` values at fixed, evenly strided positions of every weight matrix (2-D or more) of the
    first and last block, as floats with 7 significant digits; None when a weight is not materialised (meta device,
    offloaded) or not a floating-point tensor.

    It costs a handful of small slices and one device-to-host copy, never a pass over all weights. Values, not a
    hash: a model loaded in bfloat16 samples values within `WEIGHTS_RTOL` of its float32 self, which a hash would
    call different; a fused LoRA, a fine-tune or another checkpoint moves most of them further.
    """
    blocks = get_adapter(transformer).iter_blocks(transformer)
    tensors = [p for _, block, _ in (blocks[0], blocks[-1]) for p in block.parameters() if p.dim() >= 2]
    if not tensors or any(p.is_meta or not p.is_floating_point() for p in tensors):
        return None
    picks = []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        stride = max(flat.numel() // SAMPLES_PER_TENSOR, 1)
        picks.append(flat[stride // 2 :: stride][:SAMPLES_PER_TENSOR].float().to("cpu"))
    return tuple(float(f"{v:.7g}") for v in torch.cat(picks).tolist())


def weights_differ(recorded: tuple[float, ...], transformer: torch.nn.Module) -> int | None:
    """How many sampled weights of `transformer` differ from `recorded` beyond dtype rounding (`WEIGHTS_RTOL`);
    None when the model's weights cannot be sampled. A sample of another length counts as all different."""
    current = weights_sample(transformer)
    if current is None:
        return None
    if len(current) != len(recorded):
        return max(len(current), len(recorded))
    a, b = torch.tensor(recorded, dtype=torch.float64), torch.tensor(current, dtype=torch.float64)
    return int(((a - b).abs() > WEIGHTS_RTOL * torch.maximum(a.abs(), b.abs()) + WEIGHTS_ATOL).sum())


def noisy_latent_channels(config: Any) -> int | None:
    """How many leading input channels are the noisy latent: `out_channels` when the model takes more inputs than it
    predicts (the rest is conditioning the pipeline appends), else all of them (None)."""
    inputs, outputs = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
    return outputs if inputs and outputs and inputs > outputs else None


def block_inputs(spec: BlockList, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, encoder hidden states) a block was called with, by keyword or position."""
    hidden_name, hidden_pos = spec.hidden_arg
    hidden = kwargs[hidden_name] if hidden_name in kwargs else args[hidden_pos]
    if spec.encoder_index is None:
        return hidden, None
    encoder_name, encoder_pos = spec.encoder_arg
    encoder = (
        kwargs.get(encoder_name) if encoder_name in kwargs else (args[encoder_pos] if len(args) > encoder_pos else None)
    )
    return hidden, encoder


def block_outputs(spec: BlockList, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, encoder hidden states) a block returned, by the adapter's output indices."""
    if spec.hidden_index is None:
        return output, None
    encoder = output[spec.encoder_index] if spec.encoder_index is not None else None
    return output[spec.hidden_index], encoder


def pack_block_outputs(spec: BlockList, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
    """What a block of this kind returns, built from its hidden (and encoder) states: the inverse of `block_outputs`."""
    if spec.hidden_index is None:
        return hidden
    packed: list[Any] = [None] * (max(spec.hidden_index, spec.encoder_index or 0) + 1)
    packed[spec.hidden_index] = hidden
    if spec.encoder_index is not None:
        packed[spec.encoder_index] = encoder
    return tuple(packed)
