"""`python -m tuning.train`: one training run (a teacher, a student, or a baseline)."""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from data import DataError
from tuning.checkpoint import atomic_write_text
from tuning.config import RunConfig, UserError
from tuning.trainer import CHECKPOINT_NAME, MODEL_NAME, DivergedError, train

HELP = {
    "method": "ce (a teacher or a scratch student), kd, alignkd or jointrd",
    "shortcut": "all (a ResNet), none (Plain-CNN), downsample (projections kept)",
    "teacher": "a trained teacher's model.pt (needed by kd, alignkd, jointrd)",
    "data_path": "the .npz file for --dataset npz, or an Imagewoof folder",
    "device": "auto, cpu or cuda[:N]",
    "checkpoint_interval_s": "seconds of training between checkpoints (default 30; 0: every "
                             "epoch); the last epoch always writes one",
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, with the fix, and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}; see `python -m {self.prog} --help`\n")


def _field_type(f) -> Any:
    hint = typing.get_type_hints(RunConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser() -> Parser:
    parser = Parser(prog="tuning.train", description=__doc__,
                    argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="a YAML run config; flags override its values")
    parser.add_argument("--out", help="run directory (default runs/<method>-<dataset>-...)")
    parser.add_argument("--resume", action="store_true", default=False,
                        help="continue the stopped run in --out from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", default=False,
                        help="no per-epoch lines or progress bar")
    parser.add_argument("--no-test", action="store_true", default=False,
                        help="skip the test-split evaluation at the end")
    for f in fields(RunConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                help=HELP.get(f.name))
        else:
            parser.add_argument(flag, type=kind, help=HELP.get(f.name, f"default {f.default}"))
    return parser


def default_run_dir(cfg: RunConfig) -> Path:
    net = "resnet" if cfg.shortcut == "all" else "plain"
    return Path("runs") / f"{cfg.method}-{cfg.dataset}-{net}{cfg.depth}-w{cfg.width}-s{cfg.seed}"


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    eta = f"  eta {metrics['eta']:.3f}" if metrics["eta"] == metrics["eta"] else ""
    return (f"epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  "
            f"train_acc {metrics['train_acc']:.4f}  val_acc {metrics['val_acc']:.4f}  "
            f"lr {metrics['lr']:.4g}{eta}  {metrics['epoch_time']:.1f}s  "
            f"{metrics['images_per_s']:,.0f} img/s")


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_file, out = args.pop("config", None), args.pop("out", None)
    resume, quiet, no_test = args.pop("resume"), args.pop("quiet"), args.pop("no_test")
    try:
        if resume:
            if out is None:
                raise UserError("--resume needs --out DIR: the run directory to continue")
            ckpt = Path(out) / CHECKPOINT_NAME
            if not ckpt.exists() and not ckpt.with_name(CHECKPOINT_NAME + ".prev").exists():
                raise UserError(f"no checkpoint to resume in {out}; start the run without "
                                "--resume")
            cfg = RunConfig.from_yaml(Path(out) / "config.yaml")
        else:
            values = RunConfig.from_yaml(config_file).to_dict() if config_file else {}
            cfg = RunConfig.from_dict({**values, **args}, source="flags")
        run_dir = Path(out) if out else default_run_dir(cfg)
        if not resume and ((run_dir / CHECKPOINT_NAME).exists() or (run_dir / MODEL_NAME).exists()):
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it, "
                            "or --out NEW_DIR for a new one")
        listeners = []
        if not resume:
            def write_config(metrics: dict, ckpt: Path | None) -> None:
                if metrics["epoch"] == 1:
                    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
            listeners.append(write_config)
        if not quiet:
            listeners.append(lambda m, saved: print(
                epoch_line(m, cfg.epochs) + ("  (checkpoint)" if saved else ""), flush=True))
        final = train(cfg, run_dir, listeners=listeners, evaluate_test=not no_test, quiet=quiet,
                      resume_from=run_dir / CHECKPOINT_NAME if resume else None)
    except (UserError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        where = f" --out {out}" if out else ""
        print(f"\ninterrupted; continue with `python -m tuning.train --resume{where}`",
              file=sys.stderr)
        return 130
    test = f", test_acc {final['test_acc']:.4f}" if "test_acc" in final else ""
    print(f"done: best val_acc {final['best_val_acc']:.4f} (last {final['last_val_acc']:.4f})"
          f"{test}; train {final['train_time']:.1f}s, eval {final['eval_time']:.1f}s, "
          f"{final.get('images_per_s', 0):,.0f} img/s -> {run_dir / MODEL_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
