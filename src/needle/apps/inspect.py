"""``needle info``: what a checkpoint holds, in a few lines a person reads.

For a checkpoint of ``needle train``: the model and its parameter count, the data, the
optimizer's settings, the epochs trained, the last and best test accuracy, the file's format
and writer, and one line about its arrays (``--arrays`` lists them, ``--verify`` checks every
array's SHA-256). Any other needle checkpoint gets its items and arrays summarized. Only the
metadata is read (no array data) unless verifying.
"""

from __future__ import annotations

import os
from typing import Any, TypeGuard

import numpy as np

from ..checkpoint import checkpoint_info
from ..checkpoint.api import ArrayInfo, format_arrays, format_info, format_size, load_metadata
from .models import build_model

#: how many bad arrays the one-line report of --verify names before "and N more"
_NAMED_BAD = 5


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, (bool, np.bool_))


def _g(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    return f"{value:g}" if _number(value) else repr(value)


def _plural(n: float, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _is_training_checkpoint(values: dict) -> bool:
    config = values.get("config")
    identity = config.get("identity") if isinstance(config, dict) else None
    return isinstance(identity, dict) and isinstance(identity.get("model"), str)


def _parameter_names(identity: dict) -> set[str] | None:
    """The parameter names (not buffers) of the model the identity describes, or None when
    it cannot be built. NumPy's global RNG is left as it was."""
    shape, classes = identity.get("image_shape"), identity.get("num_classes")
    if not (isinstance(shape, list) and len(shape) == 3 and isinstance(classes, int)):
        return None
    state = np.random.get_state()
    try:
        model = build_model(identity["model"], (int(shape[0]), int(shape[1]), int(shape[2])),
                            classes)
        return {name for name, _ in model.named_parameters()}
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    finally:
        np.random.set_state(state)


def _model_line(identity: dict, weights: Any) -> str:
    shape, classes = identity.get("image_shape"), identity.get("num_classes")
    what = identity["model"]
    if isinstance(shape, list) and len(shape) == 3:
        what += f" for {'x'.join(str(n) for n in shape)} images"
    if isinstance(classes, int):
        what += f", {classes} classes"
    arrays = [a for a in weights.values() if isinstance(a, ArrayInfo)] \
        if isinstance(weights, dict) else []
    names = _parameter_names(identity)
    if names is None:
        total = sum(a.size for a in arrays)
        nbytes = sum(a.nbytes for a in arrays)
        return f"{what}: {total:,} values in {len(arrays)} arrays ({nbytes:,} bytes; " \
               "parameters and buffers)"
    params = [a for key, a in weights.items() if key in names and isinstance(a, ArrayInfo)]
    buffers = [a for key, a in weights.items() if key not in names and isinstance(a, ArrayInfo)]
    line = (f"{what}: {sum(a.size for a in params):,} parameters "
            f"({sum(a.nbytes for a in params):,} bytes)")
    if buffers:
        line += f" + {sum(a.size for a in buffers):,} buffer values"
    return line


def _optimizer_line(config: dict, optimizer: Any) -> str:
    hyper = optimizer.get("hyperparams") if isinstance(optimizer, dict) else None
    if not isinstance(hyper, dict):  # the config records the settings too
        hyper = {k: config[k] for k in ("lr", "weight_decay", "momentum") if k in config}
    first = [k for k in ("lr", "weight_decay", "momentum") if k in hyper]
    settings = [f"{k.replace('_', ' ')} {_g(hyper[k])}"
                for k in [*first, *(k for k in hyper if k not in first)]]
    name = config.get("optimizer")
    if not isinstance(name, str):
        name = optimizer.get("optimizer", "?") if isinstance(optimizer, dict) else "?"
    return f"{name}: {', '.join(settings)}" if settings else str(name)


def _rows(history: Any) -> list[dict]:
    if not isinstance(history, list):
        return []
    return [r for r in history if isinstance(r, dict) and _number(r.get("epoch"))
            and _number(r.get("test_acc"))]


def _training_lines(values: dict, info: dict) -> list[str]:
    config = values["config"]
    identity = config["identity"]
    lines = [f"  model      {_model_line(identity, values.get('model'))}"]
    data = [f"batch size {config['batch_size']}"] if _number(config.get("batch_size")) else []
    if isinstance(config.get("augment"), bool):
        data.append("augmented" if config["augment"] else "no augmentation")
    if _number(config.get("seed")):
        data.append(f"seed {config['seed']}")
    lines.append(f"  data       {config.get('data', '?')}"
                 + (f" ({', '.join(data)})" if data else ""))
    lines.append(f"  optimizer  {_optimizer_line(config, values.get('optimizer'))}")
    epoch, target = values.get("epoch"), config.get("epochs")
    if _number(epoch):
        trained = _plural(epoch, "epoch") if not _number(target) or epoch >= target \
            else f"{epoch} of {_plural(target, 'epoch')} (--resume to finish)"
        extra = [_plural(values["step"], "step")] if _number(values.get("step")) else []
        if isinstance(config.get("mode"), str):
            extra.append(f"{config['mode']} mode")
        resumed = config.get("resumed_at")
        if isinstance(resumed, list) and resumed:
            extra.append("resumed at epoch " + ", ".join(str(e) for e in resumed))
        lines.append(f"  trained    {trained}" + (f" ({'; '.join(extra)})" if extra else ""))
    rows = _rows(values.get("history"))
    if rows:
        last, best = rows[-1], max(rows, key=lambda r: r["test_acc"])
        loss = f"; last test loss {last['test_loss']:.4f}" \
            if _number(last.get("test_loss")) else ""
        lines.append(f"  test acc   last {last['test_acc']:.4f} (epoch {last['epoch']}), best "
                     f"{best['test_acc']:.4f} (epoch {best['epoch']}){loss}")
    lines.append(f"  file       {_file_line(info)}")
    return lines


def _file_line(info: dict) -> str:
    return (f"{info['format']} v{info['version']}, written by {info['writer'] or 'unknown'}, "
            f"{format_size(info['file_bytes'])} ({info['file_bytes']:,} bytes)")


def describe_checkpoint(path: str | os.PathLike, arrays: bool = False,
                        bad: dict[str, str] | None = None) -> str:
    """What ``needle info`` prints for ``path``: a summary, one line about the arrays and,
    with ``arrays``, one line per array (marking those named in ``bad``)."""
    info = checkpoint_info(path)
    values = load_metadata(path)
    if not _is_training_checkpoint(values):
        lines = [format_info(info, arrays=False)]
    else:
        lines = [f"{info['path']}: a checkpoint of `needle train`", *_training_lines(values, info)]
        hint = "" if arrays else "; --arrays lists them"
        lines.append(f"  arrays     {_plural(info['num_arrays'], 'array')}, "
                     f"{format_size(info['array_bytes'])} ({info['array_bytes']:,} bytes){hint}")
    if arrays:
        lines.extend(format_arrays(info["arrays"], bad, indent="    "))
    return "\n".join(lines)


def verification_report(path: str | os.PathLike, total: int,
                        bad: dict[str, str]) -> tuple[bool, str]:
    """``(ok, line)`` for the result of :func:`needle.checkpoint.api.verify_checkpoint`: all
    arrays match their SHA-256, or which do not (the first few by name)."""
    if not bad:
        if total <= 1:
            return True, ("checksums: OK, the one array matches its SHA-256" if total
                          else "checksums: OK (no arrays to check)")
        return True, f"checksums: OK, all {total:,} arrays match their SHA-256"
    named = [f"{name} ({_short(problem)})" for name, problem in list(bad.items())[:_NAMED_BAD]]
    more = f" and {len(bad) - _NAMED_BAD} more" if len(bad) > _NAMED_BAD else ""
    return False, (f"{os.fspath(path)}: {len(bad)} of {_plural(total, 'array')} fail "
                   f"verification: {', '.join(named)}{more}")


def _short(problem: str) -> str:
    if "checksum mismatch" in problem:
        return "SHA-256 mismatch"
    if "is missing" in problem:
        return "missing"
    return "unreadable"


__all__ = ["describe_checkpoint", "verification_report"]
