"""``python -m needle``: train a model, evaluate a checkpoint, or show what a checkpoint holds.

Exit status: 0 on success; 2 for bad input (unknown model, missing data folder, a folder
without the expected files, an unreadable, bad or mismatched checkpoint, an output folder that
cannot be written or holds an earlier run), with one line on stderr and no traceback; 3 when
training diverged (the loss became NaN or infinite: nothing is saved after that, the last
checkpoint stays as it was); 130 on Ctrl-C; 141 (128 + SIGPIPE) when the reader of stdout
went away (``needle info ckpt | head``), quietly, as Unix tools do.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a tool killed by SIGPIPE


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    from .apps.models import MODEL_NAMES
    from .apps.sources import DATA_HELP
    from .apps.trainer import MODES, OPTIMIZERS, TrainConfig

    defaults = TrainConfig()
    parser = _Parser(prog="needle", description="needle: train and inspect models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (default: MLP-ResNet on bundled digits)")
    train.add_argument("--model", choices=MODEL_NAMES, default=defaults.model)
    train.add_argument("--data", default=defaults.data, help=DATA_HELP)
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    # default None: with --resume, only values given explicitly replace the checkpoint's
    resumed = "; with --resume, the checkpoint's unless given"
    train.add_argument("--lr", type=float, default=None,
                       help=f"learning rate (default {defaults.lr:g}{resumed})")
    train.add_argument("--weight-decay", type=float, default=None,
                       help=f"default {defaults.weight_decay:g}{resumed}")
    train.add_argument("--momentum", type=float, default=None,
                       help=f"SGD momentum in [0, 1) (default {defaults.momentum:g}{resumed})")
    train.add_argument("--augment", action="store_true", help="random crops (and flips for "
                       "CIFAR-10) of the training images")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--out", default=defaults.out, help="folder for checkpoint.npz, "
                       "metrics.csv and curves.png")
    train.add_argument("--resume", metavar="PATH", help="continue from a checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace the checkpoint and "
                       "metrics of an earlier run in --out (refused otherwise)")
    train.add_argument("--mode", choices=MODES, default=defaults.mode,
                       help="how the model runs: eager autodiff, or the training step compiled "
                       "by ndl.jit")
    train.add_argument("--quiet", action="store_true", help="print only the final result")

    ev = sub.add_parser("eval", help="accuracy and loss of a checkpoint on test data")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", default=None, help=f"{DATA_HELP} (default: the training data)")
    ev.add_argument("--batch-size", type=int, default=256)

    info = sub.add_parser("info", help="what a checkpoint holds")
    info.add_argument("checkpoint")
    return parser


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"--{name} must be positive, got {value}")


def _train(args: argparse.Namespace) -> int:
    from .apps.trainer import (
        RESUMABLE_HYPERPARAMS,
        TrainConfig,
        Trainer,
        check_hyperparams,
        check_output_folder,
    )

    for name in ("epochs", "batch_size"):
        _positive(name.replace("_", "-"), getattr(args, name))
    given = {name: getattr(args, name) for name in RESUMABLE_HYPERPARAMS
             if getattr(args, name) is not None}
    check_hyperparams(given)
    check_output_folder(args.out, args.resume, args.overwrite)
    defaults = TrainConfig()
    values = {name: given.get(name, getattr(defaults, name)) for name in RESUMABLE_HYPERPARAMS}
    cfg = TrainConfig(model=args.model, data=args.data, epochs=args.epochs,
                      batch_size=args.batch_size, optimizer=args.optimizer, **values,
                      augment=args.augment, seed=args.seed, out=args.out, mode=args.mode,
                      quiet=args.quiet)
    trainer = Trainer(cfg)
    if args.resume:
        trainer.resume(args.resume, overrides=given)
    result = trainer.fit()
    acc = result["test_acc"]
    print(f"final test accuracy: {acc:.4f} ({cfg.model} on {trainer.split.spec}, "
          f"{result['epochs']} epochs; checkpoint {result['checkpoint']})" if acc is not None
          else "nothing to train: the checkpoint already has all epochs")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .apps.trainer import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size)
    print(f"{r['model']} on {r['data']} ({r['examples']} test examples, trained "
          f"{r['epoch']} epochs): accuracy {r['test_acc']:.4f}, loss {r['test_loss']:.4f}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import checkpoint_info, format_info

    print(format_info(checkpoint_info(args.checkpoint)))
    return 0


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _quiet_broken_pipe() -> int:
    """stdout's reader is gone: point stdout at /dev/null (so the interpreter's final flush
    cannot fail again) and exit without a word."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m needle`` and the ``needle`` console script."""
    args = _parser().parse_args(argv)
    from .backend import tune_malloc

    tune_malloc()  # a program, unlike the library, may set process-wide malloc thresholds
    from .apps.sources import DataSourceError
    from .apps.trainer import CheckpointMismatchError, TrainingDivergedError
    from .checkpoint import CheckpointError

    command = f"needle {args.command}"
    try:
        status = {"train": _train, "eval": _eval, "info": _info}[args.command](args)
        sys.stdout.flush()  # here, so that a closed pipe is seen (and handled) now
        return status
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (DataSourceError, CheckpointError, CheckpointMismatchError, FileNotFoundError,
            ValueError) as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDivergedError as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_DIVERGED
    except OSError as exc:  # a file that cannot be read or written, in the system's words
        where = f"{exc.filename}: " if exc.filename is not None else ""
        reason = ("no space left on the device (the disk is full)" if exc.errno == errno.ENOSPC
                  else exc.strerror or str(exc))
        print(f"{command}: error: {where}{_one_line(reason)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("needle: interrupted; the last checkpoint is intact", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
