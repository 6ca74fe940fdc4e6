"""Tiled MLP: each decoder layer's MLP run over the sequence in tiles of tokens, each tile recomputed in the
backward pass, so the MLP's intermediate activations (`tokens x intermediate_size`, three or four of them) exist
for one tile at a time instead of the whole sequence. The MLP works token by token, so the result is the same.

The tuner wraps the MLP modules (`mlp`, `feed_forward`...) as PEFT wraps the modules it adapts; no class is
patched. The wrapper shares its children and parameters with the MLP it wraps, so every parameter keeps its name
(`model.layers.0.mlp.up_proj.weight`) and an adapter put on the MLP's layers later (LoRA `target_modules`) lands
in both. Mixture-of-experts blocks are not tiled: their routers report per call (router logits for the
auxiliary loss), which tiles would split.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


MLP_NAMES = ("mlp", "feed_forward", "ffn")
"""Attribute names under which decoder layers hold their MLP (Llama, Qwen, Gemma: `mlp`; Llama 4: `feed_forward`)."""


class TiledMLP(nn.Module):
    """An MLP run in tiles of at most `tile_size` tokens: a sequence is cut along its sequence dimension into tiles of
    `tile_size // rows` positions of every row (a tile holds whole rows' slices, so PEFT's per-row adapter batches
    still see their rows), a flat `[tokens, hidden]` input into tiles of `tile_size` tokens.

    While gradients are recorded, each tile runs under `torch.utils.checkpoint` (non-reentrant, restoring the RNG):
    its intermediate activations are dropped after the forward and recomputed, one tile at a time, in the backward.
    Gradients are those of the untiled MLP (the tiles' weight gradients are summed in another order, so float32
    results differ in the last bits; dropout draws other masks). Without gradients the tiles run one after another.
    A sequence within one tile runs untiled. Other arguments of the MLP's forward that hold one value per token
    (Bloom's and MPT's residual) are cut with the hidden states; the rest are passed whole.

    Under DeepSpeed ZeRO-3 every call of a layer gathers its weights across the ranks, so all ranks must make the
    same number of calls: the tile count is agreed on (the largest of the ranks'), and a rank with fewer tokens runs
    empty tiles.

    Args:
        mlp (`torch.nn.Module`):
            The MLP to tile: a module that maps `[..., hidden]` to `[..., hidden]` token by token. Held, not
            registered: the wrapper shares its submodules and parameters instead, under the same names, and its
            training mode.
        tile_size (`int`):
            Tokens per tile, at least 1.
    """

    def __init__(self, mlp: nn.Module, tile_size: int):
        super().__init__()
        check_mlp_tile_size(tile_size)
        object.__setattr__(self, "mlp", mlp)
        # The same dicts, not copies: names, `.to()`, and PEFT's later replacements of a child are shared.
        object.__setattr__(self, "_modules", mlp._modules)
        object.__setattr__(self, "_parameters", mlp._parameters)
        object.__setattr__(self, "_buffers", mlp._buffers)
        self.tile_size = tile_size
        self.training = mlp.training

    def train(self, mode: bool = True) -> TiledMLP:
        super().train(mode)
        self.mlp.training = mode  # not a child: `train()` does not reach it (its dropout reads it)
        return self

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        flat = hidden_states.dim() < 3
        dim = 0 if flat else -2
        rows = 1 if flat else hidden_states.shape[:-2].numel()
        step = max(1, self.tile_size // rows)
        length = hidden_states.shape[dim]
        tiles = -(-length // step)
        tiles = _agreed_tile_count(tiles, self.mlp)
        if tiles <= 1:
            return self.mlp(hidden_states, *args, **kwargs)
        recording = torch.is_grad_enabled() and (
            hidden_states.requires_grad or any(p.requires_grad for p in self.mlp.parameters())
        )
        per_token = hidden_states.shape[:-1]

        def cut(value, start):
            if isinstance(value, torch.Tensor) and value.shape[:-1] == per_token:
                # contiguous: an offloader hands the checkpoint back contiguous copies, and the recomputation must
                # take the same kernels (a strided 3-d input takes a batched matmul that saves other shapes)
                return value.narrow(dim, min(start, length), max(0, min(step, length - start))).contiguous()
            return value

        outputs = []
        for index in range(tiles):
            start = index * step
            tile_args = [cut(value, start) for value in (hidden_states, *args)]
            tile_kwargs = {key: cut(value, start) for key, value in kwargs.items()}
            if recording:
                out = checkpoint(self.mlp, *tile_args, use_reentrant=False, **tile_kwargs)
            else:
                out = self.mlp(*tile_args, **tile_kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"{type(self.mlp).__name__} returned {type(out).__name__}, not a tensor: only MLPs that map "
                    "hidden states to hidden states token by token can be tiled. Set mlp_tile_size=None here."
                )
            outputs.append(out)
        return torch.cat(outputs, dim=dim)

    def extra_repr(self) -> str:
        return f"tile_size={self.tile_size}, tiling {type(self.mlp).__name__}"


def _agreed_tile_count(tiles: int, mlp: nn.Module) -> int:
    """The largest tile count of the ranks when `mlp`'s weights are ZeRO-3 partitioned (DeepSpeed marks them with
    `ds_id`) in a distributed run: each call gathers them collectively, so every rank must call as often; else
    `tiles` as it is."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tiles
    if not any(hasattr(parameter, "ds_id") for parameter in mlp.parameters()):
        return tiles
    device = next(mlp.parameters()).device
    count = torch.tensor([tiles], device=device if device.type != "meta" else "cpu")
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def check_mlp_tile_size(tile_size) -> None:
    """Refuse a tile size that is not a whole number of tokens of at least 1 (None, untiled, is valid)."""
    if tile_size is None:
        return
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(
            f"mlp_tile_size={tile_size!r} is not a number of tokens: give a whole number of at least 1 (e.g. 8192), "
            "or None to run the MLP untiled."
        )


def is_mixture_of_experts(module: nn.Module) -> bool:
    """Whether an MLP-position module routes tokens to experts, read from its structure, not its class name
    (Qwen2-MoE's dense layers are `Qwen2MoeMLP`): a submodule named `...expert...`, or a child named `router` or
    `gate` (the router; a dense MLP's gate is `gate_proj`)."""
    if any("expert" in name.rpartition(".")[2] for name, _ in module.named_modules()):
        return True
    return any(name in ("router", "gate") for name, _ in module.named_children())


def mlp_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """The full names of the dense MLPs of `model`'s decoder layers (already tiled ones included), and those of its
    mixture-of-experts blocks, which are not tiled."""
    dense, experts = [], []
    for name, module in model.named_modules():
        if name.rpartition(".")[2] not in MLP_NAMES or not name:
            continue
        inner = module.mlp if isinstance(module, TiledMLP) else module
        (experts if is_mixture_of_experts(inner) else dense).append(name)
    return dense, experts


def tile_mlps(model: nn.Module, tile_size: int) -> list[str]:
    """Wrap each dense decoder-layer MLP of `model` in a `TiledMLP` of `tile_size` tokens (an MLP already tiled gets
    the new size). Returns the names tiled.

    Raises:
        `ValueError`: when `tile_size` is invalid, or `model` has no dense MLP to tile (naming what it has).
    """
    check_mlp_tile_size(tile_size)
    dense, experts = mlp_modules(model)
    if not dense:
        found = sorted({type(model.get_submodule(name)).__name__ for name in experts})
        raise ValueError(
            f"mlp_tile_size={tile_size} found no dense MLP to tile in {type(model).__name__}: its MLP blocks are "
            f"mixtures of experts ({', '.join(found) or 'none found under ' + '/'.join(MLP_NAMES)}), whose routers "
            "report per call (router logits for the auxiliary loss), which tiles would split. Set mlp_tile_size=None."
        )
    for name in dense:
        module = model.get_submodule(name)
        if isinstance(module, TiledMLP):
            module.tile_size = tile_size
        else:
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, TiledMLP(module, tile_size))
    return dense


def untile_mlps(model: nn.Module) -> None:
    """Put back every MLP `tile_mlps` wrapped (with whatever adapters its layers hold now)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, TiledMLP):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, module.mlp)
