"""``python -m needle``: train a model (``--distributed`` under mpirun), evaluate a checkpoint,
show what a checkpoint holds, export it as a program or ONNX file, or serve remote Sessions.

``needle`` alone prints the help and exits 0, as pip does (git exits 1); ``needle --version``
prints ``needle <version>``.

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help texts end with ``(default: ...)``, except for flags and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) \
                or action.default is argparse.SUPPRESS or not action.help:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .apps.models import MODEL_NAMES
    from .apps.sources import DATA_HELP
    from .apps.trainer import MODES, OPTIMIZERS, TrainConfig

    defaults = TrainConfig()
    parser = _Parser(prog="needle", description="needle: train and inspect models",
                     formatter_class=_HelpFormatter,
                     epilog="run `needle COMMAND --help` for a command's options")
    parser.add_argument("--version", action="version", version=f"needle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    train = command("train", "train a model (default: MLP-ResNet on the bundled digits)")
    train.add_argument("--model", choices=MODEL_NAMES, default=defaults.model,
                       help="the network to train")
    train.add_argument("--data", default=defaults.data, help=DATA_HELP)
    train.add_argument("--epochs", type=int, default=defaults.epochs,
                       help="train until the run has this many epochs (with --resume: in all)")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="training examples per step")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                       help="the update rule")
    # default None: with --resume, only values given explicitly replace the checkpoint's;
    # the help shows the default a fresh run uses
    resumed = "; with --resume, the checkpoint's unless given"
    train.add_argument("--lr", type=float, default=None,
                       help=f"learning rate (default: {defaults.lr:g}{resumed})")
    train.add_argument("--weight-decay", type=float, default=None,
                       help=f"L2 weight decay (default: {defaults.weight_decay:g}{resumed})")
    train.add_argument("--momentum", type=float, default=None,
                       help=f"SGD momentum in [0, 1) (default: {defaults.momentum:g}{resumed})")
    train.add_argument("--augment", action="store_true", help="random crops (and flips for "
                       "CIFAR-10) of the training images")
    train.add_argument("--seed", type=int, default=defaults.seed,
                       help="seed of the weights, shuffling and augmentation")
    train.add_argument("--out", default=defaults.out, help="folder for checkpoint.npz, "
                       "metrics.csv and curves.png")
    train.add_argument("--resume", metavar="PATH", help="continue from a checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace the checkpoint and "
                       "metrics of an earlier run in --out (refused otherwise)")
    train.add_argument("--mode", choices=MODES, default=defaults.mode,
                       help="how the model runs: eager autodiff, or the training step compiled "
                       "by ndl.jit")
    train.add_argument("--tensorboard", metavar="DIR", help="also write the metrics as "
                       "TensorBoard event files into DIR (needs tensorboardX: pip install "
                       "'needle[tensorboard]')")
    train.add_argument("--quiet", action="store_true", help="print only the final result")
    train.add_argument("--distributed", action="store_true", help="data-parallel over the "
                       "processes of `mpirun -n N` (--batch-size is the global batch; rank 0 "
                       "prints and writes; needs 'needle[distributed]')")
    train.add_argument("--sync-bn", action="store_true", help="with --distributed: BatchNorm "
                       "statistics of the global batch (nn.SyncBatchNorm)")

    ev = command("eval", "accuracy and loss of a checkpoint on test data")
    ev.add_argument("checkpoint", help="a checkpoint.npz written by `needle train`")
    ev.add_argument("--data", default=None, help=f"{DATA_HELP} (default: the training data)")
    ev.add_argument("--batch-size", type=int, default=256, help="test examples per batch")

    info = command("info", "what a checkpoint holds: model, data, optimizer, accuracy, size")
    info.add_argument("checkpoint", help="a checkpoint file (.npz) written by needle")
    info.add_argument("--arrays", action="store_true", help="also list every array: name, "
                      "dtype, shape, size")
    info.add_argument("--verify", action="store_true", help="read every array and check its "
                      "SHA-256; exit 2 naming the bad ones on a mismatch")

    from .remote.serve import add_arguments as serve_arguments

    serve_arguments(command("serve", "serve remote Sessions (st.Session(target=ADDRESS)) and "
                            "a saved program's inference over gRPC; prints the address"))

    from .apps.export_command import add_arguments as export_arguments

    export_arguments(command("export", "a trained model as a needle program or an ONNX file "
                             "(eval mode, any batch size)"))
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
    if args.tensorboard:
        from .apps.reporting import require_tensorboard

        require_tensorboard()
        if os.path.exists(args.tensorboard) and not os.path.isdir(args.tensorboard):
            raise ValueError(f"--tensorboard {args.tensorboard}: is a file, not a folder")
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
    if args.distributed:
        from .apps.distributed_trainer import DistributedTrainer

        trainer: Trainer = DistributedTrainer(cfg, tensorboard=args.tensorboard,
                                              sync_bn=args.sync_bn)
    elif args.sync_bn:
        raise ValueError("--sync-bn needs --distributed")
    else:
        trainer = Trainer(cfg, tensorboard=args.tensorboard)
    speaks = getattr(trainer, "writes_outputs", True)  # a distributed run: rank 0 only
    if args.resume:
        trainer.resume(args.resume, overrides=given)
        if trainer.epoch >= cfg.epochs:
            how = "fewer" if trainer.epoch > cfg.epochs else "no more"
            had = f"{trainer.epoch} epoch{'' if trainer.epoch == 1 else 's'}"
            if speaks:
                print(f"the checkpoint already has {had}; --epochs {cfg.epochs} "
                      f"asks for {how}: nothing to train")
            return 0
    result = trainer.fit()
    if not speaks:
        return 0
    print(f"final test accuracy: {result['test_acc']:.4f} (best {result['best_test_acc']:.4f} "
          f"at epoch {result['best_epoch']}; {cfg.model} on {trainer.split.spec}, "
          f"{result['epochs']} epoch{'' if result['epochs'] == 1 else 's'}; checkpoint "
          f"{result['checkpoint']})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .apps.trainer import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size)
    print(f"{r['model']} on {r['data']} ({r['examples']} test examples, trained "
          f"{r['epoch']} epochs): accuracy {r['test_acc']:.4f}, loss {r['test_loss']:.4f}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .apps.inspect import describe_checkpoint, verification_report
    from .checkpoint import CheckpointError
    from .checkpoint.api import verify_checkpoint

    if not args.verify:
        print(describe_checkpoint(args.checkpoint, arrays=args.arrays))
        return 0
    total, bad = verify_checkpoint(args.checkpoint)
    ok, line = verification_report(args.checkpoint, total, bad)
    try:
        print(describe_checkpoint(args.checkpoint, arrays=args.arrays, bad=bad))
    except CheckpointError:
        if ok:
            raise
        # a bad array the summary reads (a NumPy scalar): the report below names it
    if ok:
        print(line)
        return 0
    sys.stdout.flush()
    print(f"needle info: error: {line}", file=sys.stderr)
    return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    from .remote.serve import serve

    try:
        return serve(args)
    except ImportError as exc:  # the remote extra (grpcio, protobuf) is not installed
        raise ValueError(str(exc)) from None


def _export(args: argparse.Namespace) -> int:
    from .apps.export_command import run

    return run(args)


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
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `needle` alone: the help, as pip does
        parser.print_help()
        return 0
    from .backend import tune_malloc

    tune_malloc()  # a program, unlike the library, may set process-wide malloc thresholds
    from .apps.sources import DataSourceError
    from .apps.trainer import CheckpointMismatchError, TrainingDivergedError
    from .checkpoint import CheckpointError

    command = f"needle {args.command}"
    try:
        status = {"train": _train, "eval": _eval, "info": _info,
                  "serve": _serve, "export": _export}[args.command](args)
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
