"""The paper's test errors (%), keyed by what a run is.

From He et al. 2016, Tables 1-4 (CIFAR, medians of 5 runs; "fail" = above
20%) and Table 5 (ImageNet, single 320x320 crop, top-1/top-5). A
row of a report gets the number of the paper's net it runs or, at
``scale=short``, stands for (see ``configs/scale``).
"""

from __future__ import annotations

from typing import Any

from resnet_exp.errors import UserError
from resnet_exp.models import ShortcutSpec, resolve_unit

FAIL = "fail (>20%)"
# (dataset, block, net, shortcut, batch size) -> error
PaperKey = tuple[str, str, str, str, int]

_TABLE2 = {
    # ordering: (ResNet-110, ResNet-164)
    "original": ("6.61", "5.93"),
    "bn_after_add": ("8.17", "6.50"),
    "relu_before_add": ("7.84", "6.14"),
    "relu_only_preact": ("6.71", "5.91"),
    "preact": ("6.37", "5.46"),
}
_TABLE1 = {
    "scaling(0/1)": FAIL,  # a plain net
    "scaling(0.5/1)": FAIL,
    "scaling(0.5/0.5)": "12.35",
    "exclusive_gating(b_g=-6)": "8.70",
    "exclusive_gating(b_g=-7)": "9.81",
    **{f"exclusive_gating(b_g={b})": FAIL for b in range(-5, 1)},
    "shortcut_gating(b_g=-6)": "6.91",
    "shortcut_gating(b_g=0)": "12.86",
    "conv1x1": "12.22",
    "dropout(p=0.5)": FAIL,
}
_TABLE3 = {
    ("cifar10", "original", "resnet110_single"): "9.90",
    ("cifar10", "preact", "resnet110_single"): "8.91",
    ("cifar100", "original", "resnet164"): "25.16",
    ("cifar100", "preact", "resnet164"): "24.33",
    ("cifar10", "original", "resnet1001"): "7.61",
    ("cifar10", "preact", "resnet1001"): "4.92 (mean 4.89 ± 0.14)",
    ("cifar100", "original", "resnet1001"): "27.82",
    ("cifar100", "preact", "resnet1001"): "22.71 (mean 22.68 ± 0.22)",
}

# Table 5, ImageNet val, single 320x320 crop: top-1/top-5 error
TABLE5 = {
    ("original", "resnet200"): "21.8/6.0",
    ("preact", "resnet152"): "21.1/5.5",
    ("preact", "resnet200"): "20.7/5.3",
}
IMAGENET_NETS = {152: "resnet152", 200: "resnet200"}
IMAGENET_BATCH = 256  # the recipe's; other batches scale the lr linearly (same number)

PAPER: dict[PaperKey, str] = {
    **{("imagenet", b, net, "identity", IMAGENET_BATCH): e for (b, net), e in TABLE5.items()},
    **{
        ("cifar10", block, net, "identity", 128): err
        for block, errs in _TABLE2.items()
        for net, err in zip(("resnet110", "resnet164"), errs)
    },
    **{("cifar10", "original", "resnet110", sc, 128): err for sc, err in _TABLE1.items()},
    **{(d, b, net, "identity", 128): err for (d, b, net), err in _TABLE3.items()},
    ("cifar10", "preact", "resnet1001", "identity", 64): "4.62 (mean 4.69 ± 0.20)",
}


def paper_net(config: dict[str, Any]) -> str | None:
    """The paper's net a run is, or stands for at its scale (flattened config)."""
    depth = config.get("depth")
    if config.get("data.name") == "imagenet":
        return IMAGENET_NETS.get(depth)  # type: ignore[arg-type]
    try:
        unit, _ = resolve_unit(int(depth), str(config.get("model.unit", "auto")))  # type: ignore[arg-type]
    except (UserError, TypeError, ValueError):
        return None
    for net, full, kind in (("resnet110", 110, "basic"), ("resnet164", 164, "bottleneck"),
                            ("resnet1001", 1001, "bottleneck")):  # fmt: skip
        if depth != config.get(f"scale.{net}", full):
            continue
        if unit == kind:
            return net
        if net == "resnet110" and unit == "single":
            return "resnet110_single"
    return None


def shortcut_text(config: dict[str, Any]) -> str:
    fields = {k.split(".")[-1]: v for k, v in config.items() if k.startswith("model.shortcut.")}
    try:
        return ShortcutSpec(**fields).describe()
    except (UserError, TypeError, ValueError):
        return str(fields.get("name", "identity"))


def paper_error(config: dict[str, Any]) -> str | None:
    net = paper_net(config)
    if net is None:
        return None
    key = (
        str(config.get("data.name")),
        str(config.get("model.block")),
        net,
        shortcut_text(config),
        IMAGENET_BATCH if key_is_imagenet(config) else int(config.get("data.batch_size") or 0),
    )
    return PAPER.get(key)


def key_is_imagenet(config: dict[str, Any]) -> bool:
    return config.get("data.name") == "imagenet"


# The recipe's departures from the paper's, as a report names them: (key, its text, or
# None where the key's value is the paper's). Keys beyond the paper default to off.
_RECIPE = (
    ("schedule.name", lambda v: None if v in (None, "paper") else str(v)),
    ("optimizer.name", lambda v: None if v in (None, "sgd") else str(v)),
    ("trainer.label_smoothing", lambda v: f"label smoothing {v:.3g}" if v else None),
    ("trainer.ema.decay", lambda v: f"EMA {v:.6g}" if v else None),
    ("data.cutout", lambda v: f"cutout {v}" if v else None),
    ("data.mixup_alpha", lambda v: f"mixup {v:.3g}" if v else None),
    ("data.cutmix_alpha", lambda v: f"cutmix {v:.3g}" if v else None),
)
RECIPE_KEYS = tuple(k for k, _ in _RECIPE)


def recipe_text(config: dict[str, Any]) -> str:
    """``paper recipe``, or what a run changes of it: ``cosine + label smoothing 0.1 + ...``."""
    parts = [text(config.get(key)) for key, text in _RECIPE]
    changed = [p for p in parts if p]
    return " + ".join(changed) if changed else "paper recipe"
