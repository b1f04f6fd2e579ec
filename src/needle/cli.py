"""``python -m needle``: train a model, evaluate a checkpoint, or show what a checkpoint holds.

Bad input (unknown model, missing data folder, a folder without the expected files, an
unreadable or mismatched checkpoint) prints one line and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


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
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--momentum", type=float, default=defaults.momentum)
    train.add_argument("--augment", action="store_true", help="random crops (and flips for "
                       "CIFAR-10) of the training images")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--out", default=defaults.out, help="folder for checkpoint.npz, "
                       "metrics.csv and curves.png")
    train.add_argument("--resume", metavar="PATH", help="continue from a checkpoint")
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


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"--{name} must be positive, got {value}")


def _train(args: argparse.Namespace) -> int:
    from .apps.trainer import TrainConfig, Trainer

    for name in ("epochs", "batch_size", "lr"):
        _positive(name.replace("_", "-"), getattr(args, name))
    cfg = TrainConfig(model=args.model, data=args.data, epochs=args.epochs,
                      batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      weight_decay=args.weight_decay, momentum=args.momentum,
                      augment=args.augment, seed=args.seed, out=args.out, mode=args.mode,
                      quiet=args.quiet)
    trainer = Trainer(cfg)
    if args.resume:
        trainer.resume(args.resume)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m needle`` and the ``needle`` console script."""
    args = _parser().parse_args(argv)
    from .apps.sources import DataSourceError
    from .apps.trainer import CheckpointMismatchError
    from .checkpoint import CheckpointError

    try:
        return {"train": _train, "eval": _eval, "info": _info}[args.command](args)
    except (DataSourceError, CheckpointError, CheckpointMismatchError, FileNotFoundError,
            ValueError) as exc:
        print(f"needle {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("needle: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
