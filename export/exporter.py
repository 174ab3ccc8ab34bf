"""Export a transformer with a static plan folded in, as ONNX graphs for onnxruntime or TensorRT.

**One graph per distinct action set.** A plan's step table gives every denoising step a tuple of per-block actions
(compute, reuse, prune). Steps that share a tuple share one graph, so a 50-step plan exports a handful of graphs
(`dit-plan inspect` shows how many distinct columns a plan has). We chose this over one graph with an ONNX `If` per
block because each exported graph is then static: TensorRT fuses across block boundaries and allocates once, a
reused block costs nothing (not even a branch), and onnxruntime never has to keep both subgraphs of every `If`
alive. The graphs share one copy of the weights: every large initializer is stored once in `weights.bin` (ONNX
external data) and each graph points into it, so an export costs about one model's size on disk.

What each graph holds:

* the transformer's own inputs (as the pipeline passes them: for Wan, `hidden_states`, `timestep`,
  `encoder_hidden_states`), captured from one real call, so shapes are the pipeline's default size, batch of one
  per CFG branch;
* residual caches as explicit tensors: `cache_in.<span>.hidden` (and `.encoder` for joint-attention models) for
  every span that reuses or blends at that action set, `cache_out.<span>.hidden` for every span it computes;
* `blend.<block>`: the DWS weight (a 1-element float tensor) of every pruned block that blends with its cache;
* the PCA bases of pruned blocks as constants. They cannot be folded into the query/key projection weights of any
  supported model (RMS-norm and RoPE come after the projection and do not commute with the basis, see
  `dit_accel.runtime.pruning`), so the graph projects q and k per head after RoPE, exactly as the torch runtime does.

The graphs are traced through the torch runtime's own hooks (`dit_accel.runtime.replay.BlockHook`), so they compute what
`apply_plan` computes. `manifest.json` maps every step to its graph and lists the scheduler's timesteps and sigmas;
`dit_accel.export.driver` replays it. Adaptive plans (AdaCache, BWCache) decide at run time from measured distances and
are not exported: fit a static method (auto, profilingdit, unicp) for deployment outside PyTorch.

Example:
    >>> manifest = export_onnx(pipe, load_plan("plans/default-auto-2x.plan"), "out/")
    >>> len(manifest["graphs"]), manifest["steps"][0]
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from diffusers.hooks import HookRegistry
from onnx.external_data_helper import set_external_data

from dit_accel.harness.files import replace_folder, staging_folder
from dit_accel.runtime.adapters import find_transformer, get_adapter
from dit_accel.runtime.branches import BranchStates
from dit_accel.runtime.plan import Plan, cache_level
from dit_accel.runtime.replay import BranchState, PlanHandle, check_plan_matches, install_block_hooks
from dit_accel.runtime.replay_table import CompiledSchedule, StepTable

from .manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, WEIGHTS_NAME, ExportError, is_export_folder

OPSET = 18
#: Example prompt whose transformer call fixes the graphs' input shapes (its words are in the default vocabulary).
EXAMPLE_PROMPT = "a small red circle moves left on a gray background"

#: One step's decisions: per span reuse, per block prune, per block "blends with the cache" (DWS weight < 1).
ActionKey = tuple[tuple[bool, ...], tuple[bool, ...], tuple[bool, ...]]


class _StopAfterCapture(Exception):
    """Raised by the capture hook to end the example generation after the first transformer call."""


def capture_transformer_inputs(pipe: Any, prompt: str, size: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The tensor arguments of the transformer's first call when `pipe` generates `prompt`, by parameter name.

    The exported graphs take exactly these inputs (same shapes and dtypes), so the driver feeds what the pipeline
    would feed. Non-tensor arguments (flags such as `return_dict`) are not graph inputs.
    """
    transformer = find_transformer(pipe)
    parameters = list(inspect.signature(transformer.forward).parameters)
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        named = dict(zip(parameters, args)) | kwargs
        captured.update({k: v.detach().clone() for k, v in named.items() if isinstance(v, torch.Tensor)})
        raise _StopAfterCapture

    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        pipe(prompt=prompt, num_inference_steps=2, guidance_scale=1.0, output_type="latent", **(size or {}))
    except _StopAfterCapture:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ExportError("the pipeline never called its transformer; cannot capture example inputs for export")
    return captured


def step_keys(table: StepTable) -> list[ActionKey]:
    """The action set of every step of `table` (a blend needs a cache, which exists from step 1 on)."""
    keys = []
    for step in range(table.steps):
        reuse = tuple(row[step] for row in table.reuse)
        prune = tuple(row[step] for row in table.prune)
        blend = tuple(p[step] and w[step] < 1.0 and step > 0 for p, w in zip(table.prune, table.blend))
        keys.append((reuse, prune, blend))
    return keys


class PlannedStep(torch.nn.Module):
    """The transformer at one action set, as a module with flat tensor inputs and outputs (what ONNX traces).

    Inputs: the captured transformer inputs in `input_names` order, then `cache_in.*` and `blend.*` tensors.
    Outputs: the transformer's first output, then `cache_out.*` tensors.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        branches: BranchStates,
        schedule: CompiledSchedule,
        key: ActionKey,
        model_inputs: list[str],
        has_encoder_cache: bool,
    ) -> None:
        super().__init__()
        self.transformer, self.branches, self.schedule, self.key = transformer, branches, schedule, key
        self.model_inputs = model_inputs
        reuse, prune, blend = key
        suffixes = ("hidden", "encoder") if has_encoder_cache else ("hidden",)
        read_spans = [s for s, (a, b) in enumerate(schedule.spans) if reuse[s] or any(blend[a:b])]
        self.cache_inputs = [(s, f"cache_in.{s}.{x}") for s in read_spans for x in suffixes]
        self.blend_inputs = [(b, f"blend.{b}") for b, on in enumerate(blend) if on]
        self.cache_outputs = [
            (s, f"cache_out.{s}.{x}") for s in range(len(schedule.spans)) if not reuse[s] for x in suffixes
        ]
        self.table = StepTable(
            1,
            tuple((r,) for r in reuse),
            tuple((not r,) for r in reuse),
            tuple((p,) for p in prune),
            tuple((0.5 if b else 1.0,) for b in blend),  # placeholder < 1 marks a blend; the weight is an input
        )

    @property
    def input_names(self) -> list[str]:
        return self.model_inputs + [n for _, n in self.cache_inputs] + [n for _, n in self.blend_inputs]

    @property
    def output_names(self) -> list[str]:
        return ["output"] + [n for _, n in self.cache_outputs]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.input_names, tensors))
        state: BranchState = self.branches.get_state()
        state.reset()
        state.table = self.table
        for span, name in self.cache_inputs:
            hidden, encoder = state.residuals.get(span, (None, None))
            state.residuals[span] = (named[name], encoder) if name.endswith(".hidden") else (hidden, named[name])
        state.blend_inputs = {block: named[name] for block, name in self.blend_inputs}
        kwargs = {name: named[name] for name in self.model_inputs}
        output = self.transformer(**kwargs, return_dict=False)[0]
        outputs = [output]
        for span, name in self.cache_outputs:
            hidden, encoder = state.residuals[span]
            outputs.append(hidden if name.endswith(".hidden") else encoder)
        state.reset()
        return tuple(outputs)


@contextlib.contextmanager
def _planned_hooks(transformer: torch.nn.Module, plan: Plan, schedule: CompiledSchedule) -> Any:
    """Install the runtime's block (and attention-prune) hooks without a step hook; remove them after."""
    handle = PlanHandle(transformer, BranchStates(BranchState))
    install_block_hooks(handle, get_adapter(transformer), plan, schedule)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    try:
        yield handle.branches
    finally:
        handle.remove()


def _export_graph(step: PlannedStep, example: list[torch.Tensor]) -> onnx.ModelProto:
    """Trace `step` with torch.export, then convert it with torch's ONNX exporter.

    Tracing first keeps the traced program at hand: when conversion fails on an op, the error names the op and the
    module that called it (from the node's `nn_module_stack`), not just the exporter's generic advice.
    """
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs a warning per torchvision op it cannot register
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                program = torch.export.export(step, tuple(example), strict=False)
            except Exception as exc:  # torch.export raises many types; its first line says what it could not trace
                raise ExportError(f"ONNX export failed while tracing the model: {_first_line(exc)}") from None
            try:
                converted = torch.onnx.export(
                    program,
                    dynamo=True,
                    opset_version=OPSET,
                    input_names=step.input_names,
                    output_names=step.output_names,
                    external_data=False,
                    verbose=False,
                )
            except Exception as exc:  # the converter raises many types; name the op and module it failed on
                raise ExportError(f"ONNX export failed: {_conversion_failure(exc, program)}") from None
    finally:
        quiet.setLevel(level)
    return converted.model_proto


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _conversion_failure(exc: BaseException, program: torch.export.ExportedProgram) -> str:
    """'op <target> in module <path> has no ONNX conversion', from the node named in the exporter's error chain."""
    nodes = {node.name: node for node in program.graph.nodes}
    cause: BaseException | None = exc
    while cause is not None:
        match = re.search(r"translating node %(\w+)", str(cause))
        if match and match.group(1) in nodes:
            node = nodes[match.group(1)]
            stack = node.meta.get("nn_module_stack") or {}
            path = next(reversed(stack.values()))[0] if stack else ""
            module = (
                path.removeprefix("transformer.")
                if path.startswith("transformer.")
                else "the transformer's own forward"
            )
            return (
                f"op {node.target} in module '{module}' has no ONNX conversion (opset {OPSET}); replace the op or "
                "register an ONNX translation for it"
            )
        cause = cause.__cause__ or cause.__context__
    return _first_line(exc)


def save_with_shared_weights(models: dict[str, onnx.ModelProto], folder: Path, min_bytes: int = 1024) -> None:
    """Save `models` (file name -> graph) into `folder`, storing each distinct large initializer once.

    Every graph of an export carries the same transformer weights; they go to one `weights.bin` (ONNX external
    data, 64-byte aligned) that all graphs point into, so an export costs about one copy of the model on disk.
    Small tensors and per-graph constants (PCA bases) stay inside their graph.
    """
    offsets: dict[str, tuple[int, int]] = {}
    with open(folder / WEIGHTS_NAME, "wb") as weights:
        for file_name, model in models.items():
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < min_bytes:
                    continue
                key = hashlib.sha256(
                    tensor.raw_data
                ).hexdigest()  # by content: the exporter names folded copies val_<n>
                if key not in offsets:
                    weights.write(b"\0" * (-weights.tell() % 64))
                    offsets[key] = (weights.tell(), len(tensor.raw_data))
                    weights.write(tensor.raw_data)
                offset, length = offsets[key]
                set_external_data(tensor, WEIGHTS_NAME, offset, length)
                tensor.ClearField("raw_data")
            for node in model.graph.node:  # the exporter's Python stack traces are most of a graph's bytes
                kept = [p for p in node.metadata_props if "stack_trace" not in p.key]
                del node.metadata_props[:]
                node.metadata_props.extend(kept)
            onnx.save(model, str(folder / file_name))


def _example_inputs(
    step: PlannedStep,
    model_example: dict[str, torch.Tensor],
    hidden_like: torch.Tensor,
    encoder_like: torch.Tensor | None,
) -> list[torch.Tensor]:
    tensors = [model_example[n] for n in step.model_inputs]
    for _, name in step.cache_inputs:
        like = hidden_like if name.endswith(".hidden") else encoder_like
        tensors.append(torch.zeros_like(like))
    tensors += [torch.full((1,), 0.5, dtype=hidden_like.dtype) for _ in step.blend_inputs]
    return tensors


def _residual_shapes(
    transformer: torch.nn.Module, example: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Example tensors shaped like a block's hidden (and encoder) residual, from one plain call."""
    adapter = get_adapter(transformer)
    _, block, spec = adapter.iter_blocks(transformer)[0]
    seen: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        hidden = output if spec.hidden_index is None else output[spec.hidden_index]
        seen["hidden"] = hidden.detach()
        if spec.encoder_index is not None:
            seen["encoder"] = output[spec.encoder_index].detach()

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            transformer(**example, return_dict=False)
    finally:
        handle.remove()
    return seen["hidden"], seen.get("encoder")


def check_exportable(plan: Plan) -> None:
    """Refuse plans whose decisions are not known before run time (adaptive policies), and multi-expert plans."""
    kind = plan.policy.get("kind")
    if kind != "static":
        raise ExportError(
            f"plan policy '{kind}' decides at run time and cannot be exported; export a static plan (fit with "
            "--method auto, profilingdit or unicp)"
        )
    if cache_level(plan) != "block":
        raise ExportError(
            "plan caches self-attention outputs (cache_level: attention), which the ONNX export does not replay; "
            "export a block-level plan (fit unicp with --cache-level block)"
        )
    if plan.model.experts:
        raise ExportError(
            f"plan covers experts {', '.join(plan.model.expert_names)}; exporting a multi-expert plan to ONNX is not "
            "supported (apply it with apply_plan instead)"
        )


def export_onnx(
    pipe: Any,
    plan: Plan,
    output_dir: str | os.PathLike,
    prompt: str,
    *,
    size: dict[str, int] | None = None,
    force: bool = False,
    replace: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Export one ONNX graph per distinct action set of `plan` plus `manifest.json` into `output_dir`.

    The folder is written atomically: everything goes to a temporary sibling that replaces `output_dir` only when
    every graph exported, so a failure leaves no partial export (and an existing one untouched). `force` exports a
    plan fitted on another model config (unsafe); `replace` lets the export replace a folder that is not an earlier
    export (see `check_export_destination`).
    """
    check_exportable(plan)
    out = check_export_destination(output_dir, replace=replace)
    transformer = find_transformer(pipe)
    check_plan_matches(plan, transformer, get_adapter(transformer), force=force)
    schedule = CompiledSchedule(plan, adaptive=False)
    table = schedule.table(plan.num_inference_steps)
    keys = step_keys(table)
    distinct = list(dict.fromkeys(keys))
    example = capture_transformer_inputs(pipe, prompt, size)
    hidden_like, encoder_like = _residual_shapes(transformer, example)
    tmp = staging_folder(out)
    try:
        graphs, models = [], {}
        with torch.no_grad(), _planned_hooks(transformer, plan, schedule) as branches:
            for index, key in enumerate(distinct):
                step = PlannedStep(transformer, branches, schedule, key, list(example), encoder_like is not None)
                entry = _graph_entry(index, key, step, plan)
                models[entry["file"]] = _export_graph(step, _example_inputs(step, example, hidden_like, encoder_like))
                graphs.append(entry)
                if progress is not None:
                    progress(index + 1, len(distinct))
        save_with_shared_weights(models, tmp)
        manifest = _manifest(pipe, plan, example, schedule, graphs, keys, distinct, table)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def check_export_destination(
    output_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), replace: bool = False
) -> Path:
    """The export folder to write, refused unless it is new, empty, or an earlier export (which it replaces).

    `replace=True` (`--force`) also accepts a folder with other contents, replaced as atomically as an earlier export.
    Never accepted, even then: a file, the current folder or one above it, and a folder that holds one of `inputs`
    (the plan being exported), since replacing it would delete them.

    Raises:
        ExportError: `output_dir` is one of the destinations above.
    """
    out = Path(output_dir)
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise ExportError(f"-o {output_dir} is the current folder or one above it; name a new folder for the export")
    for source in inputs:
        if resolved == Path(source).resolve() or resolved in Path(source).resolve().parents:
            raise ExportError(f"-o {output_dir} holds the input {source}; name a new folder for the export")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"-o {output_dir} exists and is not a folder; name a new folder for the export")
    if not replace and out.is_dir() and any(out.iterdir()) and not is_export_folder(out):
        raise ExportError(
            f"-o {output_dir} is a folder that holds other files; name a new folder or an earlier export, or pass "
            "--force to replace it"
        )
    return out


def _graph_entry(index: int, key: ActionKey, step: PlannedStep, plan: Plan) -> dict[str, Any]:
    reuse, prune, _ = key
    spans = step.schedule.spans
    actions = [
        "reuse" if reuse[step.schedule.span_of_block[b]] else "prune" if prune[b] else "compute"
        for b in range(plan.num_blocks)
    ]
    return {
        "file": f"graph_{index}.onnx",
        "actions": actions,
        "inputs": step.input_names,
        "outputs": step.output_names,
        "spans": [list(s) for s in spans],
    }


def _manifest(
    pipe: Any,
    plan: Plan,
    example: dict[str, torch.Tensor],
    schedule: CompiledSchedule,
    graphs: list[dict[str, Any]],
    keys: list[ActionKey],
    distinct: list[ActionKey],
    table: StepTable,
) -> dict[str, Any]:
    steps = []
    for step, key in enumerate(keys):
        blend = {f"blend.{b}": table.blend[b][step] for b, on in enumerate(key[2]) if on}
        entry: dict[str, Any] = {"graph": distinct.index(key), "blend": blend}
        if table.advance is not None:
            entry["advance"] = {str(s): row[step] for s, row in enumerate(table.advance) if row[step] != 0.0}
        if table.gain is not None:
            entry["gain"] = {str(s): row[step] for s, row in enumerate(table.gain) if row[step] != 1.0}
        steps.append(entry)
    scheduler = getattr(pipe, "scheduler", None)
    schedule_info: dict[str, Any] = {}
    if scheduler is not None and hasattr(scheduler, "set_timesteps"):
        scheduler.set_timesteps(plan.num_inference_steps)
        schedule_info = {
            "timesteps": [float(t) for t in scheduler.timesteps],
            "sigmas": [float(s) for s in getattr(scheduler, "sigmas", [])],
        }
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "opset": OPSET,
        "plan": {
            "content_sha256": plan.content_hash(),
            "policy": plan.policy.get("kind"),
            "num_inference_steps": plan.num_inference_steps,
        },
        "reuse": schedule.reuse_mode,
        "model": plan.model.to_json(),
        "inputs": {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in example.items()
        },
        "spans": [list(s) for s in schedule.spans],
        "graphs": graphs,
        "steps": steps,
        "scheduler": schedule_info,
    }
