"""`python -m tuning.train`: one training run (a teacher, a student, or a baseline)."""

from __future__ import annotations

import argparse
import math
import sys
import typing
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

from data import DataError
from tuning.run.checkpoint import atomic_write_text, check_output_dir
from tuning.run.config import RunConfig, UserError
from tuning.run.console import Parser, refuse
from tuning.run.trainer import CHECKPOINT_NAME, MODEL_NAME, DivergedError, train

HELP = {
    "method": "ce (a teacher or a scratch student), kd, alignkd, jointrd or jointrd_released "
              "(JointRD as its authors released it)",
    "alpha": "the KL term's weight (default: kd 0.9, alignkd 0.5)",
    "temperature": "the KL term's temperature (default: kd 4, alignkd 1)",
    "dis_weight": "jointrd_released's weight on its feature terms (default 1e-3)",
    "shortcut": "all (a ResNet), none (Plain-CNN), downsample (projections kept)",
    "block": "the blocks' convs: plain (the default), dirac (a*delta + b*W) or repvgg "
             "(3x3 + 1x1 + identity branches, folded into 3x3 convs at export; needs "
             "--shortcut none)",
    "dirac": "the older spelling of --block dirac",
    "teacher": "a trained teacher's model.pt (needed by every method but ce)",
    "data_path": "the .npz file for --dataset npz, or an Imagewoof folder",
    "device": "auto, cpu or cuda[:N]",
    "download": "fetch a missing CIFAR-10/100 or Imagewoof into --data-root (the default; "
                "--no-download turns it off)",
    "checkpoint_interval_s": "seconds of training between checkpoints (default 30; 0: every "
                             "epoch); the last epoch always writes one",
}


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
    net = "resnet" if cfg.shortcut == "all" else "repvgg" if cfg.block == "repvgg" else "plain"
    return Path("runs") / f"{cfg.method}-{cfg.dataset}-{net}{cfg.depth}-w{cfg.width}-s{cfg.seed}"


# Flags that may go with --resume: the run continues with the config it saved.
RESUME_FLAGS = ("--out", "--quiet", "--no-test")


def accuracy(value: Any) -> str:
    """An accuracy to 4 places, or "none" where there is none (an empty split: NaN)."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "none"
    return f"{value:.4f}"


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    eta = f"  eta {metrics['eta']:.3f}" if metrics["eta"] == metrics["eta"] else ""
    return (f"epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  "
            f"train_acc {metrics['train_acc']:.4f}  val_acc {accuracy(metrics['val_acc'])}  "
            f"lr {metrics['lr']:.4g}{eta}  {metrics['epoch_time']:.1f}s  "
            f"{metrics['images_per_s']:,.0f} img/s")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one stderr line (the default format adds the source line)."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr if file is None else file, flush=True)


def _resume_conflicts(argv: list[str] | None) -> list[str]:
    """The flags given with --resume that it would ignore, as the user spelled them."""
    given = sys.argv[1:] if argv is None else argv
    flags = [a.split("=", 1)[0] for a in given if a.startswith("--")]
    return [f for f in flags if f != "--resume" and not any(
        # argparse takes unambiguous prefixes (--qu for --quiet), so must this
        r.startswith(f) for r in RESUME_FLAGS)]


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_file, out = args.pop("config", None), args.pop("out", None)
    resume, quiet, no_test = args.pop("resume"), args.pop("quiet"), args.pop("no_test")
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run(argv, config_file, out, resume, quiet, no_test, args)


def _run(argv: list[str] | None, config_file: str | None, out: str | None, resume: bool,
         quiet: bool, no_test: bool, args: dict[str, Any]) -> int:
    try:
        if out is not None:
            # Before any look inside it: a name the system refuses (too long, a loop of links)
            # is one line here, not a traceback from the first stat().
            check_output_dir(out, what="run folder (--out)",
                             fix="pass --out a folder that can be created and written")
        if resume:
            if config_file is not None or args:
                extra = _resume_conflicts(argv) or ["--config" if config_file else "a flag"]
                raise UserError(f"--resume continues the run with its saved config, so "
                                f"{', '.join(extra)} would be ignored; drop "
                                f"{'them' if len(extra) > 1 else 'it'} (only "
                                f"{', '.join(RESUME_FLAGS)} go with --resume), or start a new "
                                "run with --out NEW_DIR")
            if out is None:
                raise UserError("--resume needs --out DIR: the run directory to continue")
            ckpt = Path(out) / CHECKPOINT_NAME
            if not ckpt.exists() and not ckpt.with_name(CHECKPOINT_NAME + ".prev").exists():
                raise UserError(f"no checkpoint to resume in {out}; start the run without "
                                "--resume")
            cfg = RunConfig.from_yaml(Path(out) / "config.yaml")
        else:
            values = RunConfig.from_yaml(config_file).to_dict() if config_file else {}
            # A file's block and dirac agree; a flag that sets one of them decides the convs.
            if "block" in args and "dirac" not in args:
                values.pop("dirac", None)
            if "dirac" in args and "block" not in args and \
                    args["dirac"] != (values.get("block") == "dirac"):
                values.pop("block", None)
            cfg = RunConfig.from_dict({**values, **args}, source="flags")
        run_dir = Path(out) if out else default_run_dir(cfg)
        if not resume and ((run_dir / CHECKPOINT_NAME).exists() or (run_dir / MODEL_NAME).exists()):
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it, "
                            "or --out NEW_DIR for a new one")
        # Before any work: a run that cannot write its results must not train first.
        check_output_dir(run_dir, what="run folder (--out)",
                         fix="pass --out a folder that can be created and written")
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
        return refuse(err)
    except DivergedError as err:
        refuse(err)
        return 1
    except KeyboardInterrupt:
        where = f" --out {out}" if out else ""
        print(f"\ninterrupted; continue with `python -m tuning.train --resume{where}`",
              file=sys.stderr)
        return 130
    # No validation split leaves every val_acc NaN: then there is no best one either.
    best = final["best_val_acc"] if math.isfinite(final["last_val_acc"]) else None
    test = f", test_acc {accuracy(final['test_acc'])}" if "test_acc" in final else ""
    print(f"done: best val_acc {accuracy(best)} (last {accuracy(final['last_val_acc'])})"
          f"{test}; train {final['train_time']:.1f}s, eval {final['eval_time']:.1f}s, "
          f"{final.get('images_per_s', 0):,.0f} img/s -> {run_dir / MODEL_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
