"""A live model for any layer path, built over a session's resident sources without copying a weight.

Each source's decoder layers are wrapped once as modules over the session's tensors (assigned, not copied).
A path's model is then one skeleton (embeddings, rotary tables, final norm and head) whose layer list holds
per-slot views of those layers: shallow copies that share every parameter but carry their own slot index, so
a layer used twice writes two KV-cache entries instead of overwriting one. A slot's residual scale multiplies
its o_proj / down_proj outputs, which equals scaling their weights (what the exported recipe does) up to float
rounding: (x W) s against x (W s), within a few ulps. Switching paths costs module bookkeeping only.
"""

import copy
from itertools import chain

import torch
from torch import nn

from merge_core import architecture
from merge_core.errors import InputError
from merge_core.layer_path import RESIDUAL_OUTPUTS, LayerPath
from merge_core.session import MergeSession


class ScaledOutput(nn.Module):
    """A projection whose output is multiplied by `scale`: the slot's share of the residual stream."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


class PathModel:
    def __init__(self, session: MergeSession, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.session, self.trust_remote_code = session, trust_remote_code
        donor = next(iter(session.checkpoints.values()))
        self.config = AutoConfig.from_pretrained(donor.path, trust_remote_code=trust_remote_code)
        layout = architecture.layout(session.tensor_names)
        self.pre, self.post = layout.pre, layout.post
        first_layer = next(name for name in session.tensor_names if architecture.layer_index(name) is not None)
        self.stack_name = first_layer[: architecture.LAYER_INDEX.search(first_layer).start()]  # "model.layers"
        self.layer_types = getattr(self.config, "layer_types", None)
        dtype = next(iter(donor.tensors.values())).dtype
        # One layer, not the model's depth: the skeleton's own layers are replaced by every path.
        skeleton_config = copy.deepcopy(self.config)
        skeleton_config.num_hidden_layers = 1
        if self.layer_types is not None:
            skeleton_config.layer_types = self.layer_types[:1]
        self.model = AutoModelForCausalLM.from_config(
            skeleton_config, dtype=dtype, trust_remote_code=trust_remote_code
        ).to(session.device)
        self.model.eval()
        self._stacks: dict[str, nn.ModuleList] = {}

    def build(self, path: LayerPath) -> nn.Module:
        """The live model rewired to `path` (the same module object every time, so an lm-eval wrapper of it
        scores whichever path was built last)."""
        for slot in path.slots:
            if slot.model not in self.session.checkpoints:
                raise ValueError(f"layer path reads {slot.model}, which is not loaded in this session")
            if not 0 <= slot.layer < self.session.num_layers:
                raise ValueError(f"layer path reads layer {slot.layer} of {self.session.num_layers}")
        views = [slot_view(self._stack(slot.model)[slot.layer], i, slot.scale) for i, slot in enumerate(path.slots)]
        self.model.set_submodule(self.stack_name, nn.ModuleList(views))
        config = self.model.config
        config.num_hidden_layers = len(path)
        if self.layer_types is not None:  # a slot keeps its layer's kind (sliding window or full attention)
            config.layer_types = [self.layer_types[slot.layer] for slot in path.slots]
        # mergekit takes the pre-layer tensors from the first slice's model, the post-layer ones from the last's
        for names, model in ((self.pre, path.slots[0].model), (self.post, path.slots[-1].model)):
            tensors = self.session.checkpoints[model].tensors
            for name in names:
                owner, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(owner), attr, nn.Parameter(tensors[name], requires_grad=False))
        if getattr(config, "tie_word_embeddings", False):
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
        return self.model

    def _stack(self, ref: str) -> nn.ModuleList:
        """`ref`'s decoder layers as modules over the session's tensors, built on first use."""
        if ref not in self._stacks:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                shell = AutoModelForCausalLM.from_config(self.config, trust_remote_code=self.trust_remote_code)
            tensors = self.session.checkpoints[ref].tensors
            layer_tensors = {name: tensors[name] for name in tensors if architecture.layer_index(name) is not None}
            shell.load_state_dict(layer_tensors, strict=False, assign=True)
            stack = shell.get_submodule(self.stack_name)
            unset = next((n for n, t in chain(stack.named_parameters(), stack.named_buffers()) if t.is_meta), None)
            if unset is not None:
                raise InputError(ref, None, f"layer tensor {unset} is not in the checkpoint: cannot build a path")
            self._stacks[ref] = stack
        return self._stacks[ref]


def slot_view(layer: nn.Module, index: int, scale: float) -> nn.Module:
    """`layer` as slot `index` of a path: its parameters shared, its cache index (`layer_idx`, wherever a module
    keeps one) set to the slot, and its residual outputs scaled when `scale` is not 1."""
    view = _own_children(layer)
    if hasattr(view, "layer_idx"):
        view.layer_idx = index
    submodules = list(layer.named_modules())[1:]
    for name, module in submodules:
        if hasattr(module, "layer_idx"):
            _replace(view, name, lambda m: _with_index(m, index))
    if scale != 1.0:
        for name, _ in submodules:
            if name.rpartition(".")[2] in RESIDUAL_OUTPUTS:
                _replace(view, name, lambda m: ScaledOutput(m, scale))
    return view


def _own_children(module: nn.Module) -> nn.Module:
    """A shallow copy whose child table is its own: replacing a child leaves the original untouched."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def _with_index(module: nn.Module, index: int) -> nn.Module:
    clone = _own_children(module)
    clone.layer_idx = index
    return clone


def _replace(root: nn.Module, name: str, make) -> None:
    """Replace submodule `name` of `root` by make(it), copying each module on the way down first so that the
    shared source layer never changes (root itself is already a copy)."""
    parent = root
    *ancestors, leaf = name.split(".")
    for part in ancestors:
        child = _own_children(parent._modules[part])
        parent._modules[part] = child
        parent = child
    parent._modules[leaf] = make(parent._modules[leaf])
