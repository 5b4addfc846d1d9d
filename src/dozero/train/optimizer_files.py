"""AdamW's state on disk, apart from the weights: its moments as flat tensors ("<position>.exp_avg", the
position of the parameter in the optimizer's groups) in safetensors, its groups (lr, betas, ...) as
JSON. Loading checks the state fits this optimizer, shape and dtype of every moment, so a checkpoint of
another model shape is one line instead of a silent mismatch or a crash of the fused kernel.

    tensors, groups = optimizer_to_files(optimizer)                 # save (dozero.train.checkpoint)
    optimizer_from_files(optimizer, tensors, groups, where)         # load, checked
    tensors, groups = moments_by_position(by_name, groups, model, optimizer, where)   # a sharded checkpoint's
"""

from __future__ import annotations

import torch

from dozero.errors import DozeroError


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer's state_dict into flat tensors ("<param index>.<name>") and JSON groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict, groups: list[dict], where) -> None:
    """Load a state split by `optimizer_to_files`, after checking that it fits this optimizer: the
    same groups, and for every parameter moments of its shape and dtype. (load_state_dict checks
    only the group sizes: a state of another shape trained on silently, or crashed the fused kernel.)"""
    own = [len(g["params"]) for g in optimizer.param_groups]
    saved = [len(g["params"]) for g in groups]
    if own != saved:
        raise DozeroError(
            f"{where}: parameter groups of sizes {saved}, but this model's optimizer has {own}; "
            "the checkpoint is from another model shape"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            raise DozeroError(f"{where}: '{key}' names no parameter of this model ({len(params)} parameters)")
        p = params[int(index)]
        expected = ((), torch.float32) if name == "step" else (tuple(p.shape), p.dtype)
        if (tuple(value.shape), value.dtype) != expected:
            raise DozeroError(
                f"{where}: '{key}' is {tuple(value.shape)} {value.dtype}, but this model needs {expected[0]} "
                f"{expected[1]}; the checkpoint is from another model shape"
            )
        state.setdefault(int(index), {})[name] = value
    names = {frozenset(s) for s in state.values()}
    if state and (len(state) != len(params) or len(names) != 1):
        raise DozeroError(f"{where}: the optimizer state covers {len(state)} of {len(params)} parameters unevenly")
    # The settings are this run's (its train_config.json), not the checkpoint's: load_state_dict would put
    # back the saved betas and weight decay, silently undoing a resume's --beta2 or --weight-decay. (Unchanged
    # flags give the same values: an exact resume stays exact. The schedule sets lr every step.)
    groups = [
        {**saved, **{k: v for k, v in own.items() if k != "params"}}
        for saved, own in zip(groups, optimizer.param_groups, strict=True)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def moments_by_position(by_name: dict, groups: list[dict], model, optimizer, where) -> tuple[dict, list[dict]]:
    """A sharded checkpoint's moments ("<name>/exp_avg") in the layout `optimizer_from_files` checks and
    loads ("<position>.exp_avg", positions in this optimizer's groups). The saved groups give the
    settings (lr, betas, ...) only: which parameter sits where is this optimizer's own business, and
    the ranks that wrote the checkpoint may each have held a part (pipeline stages)."""
    if len(groups) != len(optimizer.param_groups):
        raise DozeroError(f"{where}: {len(groups)} optimizer groups, this model has {len(optimizer.param_groups)}")
    order = [p for g in optimizer.param_groups for p in g["params"]]
    position = {id(p): i for i, p in enumerate(order)}
    # Every name of a parameter: a tied head is saved as out_head.weight by the stage that holds it.
    index_of = {
        name: position[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in position
    }
    tensors = {}
    for key, value in by_name.items():
        name, _, moment = key.rpartition("/")
        if name not in index_of:
            raise DozeroError(
                f"{where}: 'optimizer/{key}' names no parameter of this model; "
                "the checkpoint is from another model shape"
            )
        tensors[f"{index_of[name]}.{moment}"] = value
    start, numbered = 0, []
    for own, saved in zip(optimizer.param_groups, groups, strict=True):
        numbered.append({**saved, "params": list(range(start, start + len(own["params"])))})
        start += len(own["params"])
    return tensors, numbered
