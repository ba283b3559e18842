"""The layer-by-layer driver: quantize a causal LM one decoder block at a time.

1. Find the decoder blocks: the nn.ModuleList holding the most parameters (no per-architecture tables).
2. Capture the first block's inputs with a forward pre-hook that keeps every keyword argument (masks, position
   ids, rotary embeddings), and stop the forward there.
3. For each block, on the compute device: group its Linears by the input tensor they read (q/k/v share one; that
   is a true-sequential group), accumulate each group's Hessian from the block's inputs, solve, write the
   fake-quantized weight back so later groups see quantized outputs, then run the quantized block to produce the
   next block's inputs, swap in QuantLinear and send the block back to the CPU. Each pass over the inputs stops
   once the group's inputs are seen, and replays the recorded outputs of submodules that are already final
   (`Replay`), so a Llama block costs about 1.1 forwards of compute instead of 2.5.

Only one block is on the compute device at a time. Padded positions (attention_mask 0) never enter a Hessian.
With a work folder, each finished block is persisted (write, fsync, rename) so an interrupted run can resume.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import QuantConfig
from .gptq import accumulate, gptq
from .kernels.cpu_int4 import native_bf16
from .packing import packable
from .qlinear import QuantLinear
from .quant import QuantResult, rtn

log = logging.getLogger(__name__)


class UnsupportedModel(ValueError):
    pass


class _Stop(Exception):
    """Raised from a hook to end a forward pass early once the needed activations are captured."""


@dataclass
class LayerLog:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    loss: float
    damp: float | None
    seconds: float
    note: str = ""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks: the ModuleList with the most parameters."""
    best, best_n = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = (name, m), n
    if best is None:
        raise UnsupportedModel(f"no decoder blocks found in {type(model).__name__}: gptqkit needs a model whose "
                               "repeated layers sit in an nn.ModuleList (every transformers causal LM does)")
    return best


def is_linear(m: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D stores its weight as [in, out]; it is a Linear in every other respect.
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """[N, K] (out, in) view of a Linear or Conv1D weight."""
    return m.weight.T if type(m).__name__ == "Conv1D" else m.weight


def _set_weight(m: nn.Module, W: torch.Tensor) -> None:
    W = W.T if type(m).__name__ == "Conv1D" else W
    m.weight.data.copy_(W.to(m.weight.dtype))


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _cast(obj, dtype):
    """Floating tensors (hidden states, rotary cos/sin, float masks) to the calibration dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def default_compute_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """bf16 where matrix units make it fast (CUDA; CPUs with AMX or AVX512-BF16), else the model's dtype."""
    if model_dtype in (torch.float16, torch.bfloat16):
        return model_dtype
    if device.type == "cuda" or (device.type == "cpu" and native_bf16()):
        return torch.bfloat16
    return model_dtype


def _move_outside(module: nn.Module, skip: nn.Module, device) -> None:
    """Move every parameter and buffer except those inside `skip` (the blocks) to device."""
    if module is skip:
        return
    for child in module.children():
        _move_outside(child, skip, device)
    module._apply(lambda t: t.to(device), recurse=False)


def pad_batches(samples: list[dict], batch_size: int, pad_id: int = 0) -> list[dict]:
    """Group samples ({input_ids [1, T], attention_mask [1, T]}) into right-padded batches of batch_size."""
    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        T = max(s["input_ids"].shape[-1] for s in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, s in enumerate(chunk):
            t = s["input_ids"].shape[-1]
            ids[j, :t] = s["input_ids"][0]
            mask[j, :t] = s["attention_mask"][0] if "attention_mask" in s else 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[dict], device) -> list[tuple]:
    """Run the model up to the first block for each batch: [(hidden, kwargs, mask)] on device."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for k in ("past_key_value", "past_key_values", "cache", "layer_past"):  # `cache`: transformers >= 5.24
            kwargs.pop(k, None)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append([hidden, kwargs])
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                      use_cache=False)
            except _Stop:
                pass
            captured[-1].append(b["attention_mask"].to(device))
    finally:
        handle.remove()
    return [tuple(c) for c in captured]


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def input_groups(modules: dict[str, nn.Module], run: Callable[[], object]) -> list[list[str]]:
    """Names of `modules` grouped by the input tensor each reads while `run()` executes, groups in call order (a
    module called twice counts once; modules that do not run are left out). The hooks are removed even if run()
    raises, and its exception propagates."""
    order: list[str] = []
    keys: dict[str, int] = {}
    seen: list[torch.Tensor] = []  # keep inputs alive so their ids stay unique during the probe

    def make(name):
        def hook(mod, args):
            x = args[0]
            seen.append(x)
            order.append(name)
            keys[name] = id(x)
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    by_key: dict[int, list[str]] = {}
    for n in order:
        if n in by_key.get(keys[n], []):
            continue
        if keys[n] not in by_key:
            by_key[keys[n]] = []
            groups.append(by_key[keys[n]])
        by_key[keys[n]].append(n)
    return groups


def sequential_groups(block: nn.Module, names: list[str], hidden, kwargs) -> list[list[str]]:
    """Linears grouped by the input tensor they read, in execution order (q/k/v together, gate/up together)."""
    modules = dict(block.named_modules())
    groups = input_groups({n: modules[n] for n in names},
                          lambda: _run_block(block, hidden[:1], _slice_kwargs(kwargs, 1)))
    ran = {n for g in groups for n in g}
    missing = [n for n in names if n not in ran]
    if missing:
        groups.append(missing)
    return groups


def _slice_kwargs(kwargs: dict, n: int) -> dict:
    # Slice batch-major tensors to the first n rows for the cheap probe pass; shared tensors (batch 1) stay.
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > n:
            out[k] = v[:n]
        elif isinstance(v, tuple):
            out[k] = tuple(t[:n] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] > n else t for t in v)
        else:
            out[k] = v
    return out


@torch.no_grad()
def _hessians(block, group: list[str], inputs, device, replay: "Replay | None" = None) -> dict[str, torch.Tensor]:
    """Accumulate H = sum x x^T (float32) for each Linear of a group over all inputs, stopping each forward as
    soon as every member's input has been seen.

    The members of a true-sequential group read one input tensor, so they share one H (the solver copies it):
    q/k/v cost one accumulation instead of three, and from the second input on the forward stops at q_proj's
    input instead of running q and k first. A member that reads another tensor gets its own."""
    modules = dict(block.named_modules())
    H = {}
    shares: dict[str, str] = {}  # member -> the member whose H it shares, decided on the first input
    # stop once `left` hooks have fired: on the first input every member's, later only the owners' (an H each)
    state = {"mask": None, "x": None, "owner": None, "first": True, "left": len(group)}

    def make(name):
        m = modules[name]
        K = weight_matrix(m).shape[1]
        H[name] = torch.zeros(K, K, dtype=torch.float32, device=device)

        def hook(mod, args):
            x = args[0]
            if state["first"] and state["x"] is x:
                shares[name] = state["owner"]
            if name not in shares:
                accumulate(H[name], x, state["mask"])
                state["x"], state["owner"] = x, name
            if state["first"] or name not in shares:
                state["left"] -= 1
                if state["left"] == 0:
                    raise _Stop
        return hook

    handles = [modules[n].register_forward_pre_hook(make(n)) for n in group]
    try:
        with replay.run() if replay is not None else contextlib.nullcontext():
            for j, (hidden, kwargs, mask) in enumerate(inputs):
                state.update(mask=mask, x=None, owner=None, first=j == 0,
                             left=len(group) if j == 0 else len(group) - len(shares))
                try:
                    _run_block(block, hidden, kwargs)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    for name, owner in shares.items():
        H[name] = H[owner]
    return H


def _skip_pattern(full_name: str) -> str:
    return "-:^" + re.escape(full_name) + "$"


class WorkDir:
    """Finished blocks of an interrupted run: block_NNNN.safetensors + block_NNNN.json, written atomically."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, resume: bool):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if self.path.exists() and any(self.path.iterdir()):
            if not resume:
                raise FileExistsError(f"work folder {self.path} holds an earlier unfinished run; pass --resume to "
                                      "continue it, or delete the folder to start over")
            try:
                old = json.loads(manifest.read_text()) if manifest.exists() else None
            except ValueError as e:
                raise ValueError(f"{manifest} is not valid JSON ({e}); delete {self.path} to start over") from e
            if old != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(old or {}) if (old or {}).get(k) != fingerprint.get(k))
                raise ValueError(f"cannot resume from {self.path}: it was made with a different {', '.join(diff)}; "
                                 "run with the same model, settings, calibration data and seed, or delete the folder")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(manifest, json.dumps(fingerprint, indent=1, sort_keys=True).encode())

    def _file(self, i: int, ext: str) -> Path:
        return self.path / f"block_{i:04d}.{ext}"

    def load(self, i: int) -> tuple[dict[str, QuantResult], list[LayerLog]] | None:
        from safetensors.torch import load_file

        if not self._file(i, "json").exists():
            return None
        try:
            meta = json.loads(self._file(i, "json").read_text())
            t = load_file(str(self._file(i, "safetensors")))
        except Exception as e:  # json and safetensors raise their own types for torn files
            raise ValueError(f"{self._file(i, 'safetensors')} cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); delete {self.path} to start over") from e
        results = {}
        for name, extra in meta["results"].items():
            results[name] = QuantResult(codes=t[f"{name}.codes"], scales=t[f"{name}.scales"],
                                        zeros=t[f"{name}.zeros"], g_idx=t[f"{name}.g_idx"], **extra)
        return results, [LayerLog(**{**d, "shape": tuple(d["shape"])}) for d in meta["logs"]]

    def save(self, i: int, results: dict[str, QuantResult], logs: list[LayerLog]) -> None:
        from safetensors.torch import save

        tensors = {}
        for name, r in results.items():
            tensors.update({f"{name}.codes": r.codes, f"{name}.scales": r.scales, f"{name}.zeros": r.zeros,
                            f"{name}.g_idx": r.g_idx})
        atomic_write_bytes(self._file(i, "safetensors"), save({k: v.contiguous() for k, v in tensors.items()}))
        meta = {"results": {n: {"loss": r.loss, "damp": r.damp, "fallback": r.fallback} for n, r in results.items()},
                "logs": [asdict(x) for x in logs]}
        # The json is written last: its presence marks the block as finished.
        atomic_write_bytes(self._file(i, "json"), json.dumps(meta).encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename over `path`, fsync the folder: all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _block_inputs_next(block, inputs, replay: "Replay | None" = None) -> list[tuple]:
    with replay.run(record=False) if replay is not None else contextlib.nullcontext():
        return [(_run_block(block, hidden, kwargs), kwargs, mask) for hidden, kwargs, mask in inputs]


class _Replayer(nn.Module):
    """Stands in for a submodule during one pass: returns its recorded outputs, one per block input, in order."""

    def __init__(self, outputs: list):
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls]
        self.calls += 1
        return _clone(out)  # a caller may write into what it gets back; the recording must stay intact


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


def _replayable(out) -> bool:
    if out is None or isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (tuple, list)) and all(_replayable(o) for o in out)


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    return sum(_nbytes(o) for o in out) if isinstance(out, (tuple, list)) else 0


def default_replay_budget(device: torch.device) -> int:
    """Bytes the recorded outputs of one block may take: a quarter of the device's free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 0  # unknown: recompute rather than risk running out of memory


class Replay:
    """Outputs of a block's submodules that no later pass can change: recorded once, replayed after.

    True-sequential quantization runs the block over every calibration input once per group and once more to
    produce the next block's inputs. A submodule (self_attn, gate_proj, ...) is final once every Linear that runs
    before it returns is solved (its weights and its inputs are then fixed), so it computes the same output in
    every later pass: the first pass where it is final records its outputs (forward hook, cloned), the passes
    after swap in a _Replayer for it. In a Llama block: q/k/v are recorded in o_proj's pass, self_attn in
    gate/up's, gate/up in down_proj's, and the last pass computes only down_proj; replayed results are bit for bit
    those of recomputation. Only the outermost final submodules are kept, and only while their recordings fit
    `budget` bytes (estimated from the probe); submodules called more than once per forward, or returning
    anything but tensors, are always recomputed.
    """

    def __init__(self, block: nn.Module, names: list[str], inputs, budget: int):
        self.block, self.budget = block, budget
        self.solved: set[str] = set()
        self.recorded: dict[str, list] = {}
        self.n_inputs = len(inputs)
        rows = sum(h.shape[0] for h, _, _ in inputs)
        modules = [(n, m) for n, m in block.named_modules() if n and any(is_linear(c) for c in m.modules())]
        ticks: dict[str, list] = {n: [None, None, 0, 0, True] for n, _ in modules}  # enter, exit, calls, bytes, ok
        seen: list[tuple[int, str]] = []  # (tick, linear name) as each Linear to quantize starts
        clock = [0]
        wanted = set(names)

        def pre(name):
            def hook(mod, args):
                clock[0] += 1
                ticks[name][0] = clock[0]
                ticks[name][2] += 1
                if name in wanted:
                    seen.append((clock[0], name))
            return hook

        def post(name):
            def hook(mod, args, out):
                clock[0] += 1
                ticks[name][1] = clock[0]
                ticks[name][3] = _nbytes(out) * rows
                ticks[name][4] = _replayable(out)
            return hook

        handles = [h for n, m in modules
                   for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
        try:
            with torch.no_grad():
                _run_block(block, inputs[0][0][:1], _slice_kwargs(inputs[0][1], 1))
        finally:
            for h in handles:
                h.remove()
        # For each usable submodule: the Linears to quantize that start before it returns, and its recording size.
        self.needs: dict[str, set[str]] = {}
        self.bytes: dict[str, int] = {}
        for n, (enter, exit_, calls, nbytes, ok) in ticks.items():
            if calls == 1 and ok and exit_ is not None:
                self.needs[n] = {lin for t, lin in seen if t < exit_}
                self.bytes[n] = nbytes

    def _final(self) -> list[str]:
        final = [n for n, need in self.needs.items() if need <= self.solved]
        return [n for n in final if not any(n.startswith(f + ".") for f in final)]  # outermost only

    @contextlib.contextmanager
    def run(self, record: bool = True):
        """One pass over the inputs: replay what is recorded, record what became final (unless `record` is off)."""
        final = [n for n in self._final() if not any(n.startswith(r + ".") for r in self.recorded)]
        replay = list(self.recorded)  # every recording is final; none lies inside another (dropped below)
        used = sum(self.bytes[n] for n in self.recorded)
        new: dict[str, list] = {}
        handles = []
        if record:
            for n in final:
                if n not in self.recorded and used + self.bytes[n] <= self.budget:
                    used += self.bytes[n]
                    new[n] = []
                    handles.append(self.block.get_submodule(n).register_forward_hook(
                        lambda mod, args, out, rec=new[n]: rec.append(_clone(out))))
        originals = {}
        for n in replay:
            parent, _, child = n.rpartition(".")
            owner = self.block.get_submodule(parent) if parent else self.block
            originals[n] = (owner, child, owner._modules[child])
            owner._modules[child] = _Replayer(self.recorded[n])
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for owner, child, module in originals.values():
                owner._modules[child] = module
        # Keep complete recordings (a pass that stops early never reaches some modules); drop the recordings of
        # submodules now inside a recorded one.
        self.recorded.update({n: rec for n, rec in new.items() if len(rec) == self.n_inputs})
        for n in list(self.recorded):
            if any(n.startswith(f + ".") for f in self.recorded):
                del self.recorded[n]


@torch.no_grad()
def quantize_model(model: nn.Module, samples: list[dict], cfg: QuantConfig, device: str | torch.device = "cpu",
                   batch_size: int = 1, pad_id: int = 0, work_dir: WorkDir | None = None, progress: bool = True,
                   on_block: Callable[[int], None] | None = None,
                   compute_dtype: torch.dtype | None = None, replay_budget: int | None = None) -> list[LayerLog]:
    """Quantize every Linear inside the decoder blocks of `model` in place (they become QuantLinear).

    replay_budget: bytes the recorded submodule outputs of one block may take (see Replay); None: a quarter of
    the device's free memory; 0: recompute every pass.
    samples: [{"input_ids": [1, T], "attention_mask": [1, T]}] as gptqkit.data.calibration_samples returns.
    `cfg.dynamic` is applied as loaders read it (QuantConfig.for_module on each Linear's full name): a "-:" rule
    leaves a Linear in floating point, a "+:" rule gives it its own bits / group_size / desc_act / sym. Blocks after
    the last one with anything to quantize are not run at all (unless cfg.lm_head needs their outputs).
    Layers whose sizes cannot be packed at their bits stay in floating point, with a warning. Returns one LayerLog
    per Linear. `cfg.dynamic` receives a "-:name" entry for each layer left unquantized so loaders know.
    """
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("no calibration samples: pass at least one text with a few tokens")
    device = torch.device(device)
    prefix, blocks = find_blocks(model)
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(device, next(blocks.parameters()).dtype)
    if replay_budget is None:
        replay_budget = default_replay_budget(device)
    head = output_layer(model, cfg) if cfg.lm_head else None  # refused here, before hours of blocks, if it cannot be
    was_training = model.training
    model.eval()
    # Round-to-nearest reads the weights only: no calibration forwards, no block inputs.
    calibrated = cfg.quant_method != "rtn"
    inputs: list[tuple] = []
    batches: list[dict] = []
    block_tuple = False  # whether a block returns a tuple (GPT-2, OPT) or a tensor (Llama): _Passthrough mimics it
    if calibrated:
        batches = pad_batches(samples, batch_size, pad_id)
        _move_outside(model, blocks, device)
        blocks[0].to(device)
        inputs = capture_inputs(model, blocks, batches, device)
        if head is not None:
            block_tuple = isinstance(blocks[0](inputs[0][0][:1], **_slice_kwargs(inputs[0][1], 1)), (tuple, list))
        inputs = [(_cast(h, compute_dtype), _cast(kw, compute_dtype), mask) for h, kw, mask in inputs]
        blocks[0].to("cpu")
        _move_outside(model, blocks, "cpu")

    logs: list[LayerLog] = []
    skipped: list[str] = []
    plans = [_block_plan(blocks[i], f"{prefix}.{i}", cfg, skipped) for i in range(len(blocks))]
    todo = len(blocks) if head is not None else 1 + max((i for i, p in enumerate(plans) if p), default=-1)
    if todo < len(blocks):
        log.info("blocks %d-%d have nothing to quantize (cfg.dynamic): they are not run", todo, len(blocks) - 1)
    bar = tqdm(range(todo), desc="Quantizing blocks", disable=not progress)
    for i in bar:
        src = blocks[i]  # stays on the CPU in the model's dtype; receives the QuantLinears at the end
        # The compute copy: one block on the device in the calibration dtype. Weights to solve are read from src.
        same = device.type == "cpu" and compute_dtype == next(src.parameters()).dtype
        block = src if same else copy.deepcopy(src).to(device=device, dtype=compute_dtype)
        plan = plans[i]
        quant_names = list(plan)
        done = work_dir.load(i) if work_dir is not None else None
        replay = None
        if done is not None:
            results, block_logs = done
        else:
            if cfg.quant_method == "gptq" and replay_budget and quant_names:
                replay = Replay(block, quant_names, inputs, replay_budget)
            results, block_logs = _quantize_block(block, src, plan, inputs, cfg, device, f"{prefix}.{i}", replay)
            if work_dir is not None:
                work_dir.save(i, results, block_logs)
        modules, src_modules = dict(block.named_modules()), dict(src.named_modules())
        for n, r in results.items():
            _set_weight(modules[n], r.dequantize().to(device))
        logs.extend(block_logs)
        if calibrated:  # _quantize_block has marked every quantized Linear solved, group by group
            inputs = _block_inputs_next(block, inputs, replay)
        del block, replay
        for n, r in results.items():
            _replace(src, n, QuantLinear.from_result(
                r, getattr(src_modules[n], "bias", None), plan[n].bits, plan[n].group_size, cfg.checkpoint_format))
        if on_block is not None:
            on_block(i)
    if head is not None:
        logs.extend(_quantize_head(model, head, prefix, blocks, batches, inputs, cfg, device, work_dir, block_tuple))
    if skipped:
        dyn = dict(cfg.dynamic or {})
        dyn.update({_skip_pattern(n): {} for n in skipped})
        object.__setattr__(cfg, "dynamic", dyn)
    model.train(was_training)
    return logs


def _block_plan(block: nn.Module, prefix: str, cfg: QuantConfig, skipped: list[str]) -> dict[str, QuantConfig]:
    """{name in block: its settings} of the Linears of `block` (full names start with prefix) to quantize: those
    cfg.dynamic does not skip, with their "+:" overrides, whose sizes pack at their bits. The full names of those
    that cannot be packed are appended to `skipped`, with a warning."""
    plan = {}
    for n, m in block.named_modules():
        mc = cfg.for_module(f"{prefix}.{n}") if is_linear(m) else None
        if mc is None:
            continue
        N, K = weight_matrix(m).shape
        if packable(K, mc.bits) and packable(N, mc.bits):
            plan[n] = mc
        else:
            skipped.append(f"{prefix}.{n}")
            log.warning("%s.%s (%dx%d) stays unquantized: its sizes are not multiples of %d, which %d-bit packing "
                        "needs", prefix, n, N, K, 32 if mc.bits == 3 else 32 // mc.bits, mc.bits)
    return plan


def output_layer(model: nn.Module, cfg: QuantConfig) -> tuple[str, nn.Module]:
    """(name, module) of the output layer (lm_head) that cfg.lm_head quantizes; a clear error where it cannot be."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if name is None or not is_linear(head):
        raise UnsupportedModel(f"lm_head=True, but {type(model).__name__} has no Linear output layer "
                               f"({type(head).__name__ if head is not None else 'none'}); quantize without --lm-head")
    mc = cfg.for_module(name)
    if mc is None:
        raise UnsupportedModel(f"lm_head=True, but a '-:' rule of dynamic skips {name}; drop the rule or quantize "
                               "without --lm-head")
    N, K = weight_matrix(head).shape
    if not (packable(K, mc.bits) and packable(N, mc.bits)):
        raise UnsupportedModel(f"lm_head=True, but {name} ({N}x{K}) cannot be packed at {mc.bits} bits (both sizes "
                               f"must be multiples of {32 if mc.bits == 3 else 32 // mc.bits}); quantize without "
                               "--lm-head")
    return name, head


class _Passthrough(nn.Module):
    """Stands in for a decoder block while the model runs only to reach lm_head: the first returns the last block's
    recorded output for the current batch (state["hidden"]), the others their input, as a tensor or a 1-tuple like
    the blocks. Plain attributes a model's forward reads from its layers (attention_type, layer_idx) are copied."""

    def __init__(self, block: nn.Module, state: dict, first: bool, as_tuple: bool):
        super().__init__()
        for k, v in vars(block).items():
            if not k.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module)):
                setattr(self, k, v)
        self.state, self.first, self.as_tuple = state, first, as_tuple

    def forward(self, *args, **kwargs):
        out = self.state["hidden"] if self.first else (args[0] if args else kwargs["hidden_states"])
        return (out,) if self.as_tuple else out


@torch.no_grad()
def _head_hessian(model: nn.Module, head: nn.Module, prefix: str, blocks: nn.ModuleList, batches: list[dict],
                  outputs: list[tuple], device, block_tuple: bool) -> torch.Tensor:
    """H = sum x x^T (float32) over lm_head's inputs: the last block's outputs through whatever the model runs after
    its blocks (the final norm; OPT's project_out), found by running the model with the blocks replaced by
    _Passthrough and stopping at lm_head. Padded positions never enter H."""
    K = weight_matrix(head).shape[1]
    H = torch.zeros(K, K, dtype=torch.float32, device=device)
    dtype = weight_matrix(head).dtype
    state: dict = {}

    def hook(mod, args):
        accumulate(H, args[0], state["mask"])
        raise _Stop

    _move_outside(model, blocks, device)
    _replace(model, prefix, nn.ModuleList(_Passthrough(b, state, i == 0, block_tuple) for i, b in enumerate(blocks)))
    handle = head.register_forward_pre_hook(hook)
    try:
        for b, (hidden, _, mask) in zip(batches, outputs):
            state.update(hidden=hidden.to(dtype), mask=mask)
            try:
                model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                      use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        _replace(model, prefix, blocks)
        _move_outside(model, blocks, "cpu")
    return H


def _quantize_head(model: nn.Module, head: tuple[str, nn.Module], prefix: str, blocks: nn.ModuleList,
                   batches: list[dict], outputs: list[tuple], cfg: QuantConfig, device, work_dir: WorkDir | None,
                   block_tuple: bool) -> list[LayerLog]:
    """Quantize the output layer (cfg.lm_head) after the blocks, from the last block's outputs; a tied lm_head is
    untied first (the embedding keeps its dense weight; the config then says tie_word_embeddings=False). In the
    work folder it is the entry after the last block."""
    name, module = head
    mc = cfg.for_module(name)  # not None: output_layer refused a skipped head
    log.warning("quantizing %s: gptqkit, GPTQModel and vLLM load the checkpoint; transformers' from_pretrained "
                "(optimum) and AutoGPTQ cannot (they expect a dense lm_head)", name)
    emb = model.get_input_embeddings()
    if emb is not None and getattr(emb, "weight", None) is module.weight:
        log.info("%s shares the input embedding's weight: untied so the embedding stays dense "
                 "(the checkpoint's config says tie_word_embeddings=false)", name)
        model.config.tie_word_embeddings = False
    done = work_dir.load(len(blocks)) if work_dir is not None else None
    if done is not None:
        results, logs = done
    else:
        H = None
        if cfg.quant_method == "gptq":
            t0 = time.perf_counter()
            H = _head_hessian(model, module, prefix, blocks, batches, outputs, device, block_tuple)
            log.info("%s: Hessian from the last block's outputs in %.1fs", name, time.perf_counter() - t0)
        logs: list[LayerLog] = []
        results = {name: _solve(module, H, mc, device, name, logs)}
        if work_dir is not None:
            work_dir.save(len(blocks), results, logs)
    _replace(model, name, QuantLinear.from_result(results[name], getattr(module, "bias", None), mc.bits,
                                                  mc.group_size, cfg.checkpoint_format))
    return logs


def _quantize_block(block, src, plan: dict[str, QuantConfig], inputs, cfg: QuantConfig, device, prefix,
                    replay: Replay | None = None) -> tuple[dict, list[LayerLog]]:
    """Quantize the Linears of `plan` ({name: its settings}, _block_plan) of one block; cfg: the run's method and
    order."""
    modules, src_modules = dict(block.named_modules()), dict(src.named_modules())
    results: dict[str, QuantResult] = {}
    logs: list[LayerLog] = []
    names = list(plan)
    if not names:
        return results, logs
    if cfg.quant_method == "rtn":
        groups = [names]
    elif cfg.true_sequential:
        groups = sequential_groups(block, names, inputs[0][0], inputs[0][1])
    else:
        groups = [names]
    for group in groups:
        H = _hessians(block, group, inputs, device, replay) if cfg.quant_method == "gptq" else {}
        for n in group:
            results[n] = r = _solve(src_modules[n], H.pop(n, None), plan[n], device, f"{prefix}.{n}", logs)
            # Later groups of this block must see this layer's quantized output.
            _set_weight(modules[n], r.dequantize().to(device))
        if replay is not None:
            replay.solved.update(group)
    return results, logs


# Rows of W solved at a time, as float32 bytes: GPTQ treats every output row on its own given H (the codes come out
# the same), and the solver holds ~4 float32 copies of what it is given, so a 128256 x 4096 lm_head (Llama 3) would
# take ~8 GB at once, SmolLM2's 49152 x 576 one ~450 MB; in blocks, at most ~4 x 64 MiB.
SOLVE_BYTES = 64 << 20


def solve_rows(K: int, device: torch.device) -> int:
    """Rows of a K-column weight per solver call. On CUDA the solver's column loop is bound by kernel launches, not
    by the rows, so every extra block repeats its cost (measured on an H100: a Llama-7B block took 17.7 s with
    64 MiB blocks, its seven solves 6.8 s in one piece each): there the budget is an eighth of free memory."""
    budget = SOLVE_BYTES
    if device.type == "cuda":
        budget = max(budget, torch.cuda.mem_get_info(device)[0] // 8)
    return max(1, budget // (4 * K))


def _solve(module: nn.Module, H: torch.Tensor | None, cfg: QuantConfig, device, name: str,
           logs: list[LayerLog]) -> QuantResult:
    """GPTQ with Hessian H (RTN when cfg says so) of one Linear's weight, in blocks of solve_rows() rows; the result
    on the CPU. Appends its LayerLog to logs."""
    t0 = time.perf_counter()
    weight = weight_matrix(module).detach()
    N, K = weight.shape
    step = solve_rows(K, torch.device(device))
    parts = []
    for r0 in range(0, N, step):
        W = weight[r0:r0 + step].to(device=device, dtype=torch.float32)
        if not torch.isfinite(W).all():
            raise ValueError(f"{name} has NaN or Inf weights; the source model is broken, quantize a checkpoint with "
                             "finite weights")
        parts.append(rtn(W.cpu(), cfg) if cfg.quant_method == "rtn" else gptq(W, H, cfg))
        del W
    first = parts[0]
    r = QuantResult(codes=torch.cat([p.codes.cpu() for p in parts]),
                    scales=torch.cat([p.scales.cpu() for p in parts], 1),
                    zeros=torch.cat([p.zeros.cpu() for p in parts], 1), g_idx=first.g_idx.cpu(),
                    loss=sum(p.loss for p in parts), damp=first.damp,
                    fallback=next((p.fallback for p in parts if p.fallback), None))
    dt = time.perf_counter() - t0
    logs.append(LayerLog(name, (N, K), r.loss, r.damp, dt, r.fallback or ""))
    if r.fallback:
        log.warning("%s: %s", name, r.fallback)
    log.info("%s %s loss %.4g damp %s %.2fs", name, (N, K), r.loss,
             f"{r.damp:g}" if r.damp is not None else "-", dt)
    return r


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
