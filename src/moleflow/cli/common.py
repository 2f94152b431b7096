"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..config import Config
from ..errors import MoleflowError

if TYPE_CHECKING:
    from ..continual import ContinualRequest
    from ..parallel import Parallel


def add_config_options(p: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    from ..config import PRESETS

    g = p.add_argument_group("model configuration")
    g.add_argument("--preset", default=default_preset,
                   help=f"named preset: {', '.join(PRESETS)} (default {default_preset})")
    g.add_argument("--config", type=Path, help="a YAML config file (as written to RUN_DIR/config.yaml); overrides the preset")
    g.add_argument("--backbone", help="backbone name: tf_efficientnet_lite0 (offline), wide_resnet50_2, vit_base_patch16_224")
    g.add_argument("--backbone-weights", help="local weights file for the backbone (else MOLEFLOW_WEIGHTS_<NAME> or a download)")
    g.add_argument("--embed-dim", type=int, help="feature dimension D (768 in the paper)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.epochs=20 --set model.lora_rank=16 "
                        "(`moleflow config` prints every key)")


def add_data_options(p: argparse.ArgumentParser) -> None:
    """--data, --dataset, --classes and --scenario: which classes a continual run learns, in which steps."""
    from ..data.datasets import DATASETS

    p.add_argument("--data", type=Path, required=True, help="dataset root")
    p.add_argument("--dataset", default="folder", choices=DATASETS,
                   help="layout: mvtec/mpdd/folder (MVTec AD folders) or visa (split_csv/1cls.csv); default folder")
    p.add_argument("--classes", nargs="+", help="classes in learning order (default: the dataset's order)")
    p.add_argument("--scenario", default="1-1",
                   help="a-b: the first step learns a classes, each later step the next b (default 1-1); every "
                        "class keeps its own expert and prototype unless model.experts=task")


def class_sequence(args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    """The classes of `add_data_options` (--classes, default every class of the dataset in its order) and
    their learning steps (--scenario)."""
    from ..continual import parse_scenario
    from ..data.datasets import default_classes

    classes = args.classes or default_classes(args.dataset, args.data)
    if not classes:
        raise MoleflowError(f"{args.data}: no classes found (a class is a folder with train/good inside)")
    return classes, parse_scenario(args.scenario, classes)


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--workers", type=int, default=0, help="image-loading worker processes for learning and evaluation (default 0: "
                                                      "load in this process)")
    g.add_argument("--batch-size", type=int, default=32, help="inference batch size (default 32)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    """Experts of products learned after the shared flow is frozen, trained at the same time on Ray."""
    g = p.add_argument_group("parallel experts (Ray; pip install 'moleflow[ray]')")
    g.add_argument("--parallel", type=int, metavar="N",
                   help="train up to N new experts at the same time as Ray tasks (products after the first step; "
                        "bit-identical to serial learning with --threads equal to --cpus-per-expert)")
    g.add_argument("--ray-address", metavar="ADDRESS",
                   help="a running Ray cluster (ray://HEAD:10001 or HEAD:6379); default: start a local Ray")
    g.add_argument("--cpus-per-expert", type=int, default=1, help="CPUs (and torch threads) per expert (default 1)")
    g.add_argument("--gpus-per-expert", type=float, default=0.0,
                   help="GPUs per expert (e.g. 0.25 shares a GPU between 4; default 0: train on CPUs)")


def parallel_spec(args: argparse.Namespace) -> "Parallel | None":
    """The `--parallel` options as a parallel.Parallel, or None when not asked for."""
    from ..parallel import Parallel

    if getattr(args, "parallel", None) is None:
        if getattr(args, "ray_address", None) and getattr(args, "parallel_trials", None) is None:
            raise MoleflowError("--ray-address needs --parallel N (how many experts to train at once)")
        return None
    return Parallel(args.parallel, args.ray_address, args.cpus_per_expert, args.gpus_per_expert)


def parse_rate(text: str) -> float:
    """A false-alarm rate for argparse: 0.01 or 1%."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate; write 0.01 or 1%") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a false-alarm rate must be between 0 and 1 (0.01 = 1%)")
    return value


def parse_rates(items: list[str] | None) -> tuple[float | None, dict[str, float]]:
    """`--false-alarm-rate` values: one default rate and/or PRODUCT=RATE pairs -> (default, per product)."""
    default, per_product = None, {}
    for item in items or []:
        if "=" in item:
            name, value = item.split("=", 1)
            per_product[name.strip()] = parse_rate(value.strip())
        else:
            default = parse_rate(item)
    return default, per_product


def add_rate_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--false-alarm-rate", nargs="+", metavar="RATE|PRODUCT=RATE",
                   help="false-alarm rate the decision threshold guarantees, for every product and/or per product "
                        "(e.g. 0.01 cubes=0.05); default score.false_alarm_rate")


def add_lock_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="if another moleflow process is changing the run, wait up to this long (default: stop)")


def add_edit_options(p: argparse.ArgumentParser) -> None:
    """The run folder and options of a command that edits one learned product of a saved run."""
    p.add_argument("run_dir", type=Path)
    p.add_argument("name", help="task name (see `moleflow tasks`)")
    p.add_argument("--backbone-weights", help="backbone weights file, if the run's is not found here")
    add_lock_option(p)


def edit_run(args: argparse.Namespace, change: Callable[[Any], Any]) -> Any:
    """Load the run of `args` under its lock, apply `change(model)`, save it; return what `change` returned."""
    from ..detector import MoleFlow
    from ..store import run_lock

    with run_lock(args.run_dir, args.wait):
        model = MoleFlow.load(args.run_dir, backbone_weights=args.backbone_weights)
        out = change(model)
        model.save(args.run_dir)
    return out


def apply_runtime(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def build_config(args: argparse.Namespace) -> Config:
    """Preset (or config file), then the named options, then --set overrides."""
    if args.config:
        import yaml

        try:
            data = yaml.safe_load(Path(args.config).read_text())
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())
            raise MoleflowError(f"{args.config}: cannot read the config file ({reason})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            what = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise MoleflowError(f"{args.config}: not a valid YAML file ({where}{what})") from None
        if not isinstance(data, dict):
            raise MoleflowError(f"{args.config}: a config file must be a YAML mapping of sections "
                                f"(as written to RUN_DIR/config.yaml), got {type(data).__name__}")
        try:
            cfg = Config.from_dict(data)
        except MoleflowError as exc:
            raise MoleflowError(f"{args.config}: {exc}") from None
    else:
        cfg = Config.from_preset(args.preset)
    named: dict[str, Any] = {}
    if args.backbone:
        named["backbone.name"] = args.backbone
    if args.backbone_weights:
        named["backbone.weights"] = args.backbone_weights
    if args.embed_dim:
        named["backbone.embed_dim"] = args.embed_dim
    if named:
        cfg = cfg.with_overrides(named)
    return cfg.with_overrides(args.overrides)


def continual_request(args: argparse.Namespace, cfg: Config, tasks: list[list[str]], run_dir: Path,
                      report: bool) -> "ContinualRequest":
    """The continual run the options of `args` ask for (--data/--dataset/--scenario, --overwrite/--resume,
    --false-alarm-rate PRODUCT=RATE, --discover, --parallel, runtime options) with `cfg` into `run_dir`."""
    from ..continual import ContinualRequest, DataSource

    existing = ("overwrite" if getattr(args, "overwrite", False) else
                "resume" if getattr(args, "resume", False) else "refuse")
    return ContinualRequest(cfg, DataSource(Path(args.data), args.dataset), tasks, run_dir, scenario=args.scenario,
                            existing=existing, rates=parse_rates(getattr(args, "false_alarm_rate", None))[1],
                            discover=getattr(args, "discover", None), parallel=parallel_spec(args), report=report,
                            device=args.device, workers=args.workers, batch_size=args.batch_size,
                            progress=not args.no_progress)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _shares(shares: dict[str, float], leave_out: str | None = None) -> str:
    """"a 91%, b 9%": products by share, largest first, `leave_out` left out."""
    return ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda x: -x[1]) if k != leave_out)


def describe_confusability(name: str, confusability: dict[str, Any]) -> str:
    """One line: where product `name`'s held-out normals were routed when it was learned, good and with a pasted
    defect (`TaskInfo.confusability`); empty when nothing was measured."""
    parts = []
    for case, label in (("good", "good"), ("defect", "with a 10 % pasted defect")):
        shares = confusability.get(case)
        if not shares:
            continue
        others = _shares(shares, name)
        ambiguous = confusability.get("ambiguous", {}).get(case, 0.0)
        parts.append(f"{label}: {shares.get(name, 0.0):.0%} to itself" + (f" ({others})" if others else "")
                     + (f", {ambiguous:.0%} ambiguous" if ambiguous else ""))
    draws = confusability.get("draws") or {}
    drawn = f"draws held-out good parts of {_shares(draws)}" if draws else ""
    if not parts:
        return f"{name}: {drawn}" if drawn else ""
    among = len(confusability.get("among", []))
    return (f"{name}: {confusability.get('n', '?')} held-out normals routed among {among} "
            f"product{'' if among == 1 else 's'}; " + "; ".join(parts + ([drawn] if drawn else [])))


def describe_routing_now(routing: dict[str, dict]) -> list[str]:
    """Lines for `router.holdout_routing`: each product whose kept held-out good parts do not all route to it
    now, or one line saying they all do; empty when no product kept them."""
    if not routing:
        return []
    astray = {name: r for name, r in routing.items() if r["routed"].get(name, 0.0) < 1.0}
    if not astray:
        return [f"routing now: the held-out good parts of all {len(routing)} products that kept them route to their "
                "own product"]
    lines = []
    for name, r in astray.items():
        lines.append(f"routing now: {name}: {r['routed'].get(name, 0.0):.0%} of its {r['n']} held-out good parts "
                     f"to itself ({_shares(r['routed'], name)})" + (f", {r['ambiguous']:.0%} ambiguous" if r["ambiguous"] else ""))
    return lines


def command_parser(sub, name: str, help_text: str, epilog: str, description: str | None = None
                   ) -> argparse.ArgumentParser:
    """A (sub)command's parser: its one-line help, an optional description, and its examples shown as written."""
    return sub.add_parser(name, help=help_text, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
