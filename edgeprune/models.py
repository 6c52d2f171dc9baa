"""Model loading: the bundled demo model, any timm name, or a user's `pkg.module:factory`.

`load_model` returns an `nn.Module` in eval mode on the CPU, with a checkpoint applied if one is given.
Every problem a user can cause (unknown name, missing or corrupt checkpoint, a checkpoint for another
architecture, no internet for hub weights) is raised as an `EdgepruneError` with a one-line message.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import pickle
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

import edgeprune.zoo  # noqa: F401  (registers the fmnist_* models in timm)
from edgeprune.errors import EdgepruneError
from edgeprune.zoo import bundled_weights

DEMO_MODEL = "fmnist_resnet"
MODEL_SPECS = "'demo', a timm name (e.g. resnet18, timm:vit_tiny_patch16_224) or 'pkg.module:factory'"

# Wrappers a training script may put around the state_dict, tried in this order.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")

# Model family from the class name (timm and torchvision use the same names for the same families).
# Subclasses resolve through their MRO; anything else is "generic" and gets only the default rules.
FAMILIES: dict[str, str] = {
    "ResNet": "resnet",
    "ResNetV2": "resnet",
    "VGG": "vgg",
    "VisionTransformer": "vit",
    "VisionTransformerDistilled": "vit",
    "Eva": "vit",
    "Beit": "vit",
    "SwinTransformer": "swin",
    "SwinTransformerV2": "swin",
    "Levit": "levit",
    "LevitDistilled": "levit",
    "MobileNetV3": "mobilenetv3",
    "MobileNetV2": "mobilenetv2",
    "EfficientNet": "efficientnet",
    "ConvNeXt": "convnext",
    "RegNet": "regnet",
    "DenseNet": "densenet",
    "MobileVit": "mobilevit",
    "GhostNet": "ghostnet",
}


def model_family(model: nn.Module) -> str:
    """'resnet', 'vgg', 'vit', 'swin', 'mobilenetv3', … from the model's class (or a base class); else 'generic'."""
    for cls in type(model).__mro__:
        family = FAMILIES.get(cls.__name__)
        if family is not None:
            return family
    return "generic"


def load_model(
    spec: str = "demo",
    *,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Build the model named by `spec` and load `checkpoint` into it; returned in eval mode on the CPU.

    - `demo`: `fmnist_resnet` with its bundled Fashion-MNIST weights (10 classes; the grey stem is
      adapted with timm's `adapt_input_conv` if `in_chans` asks for more channels).
    - a timm name, optionally prefixed `timm:`; `img_size` goes only to models that take it (ViT, Swin…).
      `pretrained=True` downloads timm's weights from the Hugging Face hub.
    - `pkg.module:factory` (or `path/to/file.py:factory`): calls the factory with whichever of
      `num_classes`, `in_chans`, `img_size`, `pretrained` its signature accepts.
    """
    spec = spec.strip()
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    if spec == "demo":
        model = _demo_model(num_classes, in_chans, use_bundled=checkpoint is None)
    elif spec.startswith("timm:") or ":" not in spec:
        name = spec[len("timm:") :] if spec.startswith("timm:") else spec
        model = _timm_model(name, kwargs, img_size, pretrained)
    else:
        model = _factory_model(spec, {**kwargs, "img_size": img_size, "pretrained": pretrained})
    if not isinstance(model, nn.Module):
        raise EdgepruneError(f"model '{spec}' is a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, spec=spec)
    else:  # a factory or hub download can hand over NaN too; the checkpoint path checks its own tensors
        check_finite(model.state_dict(), f"model '{spec}'", "check the factory or the downloaded weights")
    return model.cpu().eval()


# ----------------------------------------------------------------------------------------------- sources


def _demo_model(num_classes: int | None, in_chans: int | None, *, use_bundled: bool) -> nn.Module:
    if not use_bundled:  # the user's checkpoint replaces the weights: build exactly what they asked for
        kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
        return timm.create_model(DEMO_MODEL, **kwargs)
    model = timm.create_model(DEMO_MODEL)  # 1 channel, 10 classes: the bundled weights' shapes
    if num_classes is not None and num_classes != model.num_classes:
        raise EdgepruneError(
            f"the demo model classifies the {model.num_classes} Fashion-MNIST classes but {num_classes} were "
            f"asked for; use --model {DEMO_MODEL} --num-classes {num_classes} with --checkpoint, or a timm name"
        )
    weights = bundled_weights(DEMO_MODEL)
    if weights is None:
        raise EdgepruneError(
            f"the demo model's weights ({DEMO_MODEL}.pt) are missing from the package; reinstall edgeprune "
            f"or run `python scripts/train_reference.py --models {DEMO_MODEL} --out edgeprune/assets`"
        )
    load_checkpoint(model, weights, spec="demo")
    if in_chans is not None and in_chans != model.in_chans:
        # Same move timm makes for pretrained stems: spread the grey filter over the new channels.
        old = model.conv1
        new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        with torch.no_grad():
            new.weight.copy_(adapt_input_conv(in_chans, old.weight.detach(), base_chans=old.in_channels))
        model.conv1 = new
        model.in_chans = in_chans
        size = model.pretrained_cfg["input_size"][1:]
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (in_chans, *size)}
    return model


def _timm_model(name: str, kwargs: dict[str, Any], img_size: int | None, pretrained: bool) -> nn.Module:
    if not name:
        raise EdgepruneError(f"empty model name; use {MODEL_SPECS}")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models() for the names"
        raise EdgepruneError(f"unknown model '{name}': not a timm model name{hint}")
    try:
        return _create_timm(name, kwargs, img_size, pretrained)
    except EdgepruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        if pretrained:
            raise EdgepruneError(
                f"could not get pretrained weights for {name} from the Hugging Face hub "
                f"({type(exc).__name__}: {first}); check the internet connection, or drop --pretrained and "
                "pass --checkpoint"
            ) from exc
        raise EdgepruneError(f"timm could not build {name} with {kwargs}: {first}") from exc


def _create_timm(name: str, kwargs: dict[str, Any], img_size: int | None, pretrained: bool) -> nn.Module:
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError as exc:
            # CNNs take any input size and have no img_size argument; transformers need it at creation.
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise EdgepruneError(f"model spec '{spec}' is not 'pkg.module:factory'; use {MODEL_SPECS}")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise EdgepruneError(f"model file not found: {path}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's file can raise anything
            raise EdgepruneError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = _import_module(module_name)
        except ModuleNotFoundError as exc:
            raise EdgepruneError(
                f"cannot import '{module_name}' for --model {spec} ({exc}); run from the folder that holds it "
                "or add it to PYTHONPATH"
            ) from exc
        except Exception as exc:  # noqa: BLE001
            raise EdgepruneError(f"importing '{module_name}' failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise EdgepruneError(f"module '{module_name}' has no attribute '{attr}'")
    if not callable(factory):
        raise EdgepruneError(f"'{spec}' is not callable; it must be a function or class that returns an nn.Module")
    return factory


def _import_module(name: str) -> Any:
    """Import `name`; a console script's sys.path lacks the working directory, so retry with it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        cwd = str(Path.cwd())
        if cwd in sys.path:
            raise
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(cwd)


def _factory_model(spec: str, wanted: dict[str, Any]) -> Any:
    factory = _import_factory(spec)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature: call without arguments
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # Pass only what the factory accepts, and skip unset values so its own defaults apply.
    kwargs = {k: v for k, v in wanted.items() if (k in params or takes_any) and v not in (None, False)}
    try:
        return factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's factory can raise anything
        raise EdgepruneError(f"{spec}({_fmt_kwargs(kwargs)}) failed: {type(exc).__name__}: {exc}") from exc


def _fmt_kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


# ----------------------------------------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (raw state_dict or wrapped in state_dict/model/…), prefixes stripped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgepruneError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":  # timm's hub format; a flat dict of tensors, no pickle at all
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise EdgepruneError(f"{path} is not a readable safetensors checkpoint ({exc})") from exc
    else:
        obj = _torch_load(path)
    state = _unwrap(obj)
    if state is None:
        raise EdgepruneError(
            f"checkpoint {path} contains no state_dict (expected a dict of tensors, or one under "
            f"{'/'.join(_STATE_DICT_KEYS)})"
        )
    return state


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a pickled nn.Module or other object, refused by weights_only
            raise EdgepruneError(
                f"checkpoint {path} holds pickled Python objects, not only tensors; save "
                "`model.state_dict()` with torch.save and pass that file"
            ) from exc
        raise EdgepruneError(f"{path} is not a PyTorch checkpoint (cannot unpickle it)") from exc
    except Exception as exc:  # noqa: BLE001 - the unpickler raises anything (IndexError, KeyError, …) on garbage
        raise EdgepruneError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}); check the file") from exc


def _unwrap(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, Mapping):
        return None
    for key in _STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        return None
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str | Path, *, spec: str = "the model") -> None:
    """Load a checkpoint into `model` strictly; a mismatch names how many keys differ and the first one."""
    state = read_checkpoint(path)
    own = model.state_dict()
    # BatchNorm's step counter is absent from some older checkpoints and never affects outputs.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        total = len(missing) + len(unexpected) + len(shape)
        if shape:
            k = shape[0]
            first = f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
            hint = _shape_hint(model, k, state[k], own[k])
        elif missing:
            first, hint = f"{missing[0]} missing from the checkpoint", "is it for another architecture?"
        else:
            first, hint = f"unexpected key {unexpected[0]}", "is it for another architecture?"
        raise EdgepruneError(
            f"checkpoint {Path(path).name} does not fit {spec}: {total} of {len(own)} keys mismatch "
            f"(first: {first}); {hint}"
        )
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    # After the cast: a float64 1e300 becomes a float32 Inf here.
    check_finite(state, f"checkpoint {Path(path).name}", "re-save it from a healthy training run")
    model.load_state_dict(state, strict=False)


def check_finite(state: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    """Raise `EdgepruneError` naming the first floating tensor holding NaN or Inf (and how many others do).

    Without this a NaN weight surfaces much later and by accident (a zero count, a parity check).
    """
    bad: list[tuple[str, int, int]] = []
    for name, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            bad.append((name, nan, int(t.numel() - torch.isfinite(t).sum()) - nan))
    if not bad:
        return
    name, nan, inf = bad[0]
    counts = " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if p)
    more = f" ({len(bad) - 1} more tensors too)" if len(bad) > 1 else ""
    values = "value" if nan + inf == 1 else "values"
    raise EdgepruneError(f"{what}: tensor '{name}' has {counts} {values}{more}; {fix}")


def _shape_hint(model: nn.Module, key: str, theirs: torch.Tensor, ours: torch.Tensor) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or ""
    first_conv = cfg.get("first_conv") or ""
    last_weight = _last_weight_key(model)
    if (classifier and key.startswith(classifier + ".")) or key.startswith(last_weight.rsplit(".", 1)[0] + "."):
        return f"pass --num-classes {theirs.shape[0]} to match it"
    if (first_conv and key.startswith(first_conv + ".")) and theirs.ndim == 4 and theirs.shape[0] == ours.shape[0]:
        return f"pass --in-chans {theirs.shape[1]} to match it"
    return "is it for another architecture or width? check --model"


def _last_weight_key(model: nn.Module) -> str:
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim >= 2]
    return names[-1] if names else ""
